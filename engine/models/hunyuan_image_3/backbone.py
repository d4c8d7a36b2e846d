"""The HunyuanImage-3.0 decoder stack, shaped for the engine: flat token batches over a paged KV cache.

Parameter names equal the official checkpoint keys minus the leading "model." (so the top-level model's
`model` attribute loads the checkpoint unchanged), except for one deliberate layout difference: our fused
`qkv_proj.weight` stores [all q heads; all k heads; all v heads] (simple column sharding for tensor parallel);
`weights.qkv_official_to_ours` re-lays the official per-KV-group interleave at load.

Tensor parallel (`parallel=ParallelContext(tp_size > 1, ...)`, see `diffgentor.engine.parallel`): every
parameter keeps its checkpoint name but holds only this rank's slice, read by `weights.load_state_into` with
`hunyuan_shard_plan`:
- `qkv_proj` column-parallel (this rank's q heads, then its KV heads, then their V heads: our [Q;K;V] layout
  sliced per part), `o_proj` row-parallel; ONE all-reduce after attention;
- MoE: the router is replicated (fp32, every rank routes every token identically); routed experts are tensor
  parallel on the width (the [up; gate] halves sliced separately) or, under expert parallel, whole experts;
  the shared expert (and a dense MLP) is width-sharded; routed + shared partial sums take ONE all-reduce;
- `wte` vocab-parallel (masked lookup + all-reduce); norms replicated; the KV cache holds this rank's KV heads.
Inputs (embeddings, positions, metadata) must be identical on every rank; outputs are then identical too.

Sequence parallel (`parallel.sp_size > 1`, Ulysses, `kernels.ulysses`), for denoising steps only:
`forward_sequence_parallel` takes the step's text rows and its image-block rows separately, both whole on every rank.
Each rank of the sequence-parallel group keeps 1/N of the image rows (padded) and runs every per-token op (norms,
projections, RoPE, MoE, the tensor-parallel all-reduces within its own tensor-parallel group) on the text rows plus
its share; attention runs the text rows as usual and the image rows through two all-to-alls around the same paged
attention over 1/N of this rank's heads; the last layer's image rows are gathered. Text steps never split, so every
rank of a sequence-parallel group holds the whole prompt KV (of its tensor-parallel heads).

The forward takes embeddings the caller already assembled (text, image, timestep tokens), explicit 2-D
RoPE positions and attention metadata, and returns the last layer's hidden states WITHOUT ln_f: the text head
applies `final_norm` before lm_head, the diffusion head reads the raw states (as the official model does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffgentor.engine.parallel import ParallelContext
from diffgentor.kernels.attention import AttentionBackend, AttentionMetadata
from diffgentor.kernels.attention_select import get_attention_backend
from diffgentor.kernels.kv_cache import PagedKVCache
from diffgentor.kernels.moe import (
    MoEParallel,
    flashinfer_moe_workspace_size,
    fused_experts,
    one_expert,
    reserve_flashinfer_moe_workspace,
    resolve_moe_impl,
    select_experts,
    swiglu_mlp,
    tune_flashinfer_moe,
)
from diffgentor.kernels.norm import RMSNorm
from diffgentor.kernels.quantization import Fp8Weight, linear_weight, stack_linear_weights, storage_ptr
from diffgentor.kernels.rope import apply_rope, rope_cos_sin
from diffgentor.kernels.ulysses import RowShard, UlyssesAttention, UlyssesHeads

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

    def forward(self, x: Tensor, impl: str = "reference") -> Tensor:
        return swiglu_mlp(x, linear_weight(self.gate_and_up_proj), linear_weight(self.down_proj), impl)


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
    """Routed experts (dropless, renormalised top-k) plus the unscaled shared expert.

    `moe_impl` (ModelConfig.moe_impl; None = eager) is resolved by `kernels.moe.resolve_moe_impl` at the first
    forward, when the device and the experts' quantization (FP8 weights attached at load, see
    `kernels.quantization`) are known. The fast paths need stacked [E, 2I, H] / [E, H, I] weights: they are
    stacked ONCE and every expert's parameter becomes a view of the stack (no second copy; checkpoint keys and
    `state_dict` unchanged). A later `.to()` / reload replaces the parameters and triggers a re-stack.
    """

    def __init__(
        self, cfg: HunyuanImage3Config, layer_idx: int, moe_impl: str | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        par = parallel or ParallelContext()
        inter = cfg.moe_intermediate_size[layer_idx]
        self.top_k = cfg.moe_topk[layer_idx]
        self.renormalize = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.gate = TopKRouter(cfg.hidden_size, cfg.num_experts)
        if cfg.use_mixed_mlp_moe:
            shared = inter * cfg.num_shared_expert[layer_idx]
            self.shared_mlp = SwiGLUMLP(cfg.hidden_size, len(par.shard_range(shared, "shared-expert columns")))
        self.moe_parallel = par.moe_parallel()
        if par.expert_parallel and par.is_parallel:
            # whole experts, keyed by their GLOBAL id so parameter names stay the checkpoint keys
            self.experts: nn.Module = nn.ModuleDict(
                {str(e): SwiGLUMLP(cfg.hidden_size, inter) for e in par.expert_range(cfg.num_experts)}
            )
        else:
            width = len(par.shard_range(inter, "expert columns")) if par.is_parallel else inter
            self.experts = nn.ModuleList(SwiGLUMLP(cfg.hidden_size, width) for _ in range(cfg.num_experts))
        self.moe_impl = moe_impl
        self._impl: str | None = None
        self._stack: tuple[Tensor, Tensor] | None = None

    def _expert_list(self) -> list[nn.Module]:
        return list(self.experts.values()) if isinstance(self.experts, nn.ModuleDict) else list(self.experts)

    def _stacked(self) -> tuple[Tensor, Tensor]:
        experts = self._expert_list()
        first, last = experts[0], experts[-1]
        if self._stack is not None:
            if torch.compiler.is_compiling():
                # traced (torch.compile): the eager forward before it checked the stack; data pointers are not
                # traceable, and a graph never outlives a weight reload (docs/decisions.md, CUDA graphs)
                return self._stack
            w13, w2 = self._stack
            if (first.gate_and_up_proj.weight.data_ptr() == storage_ptr(w13)
                    and last.down_proj.weight.data_ptr() == storage_ptr(w2[-1])):
                return self._stack
        self._stack = (stack_linear_weights([e.gate_and_up_proj for e in experts]),
                       stack_linear_weights([e.down_proj for e in experts]))
        return self._stack

    def quantization(self) -> str | None:
        """The experts' weight quantization as loaded: None, "fp8" (per channel) or "fp8_block"."""
        w = linear_weight(self._expert_list()[0].gate_and_up_proj)
        if isinstance(w, Tensor):
            return None
        return "fp8" if w.block is None else "fp8_block"

    def tune(self, max_tokens: int, dtype: torch.dtype, workspace_bytes: int | None = None) -> bool:
        """Start-up preparation of FlashInfer's fused MoE for steps of up to `max_tokens` tokens (nothing for the other
        paths): the process's one reused workspace (`workspace_bytes`: the memory plan's size) and tactic tuning, once
        per process and weight shape, for the routed experts and a block-scaled FP8 shared expert (which runs as a
        one-expert fused MoE). True when it tuned."""
        w = self.gate.wg.weight
        if self._impl is None:
            self._impl = resolve_moe_impl(self.moe_impl, w.device, self.quantization())
        if self._impl != "flashinfer":
            return False
        w13, w2 = self._stacked()
        shapes = [(w13, w2, self.top_k, self.moe_parallel)]
        shared = getattr(self, "shared_mlp", None)
        s13 = None if shared is None else linear_weight(shared.gate_and_up_proj)
        if isinstance(s13, Fp8Weight) and s13.block is not None:  # its partial sum is local: no TP / EP arguments
            shapes.append((one_expert(s13), one_expert(linear_weight(shared.down_proj)), 1, MoEParallel()))
        tuned = False
        for a, b, k, par in shapes:
            need = flashinfer_moe_workspace_size(a, b, k, max_tokens, dtype, par)
            if need is not None:
                reserve_flashinfer_moe_workspace(need, max_tokens, w.device, workspace_bytes)
            tuned = tune_flashinfer_moe(a, b, k, max_tokens, dtype, par) or tuned
        return tuned

    def forward(self, x: Tensor) -> Tensor:
        """Routed + shared output; under tensor / expert parallel this rank's PARTIAL sum (the layer reduces)."""
        if self._impl is None:
            self._impl = resolve_moe_impl(self.moe_impl, x.device, self.quantization())
        weights, ids = select_experts(x, self.gate.wg.weight, self.top_k, self.renormalize, self.routed_scaling_factor)
        if self._impl == "reference":
            experts = self._expert_list()
            w13 = [linear_weight(e.gate_and_up_proj) for e in experts]
            w2 = [linear_weight(e.down_proj) for e in experts]
        else:
            w13, w2 = self._stacked()
        out = fused_experts(x, weights, ids, w13, w2, impl=self._impl, parallel=self.moe_parallel)
        shared = getattr(self, "shared_mlp", None)
        if shared is not None:
            out = shared(x, self._impl) + out
        return out


