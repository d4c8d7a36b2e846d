"""MoE-layer and attention micro-benchmarks at HunyuanImage-3.0 shapes, per implementation.

    python -m diffgentor.bench.kernels                     # GPU: real shapes, bench/results/<card>-kernels.json
    python -m diffgentor.bench.kernels --device cpu --small  # smoke run, bench/results/cpu-small-kernels.json

Real shapes: hidden 4096, 64 experts top-8, expert width 3072; 32 q / 8 kv heads of 128; token counts
1, 8, 64, 512, 4096, 16384. MoE: routed experts only (the shared expert is one dense MLP), random bf16 weights.
Attention: T query tokens over a 1024-token prefix plus themselves (T >= 64: the T tokens form one image
block, i.e. a diffusion step; smaller T: causal text, T = 1 is a decode). Each row reports time, TFLOP/s,
GB/s and the fraction of the card's roofline (time lower bound max(flops/peak, bytes/bandwidth) / measured).
CPU numbers are labelled "cpu" and are never written under a GPU card's name.

    python -m diffgentor.bench.kernels --device cpu --sdpa-before 7d805fa   # attention before/after

compares the torch attention backend of an earlier revision (loaded from git into this process) with the
current one on engine-step shapes (an edit prefill with a 1024x768 condition image, batched diffusion blocks,
a mixed step), alternating the two per repeat: bench/results/<card>-attention-sdpa.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from diffgentor.kernels.attention import ATTN_VARIANTS, AttentionMetadata, SequenceChunk
from diffgentor.kernels.attention_select import get_attention_backend
from diffgentor.kernels.kv_cache import PagedKVCache
from diffgentor.kernels.moe import flashinfer_moe_available, fused_experts, select_experts

# dense bf16 tensor-core peak (no sparsity) and HBM bandwidth, SXM parts (NVIDIA data sheets)
CARDS = {
    "h100": {"name": "H100 SXM", "bf16_tflops": 989.0, "hbm_gbps": 3350.0},
    "h200": {"name": "H200 SXM", "bf16_tflops": 989.0, "hbm_gbps": 4800.0},
}
TOKENS = (1, 8, 64, 512, 4096, 16384)
REAL = {"hidden": 4096, "experts": 64, "top_k": 8, "inter": 3072, "hq": 32, "hkv": 8, "head_dim": 128}
SMALL = {"hidden": 256, "experts": 16, "top_k": 4, "inter": 192, "hq": 4, "hkv": 1, "head_dim": 64}
SMALL_TOKENS = (1, 8, 64, 512)
PREFIX = 1024
PAGE = 16


def card_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in CARDS if k in name), name.replace(" ", "_"))


def timeit(fn, device: torch.device, warmup: int, repeat: int) -> float:
    """Median seconds per call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _row(kind, impl, tokens, sec, flops, nbytes, peak):
    row = {"kernel": kind, "impl": impl, "tokens": tokens, "time_ms": sec * 1e3, "tflops": flops / sec / 1e12,
           "gbps": nbytes / sec / 1e9, "flops": flops, "bytes": nbytes}
    if peak:
        bound = max(flops / (peak["bf16_tflops"] * 1e12), nbytes / (peak["hbm_gbps"] * 1e9))
        row["roofline_frac"] = bound / sec
    return row


