"""RMSNorm with the official HunyuanImage-3.0 numerics.

The official norm normalises in fp32, casts the normalised activations back to the input dtype and only
then multiplies by the weight. Doing the weight multiply in fp32 instead (as many ports do) changes bf16
results, so the reference keeps the official order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fused import flashinfer_for


def rms_norm(x: Tensor, weight: Tensor, eps: float, fused: bool = False) -> Tensor:
    """The selection point: FlashInfer's fused rmsnorm when `fused` on CUDA (bf16-close: it multiplies the weight
    before the cast), else the torch reference (official numerics)."""
    fi = flashinfer_for(x, fused)
    if fi is not None and weight.dtype == x.dtype and x.shape[-1] == weight.shape[-1]:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        return fi.rmsnorm(x2, weight, eps).view(x.shape)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise the last axis of `x` (fp32 math, official cast order) and scale by `weight`."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


class RMSNorm(nn.Module):
    """Learned-scale RMSNorm over the last axis; `.weight` matches the checkpoint's `*.weight` key."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = fused  # FlashInfer's fused kernel on CUDA (bf16-close, see `rms_norm`)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.fused)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
