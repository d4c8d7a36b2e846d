"""Attention metadata for a flat mixed batch and the pure-torch paged attention reference.

One engine step packs N query tokens from S sequences (prefill chunks, decode tokens, diffusion image tokens)
into one flat batch. `AttentionMetadata` describes, per token, where its K/V is stored and which keys it sees:

    a query at KV index i may attend key j (j < kv_len)  iff  j <= i  or  bidir_start <= j < bidir_end

i.e. causal attention plus the bidirectional image block that contains the query (the official model's 4-D mask,
`tril | block x block` per full-attention slice; `paged_attention_reference` states it densely). A block must be
complete in the KV when its tokens are queried, so a scheduler must not split a bidirectional block across steps
(keys past kv_len are not seen).

What one forward does, per layer: the model's attention (engine/models/hunyuan_image_3/backbone.py) projects
q, k, v, calls `kv_cache.store(layer, metadata, k, v)` (kernels/kv_cache.py: index copies at the slots the
step's metadata prepared on the host, no device read), then `backend.run(q, k, v, kv_cache, layer)`, which reads
every key, this step's included, from the pages. `backend.plan(metadata)` ran once before the first layer (host
work: grouping, page lists, masks), so `kv_lens` already counts the step's stores. `k`, `v` are passed as well
because the cascade variant reads a segment's own rows directly instead of from the cache.
`kernels.attention_select.get_attention_backend` is the one selection point (FlashInfer's plan/run contract,
`AttentionBackend`); it sits above this module and the FlashInfer one, so neither imports the other's importer.

Variants (all exact re-statements of the same mask; the CPU tests prove they agree, the FlashInfer backend
implements the same decompositions with kernels):
* "mask" (the torch backend's default): sequences grouped by step shape and mask kind (`plan_sdpa_groups`), each
  group's pages gathered and ONE 4-D `scaled_dot_product_attention` call run per group: no mask for full or
  whole-causal rows, a prefix-limit mask otherwise (FlashInfer: one prefill wrapper with a custom mask, FA2).
* "segments": each sequence's query rows split into maximal causal text runs and image-block runs. A text
  run with KV indices [a, b) is a causal prefill over keys [0, b) (bottom-right aligned); an image run inside
  block [s, e) is a NON-causal prefill over keys [0, e). No mask tensor, so FlashInfer keeps FA3.
* "cascade": a segment whose own rows are all its last keys (text runs; whole image blocks, e.g. a diffusion
  step) = non-causal attention over the paged prefix [0, a) merged by log-sum-exp with attention over the
  segment's own K/V (causal for text, full for an image block); other segments as in "segments".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .host_copy import to_device


class PagedKVReader(Protocol):
    """What attention reads of the paged KV cache. kernels/kv_cache.py's `PagedKVCache` satisfies it; that module
    imports this one's `AttentionMetadata`, so a structural type here keeps the two out of an import circle."""

    def layer(self, layer: int) -> Tensor: ...

    def gather(self, layer: int, block_table_row: Tensor, kv_len: int) -> tuple[Tensor, Tensor]: ...


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
class MetadataLists:
    """Host (python) copies of a step's metadata, so plan() needs no device-to-host reads (no syncs)."""

    qo_indptr: tuple[int, ...]
    kv_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]
    query_kv_index: tuple[int, ...]
    bidir_start: tuple[int, ...]
    bidir_end: tuple[int, ...]
    key_limit: tuple[int, ...]
    write_all: bool
    max_slot: int


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
    key_limit [N]: the query sees exactly the keys [0, key_limit) (max(index + 1, block end): the mask rule
      above always leaves a prefix of the keys).
    write_rows / write_slots [M]: the rows of this step's K/V that are stored and their slots (the slot >= 0
      part of slot_mapping), so the cache write needs no boolean indexing.
    host: python copies of all of the above (`MetadataLists`); plan() reads these, never the tensors.

    `build` makes every index tensor on the host and moves them to the device in ONE copy per step.
    """

    qo_indptr: Tensor
    kv_lens: Tensor
    block_tables: Tensor
    slot_mapping: Tensor
    query_kv_index: Tensor
    bidir_start: Tensor
    bidir_end: Tensor
    block_size: int
    key_limit: Tensor | None = None
    write_rows: Tensor | None = None
    write_slots: Tensor | None = None
    host: MetadataLists | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.kv_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def lists(self) -> MetadataLists:
        """The host copies; derived from the tensors (a device read) only for metadata not made by `build`."""
        if self.host is not None:
            return self.host
        qidx = self.query_kv_index.tolist()
        b1 = self.bidir_end.tolist()
        slots = self.slot_mapping.tolist()
        return MetadataLists(
            qo_indptr=tuple(self.qo_indptr.tolist()),
            kv_lens=tuple(self.kv_lens.tolist()),
            block_tables=tuple(tuple(r) for r in self.block_tables.tolist()),
            query_kv_index=tuple(qidx),
            bidir_start=tuple(self.bidir_start.tolist()),
            bidir_end=tuple(b1),
            key_limit=tuple(max(i + 1, e) for i, e in zip(qidx, b1)),
            write_all=all(s >= 0 for s in slots),
            max_slot=max(slots, default=-1),
        )

    def to(self, device: torch.device | str) -> AttentionMetadata:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return AttentionMetadata(
            qo_indptr=self.qo_indptr.to(device),
            kv_lens=self.kv_lens.to(device),
            block_tables=self.block_tables.to(device),
            slot_mapping=self.slot_mapping.to(device),
            query_kv_index=self.query_kv_index.to(device),
            bidir_start=self.bidir_start.to(device),
            bidir_end=self.bidir_end.to(device),
            block_size=self.block_size,
            key_limit=mv(self.key_limit),
            write_rows=mv(self.write_rows),
            write_slots=mv(self.write_slots),
            host=self.host,
        )

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        block_size: int,
        device: torch.device | str | None = None,
    ) -> AttentionMetadata:
        """Compute the flat per-token index tensors from per-sequence descriptions, on the host, and move them
        to `device` in one copy. All validation (spans, page coverage, query indices) happens here."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        qo_indptr = [0]
        slots: list[int] = []
        qidx: list[int] = []
        b_start: list[int] = []
        b_end: list[int] = []
        tables: list[tuple[int, ...]] = []
        for s, ch in enumerate(chunks):
            spans = sorted((int(a), int(b)) for a, b in ch.bidir_spans)
            for (_, b0), (a1, _) in zip(spans, spans[1:]):
                if a1 < b0:
                    raise ValueError(f"sequence {s}: bidirectional spans overlap: {spans}")
            if any(a < 0 or b <= a for a, b in spans):
                raise ValueError(f"sequence {s}: empty or negative bidirectional span in {spans}")
            kv_len = int(ch.kv_len)
            pages_needed = -(-kv_len // block_size)
            table = tuple(int(p) for p in ch.block_table)
            if len(table) < pages_needed or any(p < 0 for p in table[:pages_needed]):
                raise ValueError(f"sequence {s}: block table {list(table)} does not cover kv_len {kv_len}")
            tables.append(table)
            for i in ch.query_kv_indices:
                i = int(i)
                if not 0 <= i < kv_len:
                    raise ValueError(f"sequence {s}: query KV index {i} outside [0, kv_len={kv_len})")
                qidx.append(i)
                slots.append(table[i // block_size] * block_size + i % block_size if ch.write_kv else -1)
                span = next(((a, b) for a, b in spans if a <= i < b), (0, 0))
                b_start.append(span[0])
                b_end.append(span[1])
            qo_indptr.append(len(qidx))
        kv_lens = [int(ch.kv_len) for ch in chunks]
        limit: list[int] = []
        for s in range(len(chunks)):
            for r in range(qo_indptr[s], qo_indptr[s + 1]):
                limit.append(min(max(qidx[r] + 1, b_end[r]), kv_lens[s]))
        write_rows = [r for r, sl in enumerate(slots) if sl >= 0]
        write_slots = [slots[r] for r in write_rows]
        max_blocks = max([len(t) for t in tables] + [1])
        flat_tables = [p for t in tables for p in (*t, *([-1] * (max_blocks - len(t))))]
        # one host tensor, one copy to the device, then views
        parts = [qo_indptr, kv_lens, flat_tables, slots, qidx, b_start, b_end, limit, write_rows, write_slots]
        flat = [x for p in parts for x in p]
        packed = torch.tensor(flat, dtype=torch.long) if device is None else to_device(flat, torch.long, device)
        views = packed.split([len(p) for p in parts])
        host = MetadataLists(
            qo_indptr=tuple(qo_indptr),
            kv_lens=tuple(kv_lens),
            block_tables=tuple(tables),
            query_kv_index=tuple(qidx),
            bidir_start=tuple(b_start),
            bidir_end=tuple(b_end),
            key_limit=tuple(limit),
            write_all=len(write_rows) == len(slots),
            max_slot=max(write_slots, default=-1),
        )
        return cls(
            qo_indptr=views[0],
            kv_lens=views[1],
            block_tables=views[2].view(len(chunks), max_blocks),
            slot_mapping=views[3],
            query_kv_index=views[4],
            bidir_start=views[5],
            bidir_end=views[6],
            block_size=block_size,
            key_limit=views[7],
            write_rows=views[8],
            write_slots=views[9],
            host=host,
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
    kv_cache: PagedKVReader,
    layer: int,
    scale: float,
) -> Tensor:
    """Attention for a flat batch q [N, Hq, D] over each sequence's paged K/V -> [N, Hq, D] in q's dtype.

    Per sequence: gather its K/V, build the causal-or-block mask, repeat KV heads for GQA (query head h uses
    KV head h // (Hq / Hkv)), SDPA in fp32. The step's own K/V must already be written (module docstring).
    """
    hq = q.shape[1]
    out = torch.empty_like(q)
    host = metadata.lists()
    indptr, kv_lens = host.qo_indptr, host.kv_lens
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
    host = metadata.lists()
    indptr, qidx, b0, b1 = host.qo_indptr, host.query_kv_index, host.bidir_start, host.bidir_end
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

    def run(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: PagedKVReader, layer: int) -> Tensor: ...


@dataclass(frozen=True)
class SdpaGroup:
    """Sequences whose step has the same shape (n query rows over m keys) and mask kind: ONE 4-D SDPA call.

    kind: "full" (every row sees all m keys: decode tokens, an image block at the end of the KV), "causal"
    (n == m, a whole causal prefill: is_causal, no mask tensor) or "mask" (prefix-limit mask [B, 1, n, m]:
    a chunk after a prefix, rows inside an image block). rows: the group's flat query rows, either one
    contiguous span (row_span) or an index tensor (row_index). pages [B * P]: the sequences' first P pages.
    """

    seqs: tuple[int, ...]
    n: int
    m: int
    kind: str
    row_span: tuple[int, int] | None
    row_index: Tensor | None
    pages: Tensor
    mask: Tensor | None

    @property
    def batch(self) -> int:
        return len(self.seqs)


# Sequences are batched into one SDPA call only from this many query rows up: with 1-3 rows (decode tokens) the
# CPU kernel gives a row different low bits in a batch than alone (measured on torch 2.13), which would break
# batch invariance; from 4 rows up batched == alone bit for bit (tests/test_attention_fast.py). The rule holds only
# where batch invariance is asked for (on CPU by default); elsewhere decode rows of any lengths form one group.
MIN_BATCH_ROWS = 8


def _mask_kind(limits: Sequence[int], m: int) -> str:
    n = len(limits)
    if all(lim == m for lim in limits):
        return "full"
    if n == m and all(lim == r + 1 for r, lim in enumerate(limits)):
        return "causal"
    return "mask"


def _rows_of(starts: list[int], n: int, dev: torch.device) -> tuple[tuple[int, int] | None, Tensor | None]:
    """A group's flat query rows: one contiguous span, or else an index tensor."""
    if all(b == a + n for a, b in zip(starts, starts[1:])):
        return (starts[0], starts[0] + n * len(starts)), None
    return None, to_device([r + i for r in starts for i in range(n)], torch.long, dev)


def _decode_group(metadata: AttentionMetadata, host: MetadataLists, seqs: list[int]) -> SdpaGroup:
    """Single-token rows that see all their keys, of different kv_lens, as ONE padded call: keys up to the longest
    context, each row masked to its own kv_len (pages past a sequence's table read page 0, masked)."""
    dev = metadata.slot_mapping.device
    m = max(host.kv_lens[s] for s in seqs)
    row_span, row_index = _rows_of([host.qo_indptr[s] for s in seqs], 1, dev)
    idx = to_device(seqs, torch.long, dev)
    pages = metadata.block_tables.index_select(0, idx)[:, : -(-m // metadata.block_size)].clamp_min(0)
    mask = (torch.arange(m, device=dev) < metadata.kv_lens.index_select(0, idx).unsqueeze(1)).view(len(seqs), 1, 1, m)
    return SdpaGroup(tuple(seqs), 1, m, "mask", row_span, row_index, pages.reshape(-1), mask)


def plan_sdpa_groups(metadata: AttentionMetadata, batch_invariant: bool | None = None) -> list[SdpaGroup]:
    """Group a step's sequences for batched 4-D SDPA (host work plus a few device views; no device reads).

    batch_invariant (default: on CPU): a row's bits never depend on the batch (`MIN_BATCH_ROWS`, equal shapes
    only). Without it, every decode row (one token seeing all its keys) joins one padded group (`_decode_group`)."""
    host = metadata.lists()
    dev = metadata.slot_mapping.device
    if batch_invariant is None:
        batch_invariant = dev.type == "cpu"
    bs = metadata.block_size
    by_key: dict[tuple[int, int, str, int], list[int]] = {}
    decodes: list[int] = []
    for s in range(metadata.num_seqs):
        r0, r1 = host.qo_indptr[s], host.qo_indptr[s + 1]
        if r1 == r0:
            continue
        n, m = r1 - r0, host.kv_lens[s]
        kind = _mask_kind(host.key_limit[r0:r1], m)
        if not batch_invariant and n == 1 and kind == "full":
            decodes.append(s)
            continue
        # below MIN_BATCH_ROWS query rows the CPU kernel's results depend on the batch size: one call each
        alone = s if batch_invariant and n < MIN_BATCH_ROWS else -1
        by_key.setdefault((n, m, kind, alone), []).append(s)
    if len(decodes) == 1:
        by_key.setdefault((1, host.kv_lens[decodes[0]], "full", -1), []).append(decodes.pop())
    groups = []
    for (n, m, kind, _), seqs in by_key.items():
        row_span, row_index = _rows_of([host.qo_indptr[s] for s in seqs], n, dev)
        n_pages = -(-m // bs)
        if seqs == list(range(seqs[0], seqs[0] + len(seqs))):
            pages = metadata.block_tables[seqs[0] : seqs[0] + len(seqs), :n_pages]
        else:
            pages = metadata.block_tables.index_select(0, to_device(seqs, torch.long, dev))[:, :n_pages]
        mask = None
        if kind == "mask":
            lim = metadata.key_limit
            if lim is None:
                lim = torch.maximum(metadata.query_kv_index + 1, metadata.bidir_end)
            lim = lim[row_span[0] : row_span[1]] if row_index is None else lim.index_select(0, row_index)
            mask = (torch.arange(m, device=dev) < lim.view(len(seqs), n, 1)).unsqueeze(1)
        groups.append(SdpaGroup(tuple(seqs), n, m, kind, row_span, row_index, pages.reshape(-1), mask))
    if decodes:
        groups.append(_decode_group(metadata, host, decodes))
    return groups


def expand_kv_heads(k: Tensor, v: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """[B, m, Hkv, D] K/V -> [B, m, Hkv * group, D]: query head h reads KV head h // group, as `enable_gqa` does.

    Why: a boolean mask together with `enable_gqa` leaves CUDA's SDPA no fused kernel, so it runs the math kernel
    (fp32 scores [B, Hq, n, m]: ~5.6 GB per layer call for one Distil diffusion step at the real shapes). The
    eligibility rules of PyTorch 2.11 - 2.13 (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, its helpers in
    the installed header torch/include/ATen/native/transformers/sdp_utils_cpp.h):
    * flash: `check_for_attn_mask` rejects any mask; GQA is fine; `is_causal` only with n == m;
    * memory-efficient: takes a mask (stride 1 in its last dim) but checks
      `check_batch_size_and_num_heads_dense<false /*supports GQA*/>`, i.e. equal query, key and value heads;
    * cuDNN: takes mask and GQA, but is first in line only with cuDNN > 9.15 on sm90 / sm100, else after flash
      and memory-efficient; the math kernel comes last.
    So masked groups get their K/V heads repeated (one contiguous copy of the [B, m, Hq, D] keys and values,
    ~90 MB each at m = 10.7k, instead of gigabytes of scores) and call SDPA without `enable_gqa`: memory-efficient
    or cuDNN runs. The result is bit-identical to `enable_gqa` on CPU (tests/test_attention_fast.py) and
    `kernels.sdpa_rules` states these rules for the test that records every SDPA call of an engine step."""
    return k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)


def sdpa_layout(group: SdpaGroup, hq: int, hkv: int) -> str:
    """How `group`'s ONE SDPA call lays out hq query heads over hkv KV heads, so that a fused CUDA kernel admits it
    (`kernels.sdpa_rules` states the rules; `expand_kv_heads` says why):

    * "same_heads": hq == hkv, nothing to do;
    * "gqa": no mask (full or whole-causal rows): `enable_gqa`, flash runs without copies;
    * "heads_as_rows": one query token per row under a key mask (the padded decode group): each KV head's query
      heads become its query rows [B, Hkv, Hq / Hkv, D] against the [B, 1, 1, m] mask, no K/V repeat;
    * "repeat_kv": any other masked group: K/V heads repeated (`expand_kv_heads`), no `enable_gqa`.

    A function of the group and the head counts only: decided once per forward and reused by every layer."""
    if hq == hkv:
        return "same_heads"
    if group.mask is None:
        return "gqa"
    return "heads_as_rows" if group.n == 1 else "repeat_kv"


class TorchPagedAttention:
    """Pure-torch backend with the plan/run contract; also the CPU proof of each FlashInfer decomposition.

    plan() does all host work once per forward (from the metadata's host lists: no device reads); run() reads
    the pages and computes attention per the chosen variant. "mask" (the default) runs 4-D
    `scaled_dot_product_attention` per `SdpaGroup` (the fused flash / memory-efficient kernels on CPU and CUDA;
    3-D inputs would take the slow math kernel): GQA via `enable_gqa` where no mask is needed (full or
    whole-causal rows: flash), repeated K/V heads where a mask is (`expand_kv_heads`: a mask with `enable_gqa`
    leaves CUDA the math kernel), sequences of equal shape batched. On CPU it computes in fp32 (as the
    reference); on CUDA in the input dtype, so half-precision inputs reach the fused kernels (docs/decisions.md,
    "Attention fast path").
    "segments" / "cascade" emulate the FlashInfer decompositions with explicit fp32 math (slower, for tests).
    """

    name = "sdpa"

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 variant: str = "mask", batch_invariant: bool | None = None) -> None:
        if variant not in ATTN_VARIANTS:
            raise ValueError(f"unknown attention variant {variant!r}; allowed: {', '.join(ATTN_VARIANTS)}")
        self.batch_invariant = batch_invariant  # None: on CPU only (`plan_sdpa_groups`)
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.variant = variant
        self._md: AttentionMetadata | None = None
        self._groups: list[SdpaGroup] = []
        self._layouts: dict[tuple[int, int], list[str]] = {}  # (Hq, Hkv) -> each group's `sdpa_layout`, per forward
        self._segments: list[Segment] = []
        self._kv_lens: tuple[int, ...] = ()

    def plan(self, metadata: AttentionMetadata, q_dtype: torch.dtype | None = None,
             kv_dtype: torch.dtype | None = None) -> None:
        self._md = metadata
        self._kv_lens = metadata.lists().kv_lens
        if self.variant == "mask":
            self._groups = plan_sdpa_groups(metadata, self.batch_invariant)
            self._layouts = {}
        else:
            self._segments = decompose_segments(metadata)

    def run(self, q: Tensor, k: Tensor | None, v: Tensor | None, kv_cache: PagedKVReader, layer: int) -> Tensor:
        md = self._md
        if md is None:
            raise RuntimeError("run() before plan()")
        if self.variant == "mask":
            return self._run_groups(q, kv_cache, layer)
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

    def _run_groups(self, q: Tensor, kv_cache: PagedKVReader, layer: int) -> Tensor:
        n_tok, hq, d = q.shape
        compute = torch.float32 if q.device.type == "cpu" else q.dtype
        pages = kv_cache.layer(layer)  # [num_blocks, 2, block_size, n_kv, D]
        hkv = pages.shape[3]
        out: Tensor | None = None
        heads = (hq, hkv)
        if heads not in self._layouts:  # the first layer of the forward decides for all of them
            self._layouts[heads] = [sdpa_layout(g, hq, hkv) for g in self._groups]
        for g, layout in zip(self._groups, self._layouts[heads]):
            b, n, m = g.batch, g.n, g.m
            # one gather per K and V: contiguous [B, P * block_size, n_kv, D], then [B, n_kv, m, D] views
            kc = pages[:, 0].index_select(0, g.pages).view(b, -1, hkv, d)[:, :m]
            vc = pages[:, 1].index_select(0, g.pages).view(b, -1, hkv, d)[:, :m]
            if layout == "repeat_kv":
                kc, vc = expand_kv_heads(kc, vc, hq // hkv)
            kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
            if g.row_span is not None:
                qs = q[g.row_span[0] : g.row_span[1]]
            else:
                qs = q.index_select(0, g.row_index)
            heads_as_rows = layout == "heads_as_rows"
            if heads_as_rows:
                qs = qs.reshape(b, hkv, hq // hkv, d)
            else:
                qs = qs.view(b, n, hq, d).transpose(1, 2)
            gqa = layout == "gqa"
            o = F.scaled_dot_product_attention(
                qs.to(compute), kc.to(compute), vc.to(compute), attn_mask=g.mask, dropout_p=0.0,
                is_causal=g.kind == "causal", scale=self.scale, enable_gqa=gqa,
            )
            o = (o.reshape(b, hq, d) if heads_as_rows else o.transpose(1, 2).reshape(b * n, hq, d)).to(q.dtype)
            if len(self._groups) == 1 and g.row_span == (0, n_tok):
                return o
            if out is None:
                out = q.new_empty(q.shape)
            if g.row_span is not None:
                out[g.row_span[0] : g.row_span[1]] = o
            else:
                out.index_copy_(0, g.row_index, o)
        return q.new_empty(q.shape) if out is None else out


def flashinfer_attention_available(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"device {device} is not CUDA"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"flashinfer is not importable ({type(e).__name__}: {e})"
    return True, "ok"