def bench_moe(shape, tokens, impls, device, dtype, warmup, repeat, peak):
    h, e, k, i = shape["hidden"], shape["experts"], shape["top_k"], shape["inter"]
    g = torch.Generator(device="cpu").manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(device, dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).to(device, dtype)
    router = (torch.randn(e, h, generator=g) / h**0.5).to(device)
    rows = []
    el = torch.finfo(dtype).bits // 8
    for t in tokens:
        x = torch.randn(t, h, generator=g).to(device, dtype)
        w, ids = select_experts(x, router, k)
        used = int(torch.unique(ids).numel())
        flops = 6.0 * t * k * h * i
        nbytes = used * 3 * h * i * el + 2 * t * h * el
        for impl in impls:
            try:
                fn = lambda x=x, w=w, ids=ids, impl=impl: fused_experts(x, w, ids, w13, w2, impl=impl)
                sec = timeit(fn, device, warmup, repeat)
                rows.append(_row("moe", impl, t, sec, flops, nbytes, peak))
            except Exception as ex:  # noqa: BLE001 - record and keep going
                rows.append({"kernel": "moe", "impl": impl, "tokens": t, "error": f"{type(ex).__name__}: {ex}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_attention(shape, tokens, backends, device, dtype, warmup, repeat, peak, max_torch_tokens):
    hq, hkv, d = shape["hq"], shape["hkv"], shape["head_dim"]
    rows = []
    el = torch.finfo(dtype).bits // 8
    for t in tokens:
        kv_len = PREFIX + t
        spans = [(PREFIX, kv_len)] if t >= 64 else []
        pages = -(-kv_len // PAGE)
        cache = PagedKVCache(1, pages, PAGE, hkv, d, dtype=dtype, device=device)
        md = AttentionMetadata.build([SequenceChunk(range(PREFIX, kv_len), kv_len, list(range(pages)), spans)],
                                     PAGE, device=device)
        q = torch.randn(t, hq, d, device=device, dtype=dtype)
        k = torch.randn(t, hkv, d, device=device, dtype=dtype)
        v = torch.randn(t, hkv, d, device=device, dtype=dtype)
        cache.kv[0].normal_()
        cache.write(0, md.slot_mapping, k, v)
        visible = t * kv_len if spans else t * PREFIX + t * (t + 1) // 2
        flops = 4.0 * hq * d * visible
        nbytes = (2 * t * hq * d + 2 * kv_len * hkv * d) * el
        for name, variant in backends:
            impl = f"{name}-{variant}"
            if name == "sdpa" and t > max_torch_tokens:
                continue
            try:
                be = get_attention_backend(name, hq, hkv, d, variant=variant)
                be.plan(md, q_dtype=dtype, kv_dtype=dtype)
                fn = lambda be=be, q=q, k=k, v=v, cache=cache: be.run(q, k, v, cache, 0)
                sec = timeit(fn, device, warmup, repeat)
                rows.append(_row("attention", impl, t, sec, flops, nbytes, peak))
            except Exception as ex:  # noqa: BLE001
                rows.append({"kernel": "attention", "impl": impl, "tokens": t, "error": f"{type(ex).__name__}: {ex}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# engine-step shapes for the before/after comparison: (name, [(query rows, kv_len, bidirectional spans)]).
# An edit prefill: system + prompt text, a 1024x768 condition image as 64x48 = 3072 VAE tokens, its ViT tokens
# (729), text; a diffusion step of a 256x256 image (16x16 tokens + timestep) over a 300-token prefix.
_EDIT = (3900, 3900, [(40, 3112), (3113, 3842)])
_DIFFUSION = (257, 557, [(300, 557)])
SDPA_STEPS = {
    "edit_prefill": [_EDIT],
    "diffusion_x4": [_DIFFUSION] * 4,
    "mixed_edit_prefill_4_decodes_4_diffusion": [_EDIT] + [(1, 400 + 37 * i, []) for i in range(4)] + [_DIFFUSION] * 4,
    "decode_x8": [(1, 600 + 50 * i, []) for i in range(8)],
}


def load_attention_at(rev: str) -> ModuleType:
    """kernels/attention.py as of git revision `rev`, imported under a private name (its relative imports
    resolve against the current package)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:kernels/attention.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    name = "diffgentor.kernels._attention_before"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    mod.__package__ = "diffgentor.kernels"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:kernels/attention.py", "exec"), mod.__dict__)
    return mod


def bench_sdpa_before_after(rev: str, shape: dict, device: torch.device, dtype: torch.dtype,
                            repeat: int) -> list[dict]:
    """Median seconds per `run` (one layer) of the old and the current torch backend ("mask" variant) on the
    same metadata, cache and q/k/v; the two alternate within each repeat so load drifts hit both alike."""
    old = load_attention_at(rev)
    hq, hkv, d = shape["hq"], shape["hkv"], shape["head_dim"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for step, seqs in SDPA_STEPS.items():
        chunks, next_page = [], 0
        for n, kv_len, spans in seqs:
            pages = -(-kv_len // PAGE)
            chunks.append(SequenceChunk(range(kv_len - n, kv_len), kv_len, range(next_page, next_page + pages),
                                        spans))
            next_page += pages
        cache = PagedKVCache(1, next_page, PAGE, hkv, d, dtype=dtype, device=device)
        cache.kv[0].copy_(torch.randn(cache.kv[0].shape, generator=g))
        md = AttentionMetadata.build(chunks, PAGE, device=device)
        t = md.num_tokens
        q = torch.randn(t, hq, d, generator=g).to(device, dtype)
        before = old.TorchPagedAttention(hq, hkv, d, d**-0.5, "mask")
        after = get_attention_backend("sdpa", hq, hkv, d, d**-0.5, "mask")
        times: dict[str, list[float]] = {"before": [], "after": []}
        outs = {}
        for i in range(repeat + 1):
            for label, be in (("before", before), ("after", after)):
                t0 = time.perf_counter()
                be.plan(md, q_dtype=dtype, kv_dtype=dtype)
                outs[label] = be.run(q, None, None, cache, 0)
                if i:  # the first round is warmup
                    times[label].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append({
            "step": step, "sequences": [{"query_rows": n, "kv_len": kv, "bidir_spans": sp} for n, kv, sp in seqs],
            "before_s": med["before"], "after_s": med["after"], "speedup": med["before"] / med["after"],
            "max_abs_diff": float((outs["before"].float() - outs["after"].float()).abs().max()),
        })
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "sequences"}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small shapes and token counts (smoke run)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--moe-impls", nargs="*", default=None, help="reference grouped flashinfer")
    ap.add_argument("--attn", nargs="*", default=None, help="backend-variant pairs, e.g. sdpa-mask flashinfer-segments")
    ap.add_argument("--skip", nargs="*", default=(), choices=("moe", "attention"))
    ap.add_argument("--max-torch-attn-tokens", type=int, default=4096, help="torch attention materialises scores")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sdpa-before", default=None, metavar="REV",
                    help="only compare the torch attention backend of git revision REV with the current one")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SMALL if args.small else REAL
    if args.sdpa_before:
        sdpa_shape = SMALL if device.type == "cpu" else shape  # CPU: the small checkpoint (hidden 256)
        rows = bench_sdpa_before_after(args.sdpa_before, sdpa_shape, device, dtype, args.repeat)
        out = Path(args.out) if args.out else \
            Path(__file__).resolve().parent / "results" / f"{card_key(device)}-attention-sdpa.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "what": "one layer's attention (plan + run) of the torch backend, mask variant: git revision "
                    f"{args.sdpa_before} (before) vs this tree (after), same process, alternating, median",
            "device": str(device), "dtype": str(dtype), "shape": sdpa_shape, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "repeat": args.repeat, "page_size": PAGE, "rows": rows,
        }, indent=1))
        print(f"wrote {out}")
        return 0
    tokens = tuple(args.tokens) if args.tokens else (SMALL_TOKENS if args.small else TOKENS)
    card = card_key(device)
    peak = CARDS.get(card)
    moe_impls = args.moe_impls or (["reference", "grouped"] + (["flashinfer"] if flashinfer_moe_available(device)[0]
                                                              else []))
    if args.attn:
        attn = [tuple(a.split("-", 1)) for a in args.attn]
    else:
        attn = [("sdpa", v) for v in ATTN_VARIANTS]
        if device.type == "cuda":
            attn += [("flashinfer", v) for v in ATTN_VARIANTS]
    result = {
        "card": card, "device": str(device), "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype), "shapes": shape, "small": args.small, "peak": peak, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "moe": [], "attention": [],
    }
    if "moe" not in args.skip:
        result["moe"] = bench_moe(shape, tokens, moe_impls, device, dtype, args.warmup, args.repeat, peak)
    if "attention" not in args.skip:
        result["attention"] = bench_attention(shape, tokens, attn, device, dtype, args.warmup, args.repeat, peak,
                                              args.max_torch_attn_tokens)
    suffix = "-small" if args.small else ""
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"{card}{suffix}-kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    failed = [r for r in result["moe"] + result["attention"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
