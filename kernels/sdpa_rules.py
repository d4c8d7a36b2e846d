"""Which fused kernels CUDA's `scaled_dot_product_attention` could run for a call, decided from shapes and flags.

PyTorch picks the first eligible backend in its priority order (cuDNN first only with cuDNN > 9.15 on sm90 /
sm100; then flash, memory-efficient, and the math kernel last). The math kernel materialises fp32 scores
[B, Hq, n, m] (gigabytes at the real shapes), so no engine call may leave it as the only choice. This module
restates the eligibility rules of PyTorch 2.11 - 2.13 that depend on the call (not on the card), from
aten/src/ATen/native/transformers/cuda/sdp_utils.cpp and the helpers in the installed header
torch/include/ATen/native/transformers/sdp_utils_cpp.h:

* every fused kernel: 4-D q/k/v (`check_tensor_shapes`), no empty sequence, last-dim stride 1;
* flash: no mask at all (`check_for_attn_mask`); fp16/bf16; head dim <= 256 and equal for q/k/v; `is_causal`
  only with n == m (`check_flash_causal_non_square_seqlens`); GQA allowed with `enable_gqa`
  (`check_batch_size_and_num_heads_dense<true>`);
* memory-efficient: a mask is fine (last-dim stride 1); head dim a multiple of 8 for fp16/bf16 on sm80+
  (`check_head_dim_size_mem_efficient`); q/k/v storage offsets aligned to 16 bytes
  (`check_data_ptr_alignment_mem_efficient`); equal query, key and value heads even with `enable_gqa`
  (`check_batch_size_and_num_heads_dense<false>`: no GQA);
* cuDNN: mask (broadcastable shape, `check_attn_mask_shape`) and GQA allowed; head dim <= 128 and a multiple of
  8; key length != 1.

`record_sdpa_calls` records every SDPA call of a region (a `TorchFunctionMode`), so a CPU test can run an engine
step and check each call with `fused_kernels` "as on CUDA" (the dtype the CUDA path computes in is passed, since
CPU computes in fp32). bench/gpu_check.py compares these rules with `torch.backends.cuda.can_use_*` on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SdpaCall:
    """The facts of one SDPA call that the eligibility rules read (no tensor data)."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    last_strides: tuple[int, int, int]
    offsets: tuple[int, int, int]  # storage offsets in elements
    dtype: torch.dtype
    mask_shape: tuple[int, ...] | None
    mask_last_stride: int | None
    is_causal: bool
    enable_gqa: bool

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
           enable_gqa: bool = False) -> SdpaCall:
        return cls(
            tuple(q.shape), tuple(k.shape), tuple(v.shape), (q.stride(-1), k.stride(-1), v.stride(-1)),
            (q.storage_offset(), k.storage_offset(), v.storage_offset()), q.dtype,
            None if attn_mask is None else tuple(attn_mask.shape),
            None if attn_mask is None else attn_mask.stride(-1), bool(is_causal), bool(enable_gqa),
        )

    @property
    def masked_gqa(self) -> bool:
        """A mask together with grouped-query heads: the combination no fused CUDA kernel but cuDNN takes."""
        return self.mask_shape is not None and len(self.q_shape) == 4 and self.q_shape[1] != self.k_shape[1]

    def describe(self) -> str:
        return (f"q{list(self.q_shape)} k{list(self.k_shape)} mask={self.mask_shape} causal={self.is_causal} "
                f"gqa={self.enable_gqa}")


def _common_ok(c: SdpaCall) -> bool:
    if not (len(c.q_shape) == len(c.k_shape) == len(c.v_shape) == 4):
        return False
    if 0 in (c.q_shape[2], c.k_shape[2]) or any(s != 1 for s in c.last_strides):
        return False
    return c.q_shape[0] == c.k_shape[0] == c.v_shape[0]


def _heads_ok(c: SdpaCall, supports_gqa: bool) -> bool:
    hq, hk, hv = c.q_shape[1], c.k_shape[1], c.v_shape[1]
    if c.enable_gqa and supports_gqa:
        return hk == hv and hq % hk == 0
    return hq == hk == hv


def fused_kernels(call: SdpaCall, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """The fused CUDA kernels ("flash", "efficient", "cudnn") whose call-dependent rules (module docstring) admit
    `call` on an sm90 card, computing in `dtype` (default: the call's own). Empty = only the math kernel."""
    dtype = dtype or call.dtype
    if not _common_ok(call):
        return ()
    d, dk, dv = call.q_shape[-1], call.k_shape[-1], call.v_shape[-1]
    n, m = call.q_shape[2], call.k_shape[2]
    out = []
    if (call.mask_shape is None and dtype in HALF_DTYPES and d == dk == dv and d <= 256
            and (not call.is_causal or n == m) and _heads_ok(call, supports_gqa=True)):
        out.append("flash")
    align = 8 if dtype in HALF_DTYPES else 4
    offsets_ok = all((off * torch.finfo(dtype).bits // 8) % 16 == 0 for off in call.offsets)
    mask_ok = call.mask_shape is None or call.mask_last_stride == 1
    if d == dk and d % align == 0 and dv % align == 0 and offsets_ok and mask_ok and _heads_ok(call, False):
        out.append("efficient")
    if dtype in HALF_DTYPES and d <= 128 and d % 8 == 0 and dv % 8 == 0 and m != 1 and _mask_shape_ok(call) \
            and _heads_ok(call, supports_gqa=True):
        out.append("cudnn")
    return tuple(out)


def _mask_shape_ok(c: SdpaCall) -> bool:
    if c.mask_shape is None:
        return True
    b, h, n, m = c.q_shape[0], c.q_shape[1], c.q_shape[2], c.k_shape[2]
    ms = c.mask_shape
    if ms[-2] not in (1, n) or ms[-1] not in (1, m):
        return False
    return len(ms) == 2 or (len(ms) == 4 and ms[0] in (1, b) and ms[1] in (1, h))


class record_sdpa_calls(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's own modes
    """`with record_sdpa_calls() as rec:` ... `rec.calls`: every `scaled_dot_product_attention` call inside."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[SdpaCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            bound = dict(zip(names, args)) | kwargs
            self.calls.append(SdpaCall.of(bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                                          bound.get("is_causal", False), bound.get("enable_gqa", False)))
        return func(*args, **kwargs)


__all__ = ["SdpaCall", "fused_kernels", "record_sdpa_calls"]
