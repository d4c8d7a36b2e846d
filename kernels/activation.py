"""Gated activation for HunyuanImage-3.0's fused `gate_and_up_proj` output.

The checkpoint stores the fused projection as [up; gate]: the FIRST half is the linear branch and SiLU is
applied to the SECOND half. This is the opposite of vLLM's [gate; up] convention, so the order is fixed here
in one place. FlashInfer's `silu_and_mul` is gate-first; it is used (via `kernels.fused`) only for inputs laid
out gate-first (`gate_first=True`), since swapping the halves of an [up; gate] tensor would cost the copy the
fused kernel saves.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .fused import flashinfer_for


def silu_and_mul_reference(x: Tensor, gate_first: bool = False) -> Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    a, b = x.chunk(2, dim=-1)
    up, gate = (b, a) if gate_first else (a, b)
    return up * F.silu(gate)


def silu_and_mul(x: Tensor, gate_first: bool = False, fused: bool = False) -> Tensor:
    """[..., 2I] laid out as [up, gate] (or [gate, up] with gate_first) -> up * silu(gate), shape [..., I].

    The selection point: FlashInfer's fused kernel for gate-first CUDA inputs when `fused`.
    """
    fi = flashinfer_for(x, fused) if gate_first and x.is_contiguous() else None
    if fi is not None:
        return fi.silu_and_mul(x)
    return silu_and_mul_reference(x, gate_first)
