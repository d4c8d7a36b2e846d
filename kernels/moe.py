"""Reference mixture-of-experts: fp32 routing and a dropless loop over experts.

This is the semantic oracle for every faster MoE path (grouped GEMM, FlashInfer CUTLASS): they must take the
same arguments and return the same result. Decisions it encodes (docs/decisions.md: MoE: dropless):
* the router runs in fp32 (fp32 input, fp32 weight), softmax over all experts, top-k, then renormalise the k
  probabilities (denominator clamped), on EVERY path, a single decode token included;
* no token is ever dropped (no capacity);
* the combine weights are rounded to the activation dtype before use (as the official loop does);
* the shared expert is added with weight 1.
Expert weights are accepted stacked ([E, 2I, H] / [E, H, I]) or as per-expert sequences, so the module layout
of the checkpoint (one Linear per expert) and a stacked fast-path layout share this signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import silu_and_mul
from .fallback import warn_once
from .impl_names import MOE_IMPLS
from .quantization import Fp8Weight, fp8_layout, parse_quantization, quantize_rows_fp8

ExpertWeights = Tensor | Fp8Weight | Sequence[Tensor] | Sequence[Fp8Weight]

_RENORM_EPS = 1e-8


def router_logits(hidden_states: Tensor, router_weight: Tensor) -> Tensor:
    """[T, H] x [E, H] -> fp32 logits [T, E] (input and weight both upcast to fp32)."""
    return F.linear(hidden_states.to(torch.float32), router_weight.to(torch.float32))


def select_experts(
    hidden_states: Tensor,
    router_weight: Tensor,
    top_k: int,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    weight_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Route T tokens: returns (weights [T, k] in `weight_dtype` or the input dtype, expert ids [T, k] int64).

    softmax (fp32) over all experts -> top-k -> divide by the sum of the k probabilities when `renormalize`
    (config `norm_topk_prob`), else multiply by `routed_scaling_factor`.
    """
    probs = torch.softmax(router_logits(hidden_states, router_weight), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=_RENORM_EPS)
    elif routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights.to(weight_dtype or hidden_states.dtype), ids


def _dense(w: Tensor | Fp8Weight, dtype: torch.dtype) -> Tensor:
    """A plain weight as is; an FP8 one dequantised (the reference: fp8 value * scale in fp32, then `dtype`)."""
    return w.dequantize(dtype) if isinstance(w, Fp8Weight) else w


def _scaled_linear(x: Tensor, w: Fp8Weight) -> Tensor:
    """x @ w.T with `torch._scaled_mm`: x quantised per row on the fly, w per output channel (sm89+ and CPU)."""
    xq, xs = quantize_rows_fp8(x)
    out_dtype = torch.bfloat16 if x.device.type == "cuda" else x.dtype  # CUDA row-wise scaling emits bf16
    y = torch._scaled_mm(xq, w.qweight.t(), scale_a=xs, scale_b=w.scale.unsqueeze(0), out_dtype=out_dtype)
    return y.to(x.dtype)


def swiglu_mlp(x: Tensor, gate_and_up_weight: Tensor | Fp8Weight, down_weight: Tensor | Fp8Weight,
               impl: str = "reference") -> Tensor:
    """One expert / shared MLP: down(silu_and_mul(gate_and_up(x))), no biases. FP8 weights are dequantised, or
    run through `torch._scaled_mm` when `impl` is one of the scaled FP8 paths (`resolve_moe_impl`), or, block-scaled
    under `impl="flashinfer"`, through FlashInfer's block-scale fused kernel as a one-expert MoE (`one_expert`): the
    weights stay FP8, never dequantised per forward."""
    if impl in _FP8_SCALED_IMPLS and isinstance(gate_and_up_weight, Fp8Weight) and gate_and_up_weight.block is None:
        return _scaled_linear(silu_and_mul(_scaled_linear(x, gate_and_up_weight)), down_weight)
    if impl == "flashinfer" and isinstance(gate_and_up_weight, Fp8Weight) and gate_and_up_weight.block is not None:
        w13, w2 = one_expert(gate_and_up_weight), one_expert(down_weight)
        ids = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
        return fused_experts_flashinfer(x, torch.ones(x.shape[0], 1, device=x.device), ids, w13, w2)
    return F.linear(silu_and_mul(F.linear(x, _dense(gate_and_up_weight, x.dtype))), _dense(down_weight, x.dtype))


