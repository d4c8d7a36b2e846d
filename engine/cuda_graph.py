"""CUDA graphs for decode-only steps (think / recaption tokens): capture per bucket, replay, else eager.

A decode-only step is a step whose every chunk is ONE plain text token that samples the next token: no prefill,
no diffusion image block, no image / timestep slot in the chunk. Such a step is launch-bound on a GPU (a few
hundred small kernels for one token per sequence), which is what a CUDA graph removes. `decode_batch` decides
whether a step qualifies and lays its inputs out for a bucket: a batch size B (1, 2, 4, ..., max_num_seqs) and a
page-table width M, the smallest of each that holds the step. Widths reach the model's max_position_embeddings, so
every context the model allows (a 2-3-image edit's 12-18k keys included) can replay a graph.

The captured attention (`decode_attention_for`) is the paged kernel where FlashInfer is the backend: its decode
wrapper in CUDA-graph mode (fixed page-table buffers, one wrapper per batch bucket, planned on the host before each
replay) reads only each sequence's own pages, so one width serves every context and a bucket is captured once.
With the torch backend it is `kernels.decode_attention.StaticDecodeAttention`, which reads every page of its width
(widths double from 512 keys, so at most twice the longest sequence's keys). `DecodeGraphRunner` owns the static
input buffers (token ids, positions, slots, page tables [B, M], kv lens), runs the static decode forward (embedding
lookup -> backbone with the static attention -> last hidden states) and captures it per (B, M) into one shared
graph memory pool (planned by `engine.memory_plan.graph_pool_bytes`).

Tensor parallel: every rank runs the same SchedulerOutput, so every rank selects the same bucket at the same step
and captures in lockstep; the all-reduces (vocab-parallel embedding, o_proj, MoE) are recorded into each rank's
graph and run on replay like any kernel (NCCL collectives are capturable). A capture failure on one rank leaves that
rank eager for the step, which issues the same collectives in the same order as a replay.

Capture is LAZY (the first time a bucket is needed), not at startup: this engine's steps are mostly prefill and
diffusion, and many deployments never decode more than a few sequences at once nor reach long contexts, so
capturing every (B, M) up front would add startup time and hold graph memory for buckets never replayed. A capture
failure (e.g. a MoE implementation that reads group sizes on the host) turns graphs off for good with ONE warning;
the step and every later one run eagerly. Graphs are used only on CUDA and never with `--enforce-eager`; see
docs/decisions.md, "CUDA graphs for decode-only steps".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffgentor.engine.model_interface import DecoderModel
from diffgentor.engine.scheduler_output import Chunk
from diffgentor.kernels.decode_attention import StaticDecodeAttention, StaticDecodeMetadata
from diffgentor.kernels.fallback import warn_once
from diffgentor.kernels.flashinfer_attention import FlashInferGraphDecode, FlashInferPagedAttention
from diffgentor.kernels.host_copy import host_tensor
from diffgentor.kernels.kv_cache import PagedKVCache

MIN_CONTEXT_TOKENS = 512
"""Keys covered by the narrowest page table."""


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Capture sizes: powers of two below max_num_seqs, then max_num_seqs itself (every decode batch fits one)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes = []
    b = 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return (*sizes, max_num_seqs)


def width_buckets(max_tokens: int, block_size: int, min_tokens: int = MIN_CONTEXT_TOKENS) -> tuple[int, ...]:
    """Page-table widths in pages: keys min_tokens, 2x, 4x, ... below max_tokens, then max_tokens (rounded up to
    whole pages). The static attention reads every page of its width, so doubling bounds the waste at 2x."""
    if max_tokens < 1 or block_size < 1:
        raise ValueError(f"max_tokens and block_size must be positive, got {max_tokens}, {block_size}")
    last = math.ceil(max_tokens / block_size)
    widths = []
    w = max(1, math.ceil(min_tokens / block_size))
    while w < last:
        widths.append(w)
        w *= 2
    return (*widths, last)


def pick_bucket(num_rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding num_rows rows, or None when none does."""
    return min((b for b in buckets if b >= num_rows), default=None) if num_rows > 0 else None


def cuda_graphs_allowed(device: torch.device | str, enforce_eager: bool) -> tuple[bool, str]:
    """(use CUDA graphs for decode steps, why not): only on CUDA and not with --enforce-eager (tensor parallel
    included: the ranks capture in lockstep, module docstring)."""
    if enforce_eager:
        return False, "--enforce-eager"
    if torch.device(device).type != "cuda":
        return False, f"device {device} is not CUDA"
    return True, "ok"


def graph_keys(max_num_seqs: int, max_context_tokens: int, block_size: int, paged_kernel: bool
               ) -> tuple[tuple[int, int], ...]:
    """Every (batch bucket, page-table width) a runner may capture: with the paged kernel one width (the widest: the
    kernel reads only each sequence's pages), else every width bucket."""
    widths = width_buckets(max_context_tokens, block_size)
    return tuple((b, w) for b in batch_buckets(max_num_seqs) for w in (widths[-1:] if paged_kernel else widths))


