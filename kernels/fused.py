"""Optional fused elementwise kernels (FlashInfer rmsnorm / silu_and_mul) on CUDA.

Off unless the caller asks (`fused=True` on `kernels.norm.rms_norm` / `RMSNorm` / `kernels.activation.silu_and_mul`):
FlashInfer's rmsnorm multiplies by the weight in fp32 before the cast, whereas the official RMSNorm casts first
(`kernels.norm`), so the fused path is only bf16-close, not bit-equal. `flashinfer` is imported lazily, never on CPU.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor


@functools.cache
def _flashinfer() -> ModuleType | None:
    try:
        import flashinfer
    except Exception:  # noqa: BLE001 - any import failure: stay on the torch reference
        return None
    return flashinfer


def flashinfer_for(x: Tensor, enabled: bool) -> ModuleType | None:
    """The flashinfer module when a fused op may run on `x` (asked for, CUDA, fp16/bf16, importable), else None."""
    if not (enabled and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return None
    return _flashinfer()