def one_expert(w: Fp8Weight) -> Fp8Weight:
    """A [N, K] FP8 weight as a stack of one expert [1, N, K] (views of the same storage)."""
    return Fp8Weight(w.qweight.unsqueeze(0), w.scale.unsqueeze(0), w.block)


def _num_experts(w: ExpertWeights) -> int:
    return int(w.shape[0]) if isinstance(w, Tensor | Fp8Weight) else len(w)


def fused_experts_reference(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    expert_offset: int = 0,
    global_num_experts: int | None = None,
) -> Tensor:
    """Routed-expert output [T, H] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x_t), dropless.

    w13: per expert [2I, H] in the checkpoint's [up; gate] row order; w2: per expert [H, I]; either may be FP8
    (`Fp8Weight`), dequantised per expert just before its matmul. Expert parallel: the weights are the local
    experts with global ids `expert_offset ...`; ids stay global (range [0, global_num_experts)) and assignments
    to other ranks' experts contribute zero.
    """
    num_experts = _num_experts(w13)
    if _num_experts(w2) != num_experts:
        raise ValueError(f"w13 has {num_experts} experts but w2 has {_num_experts(w2)}")
    out = torch.zeros_like(hidden_states)
    if hidden_states.shape[0] == 0:
        return out
    flat_ids = topk_ids.reshape(-1)
    flat_w = topk_weights.reshape(-1).to(hidden_states.dtype)
    top_k = topk_ids.shape[1]
    total = num_experts if global_num_experts is None else global_num_experts
    for g in torch.unique(flat_ids).tolist():
        if not 0 <= g < total:
            raise ValueError(f"expert id {g} out of range [0, {total})")
        e = g - expert_offset
        if not 0 <= e < num_experts:
            continue  # another expert-parallel rank's expert
        assignment = (flat_ids == g).nonzero(as_tuple=True)[0]
        tokens = assignment // top_k
        y = swiglu_mlp(hidden_states.index_select(0, tokens), _dense(w13[e], hidden_states.dtype),
                       _dense(w2[e], hidden_states.dtype))
        # A token picks an expert at most once, so `tokens` has no repeats and the accumulation is
        # deterministic; index_put_ is also far cheaper than index_add_ on small CPU tensors.
        out.index_put_((tokens,), y * flat_w[assignment].unsqueeze(1), accumulate=True)
    return out


def moe_forward_reference(
    hidden_states: Tensor,
    router_weight: Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    top_k: int,
    shared_w13: Tensor | None = None,
    shared_w2: Tensor | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Tensor:
    """Full MoE block on [T, H]: routed experts (dropless) plus the shared expert, unscaled."""
    return moe_forward(hidden_states, router_weight, w13, w2, top_k, shared_w13, shared_w2, renormalize,
                       routed_scaling_factor, impl="reference")


# ================================================================================================ fast paths
#
# Every path below takes the arguments of `fused_experts_reference` and returns the same result (fp32: to
# rounding; bf16: to bf16 tolerance). Expert parallel (EP): the caller passes only its local experts' stacked
# weights, the GLOBAL top-k ids and `expert_offset` = the first local global id; assignments to other ranks'
# experts contribute zero, and the ranks' outputs sum to the unsharded result. Tensor parallel (TP): the
# caller passes weights sharded along the intermediate dim with `shard_w13_tp` / `shard_w2_tp` (the up and the
# gate halves are sharded separately); each rank's output is a partial sum.

_FP8_SCALED_IMPLS = ("fp8_grouped", "fp8_scaled_mm")
_ALL_IMPLS = ("reference", "grouped", "eager", "flashinfer", *_FP8_SCALED_IMPLS)


@dataclass(frozen=True)
class MoEParallel:
    """Tensor-parallel (intermediate dim) and expert-parallel (whole experts) coordinates of one rank."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"bad tensor-parallel rank {self.tp_rank} of {self.tp_size}")
        if self.ep_size < 1 or not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"bad expert-parallel rank {self.ep_rank} of {self.ep_size}")

    def local_experts(self, num_experts: int) -> range:
        """Global ids of this rank's experts: a contiguous range of num_experts / ep_size (FlashInfer's EP layout)."""
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts do not split over {self.ep_size} expert-parallel ranks")
        n = num_experts // self.ep_size
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)


def shard_w13_tp(w13: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """[..., 2I, H] in [up; gate] order -> this rank's [up_shard; gate_shard] [..., 2I/tp, H].

    A contiguous slice of the fused 2I rows would give rank 0 only up rows and the last rank only gate rows,
    so each half is sharded on its own and the shards re-concatenated in the same [up; gate] order.
    """
    two_i = w13.shape[-2]
    if two_i % (2 * tp_size):
        raise ValueError(f"intermediate size {two_i // 2} does not split over {tp_size} tensor-parallel ranks")
    up, gate = w13.chunk(2, dim=-2)
    n = up.shape[-2] // tp_size
    sl = slice(tp_rank * n, (tp_rank + 1) * n)
    return torch.cat((up[..., sl, :], gate[..., sl, :]), dim=-2).contiguous()


def shard_w2_tp(w2: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """[..., H, I] -> this rank's [..., H, I/tp] (row-parallel down projection; outputs are partial sums)."""
    i = w2.shape[-1]
    if i % tp_size:
        raise ValueError(f"intermediate size {i} does not split over {tp_size} tensor-parallel ranks")
    n = i // tp_size
    return w2[..., tp_rank * n : (tp_rank + 1) * n].contiguous()


