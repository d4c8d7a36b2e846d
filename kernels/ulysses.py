"""Ulysses sequence-parallel attention: N ranks split a step's image rows; around attention they split the heads.

Outside attention every op of a decoder layer works token by token (norms, the QKV and output projections, RoPE,
qk-norm, the MoE), so each rank of a sequence-parallel group runs them on its 1/N of the rows. Attention needs
every key of a sequence: one all-to-all turns each rank's q/k/v [rows/N, all heads] into [all rows, heads/N], the
attention then runs exactly as in one process for those heads (the same `AttentionMetadata`: causal text rows and
bidirectional image blocks alike, over the paged prefix), and a second all-to-all turns the output
[all rows, heads/N] back into [rows/N, all heads].

Rows (`RowShard`): n rows are padded to N * ceil(n / N); rank r holds padded rows [r * per, (r + 1) * per). The
padding never reaches attention (dropped after the first all-to-all, zeros on the way back).

Heads (`UlyssesHeads`): rank r attends with query heads [r * Hq/N, (r + 1) * Hq/N) (Hq must divide by N) and the KV
heads those read: an even split when N divides the KV heads; when there are fewer KV heads and their count divides
N, each rank receives the one KV head of its query heads (each KV head is sent to N / Hkv ranks: the KV heads are
repeated). Any other count is refused with the sizes.

KV cache: the prompt's K/V, all heads, is in every rank's cache (text steps run unsharded on every rank). Each rank
stores this step's K/V only for its own KV heads (after the all-to-all it holds them for every row), into the head
slice of its cache it is given, and attention reads that slice. The other heads' slots of the sharded rows stay
stale on this rank; they are never read, because sharded rows are denoising image blocks, which every denoising
step rewrites whole and nothing attends to afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .attention import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from .kv_cache import PagedKVCache


@dataclass(frozen=True)
class SequenceParallelGroup:
    """One rank's place in a sequence-parallel group and the group's collectives (size 1: no-ops).

    group: the torch.distributed process group of the sequence-parallel ranks (None: the default group)."""

    size: int = 1
    rank: int = 0
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad sequence-parallel rank {self.rank} of {self.size}")

    def all_to_all(self, x: Tensor) -> Tensor:
        """x [size, ...]: slice d goes to rank d; the result's slice s came from rank s."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = torch.empty_like(x)  # contiguous too (empty_like keeps a transposed input's strides)
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def all_gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's [per, ...] concatenated in rank order -> [size * per, ...]."""
        if self.size == 1:
            return x
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=self.group)
        return out


