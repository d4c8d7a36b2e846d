"""FlashInfer 0.5.0 paged attention with the plan/run contract of `kernels.attention` (GPU only).

Imported lazily by `get_attention_backend("flashinfer")`; `flashinfer` itself is imported at the first plan()
on a CUDA device, so CPU code never imports it. NHD pages straight from `PagedKVCache.layer(i)`
([pages, 2, page_size, n_kv, D]); no in-kernel RoPE (`pos_encoding_mode="NONE"`: RoPE and qk-norm run before
the cache write). plan() hands FlashInfer host arrays (pinned on CUDA: its planning reads them on the host, so
device arrays would be copied back, a sync per wrapper per forward); only the row index tensors used by run() go to
the device, asynchronously. The variants implement exactly the decompositions that `TorchPagedAttention` emulates:
* "mask": one prefill wrapper per forward, rows = sequences, the official mask as a flat custom mask (FA2).
* "segments": causal text runs -> a causal paged prefill (or the decode wrapper when the whole step is
  single-token text decode); image-block runs -> a non-causal paged prefill over [0, block end). FA3-eligible.
* "cascade": self-contained runs -> non-causal paged prefill over the prefix [0, kv0) (return_lse) plus a
  ragged prefill over the run's own K/V (causal for text, full for a block), merged with `merge_state`;
  other runs as a non-causal paged row over [0, kv_end).
`FlashInferGraphDecode` is the decode wrapper in CUDA-graph mode for the captured decode steps of `engine.cuda_graph`:
one wrapper per batch bucket over fixed page-table buffers, planned on the host BEFORE each capture or replay (the
plan writes the step's pages into those buffers and its split schedule into the wrapper's workspace); the captured
run() reads only each sequence's own pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .attention import (
    ATTN_VARIANTS,
    AttentionMetadata,
    Segment,
    TorchPagedAttention,
    attention_mask_rows,
    decompose_segments,
    flashinfer_attention_available,
)
from .fallback import warn_once
from .host_copy import host_tensor, to_device

if TYPE_CHECKING:
    from .kv_cache import PagedKVCache

WORKSPACE_BYTES = 128 << 20



class _PagedRows:
    """Page-table arrays for rows (query run, KV prefix length) over one sequence's pages."""

    def __init__(self) -> None:
        self.qo_indptr = [0]
        self.kv_indptr = [0]
        self.indices: list[int] = []
        self.last_page_len: list[int] = []
        self.rows: list[int] = []  # flat query row of each packed query, in packed order

    def add(self, rows: range, table: list[int], kv_len: int, page_size: int) -> None:
        n_pages = -(-kv_len // page_size)
        self.indices.extend(table[:n_pages])
        self.kv_indptr.append(len(self.indices))
        self.last_page_len.append(kv_len - (n_pages - 1) * page_size)
        self.rows.extend(rows)
        self.qo_indptr.append(len(self.rows))

    def __len__(self) -> int:
        return len(self.last_page_len)


class FlashInferPagedAttention:
    name = "flashinfer"

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 variant: str = "segments") -> None:
        if variant not in ATTN_VARIANTS:
            raise ValueError(f"unknown attention variant {variant!r}; allowed: {', '.join(ATTN_VARIANTS)}")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.variant = variant
        self._fallback: TorchPagedAttention | None = None
        self._device: torch.device | None = None
        self._wrappers: dict[str, object] = {}
        self._workspace: Tensor | None = None
        self._steps: list[tuple] = []

    def _i32(self, x: list[int]) -> Tensor:
        """A planning array as FlashInfer's plan() takes it: a host tensor (pinned on CUDA), so that planning reads
        it without copying it back from the device and uploads it asynchronously."""
        return host_tensor(x, torch.int32, self._device.type == "cuda")

    def _rows(self, rows: list[int]) -> Tensor:
        return to_device(rows, torch.long, self._device)

    # ------------------------------------------------------------------ wrappers
    def workspace(self) -> Tensor:
        """The float workspace every wrapper of this backend shares (the graph-mode decode wrappers too: steps run
        one after another on one stream)."""
        if self._workspace is None:
            self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self._device)
        return self._workspace

    def graph_decode(self, device: torch.device | str, buckets: Sequence[int], max_pages: int
                     ) -> FlashInferGraphDecode | None:
        """The CUDA-graph-mode decode attention over this backend's workspace, or None where FlashInfer cannot run
        on `device` (the caller then captures the torch static attention)."""
        if self._fallback is not None:
            return None
        ok, _ = flashinfer_attention_available(device)
        if not ok:
            return None
        self._device = torch.device(device)
        return FlashInferGraphDecode(self, buckets, max_pages)

    def _wrapper(self, kind: str):
        import flashinfer

        self.workspace()
        w = self._wrappers.get(kind)
        if w is None:
            if kind == "decode":
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", use_tensor_cores=True)
            elif kind.startswith("ragged"):
                w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self._workspace, "NHD")
            else:
                w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
            self._wrappers[kind] = w
        return w

    def _plan_paged(self, kind: str, pr: _PagedRows, causal: bool, page_size: int, custom_mask: Tensor | None = None):
        w = self._wrapper(kind)
        w.plan(
            self._i32(pr.qo_indptr), self._i32(pr.kv_indptr), self._i32(pr.indices), self._i32(pr.last_page_len),
            self.num_qo_heads, self.num_kv_heads, self.head_dim, page_size, custom_mask=custom_mask, causal=causal,
            pos_encoding_mode="NONE", sm_scale=self.scale, q_data_type=self._q_dtype, kv_data_type=self._kv_dtype,
        )
        return w

    # ------------------------------------------------------------------ plan / run
    def plan(self, metadata: AttentionMetadata, q_dtype: torch.dtype | None = None,
             kv_dtype: torch.dtype | None = None) -> None:
        device = metadata.slot_mapping.device
        if self._fallback is None and self._device is None:
            ok, why = flashinfer_attention_available(device)
            if not ok:
                warn_once(f"attn-flashinfer:{why}", f"attention 'flashinfer' unavailable ({why}); using sdpa")
                self._fallback = TorchPagedAttention(self.num_qo_heads, self.num_kv_heads, self.head_dim,
                                                     self.scale, self.variant)
            else:
                self._device = device
        if self._fallback is not None:
            self._fallback.plan(metadata, q_dtype, kv_dtype)
            return
        self._q_dtype = q_dtype or torch.bfloat16
        self._kv_dtype = kv_dtype or self._q_dtype
        ps = metadata.block_size
        host = metadata.lists()  # host copies made by AttentionMetadata.build: no device reads while planning
        tables = [list(t) for t in host.block_tables]
        kv_lens, indptr = host.kv_lens, host.qo_indptr
        dev = self._device
        self._steps = []
        if self.variant == "mask":
            pr = _PagedRows()
            masks = []
            for s in range(metadata.num_seqs):
                r0, r1 = indptr[s], indptr[s + 1]
                if r1 > r0:
                    pr.add(range(r0, r1), tables[s], kv_lens[s], ps)
                    masks.append(attention_mask_rows(metadata.query_kv_index[r0:r1], metadata.bidir_start[r0:r1],
                                                     metadata.bidir_end[r0:r1], kv_lens[s]).reshape(-1))
            if len(pr):
                w = self._plan_paged("mask", pr, False, ps, custom_mask=torch.cat(masks).to(dev))
                self._steps.append(("paged", w, self._rows(pr.rows)))
            return
        segs = decompose_segments(metadata)
        if segs and all(sg.causal and sg.num_rows == 1 for sg in segs):  # pure text decode step
            pr = _PagedRows()
            for sg in segs:
                pr.add(range(sg.row0, sg.row1), tables[sg.seq], sg.kv_end, ps)
            w = self._wrapper("decode")
            w.plan(self._i32(pr.kv_indptr), self._i32(pr.indices), self._i32(pr.last_page_len), self.num_qo_heads,
                   self.num_kv_heads, self.head_dim, ps, pos_encoding_mode="NONE", sm_scale=self.scale,
                   q_data_type=self._q_dtype, kv_data_type=self._kv_dtype)
            self._steps.append(("paged", w, self._rows(pr.rows)))
            return
        if self.variant == "segments":
            for causal, kind in ((True, "causal"), (False, "bidir")):
                pr = _PagedRows()
                for sg in segs:
                    if sg.causal == causal:
                        pr.add(range(sg.row0, sg.row1), tables[sg.seq], sg.kv_end, ps)
                if len(pr):
                    w = self._plan_paged(kind, pr, causal, ps)
                    self._steps.append(("paged", w, self._rows(pr.rows)))
            return
        self._plan_cascade(segs, tables, ps)

    def _plan_cascade(self, segs: list[Segment], tables: list[list[int]], ps: int) -> None:
        prefix = _PagedRows()  # non-causal paged rows: prefixes of self-contained runs, whole rows of the others
        ragged: dict[bool, tuple[list[int], list[int]]] = {True: ([0], []), False: ([0], [])}
        for sg in segs:
            if sg.self_contained:
                if sg.kv0 > 0:
                    prefix.add(range(sg.row0, sg.row1), tables[sg.seq], sg.kv0, ps)
                ind, rows = ragged[sg.causal]
                rows.extend(range(sg.row0, sg.row1))
                ind.append(len(rows))
            else:
                prefix.add(range(sg.row0, sg.row1), tables[sg.seq], sg.kv_end, ps)
        if len(prefix):
            w = self._plan_paged("prefix", prefix, False, ps)
            self._steps.append(("prefix", w, self._rows(prefix.rows)))
        for causal in (True, False):
            ind, rows = ragged[causal]
            if rows:
                w = self._wrapper("ragged_causal" if causal else "ragged_bidir")
                w.plan(self._i32(ind), self._i32(ind), self.num_qo_heads, self.num_kv_heads, self.head_dim,
                       causal=causal, pos_encoding_mode="NONE", sm_scale=self.scale, q_data_type=self._q_dtype,
                       kv_data_type=self._kv_dtype)
                self._steps.append(("ragged", w, self._rows(rows)))

    def run(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: PagedKVCache, layer: int) -> Tensor:
        if self._fallback is not None:
            return self._fallback.run(q, k, v, kv_cache, layer)
        paged = kv_cache.layer(layer)
        if self.variant != "cascade" or all(kind == "paged" for kind, _, _ in self._steps):
            out = torch.empty_like(q)
            for _, w, rows in self._steps:
                out[rows] = w.run(q.index_select(0, rows).contiguous(), paged)
            return out
        import flashinfer

        n, h, d = q.shape
        acc = q.new_zeros(n, h, d, dtype=torch.float32)
        lse = q.new_full((n, h), float("-inf"), dtype=torch.float32)
        for kind, w, rows in self._steps:
            qs = q.index_select(0, rows).contiguous()
            if kind == "ragged":
                o, s = w.run(qs, k.index_select(0, rows).contiguous(), v.index_select(0, rows).contiguous(),
                             return_lse=True)
            else:
                o, s = w.run(qs, paged, return_lse=True)
            o_m, s_m = flashinfer.merge_state(acc[rows].to(o.dtype), lse[rows], o, s)
            acc[rows] = o_m.float()
            lse[rows] = s_m
        return acc.to(q.dtype)


