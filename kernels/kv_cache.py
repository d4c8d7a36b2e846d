"""Paged KV-cache storage: one [num_blocks, 2, block_size, n_kv_heads, head_dim] tensor per layer.

It lives beside the attention kernels because they define its layout: the NHD pages are the ones FlashInfer's paged
wrappers read directly (index 0 = K, 1 = V), so the FlashInfer backend (kernels/flashinfer_attention.py) reads these
tensors without copies, and the torch reference (kernels/attention.py) gathers and stores through the same slots.
This class is storage only: which request owns which block is the engine's KV-cache manager's business; here a
"slot" is simply page * block_size + offset.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .attention import AttentionMetadata


def kv_page_shape(block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """One layer's page of one block: K and V (index 0 / 1) x block_size slots x KV heads x head_dim."""
    return (2, block_size, num_kv_heads, head_dim)


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes one block holds across all layers (`kv_page_shape` per layer): what the memory plan prices."""
    return num_layers * math.prod(kv_page_shape(block_size, num_kv_heads, head_dim)) * dtype_bytes


class PagedKVCache:
    """Per-layer paged K/V pages with slot-addressed writes and per-sequence gathers."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) <= 0:
            raise ValueError("PagedKVCache dimensions must all be positive")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, *kv_page_shape(block_size, num_kv_heads, head_dim))
        self.kv: list[Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]

    def head_slice(self, heads: range) -> PagedKVCache:
        """A cache over the same pages restricted to KV heads `heads` (views: writes land in this cache's pages).

        Sequence-parallel attention (kernels/ulysses.py) stores and reads only the KV heads its rank attends with."""
        if heads.step != 1 or not 0 <= heads.start < heads.stop <= self.num_kv_heads:
            raise ValueError(f"head slice {heads} outside the cache's {self.num_kv_heads} KV heads")
        if len(heads) == self.num_kv_heads:
            return self
        view = object.__new__(PagedKVCache)
        view.__dict__.update(self.__dict__)
        view.num_kv_heads = len(heads)
        view.kv = [t[:, :, :, heads.start : heads.stop] for t in self.kv]
        return view

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, layer: int) -> Tensor:
        """The raw page tensor of one layer ([num_blocks, 2, block_size, n_kv, D], NHD)."""
        return self.kv[layer]

    def write(self, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v [N, n_kv, D] at flat slots [N]; slot -1 means "do not store this token".

        Validates the slots on the host (a device read): for tools and tests. The model's forward uses
        `store`, whose indices the step's metadata prepared on the host.
        """
        if k.shape != v.shape or k.shape[0] != slot_mapping.shape[0]:
            raise ValueError(
                f"write: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slot_mapping.shape)}"
            )
        slots = slot_mapping.tolist()
        rows = [r for r, s in enumerate(slots) if s >= 0]
        if not rows:
            return
        kept = [slots[r] for r in rows]
        self._check_slot(max(kept))
        index = torch.tensor(rows, dtype=torch.long, device=k.device)
        self._store(layer, torch.tensor(kept, dtype=torch.long, device=self.device),
                    k.index_select(0, index), v.index_select(0, index))

    def store(self, layer: int, metadata: AttentionMetadata, k: Tensor, v: Tensor) -> None:
        """Store this step's k, v [N, n_kv, D] at the slots the step's metadata prepared (`write_rows`,
        `write_slots`, host `lists()`): index copies only, no device reads, so no host sync in the forward
        (docs/decisions.md, "No host syncs in the backbone forward")."""
        host = metadata.lists()
        if k.shape != v.shape or k.shape[0] != len(host.query_kv_index):
            raise ValueError(f"store: k {tuple(k.shape)}, v {tuple(v.shape)}, {len(host.query_kv_index)} rows")
        if host.max_slot < 0:
            return
        self._check_slot(host.max_slot)
        if not host.write_all:
            k = k.index_select(0, metadata.write_rows)
            v = v.index_select(0, metadata.write_rows)
        self._store(layer, metadata.write_slots, k, v)

    def _check_slot(self, max_slot: int) -> None:
        if max_slot >= self.num_slots:
            raise IndexError(f"slot {max_slot} out of range for {self.num_slots} slots")

    def _store(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        cache = self.kv[layer]
        flat = cache.view(-1, self.num_kv_heads, self.head_dim)  # rows: (page, K/V, offset)
        bs = self.block_size
        k_rows = slots + (slots // bs) * bs  # page * 2 * bs + offset
        flat.index_copy_(0, k_rows, k.to(cache.dtype))
        flat.index_copy_(0, k_rows + bs, v.to(cache.dtype))

    def gather(self, layer: int, block_table_row: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Contiguous k, v [kv_len, n_kv, D] of one sequence from its page list (-1 padded).

        The page list must cover kv_len (`AttentionMetadata.build` checks it on the host; no device read here).
        """
        n_pages = math.ceil(kv_len / self.block_size)
        pages = block_table_row[:n_pages].long()
        if pages.numel() < n_pages:
            raise IndexError(f"block table covers fewer than the {n_pages} pages needed for kv_len {kv_len}")
        sel = self.kv[layer].index_select(0, pages)  # [n_pages, 2, block_size, n_kv, D]
        k = sel[:, 0].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]
        v = sel[:, 1].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]
        return k, v
