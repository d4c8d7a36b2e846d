"""VAE encode / decode seconds per call: an earlier revision of the module vs the current one, same process.

    python -m diffgentor.bench.vae_speed --before 7d805fa            # bench/results/cpu-vae-speed.json

The module of revision REV (engine/models/hunyuan_image_3/vae.py, loaded from git under a private name) and the
current one get the same random weights (the tiny checkpoint's VAE config unless --channels says otherwise) and
the same inputs: a condition image at the 1024x768 bucket (the size a 4:3 edit input maps to) for encode, its
64x48 latent and a batch of four 256x256 latents for decode. The two alternate within each repeat; the JSON
holds the median seconds, the speedup and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, metavar="REV", help="git revision of the baseline vae.py")
    ap.add_argument("--channels", type=int, nargs="*", default=[32] * 5, help="block_out_channels")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = {"block_out_channels": args.channels, "latent_channels": 16, "layers_per_block": 1,
           "ffactor_spatial": 16, "ffactor_temporal": 4}
    after = AutoencoderKLConv3D(cfg).eval()
    with torch.no_grad():
        for p in after.parameters():
            p.normal_(0.0, 0.05)
    before = load_vae_at(args.before).AutoencoderKLConv3D(cfg).eval()
    before.load_state_dict(after.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    cases = {
        "encode_1024x768": (lambda m, x: m.encode(x).mean, torch.rand(1, 3, 1024, 768, generator=g) * 2 - 1),
        "decode_1024x768": (lambda m, z: m.decode(z), torch.randn(1, 16, 64, 48, generator=g)),
        "decode_4x256x256": (lambda m, z: m.decode(z), torch.randn(4, 16, 16, 16, generator=g)),
    }
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


if __name__ == "__main__":
    raise SystemExit(main())
