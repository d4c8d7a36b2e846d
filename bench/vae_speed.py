"""VAE encode / decode seconds per call, two ways: an earlier revision of the module vs the current one (same
process), or glibc's default heap vs heap reuse (engine/allocator.py; paired processes).

    python -m diffgentor.bench.vae_speed --before 7d805fa            # bench/results/cpu-vae-speed.json
    python -m diffgentor.bench.vae_speed --compare-allocator         # bench/results/cpu-vae-allocator.json

The module of revision REV (engine/models/hunyuan_image_3/vae.py, loaded from git under a private name) and the
current one get the same random weights (the tiny checkpoint's VAE config unless --channels says otherwise) and
the same inputs: a condition image at the 1024x768 bucket (the size a 4:3 edit input maps to) for encode, its
64x48 latent and a batch of four 256x256 latents for decode. The two alternate within each repeat; the JSON
holds the median seconds, the speedup and the largest difference between the two outputs.

With --compare-allocator the current module runs in two fresh processes per pair (the heap policy is process-wide
and cannot be undone), one with glibc's defaults and one with heap reuse, the order alternating between pairs; each
reports per case the median seconds, the minor page faults and system / user CPU seconds per call, and a hash of the
output (equal hashes: bit-identical results).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from diffgentor.engine.allocator import configure_heap
from diffgentor.engine.config import DEFAULT_HEAP_REUSE_BYTES, _size_arg
from diffgentor.engine.models.hunyuan_image_3.vae import AutoencoderKLConv3D

VAE_PATH = "engine/models/hunyuan_image_3/vae.py"


def load_vae_at(rev: str) -> ModuleType:
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:{VAE_PATH}"], cwd=root, check=True, capture_output=True,
                         text=True).stdout
    name = "diffgentor.engine.models.hunyuan_image_3._vae_before"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    mod.__package__ = "diffgentor.engine.models.hunyuan_image_3"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:{VAE_PATH}", "exec"), mod.__dict__)
    return mod


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _vae_config(channels: list[int]) -> dict:
    return {"block_out_channels": channels, "latent_channels": 16, "layers_per_block": 1, "ffactor_spatial": 16,
            "ffactor_temporal": 4}


def _seeded_vae(cfg: dict) -> AutoencoderKLConv3D:
    torch.manual_seed(0)
    vae = AutoencoderKLConv3D(cfg).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.05)
    return vae


def _cases() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "encode_1024x768": (lambda m, x: m.encode(x).mean, torch.rand(1, 3, 1024, 768, generator=g) * 2 - 1),
        "decode_1024x768": (lambda m, z: m.decode(z), torch.randn(1, 16, 64, 48, generator=g)),
        "decode_4x256x256": (lambda m, z: m.decode(z), torch.randn(4, 16, 16, 16, generator=g)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--before", metavar="REV", help="git revision of the baseline vae.py")
    mode.add_argument("--compare-allocator", action="store_true",
                      help="glibc's default heap vs heap reuse, in paired fresh processes")
    mode.add_argument("--allocator-side", choices=ALLOCATOR_SIDES, help=argparse.SUPPRESS)  # one side's process
    ap.add_argument("--channels", type=int, nargs="*", default=[32] * 5, help="block_out_channels")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2, help="with --compare-allocator: process pairs (default 2)")
    ap.add_argument("--heap-reuse-memory", type=_size_arg, default=DEFAULT_HEAP_REUSE_BYTES, metavar="SIZE",
                    help="with --compare-allocator: the heap-reuse side's ceiling (default 4GiB)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.allocator_side:
        return allocator_side(args)
    if args.compare_allocator:
        return compare_allocator(args)
    cfg = _vae_config(args.channels)
    after = _seeded_vae(cfg)
    before = load_vae_at(args.before).AutoencoderKLConv3D(cfg).eval()
    before.load_state_dict(after.state_dict(), strict=True)
    cases = _cases()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "cpu-vae-speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for case, (fn, x) in cases.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        outs = {}
        for i in range(args.repeat + 1):
            for label, mod in (("before", before), ("after", after)):
                t0 = time.perf_counter()
                with torch.no_grad():
                    outs[label] = fn(mod, x)
                if i:  # round 0 is warmup
                    times[label].append(time.perf_counter() - t0)
        b, a = _median(times["before"]), _median(times["after"])
        diff = float((outs["before"] - outs["after"]).abs().max())
        rows.append({"case": case, "before_s": b, "after_s": a, "speedup": b / a, "max_abs_diff": diff,
                     "before_all_s": times["before"], "after_all_s": times["after"]})
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({  # after every case: a long run that is cut short keeps what it measured
            "what": f"VAE seconds per call: {VAE_PATH} at git {args.before} (before) vs this tree (after), same "
                    "weights and inputs, same process, alternating, median over repeats after one warmup round",
            "config": cfg, "threads": torch.get_num_threads(), "torch": torch.__version__, "repeat": args.repeat,
            "rows": rows,
        }, indent=1))
    print(f"wrote {out}")
    return 0


ALLOCATOR_SIDES = ("glibc_default", "heap_reuse")


def allocator_side(args: argparse.Namespace) -> int:
    """One process of the allocator A/B: set the heap policy first, then one warm-up and `--repeat` timed calls per
    case; per call the seconds, minor page faults and system / user CPU seconds (getrusage), and the output's hash."""
    if args.allocator_side == "heap_reuse" and not configure_heap(args.heap_reuse_memory):
        print("vae_speed: heap reuse needs Linux glibc", file=sys.stderr)
        return 1
    vae = _seeded_vae(_vae_config(args.channels))
    rows = {}
    for case, (fn, x) in _cases().items():
        calls = []
        for i in range(args.repeat + 1):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            with torch.no_grad():
                y = fn(vae, x)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            if i:  # call 0 is the warm-up
                calls.append({"s": t1 - t0, "minor_faults": r1.ru_minflt - r0.ru_minflt,
                              "system_s": r1.ru_stime - r0.ru_stime, "user_s": r1.ru_utime - r0.ru_utime})
        rows[case] = {"calls": calls, "sha256": hashlib.sha256(y.contiguous().numpy().tobytes()).hexdigest()}
    Path(args.out).write_text(json.dumps(rows))
    return 0