def is_decode_chunk(c: Chunk) -> bool:
    """One plain text token that samples: not a diffusion block, in no image / timestep slot nor full-attention
    span (its embedding is the token's, and it sees exactly the keys [0, end))."""
    if c.end - c.start != 1 or c.sample is None or c.diffusion or len(c.token_ids) <= c.start:
        return False
    layout, at = c.layout, c.start
    if any(s.start <= at < s.end for s in layout.image_slots):
        return False
    if any(a <= at < b for a, b in layout.full_attn_spans):
        return False
    return at not in layout.cond_timestep_indexes and at not in (layout.gen_timestep_index, layout.guidance_index)


@dataclass(frozen=True)
class DecodeBatch:
    """A decode-only step's inputs on the host, padded to its bucket (rows num_rows.. are padding rows) and its
    page-table width (pages past a row's own: the scratch block)."""

    bucket: int
    width: int
    num_rows: int
    token_ids: list[int]
    positions: list[list[int]]  # [bucket][2] (y, x)
    slots: list[int]
    pages: list[list[int]]  # [num_rows][pages of the row]: each real row's own pages, unpadded
    kv_lens: list[int]
    scratch_block: int

    @property
    def block_tables(self) -> list[list[int]]:
        """[bucket][width] page tables padded with the scratch block (what the torch static attention reads)."""
        rows = [t + [self.scratch_block] * (self.width - len(t)) for t in self.pages]
        return rows + [[self.scratch_block] * self.width] * (self.bucket - self.num_rows)

    def page_lists(self) -> tuple[list[int], list[list[int]]]:
        """(kv_lens, pages) of every bucket row, padding rows one key on the scratch block (the paged kernel's)."""
        pad = self.bucket - self.num_rows
        return self.kv_lens, self.pages + [[self.scratch_block]] * pad