@dataclass(frozen=True)
class RowShard:
    """`num_rows` rows split over `size` ranks: padded to size * per_rank; `rank` holds padded rows [start, stop)."""

    num_rows: int
    size: int
    rank: int

    @property
    def per_rank(self) -> int:
        return max(1, -(-self.num_rows // self.size))

    @property
    def padded(self) -> int:
        return self.per_rank * self.size

    @property
    def start(self) -> int:
        return self.rank * self.per_rank

    @property
    def num_real(self) -> int:
        """How many of this rank's rows are real (the rest is padding)."""
        return max(0, min(self.num_rows - self.start, self.per_rank))

    def local(self, x: Tensor) -> Tensor:
        """This rank's padded rows [per_rank, ...] of the full rows x [num_rows, ...] (zeros past num_rows)."""
        if x.shape[0] != self.num_rows:
            raise ValueError(f"RowShard.local: {x.shape[0]} rows, expected {self.num_rows}")
        part = x[self.start : self.start + self.num_real]
        if part.shape[0] == self.per_rank:
            return part
        return torch.cat([part, part.new_zeros((self.per_rank - part.shape[0], *x.shape[1:]))])

    def gather(self, comm: SequenceParallelGroup, x: Tensor) -> Tensor:
        """Every rank's padded rows [per_rank, ...] -> the full rows [num_rows, ...] on every rank."""
        return comm.all_gather_rows(x)[: self.num_rows]


@dataclass(frozen=True)
class UlyssesHeads:
    """Which query and KV heads each of `sp_size` ranks attends with (module docstring); validated on creation."""

    num_qo_heads: int
    num_kv_heads: int
    sp_size: int

    def __post_init__(self) -> None:
        hq, hkv, n = self.num_qo_heads, self.num_kv_heads, self.sp_size
        if n < 1 or hq < 1 or hkv < 1:
            raise ValueError(f"bad Ulysses head layout: {hq} query heads, {hkv} KV heads, {n} ranks")
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
        if hq % n:
            raise ValueError(f"sequence parallel: {hq} query heads (per tensor-parallel rank) do not split over {n} "
                             f"sequence-parallel ranks; choose a sequence-parallel size that divides {hq}")
        if hkv % n and n % hkv:
            raise ValueError(f"sequence parallel: {hkv} KV heads (per tensor-parallel rank) neither split over {n} "
                             f"sequence-parallel ranks nor divide {n} (so whole KV heads cannot be repeated per "
                             f"rank); choose a sequence-parallel size that divides {hkv} or is a multiple of it")

    @property
    def repeats_kv(self) -> bool:
        """Fewer KV heads than ranks: each KV head goes to sp_size / num_kv_heads ranks."""
        return self.num_kv_heads % self.sp_size != 0

    @property
    def local_qo_heads(self) -> int:
        return self.num_qo_heads // self.sp_size

    @property
    def local_kv_heads(self) -> int:
        return 1 if self.repeats_kv else self.num_kv_heads // self.sp_size

    def qo_range(self, rank: int) -> range:
        k = self.local_qo_heads
        return range(rank * k, (rank + 1) * k)

    def kv_range(self, rank: int) -> range:
        """The KV heads rank `rank` attends with (those its query heads read)."""
        if self.repeats_kv:
            h = rank // (self.sp_size // self.num_kv_heads)
            return range(h, h + 1)
        k = self.local_kv_heads
        return range(rank * k, (rank + 1) * k)


class UlyssesAttention:
    """The plan/run contract of `kernels.attention` over a sequence-sharded part of a step.

    plan(metadata): the metadata of ALL the sharded rows (unpadded, in order), as one process would plan them.
    run(q, k, v, kv_cache, layer): this rank's padded rows, q [per, Hq, D], k / v [per, Hkv, D] (every head of this
    tensor-parallel rank); `kv_cache` is this rank's cache restricted to `heads.kv_range(comm.rank)` (a view, e.g.
    `PagedKVCache.head_slice`). Unlike the inner backends, run() STORES this step's K/V itself (only it holds them
    for every row); the caller must not. Returns this rank's rows [per, Hq, D].
    """

    name = "ulysses"

    def __init__(self, heads: UlyssesHeads, comm: SequenceParallelGroup, inner: AttentionBackend) -> None:
        if heads.sp_size != comm.size:
            raise ValueError(f"head layout for {heads.sp_size} ranks, group of {comm.size}")
        self.heads = heads
        self.comm = comm
        self.inner = inner  # attends with heads.local_qo_heads / local_kv_heads
        self._md: AttentionMetadata | None = None
        self._shard: RowShard | None = None

    @property
    def shard(self) -> RowShard:
        if self._shard is None:
            raise RuntimeError("run() before plan()")
        return self._shard

    def plan(self, metadata: AttentionMetadata, q_dtype: torch.dtype | None = None,
             kv_dtype: torch.dtype | None = None) -> None:
        self._md = metadata
        self._shard = RowShard(metadata.num_tokens, self.comm.size, self.comm.rank)
        self.inner.plan(metadata, q_dtype=q_dtype, kv_dtype=kv_dtype)

    def scatter_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[per, Hq | Hkv, D] local rows -> [n, Hq/N | local KV heads, D] every real row (ONE all-to-all)."""
        shard, n_ranks = self.shard, self.comm.size
        per, _, d = q.shape
        hq, hkv = self.heads.local_qo_heads, self.heads.local_kv_heads
        if self.heads.repeats_kv:  # destination d reads KV head d // (N / Hkv): each head repeated for its ranks
            rep = n_ranks // self.heads.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        parts = [t.reshape(per, n_ranks, h, d) for t, h in ((q, hq), (k, hkv), (v, hkv))]
        packed = torch.cat(parts, dim=2).transpose(0, 1)  # [N (destination), per, hq + 2 hkv, D]
        got = self.comm.all_to_all(packed).reshape(shard.padded, hq + 2 * hkv, d)[: shard.num_rows]
        qa, ka, va = got.split([hq, hkv, hkv], dim=1)
        return qa, ka, va

    def gather_heads(self, o: Tensor) -> Tensor:
        """[n, Hq/N, D] every real row -> [per, Hq, D] this rank's rows, every head (ONE all-to-all)."""
        shard, n_ranks = self.shard, self.comm.size
        if o.shape[0] < shard.padded:
            o = F.pad(o, (0, 0, 0, 0, 0, shard.padded - o.shape[0]))
        back = self.comm.all_to_all(o.reshape(n_ranks, shard.per_rank, *o.shape[1:]))  # [N (head owner), per, h, D]
        return back.transpose(0, 1).reshape(shard.per_rank, n_ranks * o.shape[1], o.shape[2])

    def run(self, q: Tensor, k: Tensor, v: Tensor, kv_cache: PagedKVCache, layer: int) -> Tensor:
        if self._md is None:
            raise RuntimeError("run() before plan()")
        qa, ka, va = self.scatter_heads(q, k, v)
        kv_cache.store(layer, self._md, ka, va)
        return self.gather_heads(self.inner.run(qa, ka, va, kv_cache, layer))


__all__ = ["RowShard", "SequenceParallelGroup", "UlyssesAttention", "UlyssesHeads"]