def compare_allocator(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "cpu-vae-allocator.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sides: dict[str, list[dict]] = {side: [] for side in ALLOCATOR_SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for side in ALLOCATOR_SIDES if pair % 2 == 0 else ALLOCATOR_SIDES[::-1]:
                path = Path(tmp) / f"{side}-{pair}.json"
                cmd = [sys.executable, "-m", "diffgentor.bench.vae_speed", "--allocator-side", side, "--repeat",
                       str(args.repeat), "--heap-reuse-memory", str(args.heap_reuse_memory), "--out", str(path),
                       "--channels", *map(str, args.channels)]
                if subprocess.run(cmd).returncode:
                    return 1
                sides[side].append(json.loads(path.read_text()))
    rows = []
    for case in sides["glibc_default"][0]:
        per = {side: [c for run in runs for c in run[case]["calls"]] for side, runs in sides.items()}
        med = {side: {k: _median([c[k] for c in calls]) for k in ("s", "minor_faults", "system_s", "user_s")}
               for side, calls in per.items()}
        hashes = {run[case]["sha256"] for runs in sides.values() for run in runs}
        rows.append({"case": case, **{f"{side}_{k}": v for side, m in med.items() for k, v in m.items()},
                     "speedup": med["glibc_default"]["s"] / med["heap_reuse"]["s"], "identical": len(hashes) == 1,
                     "calls": per})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "calls"}), flush=True)
    out.write_text(json.dumps({
        "what": "VAE seconds, minor page faults and system / user CPU seconds per call (medians) with glibc's default "
                f"heap and with heap reuse (engine/allocator.py, ceiling {args.heap_reuse_memory} bytes), one fresh "
                "process per side and pair, alternating; identical = every process's output hashes agree",
        "config": _vae_config(args.channels), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "repeat": args.repeat, "pairs": args.pairs, "rows": rows,
    }, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
