"""RMSNorm with the official HunyuanImage-3.0 numerics.

The official norm normalises in fp32, casts the normalised activations back to the input dtype and only
then multiplies by the weight. Doing the weight multiply in fp32 instead (as many ports do) changes bf16
results, so the reference keeps the official order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise the last axis of `x` (fp32 math, official cast order) and scale by `weight`."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


class RMSNorm(nn.Module):
    """Learned-scale RMSNorm over the last axis; `.weight` matches the checkpoint's `*.weight` key."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