def shard_experts_ep(w: Tensor, parallel: MoEParallel) -> Tensor:
    """Stacked [E, ...] -> this rank's local experts [E/ep, ...]."""
    r = parallel.local_experts(int(w.shape[0]))
    return w[r.start : r.stop]


# ------------------------------------------------------------------------------------------------ grouped GEMM
#
# The sort-by-expert skeleton is free of device->host syncs (no `nonzero`, `.item()`, `.tolist()`, boolean-mask
# indexing, `bincount` (whose CUDA kernel reads the max back) or data-dependent shapes): group ends come from
# `searchsorted` over the sorted keys, and under expert parallel the other ranks' assignments are sorted last,
# left outside every group and masked with `torch.where`. The only remaining sync is in the per-expert fallbacks
# (`_segment_mm`, the `_scaled_mm` loop), which need the group sizes on the host to slice.

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor | None:
    """`torch._grouped_mm(a [M, K], b [G, K, N], offs)` or None when the op is missing/unsupported here."""
    key = (a.device.type, a.dtype)
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or _GROUPED_MM_OK.get(key) is False:
        return None
    try:
        out = fn(a, b, offs=offs)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        # unsupported device / dtype / arch / alignment (strides must be 16-byte multiples): loop instead
        _GROUPED_MM_OK[key] = False
        warn_once(f"grouped_mm:{key}", f"torch._grouped_mm unavailable for {key} ({e}); MoE uses the expert loop")
        return None
    _GROUPED_MM_OK[key] = True
    return out


def _group_sizes(offs: Tensor) -> list[int]:
    """Group sizes on the host (a device->host sync: only the per-expert fallbacks use it)."""
    ends = offs.tolist()
    return [e - s for s, e in zip([0, *ends[:-1]], ends)]


def _segment_mm(a: Tensor, b: Tensor, counts: list[int]) -> Tensor:
    """Fallback of `_grouped_mm` over rows sorted by group: one matmul per non-empty group (rows past the last
    group are left zero)."""
    out = a.new_zeros(a.shape[0], b.shape[-1])
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(a[start : start + n], b[g], out=out[start : start + n])
        start += n
    return out


