"""Peak resident memory per tensor-parallel rank vs the single-process engine (bench/README.md).

    python -m diffgentor.bench.tp_memory --out bench/results/cpu-tp-memory.json

Writes two random checkpoints (the tiny-model writer): the default tiny Distil model, whose runs are the runtime
baseline (torch, tokenizer, tiny VAE / ViT, gloo, KV cache: everything but big weights), and a widened one whose
fp32 weights (~1.3 GB) dominate. Every measurement runs in a FRESH subprocess, so each VmHWM starts clean:

- engine: `Engine.from_pretrained(ckpt, device="cpu", dtype="float32", num_kv_blocks=64)` at size 1, at
  tensor_parallel_size 2, and at size 2 with expert parallel; one request (bot_task "image", 256x256, one step,
  output_type "latent"); then VmHWM of the process (/proc/self/status) and of every rank (`rank_vm_hwm_kb`, which
  the ranks report after each step);
- load: only `HunyuanImage3ForCausalMM.from_pretrained(ckpt, parallel=ParallelContext(size, rank))` (a rank's
  shard load needs no process group), RssAnon before / after, VmHWM, and RssAnon after glibc `malloc_trim(0)`:
  the resident weight bytes without the engine around them.

Both sets run twice: with the default glibc allocator, and with MALLOC_MMAP_THRESHOLD_=131072 (a fixed threshold:
every allocation over 128 KiB is its own mmap and goes back to the kernel when freed, so freed temporaries are not
kept resident by the heap). VmHWM is the kernel's peak of VmRSS = anonymous + file-backed (the safetensors memory
map) + shmem pages; this process also samples /proc/<pid>/status of each measured process and its children every
--sample-ms and keeps the maxima of RssAnon / RssFile (sampled: short spikes can be missed, VmHWM cannot).
Parameter bytes per rank are exact (the module built on the meta device with each rank's `ParallelContext`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WIDE_OVERRIDES: dict[str, Any] = dict(
    num_hidden_layers=6, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, attention_head_dim=64,
    num_experts=16, moe_topk=2, moe_intermediate_size=1024, num_shared_expert=1, intermediate_size=1024,
)
"""6 layers, hidden 1024, 16 q / 4 KV heads of 64, 16 experts top-2 of width 1024 + 1 shared expert: ~1.3 GB fp32
of which ~90% are routed experts; the tiny VAE / ViT stay as in the tiny model (a few MB)."""

ENGINE_ARGS: dict[str, Any] = dict(device="cpu", dtype="float32", num_kv_blocks=64, max_num_seqs=1)
REQUEST: dict[str, Any] = dict(request_id="mem", prompt="a red cube on a wooden table", bot_task="image",
                               image_size="256x256", num_inference_steps=1, output_type="latent", seed=1)
MiB = 1024 * 1024


# --------------------------------------------------------------------------------------------- /proc readers
def _status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile / RssShmem of a process in kB ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def _children(root: int) -> set[int]:
    """Every descendant of `root` (scans /proc: the kernel here has no task/*/children)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


class TreeSampler:
    """Samples the status of a process and its descendants; keeps each pid's maxima (kB)."""

    def __init__(self, root: int, interval_s: float) -> None:
        self.root, self.interval_s = root, interval_s
        self.peaks: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pids, last_scan = {self.root}, 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan > 0.5:  # new ranks appear only at startup
                pids |= _children(self.root)
                last_scan = now
            for pid in list(pids):
                st = _status(pid)
                peak = self.peaks.setdefault(pid, {})
                for k, v in st.items():
                    peak[k] = max(peak.get(k, 0), v)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[int, dict[str, int]]:
        self._stop.set()
        self._thread.join()
        return self.peaks


# --------------------------------------------------------------------------------------------- child commands
MALLOC_VARIANTS: dict[str, dict[str, str]] = {
    "glibc_default": {}, "mmap_threshold_128k": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


WIDE_SHARD_BYTES = 48 << 20  # ~3.5% of the widened model per shard, like a real checkpoint's 5 GB of 166 GB


def _child_make(ckpt: str, wide: bool) -> None:
    from diffgentor.engine.testing.tiny_model import make_tiny

    make_tiny(ckpt, distil=True, config_overrides=WIDE_OVERRIDES if wide else None,
              shard_bytes=WIDE_SHARD_BYTES if wide else None)


def _child_engine(ckpt: str, tp: int, ep: bool) -> dict[str, Any]:
    import torch

    from diffgentor.engine.offline import Engine
    from diffgentor.engine.os_process import vm_hwm_kb

    torch.manual_seed(0)
    t0 = time.monotonic()
    kw: dict[str, Any] = dict(ENGINE_ARGS)
    if tp > 1:
        kw.update(tensor_parallel_size=tp, expert_parallel=ep)
    with Engine.from_pretrained(ckpt, environ={}, **kw) as eng:
        t_load = time.monotonic() - t0
        (res,) = eng.generate([REQUEST])
        if res.error is not None:
            raise RuntimeError(f"request failed: {res.error}")
        out = dict(load_s=round(t_load, 2), total_s=round(time.monotonic() - t0, 2), num_kv_blocks=eng.core.num_blocks,
                   frontend_pid=os.getpid(), frontend_vm_hwm_kb=vm_hwm_kb(), frontend_status_kb=_status(os.getpid()))
        if tp > 1:
            ex = eng.core.executor  # the multiprocess executor holds the ranks
            out.update(rank_pids=list(ex.rank_pids), rank_vm_hwm_kb=list(ex.rank_vm_hwm_kb),
                       rank_status_kb=[_status(p) for p in ex.rank_pids])
    return out


def _child_load(ckpt: str, tp: int, rank: int, ep: bool) -> dict[str, Any]:
    import torch

    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
    from diffgentor.engine.parallel import ParallelContext

    before = _status(os.getpid())
    par = ParallelContext(tp, rank, expert_parallel=ep) if tp > 1 else None
    t0 = time.monotonic()
    model = HunyuanImage3ForCausalMM.from_pretrained(ckpt, dtype=torch.float32, device="cpu", parallel=par)
    load_s = time.monotonic() - t0
    after = _status(os.getpid())
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = _status(os.getpid())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return dict(pid=os.getpid(), load_s=round(load_s, 2), before_kb=before, after_load_kb=after,
                after_malloc_trim_kb=trimmed, loaded_tensor_bytes=nbytes)


# --------------------------------------------------------------------------------------------- orchestration
def _run_child(args: list[str], sample_ms: float, timeout_s: float, env: dict[str, str] | None = None
               ) -> tuple[dict[str, Any], dict[int, dict]]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, "-m", "diffgentor.bench.tp_memory", *args, "--result-file", result_file]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    sampler = TreeSampler(proc.pid, sample_ms / 1000)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        peaks = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-4000:]}")
    out = json.loads(Path(result_file).read_text())
    os.unlink(result_file)
    return out, peaks


def _param_bytes(ckpt: Path, tp: int, ep: bool) -> list[dict[str, int]]:
    """Exact parameter / buffer bytes of each rank's module (built on the meta device with its ParallelContext)."""
    import torch

    from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
    from diffgentor.engine.parallel import ParallelContext

    cfg = HunyuanImage3Config.from_pretrained(ckpt)
    rows = []
    for r in range(tp):
        with torch.device("meta"):
            m = HunyuanImage3ForCausalMM(cfg, parallel=ParallelContext(tp, r, expert_parallel=ep) if tp > 1 else None)
        groups: dict[str, int] = {"params": 0, "buffers": 0, "routed_experts": 0, "shared_mlp": 0, "attention": 0,
                                  "vocab": 0, "other_replicated": 0}
        for name, p in m.named_parameters():
            b = p.numel() * 4  # every floating tensor loads as fp32 here (dtype float32)
            groups["params"] += b
            if ".mlp.experts." in name:
                groups["routed_experts"] += b
            elif ".mlp.shared_mlp." in name:
                groups["shared_mlp"] += b
            elif ".self_attn." in name:
                groups["attention"] += b
            elif name.endswith("wte.weight") or name.endswith("lm_head.weight"):
                groups["vocab"] += b
            else:  # norms, routers, patch embed / final layer, timestep embeddings, VAE, ViT: whole on every rank
                groups["other_replicated"] += b
        groups["buffers"] = sum(b.numel() * b.element_size() for b in m.buffers())
        rows.append(groups)
    return rows


def _mib(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _proc_summary(pid: int, hwm_kb: int, end_kb: dict[str, int], peaks: dict[int, dict]) -> dict[str, Any]:
    p = peaks.get(pid, {})
    return dict(vm_hwm_mib=_mib(hwm_kb), end_rss_anon_mib=_mib(end_kb.get("RssAnon")),
                end_rss_file_mib=_mib(end_kb.get("RssFile")), sampled_max_rss_anon_mib=_mib(p.get("RssAnon")),
                sampled_max_rss_file_mib=_mib(p.get("RssFile")), sampled_max_rss_shmem_mib=_mib(p.get("RssShmem")))


def _engine_summary(out: dict[str, Any], peaks: dict[int, dict]) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        load_s=out["load_s"], total_s=out["total_s"], num_kv_blocks=out["num_kv_blocks"],
        frontend=_proc_summary(out["frontend_pid"], out["frontend_vm_hwm_kb"], out["frontend_status_kb"], peaks))
    if "rank_pids" in out:
        row["ranks"] = [_proc_summary(pid, hwm, st, peaks)
                        for pid, hwm, st in zip(out["rank_pids"], out["rank_vm_hwm_kb"], out["rank_status_kb"])]
    return row


def _load_summary(out: dict[str, Any], peaks: dict[int, dict]) -> dict[str, Any]:
    b, a, t = out["before_kb"], out["after_load_kb"], out["after_malloc_trim_kb"]
    p = peaks.get(out["pid"], {})
    return dict(load_s=out["load_s"], loaded_tensor_mib=round(out["loaded_tensor_bytes"] / MiB, 1),
                vm_hwm_mib=_mib(a["VmHWM"]), before_rss_mib=_mib(b["VmRSS"]),
                anon_added_by_load_mib=_mib(a["RssAnon"] - b["RssAnon"]),
                anon_added_after_malloc_trim_mib=_mib(t["RssAnon"] - b["RssAnon"]),
                peak_over_start_mib=_mib(a["VmHWM"] - b["VmRSS"]),
                sampled_max_rss_file_mib=_mib(p.get("RssFile")), end_rss_file_mib=_mib(a.get("RssFile")))


def _ratio(x: float, y: float) -> float:
    return round(x / y, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/cpu-tp-memory.json")
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--keep", help="write the checkpoints here and keep them (default: a temp dir, removed)")
    # internal: the per-measurement child processes
    p.add_argument("--child", choices=["make", "make-wide", "engine", "load"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child is not None:
        if a.child == "engine":
            res = _child_engine(a.ckpt, a.tp, a.ep)
        elif a.child == "load":
            res = _child_load(a.ckpt, a.tp, a.rank, a.ep)
        else:
            _child_make(a.ckpt, a.child == "make-wide")
            res = {}
        Path(a.result_file).write_text(json.dumps(res))
        return 0

    import torch

    tmp = None if a.keep else tempfile.TemporaryDirectory(prefix="dg-tp-mem-")
    root = Path(a.keep or tmp.name)  # type: ignore[union-attr]
    tiny, wide = root / "tiny.Distil-3.0", root / "wide.Distil-3.0"
    engine_runs: dict[str, dict[str, Any]] = {v: {} for v in MALLOC_VARIANTS}
    load_runs: dict[str, dict[str, Any]] = {v: {} for v in MALLOC_VARIANTS}
    try:
        for kind, ckpt in (("make", tiny), ("make-wide", wide)):
            if not (ckpt / "model.safetensors.index.json").is_file():
                t0 = time.monotonic()
                _run_child(["--child", kind, "--ckpt", str(ckpt)], 200, a.timeout_s)
                print(f"wrote {ckpt} in {time.monotonic() - t0:.1f} s", flush=True)
        file_bytes = {c.name: sum(f.stat().st_size for f in c.glob("*.safetensors")) for c in (tiny, wide)}
        shard_bytes = sorted(f.stat().st_size for f in wide.glob("*.safetensors"))
        cfg = json.loads((wide / "config.json").read_text())
        params = {"tp1": _param_bytes(wide, 1, False), "tp2": _param_bytes(wide, 2, False),
                  "ep2": _param_bytes(wide, 2, True)}

        for variant, env in MALLOC_VARIANTS.items():
            for name, ckpt, tp, ep in (("tiny_tp1", tiny, 1, False), ("tiny_tp2", tiny, 2, False),
                                       ("wide_tp1", wide, 1, False), ("wide_tp2", wide, 2, False),
                                       ("wide_ep2", wide, 2, True)):
                args = ["--child", "engine", "--ckpt", str(ckpt), "--tp", str(tp)] + (["--ep"] if ep else [])
                out, peaks = _run_child(args, a.sample_ms, a.timeout_s, env)
                row = engine_runs[variant][name] = _engine_summary(out, peaks)
                ranks = [r["vm_hwm_mib"] for r in row.get("ranks", [])]
                print(f"[{variant}] engine {name}: frontend VmHWM {row['frontend']['vm_hwm_mib']} MiB"
                      + (f", ranks {ranks} MiB" if ranks else "") + f" ({out['total_s']} s)", flush=True)
            for name, tp, rank, ep in (("tp1", 1, 0, False), ("tp2_rank0", 2, 0, False), ("ep2_rank0", 2, 0, True),
                                       ("ep2_rank1", 2, 1, True)):
                args = ["--child", "load", "--ckpt", str(wide), "--tp", str(tp), "--rank", str(rank)]
                out, peaks = _run_child(args + (["--ep"] if ep else []), a.sample_ms, a.timeout_s, env)
                row = load_runs[variant][name] = _load_summary(out, peaks)
                print(f"[{variant}] load {name}: +{row['anon_added_by_load_mib']} MiB anon "
                      f"(+{row['anon_added_after_malloc_trim_mib']} after malloc_trim), VmHWM {row['vm_hwm_mib']} MiB",
                      flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    w_single = params["tp1"][0]["params"]
    ratios: dict[str, Any] = {}
    for variant in MALLOC_VARIANTS:
        e, ld = engine_runs[variant], load_runs[variant]
        base1 = e["tiny_tp1"]["frontend"]["vm_hwm_mib"]
        base_rank = max(r["vm_hwm_mib"] for r in e["tiny_tp2"]["ranks"])
        single = e["wide_tp1"]["frontend"]["vm_hwm_mib"]
        rows: dict[str, Any] = {}
        for mode in ("tp2", "ep2"):
            for r, rank in enumerate(e[f"wide_{mode}"]["ranks"]):
                peak = rank["vm_hwm_mib"]
                rows[f"{mode}_rank{r}"] = dict(
                    engine_peak_mib=peak, single_engine_peak_mib=single,
                    rank_peak_over_single_peak=_ratio(peak, single),
                    rank_peak_minus_baseline_over_single_minus_baseline=_ratio(peak - base_rank, single - base1),
                    param_bytes_fraction=_ratio(params[mode][r]["params"], w_single),
                )
        for name in ("tp2_rank0", "ep2_rank0", "ep2_rank1"):
            row = rows.setdefault(name, {})
            row["load_anon_fraction"] = _ratio(ld[name]["anon_added_by_load_mib"], ld["tp1"]["anon_added_by_load_mib"])
            row["load_anon_after_malloc_trim_fraction"] = _ratio(ld[name]["anon_added_after_malloc_trim_mib"],
                                                                 ld["tp1"]["anon_added_after_malloc_trim_mib"])
            row["load_peak_over_start_fraction"] = _ratio(ld[name]["peak_over_start_mib"],
                                                          ld["tp1"]["peak_over_start_mib"])
        ratios[variant] = dict(baseline_single_mib=base1, baseline_tp2_rank_mib=base_rank, per_rank=rows)

    result = dict(
        what="peak resident memory (VmHWM) per tensor-parallel rank vs the single-process engine; CPU, fp32",
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     python=platform.python_version(), note="2 cores shared with other work; memory is unaffected"),
        engine_args=ENGINE_ARGS, request=REQUEST,
        model=dict(overrides=WIDE_OVERRIDES, vocab_size=cfg["vocab_size"],
                   vae_block_out_channels=cfg["vae"]["block_out_channels"], vit_hidden=cfg["vit"]["hidden_size"]),
        checkpoint_file_bytes=file_bytes, wide_shard_file_bytes=shard_bytes,
        param_bytes=dict(note="exact, from the module built on the meta device with each rank's ParallelContext (fp32)",
                         single=params["tp1"][0], tp2_per_rank=params["tp2"], ep2_per_rank=params["ep2"]),
        malloc_variants=MALLOC_VARIANTS,
        engine=engine_runs, load_only=load_runs, ratios=ratios,
        definitions=dict(
            vm_hwm_mib="VmHWM after the request (engine) or after the load (load_only): peak VmRSS = anon + "
                       "file-backed + shmem resident pages",
            baseline="the same engine run on the default tiny Distil checkpoint (~2 MB of weights): torch + engine + "
                     "tokenizer + tiny VAE/ViT + KV cache (+ gloo in a rank); baseline_tp2_rank is the larger rank",
            rank_peak_over_single_peak="rank VmHWM / single-process VmHWM, both on the wide model",
            rank_peak_minus_baseline_over_single_minus_baseline="(rank VmHWM - tiny tp2 rank VmHWM) / "
                                                                "(wide single VmHWM - tiny single VmHWM)",
            param_bytes_fraction="the rank's parameter bytes / the single model's",
            anon_added_by_load_mib="RssAnon after from_pretrained - RssAnon before (model only, no engine)",
            anon_added_after_malloc_trim_mib="the same after glibc malloc_trim(0) (freed heap pages returned)",
            peak_over_start_mib="VmHWM after the load - VmRSS before it (includes the mapped checkpoint pages)",
            sampled_max="maximum of /proc/<pid>/status fields seen by sampling every sample_ms (may miss spikes)",
        ),
        sample_ms=a.sample_ms,
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nweights: single {w_single / MiB:.0f} MiB fp32, per rank {params['tp2'][0]['params'] / MiB:.0f} MiB "
          f"(tp2) / {params['ep2'][0]['params'] / MiB:.0f} MiB (ep2); "
          f"shard files {[b // MiB for b in shard_bytes]} MiB")
    for variant in MALLOC_VARIANTS:
        rt = ratios[variant]
        print(f"\n[{variant}] engine single VmHWM {engine_runs[variant]['wide_tp1']['frontend']['vm_hwm_mib']} MiB; "
              f"baselines: single {rt['baseline_single_mib']} MiB, tp2 rank {rt['baseline_tp2_rank_mib']} MiB")
        print(f"{'rank':<10}{'VmHWM':>8}{'peak/single':>13}{'(peak-b)/(single-b)':>21}{'params':>8}"
              f"{'load anon':>11}{'load anon trimmed':>19}")
        for name, row in rt["per_rank"].items():
            if "engine_peak_mib" not in row:
                continue
            print(f"{name:<10}{row['engine_peak_mib']:>8}{row['rank_peak_over_single_peak']:>13}"
                  f"{row['rank_peak_minus_baseline_over_single_minus_baseline']:>21}{row['param_bytes_fraction']:>8}"
                  f"{row.get('load_anon_fraction', ''):>11}{row.get('load_anon_after_malloc_trim_fraction', ''):>19}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
