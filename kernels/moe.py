"""Reference mixture-of-experts: fp32 routing and a dropless loop over experts.

This is the semantic oracle for every faster MoE path (grouped GEMM, FlashInfer CUTLASS): they must take the
same arguments and return the same result. Decisions it encodes (spec "Our decisions" 1 and §3.6):
* the router runs in fp32 (fp32 input, fp32 weight), softmax over all experts, top-k, then renormalise the k
  probabilities (denominator clamped), on EVERY path, a single decode token included;
* no token is ever dropped (no capacity);
* the combine weights are rounded to the activation dtype before use (as the official loop does);
* the shared expert is added with weight 1.
Expert weights are accepted stacked ([E, 2I, H] / [E, H, I]) or as per-expert sequences, so the module layout
of the checkpoint (one Linear per expert) and a stacked fast-path layout share this signature.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import silu_and_mul
from .fallback import warn_once

ExpertWeights = Tensor | Sequence[Tensor]

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


def swiglu_mlp(x: Tensor, gate_and_up_weight: Tensor, down_weight: Tensor) -> Tensor:
    """One expert / shared MLP: down(silu_and_mul(gate_and_up(x))), no biases."""
    return F.linear(silu_and_mul(F.linear(x, gate_and_up_weight)), down_weight)


def _num_experts(w: ExpertWeights) -> int:
    return int(w.shape[0]) if isinstance(w, Tensor) else len(w)


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

    w13: per expert [2I, H] in the checkpoint's [up; gate] row order; w2: per expert [H, I].
    Expert parallel: the weights are the local experts with global ids `expert_offset ...`; ids stay global
    (range [0, global_num_experts)) and assignments to other ranks' experts contribute zero.
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
        y = swiglu_mlp(hidden_states.index_select(0, tokens), w13[e], w2[e])
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

MOE_IMPL_ENV = "DG_HUNYUAN_IMAGE_3_MOE_IMPL"
MOE_IMPLS = ("eager", "flashinfer")  # user-facing names (EngineConfig.moe_impl)
_ALL_IMPLS = ("reference", "grouped", "eager", "flashinfer")



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


def _local_assignments(topk_ids: Tensor, num_local: int, expert_offset: int) -> tuple[Tensor, Tensor]:
    """Flat local expert ids [T*k] (num_local for assignments owned by another rank) and the validity mask."""
    local = topk_ids.reshape(-1).long() - expert_offset
    valid = (local >= 0) & (local < num_local)
    return torch.where(valid, local, torch.full_like(local, num_local)), valid


# ------------------------------------------------------------------------------------------------ grouped GEMM

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


def _segment_mm(a: Tensor, b: Tensor, counts: list[int]) -> Tensor:
    """Fallback of `_grouped_mm` over rows sorted by group: one matmul per non-empty group."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(a[start : start + n], b[g], out=out[start : start + n])
        start += n
    return out


