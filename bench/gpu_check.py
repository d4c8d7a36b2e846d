"""The sections of bench/gpu_check.sh: each proves or disproves one GPU path with assertions, no checkpoint, no network.

    python -m diffgentor.bench.gpu_check --list
    python -m diffgentor.bench.gpu_check --section attention --out DIR [--dry-run]
    python -m diffgentor.bench.gpu_check --jit --out DIR          # FlashInfer builds (started first, in background)

Every section writes DIR/<section>.json as soon as it ends ({"section", "ok", "checks": [...], ...}; a failed
assertion is recorded, then the process exits 1). `--dry-run` (or no CUDA device) runs the section's CPU-provable
part: the same code at reduced sizes, the rules and the plan arithmetic, so a CPU test keeps the script honest.
The GPU parts run at the real shapes of HunyuanImage-3.0 (hidden 4096, 32 query / 8 KV heads of 128, 64 experts of
width 3072, top 8, page size 16) with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# (name, what it proves); the order is the run order
SECTIONS: tuple[tuple[str, str], ...] = (
    ("env_sdpa", "environment (card, torch, CUDA, nvcc, FlashInfer import) and which SDPA kernels take the engine's "
                 "attention calls at the real masked-GQA shapes (math excluded), with time and peak memory"),
    ("attention", "torch and FlashInfer paged attention vs an fp32 reference at heads 32/8 and 4/1, page size 16: an "
                  "8192-row prefill chunk holding a 5126-token image block, a Distil diffusion step (4099 rows over "
                  "10.7k keys), decode of 16 rows over 6.5k keys"),
    ("moe", "grouped bf16 and FP8 MoE vs the reference at 1, 64, 4099 and 8198 tokens (real widths), TP and EP shard "
            "sums equal the unsharded result, TFLOP/s against the card's peak; the fused FlashInfer MoE when its "
            "build finished"),
    ("fp8_stack", "FP8 experts vs bf16 on a 2-layer real-width stack: logits cosine >= 0.99, velocity rel-L2 <= 0.08"),
    ("cuda_graphs", "decode CUDA graphs at real width, batch 1 and 16: replay equals the static forward, speedup > 1, "
                    "graph pool bytes; then whole decode steps (bench/decode.py) graphs on / off at B = 1, 16, 64 "
                    "over 2048 keys, FlashInfer's graph-mode decode wrapper captured when FlashInfer imports"),
    ("e2e_edit", "one Distil edit at real width, 2 layers (1024x1024, one 1024x1024 condition image, think 64, 8 "
                 "steps) on the default path: finite non-constant image, per-phase times, peak <= plan x 1.1"),
    ("vae", "VAE decode (1 and 2 images) and encode (1 image) at 1024x1024: measured peaks within 10% of the plan"),
    ("projection", "per-layer times of e2e_edit extrapolated to 32 layers: images/min projected against the "
                   "card's roofline"),
    ("parallel_layouts", "per-step image time of an Instruct text-to-image request with CFG (1024x1024, 2 layers at "
                         "real width, 8 experts top 8) for each layout of tp1, cfg2, sp2, tp2, tp2xcfg2, tp2xsp2, "
                         "tp4xcfg2, tp4xsp2, tp8 that fits the visible GPUs; with one GPU every multi-rank layout is "
                         "skipped with the reason"),
)
SECTION_NAMES = tuple(n for n, _ in SECTIONS)

CARDS = {  # dense bf16 / fp8 tensor TFLOP/s and HBM TB/s (SXM data sheets)
    "h100": {"bf16_tflops": 989.0, "fp8_tflops": 1979.0, "hbm_tbps": 3.35},
    "h200": {"bf16_tflops": 989.0, "fp8_tflops": 1979.0, "hbm_tbps": 4.8},
    "cpu": {"bf16_tflops": 1.0, "fp8_tflops": 1.0, "hbm_tbps": 0.05},
}
REAL = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, experts=64, width=3072, top_k=8, page=16, layers=32)


class Check:
    """Collects assertions of one section; a failed one is recorded (not raised) so the JSON keeps every result."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, name: str, ok: bool, **detail: Any) -> bool:
        self.items.append({"name": name, "ok": bool(ok), **detail})
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(i["ok"] for i in self.items)