def decode_batch(
    chunks: Sequence[Chunk], block_size: int, widths: Sequence[int], buckets: Sequence[int], scratch_block: int
) -> DecodeBatch | None:
    """THE selection function: the step's graph inputs, or None when it must run eagerly (not decode-only, more
    rows than the largest batch bucket, a sequence longer than the widest page table, a page table that does not
    cover its sequence)."""
    bucket = pick_bucket(len(chunks), buckets)
    if bucket is None or not all(is_decode_chunk(c) for c in chunks):
        return None
    scratch_slot = scratch_block * block_size
    ids, pos, slots, tables, lens = [], [], [], [], []
    for c in chunks:
        kv_len = c.end
        pages = list(c.block_table[: -(-kv_len // block_size)])
        if len(pages) * block_size < kv_len or any(p < 0 for p in pages):
            return None
        ids.append(int(c.token_ids[c.start]))
        pos.append([int(x) for x in c.layout.positions_for(c.start, c.end)[0].tolist()])  # host tensor
        slots.append(pages[c.start // block_size] * block_size + c.start % block_size)
        tables.append(pages)
        lens.append(kv_len)
    width = pick_bucket(max(len(t) for t in tables), widths)
    if width is None:
        return None
    pad = bucket - len(chunks)
    return DecodeBatch(
        bucket=bucket,
        width=width,
        num_rows=len(chunks),
        token_ids=ids + [0] * pad,
        positions=pos + [[0, 0]] * pad,
        slots=slots + [scratch_slot] * pad,
        pages=tables,
        kv_lens=lens + [1] * pad,
        scratch_block=scratch_block,
    )


def decode_attention_for(model: DecoderModel, buckets: Sequence[int], max_pages: int
                         ) -> StaticDecodeAttention | FlashInferGraphDecode:
    """The attention a graph captures: FlashInfer's decode wrapper in CUDA-graph mode when the model's backend is
    FlashInfer and it can run here (never torch attention in its place), else the torch static attention."""
    backbone = model.model
    attn = backbone.attn
    if isinstance(attn, FlashInferPagedAttention):
        graph = attn.graph_decode(model.device, buckets, max_pages)
        if graph is not None:
            return graph
    cfg = model.config
    return StaticDecodeAttention(backbone.num_local_heads, backbone.num_local_kv_heads, cfg.head_dim,
                                 cfg.head_dim**-0.5)


class DecodeGraphRunner:
    """Static buffers, the static decode forward and its CUDA graphs per (batch bucket, page-table width).

    use_graphs=False runs the same static forward without capture (any device): what the CPU tests compare with
    the eager forward, and what `torch.compile(fullgraph=True)` traces.
    """

    def __init__(
        self,
        model: DecoderModel,
        kv_cache: PagedKVCache,
        scratch_block: int,
        max_num_seqs: int,
        max_context_tokens: int | None = None,
        use_graphs: bool = True,
    ) -> None:
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is not a page of the cache ({kv_cache.num_blocks})")
        self.model = model
        self.kv_cache = kv_cache
        self.scratch_block = scratch_block
        self.block_size = kv_cache.block_size
        self.buckets = batch_buckets(max_num_seqs)
        cfg = model.config
        limit = cfg.max_position_embeddings
        all_widths = width_buckets(min(max_context_tokens or limit, limit), self.block_size)
        self.max_blocks = all_widths[-1]
        self.attn = decode_attention_for(model, self.buckets, self.max_blocks)
        self.paged_kernel = isinstance(self.attn, FlashInferGraphDecode)
        self.widths = all_widths[-1:] if self.paged_kernel else all_widths
        self.use_graphs = use_graphs
        self.disabled_reason: str | None = None
        dev = model.device
        self._q_dtype = model.model.wte.weight.dtype
        b = self.buckets[-1]
        self._ids = torch.zeros(b, dtype=torch.long, device=dev)
        self._positions = torch.zeros(b, 2, dtype=torch.long, device=dev)
        self._slots = torch.full((b,), scratch_block * self.block_size, dtype=torch.long, device=dev)
        self._tables = torch.full((b, self.max_blocks), scratch_block, dtype=torch.long, device=dev)
        self._kv_lens = torch.ones(b, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None

    @property
    def captured(self) -> tuple[tuple[int, int], ...]:
        """The (batch bucket, page-table width) pairs captured so far."""
        return tuple(sorted(self._graphs))

    def select(self, chunks: Sequence[Chunk]) -> DecodeBatch | None:
        return decode_batch(chunks, self.block_size, self.widths, self.buckets, self.scratch_block)

    def metadata(self, bucket: int, width: int) -> StaticDecodeMetadata:
        """Views of the first `bucket` rows (and `width` page columns) of the static buffers."""
        return StaticDecodeMetadata(self._slots[:bucket], self._tables[:bucket, :width], self._kv_lens[:bucket],
                                    self.block_size, self.kv_cache.num_slots - 1)

    @torch.no_grad()
    def forward(self, bucket: int, width: int) -> Tensor:
        """The static decode forward on the buffers' first `bucket` rows and `width` page columns -> last-layer
        hidden states [bucket, H]. Shapes depend on (bucket, width) alone; no host reads of device data
        (capturable, fullgraph-traceable)."""
        emb = self.model.embed_tokens(self._ids[:bucket])
        md = self.metadata(bucket, width)
        return self.model.model(emb, self._positions[:bucket], md, self.kv_cache, attn=self.attn)

    def load(self, batch: DecodeBatch) -> None:
        """Copy a step's inputs into the static buffers (one host->device copy per buffer) and plan the attention
        on the host (FlashInfer: its fixed page-table buffers), before a capture or a replay."""
        b = batch.bucket
        bufs = [(self._ids[:b], batch.token_ids), (self._positions[:b], batch.positions),
                (self._slots[:b], batch.slots), (self._kv_lens[:b], batch.kv_lens)]
        if not self.paged_kernel:  # only the torch static attention reads the padded tables
            bufs.append((self._tables[:b, : batch.width], batch.block_tables))
        cuda = self._ids.is_cuda
        for buf, values in bufs:
            buf.copy_(host_tensor(values, torch.long, cuda), non_blocking=cuda)
        kv_lens, pages = batch.page_lists()
        self.attn.prepare(kv_lens, pages, self.block_size, self._q_dtype, self.kv_cache.dtype)

    def run(self, chunks: Sequence[Chunk]) -> Tensor | None:
        """Hidden states [len(chunks), H] of a decode-only step (graph replay, or the static forward when graphs
        are off for this runner), or None when the step must run eagerly (`decode_batch`) or capture just failed."""
        if self.disabled_reason is not None:
            return None
        batch = self.select(chunks)
        if batch is None:
            return None
        self.load(batch)
        if not self.use_graphs:
            return self.forward(batch.bucket, batch.width)[: batch.num_rows]
        key = (batch.bucket, batch.width)
        graph = self._graphs.get(key) or self._capture(key)
        if graph is None:
            return None
        g, out = graph
        g.replay()
        return out[: batch.num_rows].clone()  # the next replay overwrites `out`

    def _capture(self, key: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, Tensor] | None:
        """Warm up (resolves kernels, allocator and library workspaces outside the graph), then capture. On any
        failure graphs are disabled for good with one warning; the caller runs the step eagerly. The warm-up and the
        capture run on the CURRENT step's inputs: the K/V they write are the values the step writes anyway."""
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(*key)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                out = self.forward(*key)
        except Exception as e:  # noqa: BLE001 - whatever breaks capture, the user's request runs eagerly
            self.disabled_reason = f"capture of decode bucket {key} failed: {type(e).__name__}: {e}"
            self._graphs.clear()
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001, S110 - best effort after a failed capture
                pass
            warn_once("cuda-graph-capture", f"CUDA graphs disabled, decode steps run eagerly ({self.disabled_reason})")
            return None
        self._graphs[key] = (g, out)
        return g, out
