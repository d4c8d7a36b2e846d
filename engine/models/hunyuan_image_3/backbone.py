"""The HunyuanImage-3.0 decoder stack, shaped for the engine: flat token batches over a paged KV cache.

Parameter names equal the official checkpoint keys minus the leading "model." (so the top-level model's
`model` attribute loads the checkpoint unchanged), except for one deliberate layout difference: our fused
`qkv_proj.weight` stores [all q heads; all k heads; all v heads] (simple column sharding for tensor parallel);
`weights.qkv_official_to_ours` re-lays the official per-KV-group interleave at load.

The forward takes embeddings the caller already assembled (text, image, timestep tokens), explicit 2-D
RoPE positions and attention metadata, and returns the last layer's hidden states WITHOUT ln_f: the text head
applies `final_norm` before lm_head, the diffusion head reads the raw states (spec §3.1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffgentor.engine.kv_cache import PagedKVCache
from diffgentor.kernels.attention import AttentionMetadata, get_attention_backend
from diffgentor.kernels.moe import moe_forward_reference, swiglu_mlp
from diffgentor.kernels.norm import RMSNorm
from diffgentor.kernels.rope import apply_rope, rope_cos_sin

from .config import ConfigError, HunyuanImage3Config

ROUTER_WEIGHT_SUFFIX = "mlp.gate.wg.weight"


def keep_fp32_param(name: str) -> bool:
    """Parameters that stay fp32 whatever the model dtype: the MoE routers (official module is fp32)."""
    return name.endswith(ROUTER_WEIGHT_SUFFIX)


class SwiGLUMLP(nn.Module):
    """Expert / shared / dense MLP with the checkpoint's fused [up; gate] projection."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_and_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu_mlp(x, self.gate_and_up_proj.weight, self.down_proj.weight)


class TopKRouter(nn.Module):
    """Holds the router weight `wg` (fp32); dtype casts of the module (`.to(bf16)`, `.half()`) keep fp32."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False, dtype=torch.float32)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TopKRouter:
        def device_only(t: Tensor) -> Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        return super()._apply(device_only, recurse)


class MoEBlock(nn.Module):
    """Routed experts (dropless, renormalised top-k) plus the unscaled shared expert."""

    def __init__(self, cfg: HunyuanImage3Config, layer_idx: int) -> None:
        super().__init__()
        inter = cfg.moe_intermediate_size[layer_idx]
        self.top_k = cfg.moe_topk[layer_idx]
        self.renormalize = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.gate = TopKRouter(cfg.hidden_size, cfg.num_experts)
        if cfg.use_mixed_mlp_moe:
            self.shared_mlp = SwiGLUMLP(cfg.hidden_size, inter * cfg.num_shared_expert[layer_idx])
        self.experts = nn.ModuleList(SwiGLUMLP(cfg.hidden_size, inter) for _ in range(cfg.num_experts))

    def forward(self, x: Tensor) -> Tensor:
        shared = getattr(self, "shared_mlp", None)
        return moe_forward_reference(
            x,
            self.gate.wg.weight,
            [e.gate_and_up_proj.weight for e in self.experts],
            [e.down_proj.weight for e in self.experts],
            self.top_k,
            shared_w13=None if shared is None else shared.gate_and_up_proj.weight,
            shared_w2=None if shared is None else shared.down_proj.weight,
            renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor,
        )


class PagedSelfAttention(nn.Module):
    """GQA with fused QKV ([q; k; v] rows): RoPE, then qk-norm, K/V into the paged cache, then attention."""

    def __init__(self, cfg: HunyuanImage3Config, layer_idx: int, attn_backend: str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = bool(cfg.raw.get("attention_bias", False))
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.qkv_out_features, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.attn_fn = get_attention_backend(attn_backend)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_metadata: AttentionMetadata, kv_cache: PagedKVCache
    ) -> Tensor:
        n = x.shape[0]
        d = self.head_dim
        widths = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        q, k, v = self.qkv_proj(x).split(widths, dim=-1)
        q = apply_rope(q.reshape(n, self.num_heads, d), cos, sin)
        k = apply_rope(k.reshape(n, self.num_kv_heads, d), cos, sin)
        v = v.reshape(n, self.num_kv_heads, d)
        if hasattr(self, "query_layernorm"):
            q = self.query_layernorm(q)
            k = self.key_layernorm(k)
        # RoPE/qk-norm ran in fp32 (fp32 cos/sin); back to the activation dtype as the official code does.
        q = q.to(v.dtype)
        k = k.to(v.dtype)
        kv_cache.write(self.layer_idx, attn_metadata.slot_mapping, k, v)
        o = self.attn_fn(q, attn_metadata, kv_cache, self.layer_idx, self.scale)
        return self.o_proj(o.reshape(n, self.num_heads * d))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: HunyuanImage3Config, layer_idx: int, attn_backend: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = PagedSelfAttention(cfg, layer_idx, attn_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if cfg.num_experts > 1 and cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoEBlock(cfg, layer_idx)
        else:
            # official dense layer: keys mlp.gate_and_up_proj / mlp.down_proj sized by intermediate_size
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_metadata: AttentionMetadata, kv_cache: PagedKVCache
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_metadata, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class HunyuanImage3Backbone(nn.Module):
    """wte + decoder layers + ln_f; `forward` runs the layers only (no ln_f)."""

    def __init__(self, cfg: HunyuanImage3Config, attn_backend: str = "torch") -> None:
        super().__init__()
        if cfg.raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg.raw.get('hidden_act')!r} is not supported (only 'silu')")
        if cfg.raw.get("mlp_bias", False):
            raise ConfigError("mlp_bias=true is not supported (HunyuanImage-3.0 MLPs have no bias)")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attn_backend) for i in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token embeddings [N, H] (the caller overwrites image / timestep slots before `forward`)."""
        return self.wte(input_ids)

    def forward(
        self,
        hidden_states: Tensor,
        positions: Tensor,
        attn_metadata: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> Tensor:
        """[N, H] input embeddings, [N, 2] (y, x) RoPE positions -> [N, H] last-layer states (no ln_f)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        h = hidden_states
        for layer in self.layers:
            h = layer(h, cos, sin, attn_metadata, kv_cache)
        return h

    def final_norm(self, hidden_states: Tensor) -> Tensor:
        """ln_f, for the text head only."""
        return self.ln_f(hidden_states)

    def make_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A cache shaped for this model (layers, KV heads, head_dim); dtype defaults to wte's dtype."""
        cfg = self.config
        return PagedKVCache(
            cfg.num_hidden_layers,
            num_blocks,
            block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=dtype or self.wte.weight.dtype,
            device=device,
        )