@dataclass(frozen=True)
class StepRows:
    """Rows of a forward given whole (every rank holds all of them): embeddings [n, H], RoPE positions [n, 2] and
    their attention metadata."""

    hidden: Tensor
    positions: Tensor
    metadata: AttentionMetadata


@dataclass(frozen=True)
class ShardedRows:
    """A sequence-parallel forward's sharded rows: the flat batch's rows past `num_whole` are this rank's share of
    them; `attn` (planned for all of them) attends over `kv_cache`, this rank's KV-head slice of the cache."""

    num_whole: int
    attn: UlyssesAttention
    kv_cache: PagedKVCache


class PagedSelfAttention(nn.Module):
    """GQA with fused QKV ([q; k; v] rows): RoPE, then qk-norm, K/V into the paged cache, then attention."""

    def __init__(
        self, cfg: HunyuanImage3Config, layer_idx: int, attn: AttentionBackend, parallel: ParallelContext | None = None
    ) -> None:
        super().__init__()
        self.parallel = parallel or ParallelContext()
        self.layer_idx = layer_idx
        self.num_heads = len(self.parallel.q_head_range(cfg.num_attention_heads))  # local heads
        self.num_kv_heads = len(self.parallel.kv_head_range(cfg.num_key_value_heads))
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = bool(cfg.raw.get("attention_bias", False))
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.attn = attn  # shared by all layers; planned once per forward by the backbone

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_metadata: AttentionMetadata, kv_cache: PagedKVCache,
        attn: AttentionBackend | None = None, sharded: ShardedRows | None = None,
    ) -> Tensor:
        """`attn`: this forward's backend when it is not the shared one (the static decode path of CUDA graphs).
        `sharded`: the rows past `sharded.num_whole` are sequence-parallel (Ulysses); the rows before them attend as
        usual with `attn_metadata`."""
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
        if sharded is None:
            kv_cache.store(self.layer_idx, attn_metadata, k, v)  # indices prepared once per step: no host sync
            o = (attn or self.attn).run(q, k, v, kv_cache, self.layer_idx)
        else:
            o = self._attend_sharded(q, k, v, attn_metadata, kv_cache, attn or self.attn, sharded)
        o = o.reshape(n, self.num_heads * d)
        if not self.parallel.is_parallel:
            return self.o_proj(o)
        # row-parallel o_proj: partial sums, ONE all-reduce, the (replicated) bias added once afterwards
        out = self.parallel.all_reduce(F.linear(o, self.o_proj.weight))
        return out if self.o_proj.bias is None else out + self.o_proj.bias

    def _attend_sharded(self, q: Tensor, k: Tensor, v: Tensor, attn_metadata: AttentionMetadata,
                        kv_cache: PagedKVCache, attn: AttentionBackend, sharded: ShardedRows) -> Tensor:
        """Whole rows as usual, then the sharded rows through Ulysses (which stores their K/V itself)."""
        nw, layer = sharded.num_whole, self.layer_idx
        o = sharded.attn.run(q[nw:], k[nw:], v[nw:], sharded.kv_cache, layer)
        if not nw:
            return o
        kv_cache.store(layer, attn_metadata, k[:nw], v[:nw])
        return torch.cat([attn.run(q[:nw], k[:nw], v[:nw], kv_cache, layer), o])


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(
        self, cfg: HunyuanImage3Config, layer_idx: int, attn: AttentionBackend, moe_impl: str | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel or ParallelContext()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = PagedSelfAttention(cfg, layer_idx, attn, self.parallel)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if cfg.num_experts > 1 and cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoEBlock(cfg, layer_idx, moe_impl, self.parallel)
        else:
            # official dense layer: keys mlp.gate_and_up_proj / mlp.down_proj sized by intermediate_size
            width = len(self.parallel.shard_range(cfg.intermediate_size, "MLP columns"))
            self.mlp = SwiGLUMLP(cfg.hidden_size, width)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_metadata: AttentionMetadata, kv_cache: PagedKVCache,
        attn: AttentionBackend | None = None, sharded: ShardedRows | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_metadata, kv_cache, attn, sharded)
        return x + self.parallel.all_reduce(self.mlp(self.post_attention_layernorm(x)))


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the token embedding (`weight` [local_vocab, H], the checkpoint key's slice).

    Lookup of ids outside the slice gives zeros; one all-reduce assembles the full embeddings on every rank.
    """

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        self.vocab_range = parallel.vocab_range(vocab_size)
        self.weight = nn.Parameter(torch.empty(len(self.vocab_range), hidden_size))

    def forward(self, input_ids: Tensor) -> Tensor:
        lo, hi = self.vocab_range.start, self.vocab_range.stop
        inside = (input_ids >= lo) & (input_ids < hi)
        local = torch.where(inside, input_ids - lo, torch.zeros_like(input_ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.all_reduce(out)


class HunyuanImage3Backbone(nn.Module):
    """wte + decoder layers + ln_f; `forward` runs the layers only (no ln_f).

    attn_backend / moe_impl: names for the kernel selection points (`kernels.attention_select.get_attention_backend`,
    `kernels.moe.resolve_moe_impl`); the caller resolves attn_backend (ModelConfig.attn_impl); moe_impl None
    reads $DG_HUNYUAN_IMAGE_3_MOE_IMPL.
    """

    def __init__(
        self, cfg: HunyuanImage3Config, attn_backend: str = "sdpa", moe_impl: str | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        if cfg.raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg.raw.get('hidden_act')!r} is not supported (only 'silu')")
        if cfg.raw.get("mlp_bias", False):
            raise ConfigError("mlp_bias=true is not supported (HunyuanImage-3.0 MLPs have no bias)")
        self.config = cfg
        self.parallel = par = parallel or ParallelContext()
        if par.is_parallel:
            self.wte: nn.Module = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par)
        else:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.num_local_heads = len(par.q_head_range(cfg.num_attention_heads))
        self.num_local_kv_heads = len(par.kv_head_range(cfg.num_key_value_heads))
        self.attn = get_attention_backend(
            attn_backend, self.num_local_heads, self.num_local_kv_heads, cfg.head_dim, cfg.head_dim**-0.5
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.attn, moe_impl, par) for i in range(cfg.num_hidden_layers)
        )
        # sequence parallel: this rank's query heads / KV heads around attention (the layout is checked here, at
        # build time); the inner backend is the same implementation over fewer heads
        self.sp = par.sequence_parallel()
        self.sp_attn: UlyssesAttention | None = None
        if self.sp.size > 1:
            heads = UlyssesHeads(self.num_local_heads, self.num_local_kv_heads, self.sp.size)
            inner = get_attention_backend(attn_backend, heads.local_qo_heads, heads.local_kv_heads, cfg.head_dim,
                                          cfg.head_dim**-0.5)
            self.sp_attn = UlyssesAttention(heads, self.sp, inner)
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
        attn: AttentionBackend | None = None,
    ) -> Tensor:
        """[N, H] input embeddings, [N, 2] (y, x) RoPE positions -> [N, H] last-layer states (no ln_f).

        `attn` replaces the shared backend for this forward (e.g. `kernels.decode_attention.StaticDecodeAttention`
        for CUDA-graph decode steps, whose metadata is a `StaticDecodeMetadata`)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        attn = attn or self.attn
        attn.plan(attn_metadata, q_dtype=hidden_states.dtype, kv_dtype=kv_cache.dtype)  # once per forward
        h = hidden_states
        for layer in self.layers:
            h = layer(h, cos, sin, attn_metadata, kv_cache, attn)
        return h

    def forward_sequence_parallel(
        self, whole: StepRows | None, sharded: StepRows, kv_cache: PagedKVCache
    ) -> tuple[Tensor | None, Tensor]:
        """A forward whose `sharded` rows (denoising image blocks) are split over the sequence-parallel group
        (`kernels.ulysses`) while the `whole` rows (text: prefill chunks, decode tokens) run on every rank as usual.
        Both are given whole on every rank; each rank takes its 1/N of the sharded rows (padded), every per-token op
        runs on its rows only, and the last layer's sharded rows are gathered. Returns the last-layer states of the
        whole rows (None without) and of every sharded row [n, H], the same on every rank."""
        if self.sp_attn is None:
            raise RuntimeError("forward_sequence_parallel needs a sequence-parallel group (sequence_parallel_size > 1)")
        shard = RowShard(sharded.hidden.shape[0], self.sp.size, self.sp.rank)
        h, pos = shard.local(sharded.hidden), shard.local(sharded.positions)
        nw = 0 if whole is None else whole.hidden.shape[0]
        if nw:
            h, pos = torch.cat([whole.hidden, h]), torch.cat([whole.positions, pos])
            self.attn.plan(whole.metadata, q_dtype=h.dtype, kv_dtype=kv_cache.dtype)
        self.sp_attn.plan(sharded.metadata, q_dtype=h.dtype, kv_dtype=kv_cache.dtype)
        rows = ShardedRows(nw, self.sp_attn, kv_cache.head_slice(self.sp_attn.heads.kv_range(self.sp.rank)))
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        md = whole.metadata if nw else sharded.metadata  # the whole rows' metadata (unused without whole rows)
        for layer in self.layers:
            h = layer(h, cos, sin, md, kv_cache, self.attn, rows)
        return (h[:nw] if nw else None), shard.gather(self.sp, h[nw:])

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
        """A cache shaped for this model (layers, this rank's KV heads, head_dim); dtype defaults to wte's dtype.

        Under tensor parallel every rank builds the same number of blocks, so block tables are identical.
        """
        cfg = self.config
        return PagedKVCache(
            cfg.num_hidden_layers,
            num_blocks,
            block_size,
            self.num_local_kv_heads,
            cfg.head_dim,
            dtype=dtype or self.wte.weight.dtype,
            device=device,
        )