class FlashInferGraphDecode:
    """Decode attention for captured decode steps: FlashInfer's decode wrapper with `use_cuda_graph=True`, one per
    batch bucket (its batch size is fixed), each over fixed int32 buffers: kv indptr [B + 1], page indices
    [B * max_pages] and last-page lengths [B]. prepare() plans the step on the host (indptr and last-page lengths
    as pinned host arrays, the page indices already on the device; the wrapper copies them into its fixed buffers
    without a host sync) before a capture or a replay; plan() inside the forward does
    no work (it only checks that the bucket was prepared) and run() is what the graph holds. The query and KV dtypes
    are the model's; no in-kernel RoPE, as the eager wrappers."""

    name = "flashinfer_graph_decode"

    def __init__(self, owner: FlashInferPagedAttention, buckets: Sequence[int], max_pages: int) -> None:
        if max_pages < 1:
            raise ValueError(f"max_pages must be positive, got {max_pages}")
        self.owner = owner
        self.device = owner._device
        self.buckets = tuple(buckets)
        self.max_pages = max_pages
        self._wrappers: dict[int, object] = {}
        self._bucket: int | None = None

    def wrapper(self, bucket: int):
        """The bucket's graph-mode wrapper (made at its first prepare, with its fixed buffers)."""
        w = self._wrappers.get(bucket)
        if w is None:
            import flashinfer

            if bucket not in self.buckets:
                raise ValueError(f"batch {bucket} is not one of the buckets {self.buckets}")
            dev = self.device
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.owner.workspace(), "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.zeros(bucket + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(bucket * self.max_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(bucket, dtype=torch.int32, device=dev),
            )
            self._wrappers[bucket] = w
        return w

    def prepare(self, kv_lens: Sequence[int], pages: Sequence[Sequence[int]], page_size: int,
                q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        """Plan a step of len(kv_lens) rows (a bucket, padding rows included) on the host."""
        rows = _PagedRows()
        for r, (n, table) in enumerate(zip(kv_lens, pages)):
            if -(-n // page_size) > self.max_pages:
                raise ValueError(f"row {r}: {n} keys exceed {self.max_pages} pages of {page_size}")
            rows.add(range(r, r + 1), list(table), n, page_size)
        pin = self.device.type == "cuda"
        o = self.owner
        # indptr and last-page lengths are read on the host (pinned); the page indices only on the device: uploaded
        # here asynchronously, since in this mode the wrapper copies a HOST index array with a blocking copy
        self.wrapper(len(kv_lens)).plan(
            host_tensor(rows.kv_indptr, torch.int32, pin), to_device(rows.indices, torch.int32, self.device),
            host_tensor(rows.last_page_len, torch.int32, pin), o.num_qo_heads, o.num_kv_heads, o.head_dim,
            page_size, pos_encoding_mode="NONE", sm_scale=o.scale, q_data_type=q_dtype, kv_data_type=kv_dtype)
        self._bucket = len(kv_lens)

    def plan(self, metadata, q_dtype: torch.dtype | None = None, kv_dtype: torch.dtype | None = None) -> None:
        if self._bucket != metadata.num_seqs:
            raise RuntimeError(f"a decode step of {metadata.num_seqs} rows was not prepared (prepared: {self._bucket})")

    def run(self, q: Tensor, k: Tensor | None, v: Tensor | None, kv_cache: PagedKVCache, layer: int) -> Tensor:
        return self._wrappers[self._bucket].run(q, kv_cache.layer(layer))
