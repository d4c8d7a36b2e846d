"""Gated activation for HunyuanImage-3.0's fused `gate_and_up_proj` output.

The checkpoint stores the fused projection as [up; gate]: the FIRST half is the linear branch and SiLU is
applied to the SECOND half. This is the opposite of vLLM's [gate; up] convention, so the order is fixed here
in one place.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def silu_and_mul(x: Tensor) -> Tensor:
    """[..., 2I] laid out as [up, gate] -> up * silu(gate), shape [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    up, gate = x.chunk(2, dim=-1)
    return up * F.silu(gate)
