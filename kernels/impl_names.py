"""The user-facing implementation names of the kernel selection points (`ModelConfig.attn_impl` / `moe_impl` /
`quantization`).

One home, torch-free: the config validates its flags against these without importing torch, and the selection
points (`kernels.attention_select.get_attention_backend`, `kernels.moe.resolve_moe_impl`) name them in their errors."""

from __future__ import annotations

ATTN_IMPLS = ("sdpa", "flashinfer")
MOE_IMPLS = ("eager", "flashinfer")
QUANTIZATIONS = ("none", "fp8", "fp8_block")
"""Expert weight quantisation (`kernels.quantization`): fp8 = per-output-channel scales, fp8_block = 128x128 block
scales (the layout FlashInfer's block-scale fused MoE reads)."""

__all__ = ["ATTN_IMPLS", "MOE_IMPLS", "QUANTIZATIONS"]
