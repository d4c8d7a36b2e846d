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

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import silu_and_mul

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
) -> Tensor:
    """Routed-expert output [T, H] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x_t), dropless.

    w13: per expert [2I, H] in the checkpoint's [up; gate] row order; w2: per expert [H, I].
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
    for e in torch.unique(flat_ids).tolist():
        if not 0 <= e < num_experts:
            raise ValueError(f"expert id {e} out of range [0, {num_experts})")
        assignment = (flat_ids == e).nonzero(as_tuple=True)[0]
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
    weights, ids = select_experts(hidden_states, router_weight, top_k, renormalize, routed_scaling_factor)
    out = fused_experts_reference(hidden_states, weights, ids, w13, w2)
    if shared_w13 is not None:
        if shared_w2 is None:
            raise ValueError("shared_w13 given without shared_w2")
        out = swiglu_mlp(hidden_states, shared_w13, shared_w2) + out
    return out
