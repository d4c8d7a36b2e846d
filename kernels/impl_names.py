"""The user-facing implementation names of the kernel selection points (`EngineConfig.attn_impl` / `moe_impl`).

One home, torch-free: the config validates its flags against these without importing torch, and the selection
points (`kernels.attention.get_attention_backend`, `kernels.moe.resolve_moe_impl`) name them in their errors."""

from __future__ import annotations

ATTN_IMPLS = ("sdpa", "flashinfer")
MOE_IMPLS = ("eager", "flashinfer")

__all__ = ["ATTN_IMPLS", "MOE_IMPLS"]
