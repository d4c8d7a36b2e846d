"""FlashInfer proven at start-up, or not used: the kernel implementations an engine replica runs.

FlashInfer 0.6.x compiles each kernel at its first use (nvcc + ninja). An `import flashinfer` that works says nothing
about that build, and a build that fails inside a forward would fail every request. So before the model is built,
`choose_kernels` builds and runs once every FlashInfer module the engine would call: the attention prefill (the
causal and bidirectional paged prefills of the configured variant, with the cascade merge when the variant is
"cascade") and decode wrappers, and the fused CUTLASS MoE in the configured precision, each on a small input with
the real head counts, head dim, page size, hidden and expert widths, compared with the torch reference. All
builds start at once in threads and share one time budget (`ModelConfig.flashinfer_warmup_s`); a module that
fails, disagrees with the reference or is still building when the budget ends logs ONE warning naming it and the
fallback, and that op runs on the torch path (sdpa / the grouped MoE). A build still running in its thread keeps
going in the background (its result is ignored); the JIT cache makes the next start fast.

Which ops want FlashInfer: attention when `attn_impl=flashinfer`, or on CUDA when no attention implementation was
asked for (the contract's default name `sdpa` stays the fallback; docs/decisions.md); MoE when
`moe_impl=flashinfer`. The choice (and why) is logged once and reported in `/metrics` (`diffgentor:kernel_impl`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.model_interface import BackboneShape
from diffgentor.engine.parallel import ParallelContext
from diffgentor.kernels.attention import (
    AttentionMetadata,
    SequenceChunk,
    flashinfer_attention_available,
    paged_attention_reference,
)
from diffgentor.kernels.attention_select import get_attention_backend
from diffgentor.kernels.kv_cache import PagedKVCache
from diffgentor.kernels.moe import (
    flashinfer_moe_available,
    fused_experts_flashinfer,
    fused_experts_reference,
    resolve_moe_impl,
)
from diffgentor.kernels.quantization import fp8_layout, parse_quantization, quantize_fp8

logger = logging.getLogger("diffgentor.engine")

ATTENTION_MODULES = ("attention prefill", "attention decode")
MOE_MODULE = "fused MoE"
ATTENTION_TOLERANCE = 0.05  # max abs error vs the fp32 reference (outputs are O(1) means of N(0, 1) values)
MOE_TOLERANCE = 0.08  # relative L2 vs the reference (bf16: ~1e-2; FP8 block weights: a few 1e-2)


@dataclass(frozen=True)
class WarmupShapes:
    """The real-shaped facts a warm-up input needs (this rank's heads and expert widths)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    hidden_size: int
    expert_width: int  # this rank's intermediate width of one expert
    top_k: int
    quantization: str | None  # None, "fp8" or "fp8_block"

    @classmethod
    def of(cls, config: EngineConfig, mc: BackboneShape, parallel: ParallelContext | None) -> WarmupShapes:
        par = parallel or ParallelContext()
        layer = next((i for i in range(mc.num_hidden_layers) if mc.is_moe_layer(i)), 0)
        inter = mc.moe_intermediate_size[layer]
        width = inter if par.expert_parallel or not par.is_parallel else len(par.shard_range(inter, "expert columns"))
        return cls(len(par.q_head_range(mc.num_attention_heads)), len(par.kv_head_range(mc.num_key_value_heads)),
                   mc.head_dim, config.cache.block_size, getattr(torch, config.model.resolve_dtype()), mc.hidden_size,
                   width, mc.moe_topk[layer], parse_quantization(config.model.quantization))


@dataclass(frozen=True)
class KernelProof:
    module: str
    ok: bool
    seconds: float
    detail: str


@dataclass(frozen=True)
class KernelChoice:
    """What runs: `attn_impl` / `moe_impl` are the names the model is built with (EngineConfig's vocabulary),
    `labels` what `/metrics` shows (the resolved MoE path, e.g. grouped or fp8_grouped), `proofs` the warm-ups."""

    attn_impl: str
    moe_impl: str
    labels: dict[str, str]
    proofs: tuple[KernelProof, ...] = ()

    def describe(self) -> str:
        why = "; ".join(f"{p.module}: {'ok' if p.ok else 'FAILED'} in {p.seconds:.1f}s ({p.detail})"
                        for p in self.proofs)
        return ", ".join(f"{k}={v}" for k, v in self.labels.items()) + (f" [{why}]" if why else "")


# ------------------------------------------------------------------------------------------------ warm-ups


def _attention_step(shapes: WarmupShapes, device: torch.device, decode: bool):
    """A small real-shaped step: a causal text chunk after a prefix plus a chunk holding an image block, or three
    decode tokens of different context lengths; returns (metadata, cache, q, k, v) with the step's K/V stored."""
    ps = shapes.page_size
    if decode:
        lens = (3 * ps + 5, ps + 1, 2 * ps)
        chunks = [SequenceChunk([n - 1], n, range(p0, p0 + -(-n // ps))) for n, p0 in zip(lens, (0, 8, 16))]
    else:
        chunks = [SequenceChunk(range(ps, 3 * ps), 3 * ps, range(0, 3)),
                  SequenceChunk(range(ps + 3, 4 * ps), 4 * ps, range(8, 12), bidir_spans=[(ps + 5, 3 * ps + 7)])]
    md = AttentionMetadata.build(chunks, ps, device)
    cache = PagedKVCache(1, 24, ps, shapes.num_kv_heads, shapes.head_dim, dtype=shapes.dtype, device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for ch in chunks:  # the keys before each chunk (its prefix) are in the cache already
        prefix = [i for i in range(ch.kv_len) if i not in set(ch.query_kv_indices)]
        if prefix:
            pre = AttentionMetadata.build([SequenceChunk(prefix, ch.kv_len, ch.block_table)], ps, device)
            kv = torch.randn(2, len(prefix), shapes.num_kv_heads, shapes.head_dim, generator=gen)
            cache.store(0, pre, kv[0].to(device, shapes.dtype), kv[1].to(device, shapes.dtype))
    n = md.num_tokens
    q = torch.randn(n, shapes.num_qo_heads, shapes.head_dim, generator=gen).to(device, shapes.dtype)
    kv = torch.randn(2, n, shapes.num_kv_heads, shapes.head_dim, generator=gen).to(device, shapes.dtype)
    cache.store(0, md, kv[0], kv[1])
    return md, cache, q, kv[0], kv[1]


def warm_attention(shapes: WarmupShapes, device: torch.device, decode: bool, impl: str = "flashinfer") -> str:
    """Build and run the attention backend `impl` (through the engine's own selection point) on one step; compare
    with the fp32 reference. Raises on any failure."""
    md, cache, q, k, v = _attention_step(shapes, device, decode)
    scale = shapes.head_dim**-0.5
    backend = get_attention_backend(impl, shapes.num_qo_heads, shapes.num_kv_heads, shapes.head_dim, scale)
    backend.plan(md, q_dtype=shapes.dtype, kv_dtype=shapes.dtype)
    if getattr(backend, "_fallback", None) is not None:
        raise RuntimeError("the FlashInfer backend fell back to torch")
    out = backend.run(q, k, v, cache, 0)
    ref = paged_attention_reference(q, md, cache, 0, scale)
    err = float((out.float() - ref.float()).abs().max())
    if not err <= ATTENTION_TOLERANCE:
        raise RuntimeError(f"max abs error {err:.3g} vs the reference > {ATTENTION_TOLERANCE}")
    return f"max abs error {err:.2g}"


def warm_moe(shapes: WarmupShapes, device: torch.device,
             fused: Callable[..., torch.Tensor] = fused_experts_flashinfer) -> str:
    """Build and run FlashInfer's fused MoE (`fused`; bf16, or FP8 128x128 block scales) at the real hidden and
    expert widths with 4 experts and 16 tokens; compare with the reference loop. Raises on any failure."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    e, t, h, i = 4, 16, shapes.hidden_size, shapes.expert_width
    k = min(shapes.top_k, e)
    x = torch.randn(t, h, generator=gen).to(device, shapes.dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(device, shapes.dtype)
    w2 = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(device, shapes.dtype)
    weights, ids = torch.softmax(torch.randn(t, e, generator=gen), -1).topk(k, dim=-1)
    weights, ids = (weights / weights.sum(-1, keepdim=True)).to(device, shapes.dtype), ids.to(device)
    if shapes.quantization == "fp8_block":
        w13, w2 = quantize_fp8(w13, "block"), quantize_fp8(w2, "block")
    out = fused(x, weights, ids, w13, w2)
    ref = fused_experts_reference(x, weights, ids, w13, w2)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
    if not rel <= MOE_TOLERANCE:
        raise RuntimeError(f"relative L2 error {rel:.3g} vs the reference > {MOE_TOLERANCE}")
    return f"relative L2 error {rel:.2g}"


def flashinfer_usable(op: str, device: torch.device, quantization: str | None) -> tuple[bool, str]:
    """(FlashInfer can be tried for `op` ("attention" / "moe") here, why not): device, arch, import."""
    if op == "attention":
        return flashinfer_attention_available(device)
    return flashinfer_moe_available(device, fp8_layout(quantization))


def warm_module(module: str, shapes: WarmupShapes, device: torch.device) -> str:
    """Build and run one FlashInfer module once (the seam the start-up tests make fail)."""
    if module == MOE_MODULE:
        return warm_moe(shapes, device)
    return warm_attention(shapes, device, decode=module == "attention decode")


def prove(modules: list[str], shapes: WarmupShapes, device: torch.device, budget_s: float,
          warm: Callable[[str, WarmupShapes, torch.device], str] | None = None) -> list[KernelProof]:
    """Warm every module in its own thread, all started at once; whatever has not finished when `budget_s` ends
    is reported as timed out."""
    warm = warm or warm_module
    results: dict[str, KernelProof] = {}
    t0 = time.monotonic()

    def run(module: str) -> None:
        start = time.monotonic()
        try:
            detail, ok = warm(module, shapes, device), True
        except Exception as e:  # noqa: BLE001 - any build / run / accuracy failure means "not proven"
            detail, ok = f"{type(e).__name__}: {e}".strip()[:500], False
        results[module] = KernelProof(module, ok, time.monotonic() - start, detail)

    threads = [threading.Thread(target=run, args=(m,), name=f"flashinfer-warmup:{m}", daemon=True) for m in modules]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.0, budget_s - (time.monotonic() - t0)))
    return [results.get(m) or KernelProof(m, False, time.monotonic() - t0,
                                          f"not finished within the {budget_s:g}s warm-up budget") for m in modules]


def choose_kernels(config: EngineConfig, model_config: BackboneShape,
                   parallel: ParallelContext | None = None) -> KernelChoice:
    """The attention and MoE implementations this replica runs (module docstring); logs the choice once."""
    device = torch.device(config.model.resolve_device())
    shapes = WarmupShapes.of(config, model_config, parallel)
    want = {"attention": config.model.wants_flashinfer_attention(), "moe": config.model.moe_impl == "flashinfer"}
    modules: list[str] = []
    proofs: list[KernelProof] = []
    for op, wanted in want.items():
        if not wanted:
            continue
        ok, why = flashinfer_usable(op, device, shapes.quantization)
        if ok:
            modules += list(ATTENTION_MODULES) if op == "attention" else [MOE_MODULE]
        else:
            proofs.append(KernelProof(f"flashinfer {op}", False, 0.0, why))
    if modules:
        proofs += prove(modules, shapes, device, config.model.flashinfer_warmup_s)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the warm-up inputs; the plan counts the workspaces, not these
    failed = {p.module for p in proofs if not p.ok}
    attn_ok = want["attention"] and not failed & {*ATTENTION_MODULES, "flashinfer attention"}
    moe_ok = want["moe"] and not failed & {MOE_MODULE, "flashinfer moe"}
    attn = "flashinfer" if attn_ok else "sdpa"
    moe = "flashinfer" if moe_ok else ("eager" if config.model.moe_impl == "flashinfer" else config.model.moe_impl)
    for p in proofs:
        if not p.ok:
            fallback = "sdpa attention" if "attention" in p.module else "the torch MoE"
            logger.warning("FlashInfer %s not proven at start-up (%s); %s runs instead", p.module, p.detail, fallback)
    labels = {"attention": attn, "moe": resolve_moe_impl(moe, device, shapes.quantization)}
    choice = KernelChoice(attn, moe, labels, tuple(proofs))
    logger.info("kernels: %s", choice.describe())
    return choice


__all__ = ["KernelChoice", "KernelProof", "WarmupShapes", "choose_kernels", "prove", "warm_module"]