def _sorted_by_expert(
    topk_ids: Tensor, num_local: int, expert_offset: int, partial: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(order [T*k] of the (token, choice) assignments sorted by local expert (stable), group ends `offs`
    [num_local] int32, validity mask [T*k] or None). `partial` (expert parallel, a static property of the layer):
    ids of other ranks' experts get key num_local, sort last and fall outside every group."""
    local = topk_ids.reshape(-1).long() - expert_offset
    valid = None
    if partial:
        valid = (local >= 0) & (local < num_local)
        local = torch.where(valid, local, torch.full_like(local, num_local))
    order = torch.argsort(local, stable=True)
    bounds = torch.arange(num_local, device=local.device, dtype=local.dtype)
    offs = torch.searchsorted(local.index_select(0, order), bounds, right=True, out_int32=True)
    return order, offs, valid


GroupedGemm = Callable[[Tensor, Tensor], Tensor]
"""(rows sorted by expert [M, K], group ends offs) -> [M, N]; one per projection."""


def _run_sorted(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    num_local: int,
    expert_offset: int,
    partial: bool,
    gemm13: GroupedGemm,
    gemm2: GroupedGemm,
) -> Tensor:
    """The shared skeleton of the grouped paths: sort by expert, two grouped GEMMs with SwiGLU between, un-permute
    by a scatter with unique indices, combine the k choices in a fixed order (deterministic)."""
    t, h = hidden_states.shape
    if t == 0:
        return hidden_states.new_zeros(0, h)
    k = int(topk_ids.shape[1])
    order, offs, valid = _sorted_by_expert(topk_ids, num_local, expert_offset, partial)
    x = hidden_states.index_select(0, order // k)
    y_sorted = gemm2(silu_and_mul(gemm13(x, offs)), offs).to(hidden_states.dtype)
    y = hidden_states.new_empty(t * k, h)
    y.index_copy_(0, order, y_sorted)  # each assignment exactly once: deterministic
    w = topk_weights.reshape(t * k).to(hidden_states.dtype)
    if valid is not None:  # other ranks' rows were never computed: select zeros (never multiply garbage by 0)
        y = torch.where(valid.unsqueeze(1), y, torch.zeros((), dtype=y.dtype, device=y.device))
        w = torch.where(valid, w, torch.zeros_like(w))
    y = y.view(t, k, h)
    w = w.view(t, k, 1)
    # Combine in a fixed choice order with elementwise ops: a `.sum(dim=1)` may split the k-reduction across
    # threads depending on T, which would make a token's output depend on the batch it is in.
    out = y[:, 0] * w[:, 0]
    for j in range(1, k):
        out += y[:, j] * w[:, j]
    return out


def _dense_grouped_gemm(w: Tensor) -> GroupedGemm:
    """[E, N, K] nn.Linear-layout stack -> grouped GEMM over its transposed VIEW (no copy); per-expert loop when
    `torch._grouped_mm` is unavailable for the device / dtype / shape."""
    wt = w.transpose(1, 2)

    def gemm(x: Tensor, offs: Tensor) -> Tensor:
        out = _grouped_mm(x, wt, offs)
        return out if out is not None else _segment_mm(x, wt, _group_sizes(offs))

    return gemm


def fused_experts_grouped(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor | Fp8Weight,
    w2: Tensor | Fp8Weight,
    expert_offset: int = 0,
    global_num_experts: int | None = None,
) -> Tensor:
    """Routed-expert output via sort-by-expert + grouped GEMM; same contract as `fused_experts_reference`.

    w13 [E_local, 2I, H] ([up; gate] rows), w2 [E_local, H, I] stacked (nn.Linear layout). FP8 stacks are
    dequantised to the activation dtype for the call (the CPU / pre-sm89 path; a transient copy of ONE layer's
    experts), which gives the reference numerics. `global_num_experts` > E_local (or an offset) marks an
    expert-parallel rank. No device->host sync unless `torch._grouped_mm` is unavailable (see above).
    """
    if w13.dim() != 3 or w2.dim() != 3:
        raise TypeError("fused_experts_grouped needs stacked [E, 2I, H] / [E, H, I] expert weights")
    dtype = hidden_states.dtype
    num_local = int(w13.shape[0])
    partial = expert_offset != 0 or (global_num_experts is not None and global_num_experts > num_local)
    return _run_sorted(hidden_states, topk_weights, topk_ids, num_local, expert_offset, partial,
                       _dense_grouped_gemm(_dense(w13, dtype)), _dense_grouped_gemm(_dense(w2, dtype)))


# ------------------------------------------------------------------------------------------------ FP8 fast paths


def _fp8_grouped_gemm(w: Fp8Weight) -> GroupedGemm:
    """`torch._scaled_grouped_mm`: rows quantised per token on the fly, weights per output channel (CUDA sm90+)."""
    wt = w.qweight.transpose(1, 2)  # [E, K, N] column-major view of the [E, N, K] stack, as the op wants

    def gemm(x: Tensor, offs: Tensor) -> Tensor:
        xq, xs = quantize_rows_fp8(x)
        try:
            return torch._scaled_grouped_mm(xq, wt, xs.reshape(-1), w.scale, offs=offs, out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError) as e:  # e.g. an alignment rule of this torch build
            warn_once(f"scaled_grouped_mm:{type(e).__name__}",
                      f"torch._scaled_grouped_mm failed ({e}); FP8 MoE uses one torch._scaled_mm per expert")
            return _fp8_loop_gemm(w)(x, offs)

    return gemm


def _fp8_loop_gemm(w: Fp8Weight) -> GroupedGemm:
    """One `torch._scaled_mm` per non-empty expert (sm89 has no grouped FP8 GEMM; also runs on CPU)."""

    def gemm(x: Tensor, offs: Tensor) -> Tensor:
        out = None
        start = 0
        for g, n in enumerate(_group_sizes(offs)):
            if n:
                y = _scaled_linear(x[start : start + n], w[g])
                if out is None:
                    out = x.new_zeros(x.shape[0], y.shape[1], dtype=y.dtype)
                out[start : start + n] = y
            start += n
        return out if out is not None else x.new_zeros(x.shape[0], w.shape[1])

    return gemm


def fused_experts_fp8(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Fp8Weight,
    w2: Fp8Weight,
    expert_offset: int = 0,
    global_num_experts: int | None = None,
    impl: str = "fp8_grouped",
) -> Tensor:
    """Routed experts on per-channel FP8 weights with FP8 activations (dynamic per-token scales): `fp8_grouped`
    (`torch._scaled_grouped_mm`, sync-free) or `fp8_scaled_mm` (per-expert `torch._scaled_mm`). Differs from the
    reference by the activation rounding to e4m3 (measured in tests/test_fp8.py)."""
    if not isinstance(w13, Fp8Weight) or not isinstance(w2, Fp8Weight) or w13.block is not None:
        raise TypeError(f"{impl} needs per-channel Fp8Weight stacks (quantization fp8)")
    num_local = int(w13.shape[0])
    partial = expert_offset != 0 or (global_num_experts is not None and global_num_experts > num_local)
    make = _fp8_grouped_gemm if impl == "fp8_grouped" else _fp8_loop_gemm
    return _run_sorted(hidden_states, topk_weights, topk_ids, num_local, expert_offset, partial, make(w13), make(w2))


def cuda_capability(device: torch.device | str) -> tuple[int, int] | None:
    """The compute capability of `device`, None when it is not a usable CUDA device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def fp8_fast_path_on(capability: tuple[int, int] | None, layout: str | None) -> tuple[str | None, str]:
    """(the torch FP8 MoE path a card of `capability` (None: not CUDA) can run, or None; the reason) for a weight
    scale layout. Pure: the memory plan asks it about a card it is not running on."""
    if layout == "block":
        return None, "128x128 block scales have no torch scaled-GEMM path (FlashInfer's block-scale MoE reads them)"
    if capability is None:
        return None, "the device is not CUDA"
    if capability >= (9, 0) and hasattr(torch, "_scaled_grouped_mm"):
        return "fp8_grouped", "ok"
    if capability >= (8, 9) and hasattr(torch, "_scaled_mm"):
        return "fp8_scaled_mm", "ok"
    return None, f"compute capability sm{capability[0]}{capability[1]} < sm89 has no FP8 tensor cores"


def fp8_fast_path(device: torch.device | str, layout: str | None) -> tuple[str | None, str]:
    """`fp8_fast_path_on` for this process's `device`."""
    return fp8_fast_path_on(cuda_capability(device), layout)


# ------------------------------------------------------------------------------------------------ FlashInfer


def flashinfer_moe_supports(capability: tuple[int, int] | None, layout: str | None = None) -> tuple[bool, str]:
    """(usable, reason) on a card of `capability` (None: not CUDA), flashinfer's import aside: FlashInfer's CUTLASS
    fused MoE needs sm90+; its FP8 variant needs 128x128 block scales (per-channel FP8 is not one of its modes) and is
    built for SM90 only. Pure: the memory plan asks it about a card it is not running on."""
    if capability is None:
        return False, "the device is not CUDA"
    major, minor = capability
    if major < 9:
        return False, f"compute capability sm{major}{minor} < sm90"
    if layout == "channel":
        return False, "FlashInfer's fused MoE has no per-channel FP8 mode (use --quantization fp8_block)"
    if layout == "block" and major != 9:
        return False, f"FlashInfer's block-scale FP8 CUTLASS MoE is SM90-only (device is sm{major}{minor})"
    return True, "ok"


def flashinfer_moe_available(device: torch.device | str, layout: str | None = None) -> tuple[bool, str]:
    """(usable, reason): `flashinfer_moe_supports` on this process's `device`, and an importable flashinfer."""
    ok, why = flashinfer_moe_supports(cuda_capability(device), layout)
    if not ok:
        return False, why
    try:
        from flashinfer.fused_moe import cutlass_fused_moe  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"flashinfer is not importable ({type(e).__name__}: {e})"
    return True, "ok"


def fused_experts_flashinfer(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor | Fp8Weight,
    w2: Tensor | Fp8Weight,
    parallel: MoEParallel = MoEParallel(),
) -> Tensor:
    """FlashInfer `cutlass_fused_moe`: w13 [E_local, 2I_tp, H] in [up; gate] order (FlashInfer's w31 order, as
    stored by the checkpoint), w2 [E_local, H, I_tp], GLOBAL int32 ids, fp32 combine weights (rounded to the
    activation dtype first, as every other path does). Output read from the preallocated buffer (0.5.0 returns
    a list). Block-scaled FP8 weights go through its DeepSeek-style mode (bf16 activations, fp8 weights, scales
    [E, 2I/128, H/128] / [E, H/128, I/128]); see docs/flashinfer.md for the versions this was read against."""
    from flashinfer.fused_moe import cutlass_fused_moe

    x = hidden_states.contiguous()
    out = torch.zeros_like(x)
    if x.shape[0] == 0:
        return out
    fp8 = isinstance(w13, Fp8Weight)
    if fp8 and (w13.block is None or not isinstance(w2, Fp8Weight)):
        raise TypeError("FlashInfer's FP8 fused MoE needs 128x128 block-scaled weights (quantization fp8_block)")
    ws = _flashinfer_workspace(x)
    cutlass_fused_moe(
        x,
        topk_ids.to(torch.int32).contiguous(),
        topk_weights.to(x.dtype).to(torch.float32).contiguous(),
        w13.qweight if fp8 else w13,
        w2.qweight if fp8 else w2,
        x.dtype,
        quant_scales=[w13.scale.contiguous(), w2.scale.contiguous()] if fp8 else None,
        tp_size=parallel.tp_size,
        tp_rank=parallel.tp_rank,
        ep_size=parallel.ep_size,
        ep_rank=parallel.ep_rank,
        output=out,
        use_deepseek_fp8_block_scale=fp8,
        **({} if ws is None else {"workspace_buffer": ws}),
    )
    return out


@dataclass
class _Workspace:
    buffer: Tensor
    max_tokens: int


_FLASHINFER_WORKSPACE: dict[str, _Workspace] = {}
"""Device -> the fused-MoE scratch buffer every layer's call shares in this process (steps run one after another on
one stream). Without it FlashInfer allocates and frees its workspace on every call (up to 10-20 GiB at large
batch)."""


def _flashinfer_workspace(x: Tensor) -> Tensor | None:
    """The shared workspace when one was reserved for calls of at least x's token count, else None (FlashInfer then
    allocates its own for this call)."""
    ws = _FLASHINFER_WORKSPACE.get(str(x.device))
    return ws.buffer if ws is not None and x.shape[0] <= ws.max_tokens else None


def flashinfer_moe_workspace_size(w13: Tensor | Fp8Weight, w2: Tensor | Fp8Weight, top_k: int, max_tokens: int,
                                  dtype: torch.dtype, parallel: MoEParallel = MoEParallel()) -> int | None:
    """FlashInfer's own size query: the bytes its fused MoE needs for calls of up to `max_tokens` tokens on these
    (local, stacked) weights; None with a FlashInfer older than 0.6.17 (no query, no `workspace_buffer`: each call
    allocates its own, docs/flashinfer.md)."""
    from flashinfer import fused_moe

    cutlass_fused_moe_workspace_size = getattr(fused_moe, "cutlass_fused_moe_workspace_size", None)
    if cutlass_fused_moe_workspace_size is None:
        return None
    fp8 = isinstance(w13, Fp8Weight)
    q13, q2 = (w13.qweight, w2.qweight) if fp8 else (w13, w2)
    return int(cutlass_fused_moe_workspace_size(
        max_tokens, int(q2.shape[1]), int(q2.shape[2]), int(q13.shape[0]) * parallel.ep_size, top_k,
        x_dtype=dtype, weight_dtype=q13.dtype, output_dtype=dtype, tp_size=parallel.tp_size,
        tp_rank=parallel.tp_rank, ep_size=parallel.ep_size, ep_rank=parallel.ep_rank,
        use_deepseek_fp8_block_scale=fp8, device=q13.device))


def reserve_flashinfer_moe_workspace(needed: int, max_tokens: int, device: torch.device | str,
                                     planned: int | None = None) -> Tensor:
    """The device's shared fused-MoE workspace, allocated once at start-up: `planned` bytes (the memory plan's
    term) when given, grown to `needed` (FlashInfer's query for the largest call) with one warning when the plan
    is short. Later reservations (other weight shapes: the shared expert) reuse it unless they need more; it serves
    calls of up to the smallest reserved token count."""
    key = str(torch.device(device))
    ws = _FLASHINFER_WORKSPACE.get(key)
    size = max(needed, planned or 0)
    if planned is not None and needed > planned:
        warn_once(f"moe-workspace:{key}", f"FlashInfer's fused MoE needs a {needed / 2**20:.0f} MiB workspace; the "
                  f"memory plan reserved {planned / 2**20:.0f} MiB")
    tokens = max_tokens if ws is None else min(ws.max_tokens, max_tokens)  # what every reserved shape fits
    if ws is None or ws.buffer.numel() < needed:
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
    else:
        buffer = ws.buffer
    _FLASHINFER_WORKSPACE[key] = _Workspace(buffer, tokens)
    return buffer


_FLASHINFER_TUNED: set[tuple] = set()
"""Weight shapes (with the token limit) whose FlashInfer fused-MoE tactics this process has profiled."""


def tune_flashinfer_moe(w13: Tensor | Fp8Weight, w2: Tensor | Fp8Weight, top_k: int, max_tokens: int,
                        dtype: torch.dtype, parallel: MoEParallel = MoEParallel()) -> bool:
    """Profile FlashInfer's fused-MoE tactics once per process and weight shape: one call of `max_tokens` tokens
    inside `flashinfer.autotune()`, which tunes every token-count bucket up to it and keeps the choices for the
    process (untuned, each call runs FlashInfer's fallback tactic). Returns False when already tuned."""
    import flashinfer

    fp8 = isinstance(w13, Fp8Weight)
    q13, q2 = (w13.qweight, w2.qweight) if fp8 else (w13, w2)
    key = (str(q13.device), dtype, tuple(q13.shape), tuple(q2.shape), fp8, parallel.tp_size, parallel.ep_size,
           top_k, max_tokens)
    if key in _FLASHINFER_TUNED:
        return False
    total = int(q13.shape[0]) * parallel.ep_size
    gen = torch.Generator(device=q13.device).manual_seed(0)
    x = torch.randn(max_tokens, int(q13.shape[2]), generator=gen, device=q13.device).to(dtype)
    # every token on top_k distinct experts, all experts used: the shapes a real step has
    ids = (torch.arange(max_tokens * top_k, device=q13.device) % total).view(max_tokens, top_k)
    weights = torch.full((max_tokens, top_k), 1.0 / top_k, device=q13.device)
    with flashinfer.autotune(True):
        fused_experts_flashinfer(x, weights, ids, w13, w2, parallel)
    _FLASHINFER_TUNED.add(key)
    return True


# ------------------------------------------------------------------------------------------------ selection


def resolve_moe_impl(
    name: str | None = "eager", device: torch.device | str = "cpu", quantization: str | None = None
) -> str:
    """THE selection point: the requested name (`ModelConfig.moe_impl`, passed down by the model's constructor;
    None means eager) and the expert weights' quantization -> the path that will run:

    * unquantised: "grouped" (what `eager` means) or "flashinfer";
    * fp8 (per-channel): "fp8_grouped" (`torch._scaled_grouped_mm`, sm90+), "fp8_scaled_mm" (sm89), else
      "grouped" on the dequantised weights (CPU, older GPUs: the reference numerics);
    * fp8_block: "flashinfer" (SM90, block-scale mode) with `moe_impl=flashinfer`, else "grouped" dequantised;
    * "reference" (the loop, for tests / bench) and the internal names above are taken as given.

    A requested fast path the device / install cannot run falls back with ONE warning naming the reason.
    """
    return _select_moe_impl(name, quantization, lambda layout: flashinfer_moe_available(device, layout),
                            lambda layout: fp8_fast_path(device, layout), warn=True)


def moe_impl_on(name: str | None, quantization: str | None, capability: tuple[int, int] | None,
                flashinfer_importable: bool = True) -> str:
    """What `resolve_moe_impl` picks on a card of `capability` (None: not CUDA) with or without an importable
    flashinfer, without one at hand: the memory plan's question, answered by the same rule."""
    def flashinfer(layout: str | None) -> tuple[bool, str]:
        ok, why = flashinfer_moe_supports(capability, layout)
        if ok and not flashinfer_importable:
            return False, "flashinfer is not importable"
        return ok, why

    return _select_moe_impl(name, quantization, flashinfer, lambda layout: fp8_fast_path_on(capability, layout),
                            warn=False)


def _select_moe_impl(name: str | None, quantization: str | None,
                     flashinfer: Callable[[str | None], tuple[bool, str]],
                     fp8_fast: Callable[[str | None], tuple[str | None, str]], warn: bool) -> str:
    """`resolve_moe_impl`'s order, over the two capability probes it is given (this device's, or a planned one's)."""
    key = (name or "eager").strip().lower()
    if key not in _ALL_IMPLS:
        raise ValueError(f"unknown MoE implementation {name!r}; allowed: {', '.join(MOE_IMPLS)}")
    layout = fp8_layout(parse_quantization(quantization))
    if key not in ("eager", "flashinfer"):
        return key
    if key == "flashinfer":
        ok, why = flashinfer(layout)
        if ok:
            return "flashinfer"
        if warn:
            warn_once(f"moe-flashinfer:{why}", f"MoE implementation 'flashinfer' unavailable ({why}); using eager")
    if layout is None:
        return "grouped"
    fast, why = fp8_fast(layout)
    if fast is not None:
        return fast
    if warn:
        warn_once(f"moe-fp8:{why}",
                  f"FP8 MoE fast path unavailable ({why}); the expert weights are dequantised in torch")
    return "grouped"


def fused_experts(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    impl: str = "grouped",
    parallel: MoEParallel = MoEParallel(),
) -> Tensor:
    """Dispatch routed experts to a resolved implementation (see `resolve_moe_impl`). With EP, w13/w2 hold
    only the local experts (`parallel.local_experts`) and ids stay global."""
    n_local = _num_experts(w13)
    offset = parallel.ep_rank * n_local
    total = n_local * parallel.ep_size
    if impl == "reference":
        return fused_experts_reference(
            hidden_states, topk_weights, topk_ids, w13, w2, expert_offset=offset, global_num_experts=total,
        )
    if not isinstance(w13, Tensor | Fp8Weight) or not isinstance(w2, Tensor | Fp8Weight):
        raise TypeError(f"MoE implementation {impl!r} needs stacked expert weights (see stack_linear_weights)")
    if impl == "grouped":
        return fused_experts_grouped(hidden_states, topk_weights, topk_ids, w13, w2, offset, total)
    if impl in _FP8_SCALED_IMPLS:
        return fused_experts_fp8(hidden_states, topk_weights, topk_ids, w13, w2, offset, total, impl=impl)
    if impl == "flashinfer":
        return fused_experts_flashinfer(hidden_states, topk_weights, topk_ids, w13, w2, parallel)
    raise ValueError(f"unresolved MoE implementation {impl!r}; call resolve_moe_impl first")


def moe_forward(
    hidden_states: Tensor,
    router_weight: Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    top_k: int,
    shared_w13: Tensor | Fp8Weight | None = None,
    shared_w2: Tensor | Fp8Weight | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    impl: str = "grouped",
    parallel: MoEParallel = MoEParallel(),
) -> Tensor:
    """Full MoE block with a chosen implementation and this rank's (sharded) weights -> this rank's partial sum.

    The router is replicated (every rank routes all tokens identically). The shared expert is TP-sharded like
    the experts and added on expert-parallel rank 0 only, so the sum over all ranks (one all-reduce) equals
    the unsharded block.
    """
    weights, ids = select_experts(hidden_states, router_weight, top_k, renormalize, routed_scaling_factor)
    out = fused_experts(hidden_states, weights, ids, w13, w2, impl=impl, parallel=parallel)
    if shared_w13 is not None and parallel.ep_rank == 0:
        if shared_w2 is None:
            raise ValueError("shared_w13 given without shared_w2")
        out = swiglu_mlp(hidden_states, shared_w13, shared_w2, impl=impl) + out
    return out
