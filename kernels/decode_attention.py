"""Static-shape paged attention for decode-only steps: the backend a CUDA graph can capture.

A decode-only step has one query token per sequence and every query sees all of its sequence's keys (the token
is the causal frontier and sits in no image block). `StaticDecodeMetadata` holds that step in tensors whose
SHAPES depend only on the batch-size bucket B and a fixed page budget M (`block_tables [B, M]`), never on the
sequences' lengths, so one captured graph serves every step of that bucket: the lengths live in `kv_lens [B]`
and reach the attention as a tensor mask. Nothing in `plan` or `run` reads a device value on the host (no
`.item()`, `.tolist()`, `nonzero`, boolean-mask indexing) and nothing loops over sequences in Python.

Padding rows (bucket B > real batch) point at a scratch KV block that the KV cache manager never hands out:
their K/V writes land there and their kv_len of 1 keeps softmax away from an all-masked row (NaN). Page-table
entries past a sequence's pages also name the scratch block, so every `index_select` index is valid; those keys
are masked. Same plan/run contract as `kernels.attention` (`AttentionBackend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import MetadataLists

if TYPE_CHECKING:
    from .kv_cache import PagedKVCache


@dataclass(frozen=True)
class StaticDecodeMetadata:
    """One decode token for each of B rows, in fixed-shape int64 tensors (views of a graph's input buffers).

    slot_mapping [B]: cache slot receiving each row's K/V (padding rows: a slot of the scratch block).
    block_tables [B, M]: page ids covering each row's keys, padded with the scratch block (never -1).
    kv_lens [B]: keys per row after this step's write (>= 1; padding rows 1).
    max_slot: an upper bound of every slot the buffers may hold (the cache's last slot), for `PagedKVCache.store`'s
      host-side range check; the actual slots are never read back.

    `PagedKVCache.store` takes this object like an `AttentionMetadata`: `lists()` says "B rows, write them all"
    (shape facts only, the same for every step of the bucket) and `write_slots` is the slot tensor.
    """

    slot_mapping: Tensor
    block_tables: Tensor
    kv_lens: Tensor
    block_size: int
    max_slot: int

    @property
    def num_seqs(self) -> int:
        return int(self.kv_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def write_slots(self) -> Tensor:
        return self.slot_mapping

    @property
    def write_rows(self) -> Tensor | None:
        return None  # every row is written (write_all)

    def lists(self) -> MetadataLists:
        """Host facts that depend only on the shapes: what `PagedKVCache.store` needs (no device read)."""
        b = self.num_tokens
        return MetadataLists(
            qo_indptr=tuple(range(b + 1)),
            kv_lens=(),
            block_tables=(),
            query_kv_index=(0,) * b,  # only its length is read by store(); the indices live in kv_lens
            bidir_start=(),
            bidir_end=(),
            key_limit=(),
            write_all=True,
            max_slot=self.max_slot,
        )


class StaticDecodeAttention:
    """Pure-torch decode attention over fixed-width page tables: one 4-D SDPA call per layer for the whole batch.

    plan() builds the key mask [B, 1, 1, M * block_size] (key j of row b is visible iff j < kv_lens[b]) once per
    forward; run() gathers each row's M pages for K and V with `index_select` and runs SDPA with each KV head's
    query heads as its query rows (GQA with no repeated K/V and no `enable_gqa`, so CUDA's memory-efficient kernel,
    which takes a mask, stays eligible). Like `TorchPagedAttention`, it computes in fp32 on CPU and in the input
    dtype on CUDA.
    """

    name = "static_decode"

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None) -> None:
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self._md: StaticDecodeMetadata | None = None
        self._mask: Tensor | None = None

    def prepare(self, kv_lens: Sequence[int], pages: Sequence[Sequence[int]], block_size: int,
                q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        """Host planning before a capture or replay: none here (plan() builds the key mask from the `kv_lens`
        buffer on the device, inside the graph)."""

    def plan(self, metadata: StaticDecodeMetadata, q_dtype: torch.dtype | None = None,
             kv_dtype: torch.dtype | None = None) -> None:
        if not isinstance(metadata, StaticDecodeMetadata):
            raise TypeError(f"StaticDecodeAttention plans a StaticDecodeMetadata, got {type(metadata).__name__}")
        b, m = metadata.block_tables.shape
        keys = torch.arange(m * metadata.block_size, device=metadata.kv_lens.device)
        self._md = metadata
        self._mask = (keys.unsqueeze(0) < metadata.kv_lens.unsqueeze(1)).view(b, 1, 1, m * metadata.block_size)

    def run(self, q: Tensor, k: Tensor | None, v: Tensor | None, kv_cache: PagedKVCache, layer: int) -> Tensor:
        """q [B, Hq, D] (one token per row) -> [B, Hq, D]; this step's K/V must already be in the cache."""
        md = self._md
        if md is None or self._mask is None:
            raise RuntimeError("run() before plan()")
        b, hq, d = q.shape
        pages = kv_cache.layer(layer)  # [num_blocks, 2, block_size, n_kv, D]
        hkv = pages.shape[3]
        flat_pages = md.block_tables.reshape(-1)
        kc = pages[:, 0].index_select(0, flat_pages).view(b, -1, hkv, d).transpose(1, 2)  # [B, n_kv, M*bs, D]
        vc = pages[:, 1].index_select(0, flat_pages).view(b, -1, hkv, d).transpose(1, 2)
        compute = torch.float32 if q.device.type == "cpu" else q.dtype
        # GQA without repeating K/V: query head h reads KV head h // (hq / hkv), so each KV head's query heads are
        # consecutive and become its query rows [B, hkv, hq / hkv, D]; the [B, 1, 1, keys] mask broadcasts.
        o = F.scaled_dot_product_attention(
            q.reshape(b, hkv, hq // hkv, d).to(compute), kc.to(compute), vc.to(compute), attn_mask=self._mask,
            dropout_p=0.0, scale=self.scale,
        )
        return o.reshape(b, hq, d).to(q.dtype)
