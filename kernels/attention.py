"""Attention metadata for a flat mixed batch, the pure-torch paged attention reference, and backend selection.

One engine step packs N query tokens from S sequences (prefill chunks, decode tokens, diffusion image tokens)
into one flat batch. `AttentionMetadata` describes, per token, where its K/V is stored and which keys it sees:

    a query at KV index i may attend key j (j < kv_len)  iff  j <= i  or  bidir_start <= j < bidir_end

i.e. causal attention plus the bidirectional image block that contains the query (the official 4-D mask is
`tril | block x block` per full-attention slice, spec §3.4). A block must be complete in the KV when its
tokens are queried, so a scheduler must not split a bidirectional block across steps (keys past kv_len are
not seen).

Contract for every backend (FlashInfer's plan/run): `plan(metadata)` once per forward (host work, page tables,
masks), then every layer calls `run(q, k, v, kv_cache, layer)`. The caller writes this step's K/V into the
cache (`PagedKVCache.write` at `slot_mapping`) BEFORE `run`, and `kv_lens` already counts those writes; `k`, `v`
are this step's own K/V rows (the cascade variant reads them directly instead of from the cache).
`get_attention_backend` is the one selection point.

Variants (all exact re-statements of the same mask; the CPU tests prove they agree, the FlashInfer backend
implements the same decompositions with kernels):
* "mask": the official dense mask per sequence (FlashInfer: one prefill wrapper with a custom mask, FA2).
* "segments": each sequence's query rows split into maximal causal text runs and image-block runs. A text
  run with KV indices [a, b) is a causal prefill over keys [0, b) (bottom-right aligned); an image run inside
  block [s, e) is a NON-causal prefill over keys [0, e). No mask tensor, so FlashInfer keeps FA3.
* "cascade": a segment whose own rows are all its last keys (text runs; whole image blocks, e.g. a diffusion
  step) = non-causal attention over the paged prefix [0, a) merged by log-sum-exp with attention over the
  segment's own K/V (causal for text, full for an image block); other segments as in "segments".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .impl_names import ATTN_IMPLS

if TYPE_CHECKING:
    from diffgentor.engine.kv_cache import PagedKVCache


@dataclass(frozen=True)
class SequenceChunk:
    """Python description of one sequence's part of a step (input to `AttentionMetadata.build`).

    query_kv_indices: KV index (position in the sequence's KV) of each query token of this step, in order.
    kv_len: KV entries visible after this step's writes.
    block_table: the sequence's page ids, in KV order (must cover kv_len).
    bidir_spans: the sequence's bidirectional blocks as half-open KV ranges [start, end), non-overlapping.
    write_kv: False to attend without storing this chunk's K/V (slot -1).
    """

    query_kv_indices: Sequence[int]
    kv_len: int
    block_table: Sequence[int]
    bidir_spans: Sequence[tuple[int, int]] = field(default_factory=tuple)
    write_kv: bool = True


@dataclass(frozen=True)
class AttentionMetadata:
    """Flat batch of N query tokens from S sequences (all int64 tensors on the model's device).

    qo_indptr [S+1]: query rows of sequence s are qo_indptr[s]:qo_indptr[s+1].
    kv_lens [S]: KV entries visible to sequence s this step, after this step's writes.
    block_tables [S, max_blocks]: page ids, -1 padded.
    slot_mapping [N]: flat cache slot (page * block_size + offset) receiving each token's K/V; -1 = none.
    query_kv_index [N]: each query token's index within its sequence's KV (the causal frontier).
    bidir_start / bidir_end [N]: the bidirectional key range of the query's block; (0, 0) = none.
    block_size: tokens per page (the cache's block size).
    """

    qo_indptr: Tensor
    kv_lens: Tensor
    block_tables: Tensor
    slot_mapping: Tensor
    query_kv_index: Tensor
    bidir_start: Tensor
    bidir_end: Tensor
    block_size: int

    @property
    def num_seqs(self) -> int:
        return int(self.kv_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def to(self, device: torch.device | str) -> AttentionMetadata:
        return AttentionMetadata(
            qo_indptr=self.qo_indptr.to(device),
            kv_lens=self.kv_lens.to(device),
            block_tables=self.block_tables.to(device),
            slot_mapping=self.slot_mapping.to(device),
            query_kv_index=self.query_kv_index.to(device),
            bidir_start=self.bidir_start.to(device),
            bidir_end=self.bidir_end.to(device),
            block_size=self.block_size,
        )

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        block_size: int,
        device: torch.device | str | None = None,
    ) -> AttentionMetadata:
        """Compute the flat per-token tensors (slots, bidirectional ranges) from per-sequence descriptions."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        qo_indptr = [0]
        slots: list[int] = []
        qidx: list[int] = []
        b_start: list[int] = []
        b_end: list[int] = []
        for s, ch in enumerate(chunks):
            spans = sorted((int(a), int(b)) for a, b in ch.bidir_spans)
            for (_, b0), (a1, _) in zip(spans, spans[1:]):
                if a1 < b0:
                    raise ValueError(f"sequence {s}: bidirectional spans overlap: {spans}")
            if any(a < 0 or b <= a for a, b in spans):
                raise ValueError(f"sequence {s}: empty or negative bidirectional span in {spans}")
            pages_needed = -(-ch.kv_len // block_size)
            table = list(ch.block_table)
            if len(table) < pages_needed or any(p < 0 for p in table[:pages_needed]):
                raise ValueError(f"sequence {s}: block table {table} does not cover kv_len {ch.kv_len}")
            for i in ch.query_kv_indices:
                i = int(i)
                if not 0 <= i < ch.kv_len:
                    raise ValueError(f"sequence {s}: query KV index {i} outside [0, kv_len={ch.kv_len})")
                qidx.append(i)
                slots.append(table[i // block_size] * block_size + i % block_size if ch.write_kv else -1)
                span = next(((a, b) for a, b in spans if a <= i < b), (0, 0))
                b_start.append(span[0])
                b_end.append(span[1])
            qo_indptr.append(len(qidx))
        max_blocks = max([len(ch.block_table) for ch in chunks] + [1])
        tables = torch.full((len(chunks), max_blocks), -1, dtype=torch.long)
        for s, ch in enumerate(chunks):
            if len(ch.block_table):
                tables[s, : len(ch.block_table)] = torch.tensor(list(ch.block_table), dtype=torch.long)

        def t(x: list[int]) -> Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        return cls(
            qo_indptr=t(qo_indptr),
            kv_lens=t([int(ch.kv_len) for ch in chunks]),
            block_tables=tables.to(device) if device is not None else tables,
            slot_mapping=t(slots),
            query_kv_index=t(qidx),
            bidir_start=t(b_start),
            bidir_end=t(b_end),
            block_size=block_size,
        )


def attention_mask_rows(
    query_kv_index: Tensor, bidir_start: Tensor, bidir_end: Tensor, kv_len: int
) -> Tensor:
    """Boolean mask [n_q, kv_len] (True = may attend) for query rows of one sequence."""
    j = torch.arange(kv_len, device=query_kv_index.device)
    causal = j.unsqueeze(0) <= query_kv_index.unsqueeze(1)
    block = (j.unsqueeze(0) >= bidir_start.unsqueeze(1)) & (j.unsqueeze(0) < bidir_end.unsqueeze(1))
    return causal | block


def paged_attention_reference(
    q: Tensor,
    metadata: AttentionMetadata,
    kv_cache: PagedKVCache,
    layer: int,
    scale: float,
) -> Tensor:
    """Attention for a flat batch q [N, Hq, D] over each sequence's paged K/V -> [N, Hq, D] in q's dtype.

    Per sequence: gather its K/V, build the causal-or-block mask, repeat KV heads for GQA (query head h uses
    KV head h // (Hq / Hkv)), SDPA in fp32. The step's own K/V must already be written (module docstring).
    """
    hq = q.shape[1]
    out = torch.empty_like(q)
    indptr = metadata.qo_indptr.tolist()
    kv_lens = metadata.kv_lens.tolist()
    for s in range(metadata.num_seqs):
        r0, r1 = indptr[s], indptr[s + 1]
        if r1 == r0:
            continue
        k, v = kv_cache.gather(layer, metadata.block_tables[s], kv_lens[s])
        hkv = k.shape[1]
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
        mask = attention_mask_rows(
            metadata.query_kv_index[r0:r1], metadata.bidir_start[r0:r1], metadata.bidir_end[r0:r1], kv_lens[s]
        )
        qs = q[r0:r1].transpose(0, 1).float()  # [Hq, n_q, D]
        ks = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1).float()
        vs = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1).float()
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=0.0, scale=scale)
        out[r0:r1] = o.transpose(0, 1).to(q.dtype)
    return out



ATTN_IMPL_ENV = "DG_HUNYUAN_IMAGE_3_ATTN_IMPL"
ATTN_VARIANTS = ("mask", "segments", "cascade")



# ------------------------------------------------------------------------------------------------ decomposition


@dataclass(frozen=True)
class Segment:
    """A run of query rows [row0, row1) of sequence `seq` with consecutive KV indices [kv0, kv1).

    causal: text run, keys [0, kv1) with the causal rule (kv_end == kv1). Non-causal: image-block run, all
    keys [0, kv_end) where kv_end is the block end.
    """

    seq: int
    row0: int
    row1: int
    kv0: int
    kv1: int
    kv_end: int
    causal: bool

    @property
    def num_rows(self) -> int:
        return self.row1 - self.row0

    @property
    def self_contained(self) -> bool:
        """The segment's own rows are exactly its keys past kv0 (cascade: prefix [0, kv0) + own K/V)."""
        return self.kv1 == self.kv_end


def decompose_segments(metadata: AttentionMetadata) -> list[Segment]:
    """Split the flat batch into causal text runs and non-causal image-block runs (see module docstring)."""
    indptr = metadata.qo_indptr.tolist()
    qidx = metadata.query_kv_index.tolist()
    b0 = metadata.bidir_start.tolist()
    b1 = metadata.bidir_end.tolist()
    segs: list[Segment] = []
    for s in range(metadata.num_seqs):
        r = indptr[s]
        while r < indptr[s + 1]:
            span = (b0[r], b1[r])
            e = r + 1
            while e < indptr[s + 1] and qidx[e] == qidx[e - 1] + 1 and (b0[e], b1[e]) == span:
                e += 1
            causal = span[1] == 0
            kv1 = qidx[e - 1] + 1
            segs.append(Segment(s, r, e, qidx[r], kv1, kv1 if causal else span[1], causal))
            r = e
    return segs


# ------------------------------------------------------------------------------------------------ LSE helpers

_LOG2E = 1.0 / math.log(2.0)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Pure-torch emulation of a FlashInfer prefill with return_lse: q [n, Hq, D], k/v [m, Hkv, D] ->
    (out fp32 [n, Hq, D], lse fp32 [n, Hq] in BASE 2, FlashInfer's convention). Causal is bottom-right aligned
    (row i sees keys j <= m - n + i). m == 0 gives out 0 and lse -inf."""
    n, hq, d = q.shape
    m, hkv = k.shape[0], k.shape[1]
    if m == 0:
        return q.new_zeros(n, hq, d, dtype=torch.float32), q.new_full((n, hq), -math.inf, dtype=torch.float32)
    qf = q.float().transpose(0, 1)  # [Hq, n, D]
    kf = k.float().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, n, m]
    if causal:
        keep = torch.arange(m, device=q.device).unsqueeze(0) <= (m - n + torch.arange(n, device=q.device)).unsqueeze(1)
        scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]
    p = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(p, vf)
    return out.transpose(0, 1), (lse * _LOG2E).transpose(0, 1)


def merge_state(v_a: Tensor, s_a: Tensor, v_b: Tensor, s_b: Tensor) -> tuple[Tensor, Tensor]:
    """Pure-torch `flashinfer.merge_state`: combine two partial attentions over disjoint key sets by their
    base-2 log-sum-exp. v [n, H, D], s [n, H] -> (v, s)."""
    s_max = torch.maximum(s_a, s_b)
    s_max = torch.where(torch.isinf(s_max) & (s_max < 0), torch.zeros_like(s_max), s_max)
    w_a = torch.exp2(s_a - s_max)
    w_b = torch.exp2(s_b - s_max)
    tot = w_a + w_b
    v = (v_a.float() * w_a.unsqueeze(-1) + v_b.float() * w_b.unsqueeze(-1)) / tot.clamp_min(1e-30).unsqueeze(-1)
    return v, s_max + torch.log2(tot)


# ------------------------------------------------------------------------------------------------ backends


class AttentionBackend(Protocol):
    """plan once per forward, run once per layer (FlashInfer's contract)."""

    name: str

    def plan(self, metadata: AttentionMetadata, q_dtype: torch.dtype | None = None,
             kv_dtype: torch.dtype | None = None) -> None: ...

    def run(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: PagedKVCache, layer: int) -> Tensor: ...


class TorchPagedAttention:
    """Pure-torch backend with the plan/run contract; also the CPU proof of each FlashInfer decomposition.

    plan() does all host work once per forward (per-sequence rows, segment lists, masks); run() gathers each
    sequence's pages once per layer and computes SDPA (fp32) per the chosen variant.
    """

    name = "sdpa"

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 variant: str = "mask") -> None:
        if variant not in ATTN_VARIANTS:
            raise ValueError(f"unknown attention variant {variant!r}; allowed: {', '.join(ATTN_VARIANTS)}")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.variant = variant
        self._md: AttentionMetadata | None = None
        self._masks: list[Tensor | None] = []
        self._segments: list[Segment] = []

    def plan(self, metadata: AttentionMetadata, q_dtype: torch.dtype | None = None,
             kv_dtype: torch.dtype | None = None) -> None:
        self._md = metadata
        self._indptr = metadata.qo_indptr.tolist()
        self._kv_lens = metadata.kv_lens.tolist()
        if self.variant == "mask":
            self._masks = []
            for s in range(metadata.num_seqs):
                r0, r1 = self._indptr[s], self._indptr[s + 1]
                self._masks.append(None if r1 == r0 else attention_mask_rows(
                    metadata.query_kv_index[r0:r1], metadata.bidir_start[r0:r1], metadata.bidir_end[r0:r1],
                    self._kv_lens[s]))
        else:
            self._segments = decompose_segments(metadata)

    def run(self, q: Tensor, k: Tensor | None, v: Tensor | None, kv_cache: PagedKVCache, layer: int) -> Tensor:
        md = self._md
        if md is None:
            raise RuntimeError("run() before plan()")
        if self.variant == "mask":
            return self._run_mask(q, kv_cache, layer)
        out = torch.empty_like(q)
        kv: dict[int, tuple[Tensor, Tensor]] = {}
        for seg in self._segments:
            if seg.seq not in kv:
                kv[seg.seq] = kv_cache.gather(layer, md.block_tables[seg.seq], self._kv_lens[seg.seq])
            kc, vc = kv[seg.seq]
            qs = q[seg.row0 : seg.row1]
            if self.variant == "cascade" and seg.self_contained and k is not None and v is not None:
                o_p, s_p = attention_with_lse(qs, kc[: seg.kv0], vc[: seg.kv0], self.scale, causal=False)
                o_c, s_c = attention_with_lse(qs, k[seg.row0 : seg.row1], v[seg.row0 : seg.row1], self.scale,
                                              causal=seg.causal)
                o, _ = merge_state(o_p, s_p, o_c, s_c)
            else:
                o, _ = attention_with_lse(qs, kc[: seg.kv_end], vc[: seg.kv_end], self.scale, causal=seg.causal)
            out[seg.row0 : seg.row1] = o.to(q.dtype)
        return out

    def _run_mask(self, q: Tensor, kv_cache: PagedKVCache, layer: int) -> Tensor:
        md = self._md
        hq = q.shape[1]
        out = torch.empty_like(q)
        for s, mask in enumerate(self._masks):
            if mask is None:
                continue
            r0, r1 = self._indptr[s], self._indptr[s + 1]
            kc, vc = kv_cache.gather(layer, md.block_tables[s], self._kv_lens[s])
            g = hq // kc.shape[1]
            qs = q[r0:r1].transpose(0, 1).float()
            ks = kc.repeat_interleave(g, dim=1).transpose(0, 1).float()
            vs = vc.repeat_interleave(g, dim=1).transpose(0, 1).float()
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=0.0, scale=self.scale)
            out[r0:r1] = o.transpose(0, 1).to(q.dtype)
        return out


def flashinfer_attention_available(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"device {device} is not CUDA"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"flashinfer is not importable ({type(e).__name__}: {e})"
    return True, "ok"


def get_attention_backend(
    name: str | None = None,
    num_qo_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    scale: float | None = None,
    variant: str | None = None,
) -> AttentionBackend:
    """THE selection point: name (None -> $DG_HUNYUAN_IMAGE_3_ATTN_IMPL, default sdpa; "torch" = "sdpa") ->
    a backend object. `flashinfer` resolves its device at the first plan() and falls back to the torch backend
    (same variant) with one warning when CUDA or flashinfer is missing."""
    if name is None:
        name = os.environ.get(ATTN_IMPL_ENV, "").strip() or "sdpa"
    key = name.strip().lower()
    if key in ("torch", "sdpa"):
        return TorchPagedAttention(num_qo_heads, num_kv_heads, head_dim, scale, variant or "mask")
    if key == "flashinfer":
        from .flashinfer_attention import FlashInferPagedAttention

        return FlashInferPagedAttention(num_qo_heads, num_kv_heads, head_dim, scale, variant or "segments")
    raise ValueError(f"unknown attention backend {name!r}; available: torch, {', '.join(ATTN_IMPLS)}")
