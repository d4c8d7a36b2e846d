"""A/B of two commits of this engine on one workload, in one run: `python -m diffgentor.bench.ab_commits`.

`diffgentor bench offline` measures the engine it is part of; to compare against an earlier commit (whose
harness may lack today's flags), each side runs a small driver that only uses the offline API every commit has
(`Engine.from_pretrained`, `Engine.generate`, `RequestResult.timings`, `core.stats`), in a subprocess whose
`diffgentor` package is that commit's tree (a `git worktree` for the base). `--engine-args` and
`--head-engine-args` (JSON objects of `Engine.from_pretrained` keywords) set both sides and the head only: with
`--base HEAD` one tree A/Bs two settings. Sides alternate (base, head, base, head, ...) so a change in the machine's
load hits both alike; the JSON keeps every run, the means and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
import diffgentor
from diffgentor.engine.offline import Engine

model, workload, mns = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
reqs = []
for i, line in enumerate(workload.read_text().splitlines()):
    if line.strip():
        r = json.loads(line)
        r["images"] = [(workload.parent / p).read_bytes() for p in r.get("images", [])]
        r["request_id"] = f"w{i}"
        reqs.append(r)
kw = dict(device="cpu", dtype="float32", max_num_seqs=mns, num_kv_blocks=4096, max_num_batched_tokens=8192)
kw.update(json.loads(sys.argv[5]))
eng = Engine.from_pretrained(model, environ={}, **kw)
warm = [dict(r, request_id="warm" + r["request_id"], seed=r.get("seed", 0) + 999, max_new_tokens=2,
             num_inference_steps=1) for r in reqs[:2]]
eng.generate(warm)
eng = Engine.from_pretrained(model, environ={}, **kw)  # fresh caches: nothing carries over from the warm-up
t0 = time.perf_counter()
results = eng.generate(reqs)
wall = time.perf_counter() - t0
s = eng.core.stats
stats = {k: getattr(s, k) for k in ("steps", "schedule_s", "execute_s", "update_s", "forward_s", "post_s",
                                       "vae_s", "encode_s", "phase_forward_s", "phase_tokens") if hasattr(s, k)}
out = dict(package=str(Path(diffgentor.__file__).parent), wall_s=wall,
           images=sum(r.error is None and r.finish_reason == "image" for r in results),
           errors=[r.error for r in results if r.error],
           requests=[dict(kind="edit" if q["images"] else "t2i", first_token_s=r.timings.get("first_token"),
                          total_s=r.timings.get("total")) for q, r in zip(reqs, results)],
           stats=stats)
print("AB-RESULT " + json.dumps(out))
'''


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _package_root(tree: Path, tmp: Path, name: str) -> Path:
    """A folder whose `diffgentor` is `tree` (the repo root IS the package, see pyproject's package-dir)."""
    root = tmp / name
    root.mkdir()
    (root / "diffgentor").symlink_to(tree)
    return root


@contextmanager
def side_roots(base: str):
    """{"base": ..., "head": ...} package roots: the base commit checked out in a temporary git worktree, and this
    tree; the worktree is removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        wt = tmp / "base-tree"
        _git("worktree", "add", "--detach", str(wt), base)
        try:
            yield {"base": _package_root(wt, tmp, "base"), "head": _package_root(REPO, tmp, "head")}
        finally:
            _git("worktree", "remove", "--force", str(wt))


def _run(pkg_root: Path, model: str, workload: str, mns: int, threads: int, engine_args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pkg_root))
    proc = subprocess.run([sys.executable, "-c", DRIVER, model, workload, str(mns), str(threads),
                           json.dumps(engine_args)], env=env,
                          capture_output=True, text=True, cwd=pkg_root)
    for line in proc.stdout.splitlines():
        if line.startswith("AB-RESULT "):
            res = json.loads(line[len("AB-RESULT "):])
            if Path(res["package"]).resolve() != (pkg_root / "diffgentor").resolve():
                raise RuntimeError(f"the driver imported {res['package']}, not {pkg_root / 'diffgentor'}")
            return res
    raise RuntimeError(f"driver failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def _summary(runs: list[dict]) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.fmean(xs) if xs else None

    ipm = [60.0 * r["images"] / r["wall_s"] for r in runs]
    def by_kind(kind: str, key: str) -> list[float]:
        return [q[key] for r in runs for q in r["requests"] if q["kind"] == kind]

    t2i_first, edit_first = by_kind("t2i", "first_token_s"), by_kind("edit", "first_token_s")
    keys = ("encode_s", "forward_s", "post_s", "vae_s", "schedule_s", "update_s")
    split = {k: mean([r["stats"].get(k) for r in runs]) for k in keys if any(k in r["stats"] for r in runs)}
    return dict(images_per_min=mean(ipm), images_per_min_runs=ipm,
                images_per_min_stdev=statistics.stdev(ipm) if len(ipm) > 1 else 0.0,
                wall_s=mean([r["wall_s"] for r in runs]), t2i_first_token_s=mean(t2i_first),
                t2i_first_token_max_s=max(t2i_first) if t2i_first else None, edit_first_token_s=mean(edit_first),
                t2i_e2e_s=mean(by_kind("t2i", "total_s")), edit_e2e_s=mean(by_kind("edit", "total_s")),
                steps=mean([r["stats"].get("steps") for r in runs]), split_s=split)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffgentor.bench.ab_commits", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--workload", required=True, help="JSONL workload (bench/README.md)")
    ap.add_argument("--max-num-seqs", type=int, nargs="+", default=[16])
    ap.add_argument("--repeat", type=int, default=2, help="runs per side and max_num_seqs, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-args", type=json.loads, default={}, metavar="JSON",
                    help='Engine.from_pretrained keywords for both sides, e.g. \'{"max_step_ms": 200}\'')
    ap.add_argument("--head-engine-args", type=json.loads, default={}, metavar="JSON",
                    help="keywords for the head side only (on top of --engine-args)")
    ap.add_argument("--save-result", required=True)
    args = ap.parse_args(argv)
    side_args = {"base": dict(args.engine_args), "head": {**args.engine_args, **args.head_engine_args}}
    base = _git("rev-parse", args.base)
    head = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    out: dict = dict(base=base, head=head, head_dirty=bool(dirty), model=args.model, workload=args.workload,
                     threads=args.threads, engine_args=side_args, loadavg_before=os.getloadavg(),
                     started=time.strftime("%Y-%m-%d %H:%M:%S"),
                     cpu=_cpu_model(), results={})
    with side_roots(base) as roots:
        workload = str(Path(args.workload).resolve())
        for mns in args.max_num_seqs:
            runs: dict[str, list[dict]] = {"base": [], "head": []}
            for i in range(args.repeat):
                for side in ("base", "head"):
                    res = _run(roots[side], args.model, workload, mns, args.threads, side_args[side])
                    runs[side].append(res)
                    print(f"mns={mns} run {i} {side}: {60 * res['images'] / res['wall_s']:.1f} images/min "
                          f"({res['wall_s']:.1f} s)", flush=True)
            summ = {side: _summary(r) for side, r in runs.items()}
            summ["ratio_images_per_min"] = summ["head"]["images_per_min"] / summ["base"]["images_per_min"]
            out["results"][f"mns{mns}"] = dict(summary=summ, runs=runs)
    out["loadavg_after"] = os.getloadavg()
    Path(args.save_result).write_text(json.dumps(out, indent=1))
    for k, v in out["results"].items():
        s = v["summary"]
        print(f"{k}: base {s['base']['images_per_min']:.1f} -> head {s['head']['images_per_min']:.1f} images/min "
              f"(x{s['ratio_images_per_min']:.3f}); t2i first think token {_s(s['base']['t2i_first_token_s'])} -> "
              f"{_s(s['head']['t2i_first_token_s'])}; mean end-to-end t2i {_s(s['base']['t2i_e2e_s'])} -> "
              f"{_s(s['head']['t2i_e2e_s'])}, edits {_s(s['base']['edit_e2e_s'])} -> {_s(s['head']['edit_e2e_s'])}")
    return 0


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
