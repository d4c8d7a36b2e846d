"""The one switch for optional fused elementwise kernels (FlashInfer rmsnorm / silu_and_mul) on CUDA.

Off by default: FlashInfer's rmsnorm multiplies by the weight in fp32 before the cast, whereas the official
RMSNorm casts first (`kernels.norm`), so the fused path is only bf16-close, not bit-equal. Turn on with
`DIFFGENTOR_FUSED_OPS=1` (or `set_fused_ops(True)`). `flashinfer` is imported lazily, never on CPU.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

FUSED_OPS_ENV = "DIFFGENTOR_FUSED_OPS"
_enabled: bool | None = None
_module: ModuleType | None | bool = None  # False = import failed


def set_fused_ops(enabled: bool | None) -> None:
    """Force the fused paths on/off; None re-reads $DIFFGENTOR_FUSED_OPS."""
    global _enabled
    _enabled = enabled


def fused_ops_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(FUSED_OPS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def flashinfer_for(x: Tensor) -> ModuleType | None:
    """The flashinfer module when a fused op may run on `x` (CUDA, fp16/bf16, switch on), else None."""
    global _module
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and fused_ops_enabled()):
        return None
    if _module is None:
        try:
            import flashinfer

            _module = flashinfer
        except Exception:  # noqa: BLE001 - any import failure: stay on the torch reference
            _module = False
    return _module or None
