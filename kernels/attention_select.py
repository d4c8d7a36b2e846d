"""The attention selection point: a backend name -> an `AttentionBackend` (kernels/attention.py states the contract).

It lives above both backends (the torch reference in kernels/attention.py, FlashInfer in
kernels/flashinfer_attention.py, which builds on the reference), so the import graph has no circle: the reference
never imports its selector. FlashInfer's module is loaded only when it is selected.
"""

from __future__ import annotations

from .attention import AttentionBackend, TorchPagedAttention
from .impl_names import ATTN_IMPLS


def get_attention_backend(
    name: str = "sdpa",
    num_qo_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    scale: float | None = None,
    variant: str | None = None,
) -> AttentionBackend:
    """THE selection point: name ("sdpa" = "torch", or "flashinfer"; the caller resolves it, e.g. from
    `ModelConfig.attn_impl`: kernels read no environment) -> a backend object. `flashinfer` resolves its
    device at the first plan() and falls back to the torch backend (same variant) with one warning when CUDA or
    flashinfer is missing."""
    if not isinstance(name, str):
        raise ValueError(f"attention backend name must be a string ({', '.join(ATTN_IMPLS)}), got {name!r}")
    key = name.strip().lower()
    if key in ("torch", "sdpa"):
        return TorchPagedAttention(num_qo_heads, num_kv_heads, head_dim, scale, variant or "mask")
    if key == "flashinfer":
        from .flashinfer_attention import FlashInferPagedAttention  # only where selected: no GPU, no import

        return FlashInferPagedAttention(num_qo_heads, num_kv_heads, head_dim, scale, variant or "segments")
    raise ValueError(f"unknown attention backend {name!r}; available: torch, {', '.join(ATTN_IMPLS)}")