def fused_experts_grouped(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    expert_offset: int = 0,
) -> Tensor:
    """Routed-expert output via sort-by-expert + grouped GEMM; same contract as `fused_experts_reference`.

    w13 [E_local, 2I, H] ([up; gate] rows), w2 [E_local, H, I] stacked (nn.Linear layout; transposed VIEWS are
    fed to the grouped GEMM, no copy). The (token, choice) assignments are sorted by expert with a stable sort,
    run as one grouped GEMM per projection, then un-permuted by a scatter with unique indices and reduced over
    the k choices in a fixed order, so the result is deterministic and batch-composition independent up to
    the GEMM itself. Falls back to a per-expert matmul over the same sorted rows when `torch._grouped_mm` is
    missing or unsupported for the device / dtype / shape.
    """
    t, h = hidden_states.shape
    if w13.dim() != 3 or w2.dim() != 3:
        raise TypeError("fused_experts_grouped needs stacked [E, 2I, H] / [E, H, I] expert weights")
    num_local = int(w13.shape[0])
    out = hidden_states.new_zeros(t, h)
    if t == 0:
        return out
    k = int(topk_ids.shape[1])
    keys, valid = _local_assignments(topk_ids, num_local, expert_offset)
    order = torch.argsort(keys, stable=True)
    counts_t = torch.bincount(keys, minlength=num_local + 1)
    ep = expert_offset != 0 or bool((~valid).any())
    if ep:  # drop other ranks' assignments (sorted last): one host sync, EP only
        n_valid = int(valid.sum())
        order = order[:n_valid]
    counts_t = counts_t[:num_local]
    offs = torch.cumsum(counts_t, 0).to(torch.int32)
    x = hidden_states.index_select(0, order // k)
    gu = _grouped_mm(x, w13.transpose(1, 2), offs)
    counts: list[int] | None = None
    if gu is None:
        counts = counts_t.tolist()
        gu = _segment_mm(x, w13.transpose(1, 2), counts)
    act = silu_and_mul(gu)
    y_sorted = _grouped_mm(act, w2.transpose(1, 2), offs) if counts is None else None
    if y_sorted is None:
        y_sorted = _segment_mm(act, w2.transpose(1, 2), counts if counts is not None else counts_t.tolist())
    y = hidden_states.new_zeros(t * k, h)
    y.index_copy_(0, order, y_sorted)  # each assignment exactly once: deterministic
    w = topk_weights.reshape(t * k).to(hidden_states.dtype)
    if ep:
        w = torch.where(valid, w, torch.zeros_like(w))
    y = y.view(t, k, h)
    w = w.view(t, k, 1)
    # Combine in a fixed choice order with elementwise ops: a `.sum(dim=1)` may split the k-reduction across
    # threads depending on T, which would make a token's output depend on the batch it is in.
    out = y[:, 0] * w[:, 0]
    for j in range(1, k):
        out += y[:, j] * w[:, j]
    return out


# ------------------------------------------------------------------------------------------------ FlashInfer


def flashinfer_moe_available(device: torch.device | str) -> tuple[bool, str]:
    """(usable, reason): FlashInfer's CUTLASS fused MoE needs CUDA sm90+ and an importable flashinfer."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"device {device} is not CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return False, f"compute capability sm{major}{minor} < sm90"
    try:
        from flashinfer.fused_moe import cutlass_fused_moe  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"flashinfer is not importable ({type(e).__name__}: {e})"
    return True, "ok"


def fused_experts_flashinfer(
    hidden_states: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    parallel: MoEParallel = MoEParallel(),
) -> Tensor:
    """FlashInfer `cutlass_fused_moe`: w13 [E_local, 2I_tp, H] in [up; gate] order (FlashInfer's w31 order, as
    stored by the checkpoint), w2 [E_local, H, I_tp], GLOBAL int32 ids, fp32 combine weights (rounded to the
    activation dtype first, as every other path does). Output read from the preallocated buffer (0.5.0 returns
    a list)."""
    from flashinfer.fused_moe import cutlass_fused_moe

    x = hidden_states.contiguous()
    out = torch.zeros_like(x)
    if x.shape[0] == 0:
        return out
    cutlass_fused_moe(
        x,
        topk_ids.to(torch.int32).contiguous(),
        topk_weights.to(x.dtype).to(torch.float32).contiguous(),
        w13,
        w2,
        x.dtype,
        quant_scales=None,
        tp_size=parallel.tp_size,
        tp_rank=parallel.tp_rank,
        ep_size=parallel.ep_size,
        ep_rank=parallel.ep_rank,
        output=out,
    )
    return out


# ------------------------------------------------------------------------------------------------ selection


def resolve_moe_impl(name: str | None = None, device: torch.device | str = "cpu") -> str:
    """THE selection point: requested name (None -> $DG_HUNYUAN_IMAGE_3_MOE_IMPL, default eager) -> the path
    that will run: "grouped" (what `eager` means), "flashinfer", or "reference" (the loop, for tests/bench).

    `flashinfer` without CUDA sm90+ or without an importable flashinfer falls back to eager with ONE warning.
    """
    if name is None:
        name = os.environ.get(MOE_IMPL_ENV, "").strip() or "eager"
    key = name.strip().lower()
    if key not in _ALL_IMPLS:
        raise ValueError(f"unknown MoE implementation {name!r}; allowed: {', '.join(MOE_IMPLS)}")
    if key == "eager":
        return "grouped"
    if key == "flashinfer":
        ok, why = flashinfer_moe_available(device)
        if not ok:
            warn_once(f"moe-flashinfer:{why}", f"MoE implementation 'flashinfer' unavailable ({why}); using eager")
            return "grouped"
    return key


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
    if impl == "reference":
        return fused_experts_reference(
            hidden_states, topk_weights, topk_ids, w13, w2, expert_offset=offset,
            global_num_experts=n_local * parallel.ep_size,
        )
    if not isinstance(w13, Tensor) or not isinstance(w2, Tensor):
        w13, w2 = torch.stack(list(w13)), torch.stack(list(w2))
    if impl == "grouped":
        return fused_experts_grouped(hidden_states, topk_weights, topk_ids, w13, w2, expert_offset=offset)
    if impl == "flashinfer":
        return fused_experts_flashinfer(hidden_states, topk_weights, topk_ids, w13, w2, parallel)
    raise ValueError(f"unresolved MoE implementation {impl!r}; call resolve_moe_impl first")


def moe_forward(
    hidden_states: Tensor,
    router_weight: Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    top_k: int,
    shared_w13: Tensor | None = None,
    shared_w2: Tensor | None = None,
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
        out = swiglu_mlp(hidden_states, shared_w13, shared_w2) + out
    return out
