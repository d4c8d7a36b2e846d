"""Attention metadata for a flat mixed batch, the pure-torch paged attention reference, and backend selection.

One engine step packs N query tokens from S sequences (prefill chunks, decode tokens, diffusion image tokens)
into one flat batch. `AttentionMetadata` describes, per token, where its K/V is stored and which keys it sees:

    a query at KV index i may attend key j (j < kv_len)  iff  j <= i  or  bidir_start <= j < bidir_end

i.e. causal attention plus the bidirectional image block that contains the query (the official 4-D mask is
`tril | block x block` per full-attention slice, spec §3.4). A block must be complete in the KV when its
tokens are queried, so a scheduler must not split a bidirectional block across steps (keys past kv_len are
not seen).

Contract for every backend: the caller writes this step's K/V into the cache (`PagedKVCache.write` at
`slot_mapping`) BEFORE calling attention, and `kv_lens` already counts those writes. Later backends
(FlashInfer) implement the same signature and are added in `get_attention_backend`, the one selection point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

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


AttentionBackend = Callable[[Tensor, AttentionMetadata, "PagedKVCache", int, float], Tensor]

_BACKENDS: Mapping[str, AttentionBackend] = MappingProxyType(
    {"torch": paged_attention_reference, "sdpa": paged_attention_reference}
)


def get_attention_backend(name: str = "torch") -> AttentionBackend:
    """The one place that maps a backend name to an attention function with the contract above."""
    key = name.lower()
    if key in _BACKENDS:
        return _BACKENDS[key]
    if key == "flashinfer":
        raise NotImplementedError("the FlashInfer attention backend is not implemented yet; use 'torch'")
    raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