def card_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return next((c for c in ("h200", "h100") if c in name), name.replace(" ", "-"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[Any, float]:
    out = fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    _sync()
    return out, (time.perf_counter() - t0) / repeat


def _peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn's result and the peak bytes allocated above what was allocated before it (CUDA)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


# ------------------------------------------------------------------------------------------------ 1 env + SDPA


def section_env_sdpa(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    from diffgentor.kernels.attention import expand_kv_heads
    from diffgentor.kernels.sdpa_rules import SdpaCall, fused_kernels

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "card": card_name(),
                           "python": sys.version.split()[0], "ninja": shutil.which("ninja"),
                           "nvcc": shutil.which("nvcc") or os.environ.get("CUDA_HOME")}
    if gpu:
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        try:
            import flashinfer

            env["flashinfer"] = flashinfer.__version__
        except Exception as e:  # noqa: BLE001 - recorded, and fails the section (and so the run)
            env["flashinfer"] = f"import failed: {type(e).__name__}: {e}"
        chk("flashinfer imports", not str(env["flashinfer"]).startswith("import failed"), detail=env["flashinfer"])
        chk("nvcc found (FlashInfer's JIT)", env["nvcc"] is not None)
    # the engine's three attention call shapes at the real sizes: a masked Distil step (expanded K/V), the padded
    # decode group (query heads as rows), and for contrast the masked GQA call the engine no longer makes
    hq, hkv, d = REAL["heads"], REAL["kv_heads"], REAL["head_dim"]
    dev = "cuda" if gpu else "meta"
    n, m, b, ctx = 4099, 10700, 16, 6500
    dt = torch.bfloat16

    def calls() -> dict[str, tuple]:
        q = torch.randn(1, n, hq, d, device=dev, dtype=dt).transpose(1, 2) if gpu else \
            torch.empty(1, n, hq, d, device=dev, dtype=dt).transpose(1, 2)
        mk = (lambda *s: torch.randn(*s, device=dev, dtype=dt)) if gpu else \
            (lambda *s: torch.empty(*s, device=dev, dtype=dt))
        k, v = mk(1, m, hkv, d), mk(1, m, hkv, d)
        mask = torch.ones(1, 1, n, m, device=dev, dtype=torch.bool).tril(m - n)
        ke, ve = expand_kv_heads(k, v, hq // hkv)
        qd = mk(b, hkv, hq // hkv, d)
        kd, vd = mk(b, ctx, hkv, d).transpose(1, 2), mk(b, ctx, hkv, d).transpose(1, 2)
        maskd = torch.ones(b, 1, 1, ctx, device=dev, dtype=torch.bool)
        return {"diffusion_step_expanded": (q, ke.transpose(1, 2), ve.transpose(1, 2), mask, False),
                "decode_heads_as_rows": (qd, kd, vd, maskd, False),
                "legacy_masked_gqa": (q, k.transpose(1, 2), v.transpose(1, 2), mask, True)}

    probe: dict[str, Any] = {}
    for name, (q, k, v, mask, gqa) in calls().items():
        rules = fused_kernels(SdpaCall.of(q, k, v, mask, enable_gqa=gqa))
        row: dict[str, Any] = {"rules": list(rules)}
        if name != "legacy_masked_gqa":
            chk(f"{name}: a fused kernel by the rules", bool({"flash", "efficient"} & set(rules)), rules=rules)
        if gpu:
            from torch.backends.cuda import (
                SDPAParams,
                can_use_cudnn_attention,
                can_use_efficient_attention,
                can_use_flash_attention,
            )
            from torch.nn.attention import SDPBackend, sdpa_kernel

            params = SDPAParams(q, k, v, mask, 0.0, False, gqa)
            torch_ok = {"flash": can_use_flash_attention(params), "efficient": can_use_efficient_attention(params),
                        "cudnn": can_use_cudnn_attention(params)}
            row["torch"] = torch_ok
            for kname in ("flash", "efficient"):
                chk(f"{name}: rules agree with torch on {kname}", torch_ok[kname] == (kname in rules))
            backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION}
            for kname, ok in torch_ok.items():
                if not ok:
                    continue
                try:
                    with sdpa_kernel([backends[kname]]):
                        def run(q=q, k=k, v=v, mask=mask, gqa=gqa) -> torch.Tensor:
                            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                   enable_gqa=gqa)

                        (_, peak), sec = _timed(lambda run=run: _peak(run), repeat=2)
                    row[kname] = {"seconds": sec, "peak_bytes": peak}
                except RuntimeError as e:
                    row[kname] = {"error": str(e)[:300]}
            if name != "legacy_masked_gqa":
                chk(f"{name}: a fused kernel runs on this card", any(
                    isinstance(row.get(k2), dict) and "seconds" in row[k2] for k2 in ("flash", "efficient", "cudnn")))
        probe[name] = row
    return {"env": env, "sdpa": probe}


# ------------------------------------------------------------------------------------------------ 2 attention


def _attention_cases(scale: int) -> dict[str, tuple[list, int]]:
    """(SequenceChunks, page size) of the three shapes; `scale` divides every length (CPU dry run)."""
    from diffgentor.kernels.attention import SequenceChunk

    ps = REAL["page"]
    used = [0]

    def table(n: int) -> list[int]:
        t = list(range(used[0], used[0] + -(-n // ps)))
        used[0] += len(t)
        return t

    n_pre, img = 8192 // scale, 5126 // scale
    pre = [SequenceChunk(range(n_pre), n_pre, table(n_pre), bidir_spans=[(n_pre // 8, n_pre // 8 + img)])]
    m, n = 10700 // scale, max(4099 // scale, 8)
    blk0 = m - n + 1
    diff = [SequenceChunk(range(m - n, m), m, table(m), bidir_spans=[(blk0, m - 1)])]
    ctx = 6500 // scale
    dec = [SequenceChunk([ctx - 1 - i], ctx - i, table(ctx)) for i in range(16)]
    return {"prefill_image_chunk": (pre, ps), "distil_step": (diff, ps), "decode_b16": (dec, ps)}


def section_attention(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    from diffgentor.kernels.attention import AttentionMetadata, paged_attention_reference
    from diffgentor.kernels.attention_select import get_attention_backend
    from diffgentor.kernels.kv_cache import PagedKVCache

    dev = torch.device("cuda" if gpu else "cpu")
    dt = torch.bfloat16 if gpu else torch.float32
    impls = ["sdpa", "flashinfer"] if gpu else ["sdpa"]
    res: dict[str, Any] = {}
    for hq, hkv in ((32, 8), (4, 1)):
        for case, (chunks, ps) in _attention_cases(1 if gpu else 64).items():
            md = AttentionMetadata.build(chunks, ps, dev)
            n_pages = max(p for c in chunks for p in c.block_table) + 1
            cache = PagedKVCache(1, n_pages, ps, hkv, REAL["head_dim"], dtype=dt, device=dev)
            gen = torch.Generator(device=dev).manual_seed(0)
            all_kv = AttentionMetadata.build(
                [type(c)(range(c.kv_len), c.kv_len, c.block_table) for c in chunks], ps, dev)
            kv = torch.randn(2, all_kv.num_tokens, hkv, REAL["head_dim"], generator=gen, device=dev).to(dt)
            cache.store(0, all_kv, kv[0], kv[1])
            q = torch.randn(md.num_tokens, hq, REAL["head_dim"], generator=gen, device=dev).to(dt)
            ref = paged_attention_reference(q, md, cache, 0, REAL["head_dim"] ** -0.5).float()
            for impl in impls:
                be = get_attention_backend(impl, hq, hkv, REAL["head_dim"])
                be.plan(md, q_dtype=dt, kv_dtype=dt)
                fell_back = getattr(be, "_fallback", None) is not None
                got, sec = _timed(lambda be=be, q=q, cache=cache: be.run(q, None, None, cache, 0),
                                  repeat=2 if gpu else 1)
                err = float((got.float() - ref).abs().max())
                key = f"{case}/{hq}x{hkv}/{impl}"
                res[key] = {"max_abs_err": err, "seconds": sec, "rows": md.num_tokens}
                chk(f"{key}: matches the fp32 reference", err <= (2e-2 if gpu else 1e-4), err=err)
                if impl == "flashinfer":
                    chk(f"{key}: FlashInfer ran (no fallback)", not fell_back)
    return {"results": res}


# ------------------------------------------------------------------------------------------------ 3 MoE


def section_moe(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    from diffgentor.kernels.moe import (
        MoEParallel,
        fp8_fast_path,
        fused_experts,
        fused_experts_reference,
        shard_experts_ep,
        shard_w2_tp,
        shard_w13_tp,
    )
    from diffgentor.kernels.quantization import quantize_fp8

    dev = torch.device("cuda" if gpu else "cpu")
    dt = torch.bfloat16 if gpu else torch.float32
    h, i, e, k = (REAL["hidden"], REAL["width"], REAL["experts"], REAL["top_k"]) if gpu else (64, 48, 8, 2)
    tokens = (1, 64, 4099, 8198) if gpu else (1, 64)
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=dev) * h**-0.5).to(dt)
    w2 = (torch.randn(e, h, i, generator=gen, device=dev) * i**-0.5).to(dt)
    peak = CARDS.get(card_name(), CARDS["cpu"])
    fp8_impl, why = fp8_fast_path(dev, "channel")
    w13q, w2q = quantize_fp8(w13, "channel"), quantize_fp8(w2, "channel")
    jit = _read_json(out / "jit.json")
    fused_proven = bool(jit and any(p["module"] == "fused MoE" and p["ok"] for p in jit.get("proofs", [])))
    res: dict[str, Any] = {"fp8_path": fp8_impl or f"dequantised ({why})",
                           "flashinfer_fused": "proven" if fused_proven else "not proven"}
    for t in tokens:
        x = torch.randn(t, h, generator=gen, device=dev).to(dt)
        wts, ids = torch.softmax(torch.randn(t, e, generator=gen, device=dev), -1).topk(k, dim=-1)
        wts = (wts / wts.sum(-1, keepdim=True)).to(dt)
        ref = fused_experts_reference(x, wts, ids, w13, w2).float()
        flops = 6 * t * k * h * i
        for impl, a, b, tflops in (("grouped", w13, w2, peak["bf16_tflops"]),
                                   (fp8_impl or "grouped", w13q, w2q, peak["fp8_tflops"]),
                                   *((("flashinfer", w13, w2, peak["bf16_tflops"]),) if fused_proven else ())):
            got, sec = _timed(lambda impl=impl, a=a, b=b, x=x, wts=wts, ids=ids:
                              fused_experts(x, wts, ids, a, b, impl=impl), repeat=3)
            rel = float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12))
            label = f"T{t}/{impl}" + ("/fp8" if a is w13q else "")
            res[label] = {"rel_l2": rel, "seconds": sec, "tflops": flops / sec / 1e12,
                          "peak_fraction": flops / sec / 1e12 / tflops}
            chk(f"{label}: matches the reference", rel <= (0.08 if a is w13q else 2e-2), rel=rel)
        if t == 64:  # shard sums: TP over the width (4 ranks), EP over whole experts (ep = 4)
            tp = sum(fused_experts(x, wts, ids, shard_w13_tp(w13, r, 4), shard_w2_tp(w2, r, 4), impl="grouped",
                                   parallel=MoEParallel(tp_rank=r, tp_size=4)).float() for r in range(4))
            ep = sum(fused_experts(x, wts, ids, shard_experts_ep(w13, MoEParallel(ep_rank=r, ep_size=4)),
                                   shard_experts_ep(w2, MoEParallel(ep_rank=r, ep_size=4)), impl="grouped",
                                   parallel=MoEParallel(ep_rank=r, ep_size=4)).float() for r in range(4))
            for name, total in (("tp4", tp), ("ep4", ep)):
                rel = float((total - ref).norm() / ref.norm())
                res[f"shard_sum/{name}"] = rel
                chk(f"{name} shard sum equals the unsharded MoE", rel <= 2e-2, rel=rel)
    res["workspace"] = _moe_workspace_vs_plan(chk, gpu and fused_proven)
    return {"results": res}


def _moe_workspace_vs_plan(chk: Check, fused: bool) -> dict[str, Any]:
    """The memory plan's FlashInfer fused-MoE workspace for the largest step at the real widths (tp1 bf16 and
    fp8_block, tp8 bf16) against FlashInfer's own size query when its fused MoE is proven here (meta weights: the
    query reads shapes only): the plan must hold what the kernel asks. CPU: the plan's figures only."""
    from diffgentor.engine.config import EngineConfig
    from diffgentor.engine.memory_plan import flashinfer_moe_workspace_bytes, largest_step_tokens
    from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
    from diffgentor.engine.parallel import ParallelContext
    from diffgentor.kernels.moe import MoEParallel, flashinfer_moe_workspace_size
    from diffgentor.kernels.quantization import Fp8Weight

    h, i, e, k = REAL["hidden"], REAL["width"], REAL["experts"], REAL["top_k"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HunyuanImage3Config.from_pretrained(_model_dir(Path(tmp), True, layers=1))  # real widths, config only
    tokens = largest_step_tokens(EngineConfig(), cfg)[0]
    out: dict[str, Any] = {"tokens": tokens}
    for tp, quant in ((1, None), (1, "fp8_block"), (8, None)):
        planned = flashinfer_moe_workspace_bytes(cfg, ParallelContext(tp, 0), tokens, quant)
        row: dict[str, Any] = {"planned": planned}
        chk(f"tp{tp}/{quant or 'bf16'}: a workspace is planned", planned > 0, planned=planned)
        if fused and (quant is None or torch.cuda.get_device_capability() == (9, 0)):
            dt = torch.float8_e4m3fn if quant else torch.bfloat16
            w13 = torch.empty(e, 2 * i // tp, h, dtype=dt, device="cuda")
            w2 = torch.empty(e, h, i // tp, dtype=dt, device="cuda")
            if quant:
                w13 = Fp8Weight(w13, torch.empty(e, 2 * i // tp // 128, h // 128, device="cuda"), (128, 128))
                w2 = Fp8Weight(w2, torch.empty(e, h // 128, i // tp // 128, device="cuda"), (128, 128))
            asked = flashinfer_moe_workspace_size(w13, w2, k, tokens, torch.bfloat16, MoEParallel(0, tp))
            row["flashinfer_query"] = asked
            holds = asked is not None and planned >= asked
            chk(f"tp{tp}/{quant or 'bf16'}: the plan holds FlashInfer's workspace", holds, planned=planned, asked=asked)
        out[f"tp{tp}/{quant or 'bf16'}"] = row
    return out


# ------------------------------------------------------------------------------------------------ 4 FP8 stack


def _model_dir(tmp: Path, gpu: bool, layers: int, distil: bool = False) -> Path:
    from diffgentor.bench.engine_run import REAL_SHAPES
    from diffgentor.engine.testing.tiny_model import write_tiny_metadata

    overrides = dict(REAL_SHAPES) if gpu else {}
    overrides["num_hidden_layers"] = layers
    return write_tiny_metadata(tmp / ("distil" if distil else "instruct"), distil=distil,
                               dtype=torch.bfloat16 if gpu else torch.float32, config_overrides=overrides)


def section_fp8_stack(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    from diffgentor.bench.engine_run import build_random_model
    from diffgentor.bench.fp8_accuracy import _prompt, cosine, logits_and_greedy, rel_l2, velocity

    dev = "cuda" if gpu else "cpu"
    dt = torch.bfloat16 if gpu else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _model_dir(Path(tmp), gpu, layers=2)
        res: dict[str, Any] = {}
        ref = build_random_model(ckpt, dev, dt, None, 0, "sdpa", "eager")
        prompt = _prompt(ref.config.vocab_size, 0)
        ref_logits, _ = logits_and_greedy(ref, prompt)
        ref_v = velocity(ref, prompt, 0)
        del ref
        q = build_random_model(ckpt, dev, dt, "fp8", 0, "sdpa", "eager")
        logits, _ = logits_and_greedy(q, prompt)
        v = velocity(q, prompt, 0)
        res = {"logits_cosine": cosine(logits, ref_logits), "velocity_rel_l2": rel_l2(v, ref_v)}
    chk("logits cosine >= 0.99", res["logits_cosine"] >= 0.99, value=res["logits_cosine"])
    chk("velocity rel-L2 <= 0.08", res["velocity_rel_l2"] <= 0.08, value=res["velocity_rel_l2"])
    return res


# ------------------------------------------------------------------------------------------------ 5 CUDA graphs


def section_cuda_graphs(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    """The static decode forward (what a graph captures) against the eager forward, then capture + replay on CUDA."""
    from diffgentor.bench.decode import _text_layout
    from diffgentor.bench.engine_run import build_random_model
    from diffgentor.engine.cuda_graph import DecodeGraphRunner
    from diffgentor.engine.models.hunyuan_image_3.sampling import SamplingParams
    from diffgentor.engine.scheduler_output import Chunk, SampleSpec
    from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk

    dev = "cuda" if gpu else "cpu"
    dt = torch.bfloat16 if gpu else torch.float32
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_model(_model_dir(Path(tmp), gpu, layers=2), dev, dt, None, 0, "sdpa", "eager")
        ctx, ps = 512, 16
        for batch in (1, 16):
            kv = model.make_kv_cache(batch * (ctx // ps + 1) + 1, ps)
            scratch = kv.num_blocks - 1
            tables = [list(range(b * (ctx // ps + 1), (b + 1) * (ctx // ps + 1))) for b in range(batch)]
            layout = _text_layout(ctx)
            chunks = [Chunk(request_id=f"r{b}", seq_id=f"r{b}", token_ids=layout.token_ids, layout=layout,
                            start=ctx - 1, end=ctx, block_table=tables[b], sample=SampleSpec(SamplingParams()))
                      for b in range(batch)]
            ids = torch.tensor([layout.token_ids[ctx - 1]] * batch)
            runner = DecodeGraphRunner(model, kv, scratch, max(batch, 1), use_graphs=False)
            batch_in = runner.select(chunks)
            chk(f"B{batch}: the step is graph-eligible", batch_in is not None)
            if batch_in is None:
                continue
            runner.load(batch_in)
            static = runner.forward(batch_in.bucket, batch_in.width)[:batch].float()
            md = AttentionMetadata.build([SequenceChunk([ctx - 1], ctx, tables[b]) for b in range(batch)], ps, dev)
            emb = model.embed_tokens(ids.to(dev))
            pos = layout.positions_for(ctx - 1, ctx).to(dev).expand(batch, 2)
            eager = model.model(emb, pos, md, kv).float()
            err = float((static - eager).abs().max() / eager.abs().max())
            res[f"B{batch}"] = {"static_vs_eager_rel": err}
            chk(f"B{batch}: static forward equals eager", err <= (2e-2 if gpu else 1e-5), err=err)
            if gpu:
                graphs = DecodeGraphRunner(model, kv, scratch, batch)
                graphs.load(batch_in)
                before = torch.cuda.memory_reserved()
                replayed = graphs.run(chunks)
                chk(f"B{batch}: captured", replayed is not None and graphs.disabled_reason is None,
                    reason=graphs.disabled_reason)
                if replayed is None:
                    continue
                r_err = float((replayed.float() - static).abs().max() / static.abs().max())
                chk(f"B{batch}: replay equals the static forward", r_err <= 1e-2, err=r_err)
                _, t_graph = _timed(lambda g=graphs, c=chunks: g.run(c), repeat=10)
                _, t_static = _timed(lambda r=runner, b=batch_in: r.forward(b.bucket, b.width), repeat=10)
                res[f"B{batch}"].update(graph_s=t_graph, static_s=t_static, speedup=t_static / t_graph,
                                        pool_bytes=torch.cuda.memory_reserved() - before)
                chk(f"B{batch}: graph replay is faster", t_static / t_graph > 1.0, speedup=t_static / t_graph)
    res["decode_steps"] = _decode_steps_graphs_on_off(chk, gpu)
    return res


def _decode_steps_graphs_on_off(chk: Check, gpu: bool) -> dict[str, Any]:
    """Whole worker decode steps (`bench/decode.py`'s measurement: forward, logits, sampling) with graphs off and on,
    at real width and 2 layers on CUDA (B = 1, 16, 64 over 2048 keys; FlashInfer attention when it imports, so the
    graph holds its paged decode wrapper), on the tiny shapes on CPU (the static forward, uncaptured)."""
    import argparse

    from diffgentor.bench.decode import measure

    attn = "sdpa"
    if gpu:
        try:
            import flashinfer  # noqa: F401

            attn = "flashinfer"
        except Exception:  # noqa: BLE001 - any import failure: the torch static attention is captured
            attn = "sdpa"
    batches = [1, 16, 64] if gpu else [1, 2]
    args = argparse.Namespace(model=None, shapes="real" if gpu else "tiny", layers=2 if gpu else None,
                              device="cuda" if gpu else "cpu", batch=batches, context=[2048] if gpu else [64],
                              modes=["eager", "graphs"], warmup=2, steps=5 if gpu else 1, moe_impl="eager",
                              attn_impl=attn)
    out = measure(args)
    step = {(r["batch"], r["mode"]): r["step_ms"] for r in out["rows"]}
    chk("decode steps: every batch ran eager and with graphs", all((b, m) in step for b in batches
                                                                    for m in ("eager", "graphs")))
    want = "flashinfer_graph_decode" if attn == "flashinfer" else "static_decode"
    chk(f"decode steps: graphs captured {want}", out["graph_attention"] == want, got=out["graph_attention"])
    for b in batches:
        if gpu and (b, "eager") in step and (b, "graphs") in step:
            ratio = step[(b, "eager")] / step[(b, "graphs")]
            chk(f"decode steps B{b}: graphs on are not slower than off", ratio >= 0.95, eager_over_graphs=ratio)
    return out


# ------------------------------------------------------------------------------------------------ 6 end to end


def section_e2e_edit(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    """One Distil edit through the engine (default attention path) at real width and 2 layers; measured peak vs the
    memory plan of the same 2-layer model."""
    import numpy as np
    from PIL import Image

    from diffgentor.bench.engine_run import LayerTimer, build_random_model
    from diffgentor.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from diffgentor.engine.core import EngineCore
    from diffgentor.engine.executor import UniProcExecutor
    from diffgentor.engine.input_processor import load_processor_context
    from diffgentor.engine.kernel_warmup import choose_kernels
    from diffgentor.engine.memory_plan import GpuSpec, plan_memory
    from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
    from diffgentor.engine.offline import Engine
    from diffgentor.engine.parallel import ParallelContext
    from diffgentor.engine.worker import Worker

    dev = "cuda" if gpu else "cpu"
    dt = torch.bfloat16 if gpu else torch.float32
    size, think, steps, layers = ("1024x1024", 64, 8, 2) if gpu else ("256x256", 4, 2, 2)
    side = int(size.split("x")[0])
    res: dict[str, Any] = {"image_size": size, "think_tokens": think, "steps": steps, "layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _model_dir(Path(tmp), gpu, layers=layers, distil=True)
        mc = HunyuanImage3Config.from_pretrained(ckpt)
        base = EngineConfig(model=ModelConfig(checkpoint=str(ckpt), device=dev, enforce_eager=not gpu,
                                              flashinfer_warmup_s=60),
                            cache=CacheConfig(num_kv_blocks=4096 if gpu else 512),
                            scheduler=SchedulerConfig(max_num_seqs=2))
        kernels = choose_kernels(base, mc)  # the default path: FlashInfer attention where proven
        res["kernels"] = kernels.labels
        config = EngineConfig(model=ModelConfig(checkpoint=str(ckpt), device=dev, attn_impl=kernels.attn_impl,
                                                moe_impl=kernels.moe_impl, enforce_eager=True),
                              cache=CacheConfig(num_kv_blocks=4096 if gpu else 512),
                              scheduler=SchedulerConfig(max_num_seqs=2))
        t0 = time.perf_counter()
        model = build_random_model(ckpt, dev, dt, None, 0, kernels.attn_impl, kernels.moe_impl)
        res["build_s"] = time.perf_counter() - t0
        core = EngineCore(load_processor_context(ckpt, config), config,
                          UniProcExecutor(Worker(model, config, config.cache.num_kv_blocks)))
        engine = Engine(core)
        arr = (np.random.RandomState(0).rand(side, side, 3) * 255).astype(np.uint8)
        img = Image.fromarray(arr)
        timer = LayerTimer(model.model.layers) if gpu else None

        def one(i: int, n_think: int, n_steps: int):
            req = engine.make_request(dict(request_id=f"e{i}", prompt="make it a winter scene", images=[img],
                                           image_size=size, bot_task="think_recaption", max_new_tokens=n_think,
                                           num_inference_steps=n_steps, seed=i, output_type="pil"))
            t = time.perf_counter()
            (r,) = engine.generate([req])
            _sync()
            return r, time.perf_counter() - t

        if gpu:
            one(0, 4, 1)  # kernel selection, allocator growth outside the measurement
            timer.reset()
            torch.cuda.reset_peak_memory_stats()
        r, wall = one(1, think, steps)
        chk("the edit finished with an image", r.error is None and r.image is not None, error=r.error)
        if r.image is not None:
            px = np.asarray(r.image, dtype=np.float32)
            chk("image finite and not constant", bool(np.isfinite(px).all() and px.std() > 0), std=float(px.std()))
        res.update(seconds=wall, timings=dict(r.timings), generated_tokens=r.num_generated_tokens)
        if gpu:
            layers_s = timer.total_s()
            res.update(layers_s=layers_s, per_layer_s=layers_s / layers)
            spec = GpuSpec(card_name(), torch.cuda.get_device_properties(0).total_memory,
                           torch.cuda.get_device_capability(0))
            plan = plan_memory(mc, config, ParallelContext(), spec.total_bytes, spec.name, spec.capability)
            kv = config.cache.num_kv_blocks * plan.kv_block_bytes
            planned = plan.weight_bytes + kv + plan.transient_bytes + plan.encoder_cache_bytes
            measured = torch.cuda.max_memory_allocated()
            res.update(peak_bytes=measured, planned_bytes=planned, plan_terms=plan.terms())
            chk("measured peak <= plan x 1.1", measured <= 1.1 * planned, measured=measured, planned=planned)
    return res


# ------------------------------------------------------------------------------------------------ 7 VAE


def section_vae(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    from diffgentor.engine.memory_plan import vae_decode_bytes, vae_encode_bytes
    from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _model_dir(Path(tmp), True, layers=1)  # the real VAE sizes (the plan reads them)
        mc = HunyuanImage3Config.from_pretrained(ckpt)
        res: dict[str, Any] = {"plan": {"decode_1": vae_decode_bytes(mc, 1024, 1024, 1),
                                        "decode_2": vae_decode_bytes(mc, 1024, 1024, 2),
                                        "encode_1": vae_encode_bytes(mc, 1024, 1024, 1)}}
        chk("plan: two decodes cost more than one", res["plan"]["decode_2"] > res["plan"]["decode_1"])
        from diffgentor.bench.engine_run import build_random_model

        if not gpu:  # the same calls on the tiny VAE (shapes and API; the peaks need the card)
            tiny = build_random_model(_model_dir(Path(tmp) / "tiny", False, layers=1), "cpu", torch.float32, None,
                                      0, "sdpa", "eager")
            tc = tiny.config
            z = torch.randn(2, tc.latent_channels, 4, 4)
            img = tiny.decode_latents(z)
            post = tiny.encode_condition_vae(torch.rand(1, 3, 4 * tc.latent_downsample, 4 * tc.latent_downsample))
            chk("tiny VAE decode / encode run", img.shape[0] == 2 and post is not None, shape=list(img.shape))
            return res

        model = build_random_model(ckpt, "cuda", torch.bfloat16, None, 0, "sdpa", "eager")
        ch, down = mc.latent_channels, mc.latent_downsample
        with torch.no_grad():
            for b in (1, 2):
                z = torch.randn(b, ch, 1024 // down, 1024 // down, device="cuda")
                _, peak = _peak(lambda z=z: model.decode_latents(z))
                res[f"decode_{b}"] = peak
            x = torch.rand(1, 3, 1024, 1024, device="cuda") * 2 - 1
            _, res["encode_1"] = _peak(lambda: model.encode_condition_vae(x))
        for key in ("decode_1", "decode_2", "encode_1"):
            ratio = res[key] / res["plan"][key]
            chk(f"{key}: measured peak within 10% of the plan", 0.9 <= ratio <= 1.1, ratio=ratio)
    return res


# ------------------------------------------------------------------------------------------------ 8 projection


def project(e2e: dict[str, Any], card: str, layers: int = REAL["layers"]) -> dict[str, Any]:
    """Extrapolate the 2-layer run to `layers` and compare with the card's roofline for the same request.

    Roofline per forward token: 2 x active parameters FLOPs (13B active of 80B: attention + 8 of 64 experts + shared)
    at the bf16 peak, and every step reads the active weights once at the HBM bandwidth; a diffusion step of n image
    tokens takes max(compute, weight reads), a think token the weight reads."""
    spec = CARDS.get(card, CARDS["cpu"])
    per_layer = e2e.get("per_layer_s", 0.0)
    measured_layers = e2e.get("layers", 2)
    total = e2e["seconds"] + (layers - measured_layers) * per_layer
    active_params = 13e9 * layers / REAL["layers"]
    tokens = 4099 * 2  # one diffusion step: the image block with its CFG row
    step_compute = 2 * active_params * tokens / (spec["bf16_tflops"] * 1e12)
    step_bytes = 2 * active_params / (spec["hbm_tbps"] * 1e12)
    roof = e2e["steps"] * max(step_compute, step_bytes) + e2e["think_tokens"] * step_bytes
    return {"card": card, "extrapolated_seconds": total, "images_per_min": 60.0 / total,
            "roofline_seconds": roof, "roofline_images_per_min": 60.0 / roof, "fraction_of_roofline": roof / total}


def section_projection(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    e2e = _read_json(out / "e2e_edit.json")
    if not e2e or "seconds" not in e2e:
        chk("e2e_edit results present", False)
        return {}
    res = project(e2e, card_name())
    chk("projection is positive", res["images_per_min"] > 0 and res["roofline_images_per_min"] > 0)
    return res


# ------------------------------------------------------------------------------------------------ runner

# ------------------------------------------------------------------------------------------------ 9 parallel layouts
LAYOUTS_TO_TIME = ("tp1", "cfg2", "sp2", "tp2", "tp2xcfg2", "tp2xsp2", "tp4xcfg2", "tp4xsp2", "tp8")
DRY_RUN_LAYOUTS = ("tp1", "cfg2", "sp2")  # on the CPU with gloo ranks at the tiny shape


def section_parallel_layouts(chk: Check, gpu: bool, out: Path) -> dict[str, Any]:
    """Each layout that fits the visible GPUs runs the same CFG request (its own engine and rank processes, one
    untimed warm-up) and reports its per-step image time (bench/offline.py `image_step_time`) and the ratio to
    tp1 (sequence-parallel layouts split the step's 2 x 4097 image rows; their all-to-alls are the overhead to
    see). Without CUDA (dry run) the `DRY_RUN_LAYOUTS` run on the CPU with gloo ranks at the tiny shape."""
    from diffgentor.bench.engine_run import REAL_SHAPES
    from diffgentor.bench.offline import parse_layout, run_once
    from diffgentor.engine.parallel_layout import ParallelLayout
    from diffgentor.engine.testing.tiny_model import make_tiny

    devices = torch.cuda.device_count() if gpu else 2
    res: dict[str, Any] = {"visible_devices": devices, "layouts": {}, "skipped": {}}
    runnable = []
    for name in LAYOUTS_TO_TIME:
        a = parse_layout(name)
        world = ParallelLayout(a["tensor_parallel_size"], a["cfg_parallel_size"], a["sequence_parallel_size"])
        if world.world_size > devices:
            res["skipped"][name] = f"needs {world.world_size} GPUs, {devices} visible"
        elif not gpu and name not in DRY_RUN_LAYOUTS:
            res["skipped"][name] = f"dry run: only {', '.join(DRY_RUN_LAYOUTS)} run on the CPU"
        else:
            runnable.append(name)
    if gpu and devices < 2:
        chk("one GPU: every multi-rank layout skipped with its reason", len(res["skipped"]) == len(LAYOUTS_TO_TIME) - 1,
            skipped=res["skipped"])
        res["note"] = "one GPU: tp1 alone compares nothing (its step time is e2e_edit's); lend several GPUs"
        return res
    size, steps = ("1024x1024", 8) if gpu else ("256x256", 2)
    req = dict(request_id="layout-0", prompt="a red fox in the snow, studio light", bot_task="image",
               image_size=size, num_inference_steps=steps, guidance_scale=5.0, seed=0, infer_align_image_size=False)
    engine_args = dict(device="cuda" if gpu else "cpu", dtype="bfloat16" if gpu else "float32", max_num_seqs=1,
                       max_num_batched_tokens=8192, num_kv_blocks=2048 if gpu else 256)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = dict(REAL_SHAPES, num_hidden_layers=2, num_experts=8) if gpu else {}
        ckpt = make_tiny(Path(tmp) / "instruct", distil=False, dtype=torch.bfloat16 if gpu else torch.float32,
                         config_overrides=overrides)
        for name in runnable:
            r = run_once(ckpt, engine_args, [req], warmup=1 if gpu else 0, repeat=0, layout=name)
            chk(f"{name}: the image finished", not r.errors, errors=r.errors)
            res["layouts"][name] = {**r.image_steps, "duration_s": r.duration_s,
                                    "image_sha256": r.requests[0]["image_sha256"]}
    base = res["layouts"].get("tp1", {}).get("mean_s")
    for v in res["layouts"].values():
        v["vs_tp1"] = v["mean_s"] / base if base else None
        v["same_image_as_tp1"] = v["image_sha256"] == res["layouts"].get("tp1", {}).get("image_sha256")
    chk("every runnable layout reported image steps", all(v["steps"] > 0 for v in res["layouts"].values()),
        layouts=res["layouts"])
    return res


RUNNERS: dict[str, Callable[[Check, bool, Path], dict[str, Any]]] = {
    "env_sdpa": section_env_sdpa, "attention": section_attention, "moe": section_moe,
    "fp8_stack": section_fp8_stack, "cuda_graphs": section_cuda_graphs, "e2e_edit": section_e2e_edit,
    "vae": section_vae, "projection": section_projection, "parallel_layouts": section_parallel_layouts,
}


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_section(name: str, out: Path, dry_run: bool) -> int:
    gpu = torch.cuda.is_available() and not dry_run
    chk = Check()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"section": name, "gpu": gpu, "card": card_name() if gpu else "cpu"}
    try:
        with torch.no_grad():
            result.update(RUNNERS[name](chk, gpu, out))
    except Exception as e:  # noqa: BLE001 - recorded in the section's JSON, the section fails
        chk("ran without an exception", False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
    result.update(ok=chk.ok, checks=chk.items, seconds=time.perf_counter() - t0)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    for c in chk.items:
        print(("ok   " if c["ok"] else "FAIL ") + c["name"], flush=True)
    return 0 if chk.ok else 1


def run_jit(out: Path) -> int:
    """Build (and prove) FlashInfer's modules at the real shapes: attention, bf16 and FP8 block fused MoE."""
    from diffgentor.engine.kernel_warmup import WarmupShapes, prove

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to build")
        return 0
    from concurrent.futures import ThreadPoolExecutor

    def build(quant: str | None) -> list[dict[str, Any]]:
        shapes = WarmupShapes(REAL["heads"], REAL["kv_heads"], REAL["head_dim"], REAL["page"], torch.bfloat16,
                              REAL["hidden"], REAL["width"], REAL["top_k"], quant)
        modules = ["attention prefill", "attention decode", "fused MoE"] if quant is None else ["fused MoE"]
        return [dict(vars(p), quantization=quant or "bf16")
                for p in prove(modules, shapes, torch.device("cuda"), budget_s=560)]

    with ThreadPoolExecutor(2) as pool:  # bf16 and FP8 block builds at once
        proofs = [p for part in pool.map(build, (None, "fp8_block")) for p in part]
    (out / "jit.json").write_text(json.dumps({"proofs": proofs}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=SECTION_NAMES)
    ap.add_argument("--out", default="bench/results/gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="CPU-provable part only")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--jit", action="store_true", help="build FlashInfer's modules (background job of the script)")
    args = ap.parse_args(argv)
    if args.list:
        for i, (name, what) in enumerate(SECTIONS, 1):
            print(f"{i} {name}: {what}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.jit:
        return run_jit(out)
    if not args.section:
        ap.error("--section, --list or --jit")
    return run_section(args.section, out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["SECTIONS", "main", "project", "run_section"]
