"""Tensor / expert / CFG / sequence parallel coordinates of one model rank, and the torch.distributed bootstrap.

`ParallelContext()` (the default everywhere) is the single-process model: size 1, no process group, every
collective a no-op, every shard range the whole dimension. A worker process of a parallel engine builds one with
`init_distributed(...)` (which also makes this rank's tensor-parallel, CFG and sequence-parallel process groups, once,
from the rank grid of `engine.parallel_layout`) and passes it to `HunyuanImage3ForCausalMM.from_pretrained(...,
parallel=ctx)`. The model's own collectives use the tensor-parallel group only.

Sharding rules (as in vLLM / SGLang):
- attention: q heads split evenly; KV heads split evenly when tp <= num_kv_heads, otherwise each KV head is
  replicated on tp / num_kv_heads consecutive ranks (rank r holds KV head r // (tp / num_kv_heads), which is
  exactly the KV group of its q heads);
- MoE: tensor parallel on the expert width (every rank holds every expert, 1/tp of its width), or expert
  parallel (`EngineConfig.parallel.expert_parallel`): whole experts, a contiguous range of num_experts / tp;
- vocabulary: contiguous row ranges of ceil(vocab / tp) (the last may be shorter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.kernels.moe import MoEParallel
from diffgentor.kernels.ulysses import SequenceParallelGroup, UlyssesHeads


def _even_range(n: int, rank: int, size: int, what: str) -> range:
    if n % size:
        raise ValueError(f"{n} {what} do not split over {size} tensor-parallel ranks")
    k = n // size
    return range(rank * k, (rank + 1) * k)


@dataclass(frozen=True)
class ParallelContext:
    """One rank's place in a tensor-parallel group (optionally expert parallel for the MoE experts), and in the
    CFG and sequence-parallel groups of its layout.

    group: the torch.distributed process group of the tensor-parallel ranks; None with tp_size > 1 means the
    default (WORLD) group (a layout of tensor parallel only). cfg_group / sp_group: this rank's CFG and
    sequence-parallel groups (None at size 1). Collectives are in-place and return their input for chaining.
    """

    tp_size: int = 1
    tp_rank: int = 0
    expert_parallel: bool = False
    group: Any = None
    cfg_size: int = 1
    cfg_rank: int = 0
    cfg_group: Any = None
    sp_size: int = 1
    sp_rank: int = 0
    sp_group: Any = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"bad tensor-parallel rank {self.tp_rank} of {self.tp_size}")
        if self.cfg_size < 1 or not 0 <= self.cfg_rank < self.cfg_size:
            raise ValueError(f"bad CFG-parallel rank {self.cfg_rank} of {self.cfg_size}")
        if self.sp_size < 1 or not 0 <= self.sp_rank < self.sp_size:
            raise ValueError(f"bad sequence-parallel rank {self.sp_rank} of {self.sp_size}")

    @property
    def is_parallel(self) -> bool:
        """The model is sharded (tensor parallel): its layers run collectives."""
        return self.tp_size > 1

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp_size, cfg=self.cfg_size, sp=self.sp_size)

    @property
    def rank(self) -> int:
        """This rank's index in the world (the layout's grid)."""
        return self.layout.rank_of(self.tp_rank, self.sp_rank, self.cfg_rank)

    @property
    def is_group_leader(self) -> bool:
        """Rank (tp 0, sp 0) of its CFG group: it reports what its group computed."""
        return self.tp_rank == 0 and self.sp_rank == 0

    def cfg_all_reduce(self, t: Tensor) -> Tensor:
        """Sum over the CFG groups (this rank's peers at the same tp / sp coordinates), in place."""
        if self.cfg_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.cfg_group)
        return t

    def world_min(self, n: int, device: Any = "cpu") -> int:
        """The smallest `n` over every rank of the layout (e.g. the KV blocks all of them can hold)."""
        if self.layout.world_size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over the ranks, in place (no-op at size 1)."""
        if self.tp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather_last_dim(self, t: Tensor, sizes: list[int]) -> Tensor:
        """Concatenate every rank's [..., sizes[r]] along the last dim (ragged sizes are padded on the wire)."""
        if self.tp_size == 1:
            return t
        width = max(sizes)
        local = t.contiguous()
        if local.shape[-1] < width:
            local = torch.nn.functional.pad(local, (0, width - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    # ------------------------------------------------------------------ shard ranges
    def shard_range(self, n: int, what: str = "rows") -> range:
        """This rank's contiguous 1/tp of n (must divide evenly)."""
        return _even_range(n, self.tp_rank, self.tp_size, what)

    def q_head_range(self, num_heads: int) -> range:
        return _even_range(num_heads, self.tp_rank, self.tp_size, "query heads")

    def kv_head_range(self, num_kv_heads: int) -> range:
        """This rank's KV heads: an even split, or ONE replicated head when tp_size > num_kv_heads."""
        if self.tp_size <= num_kv_heads:
            return _even_range(num_kv_heads, self.tp_rank, self.tp_size, "KV heads")
        if self.tp_size % num_kv_heads:
            raise ValueError(f"{self.tp_size} tensor-parallel ranks are not a multiple of {num_kv_heads} KV heads")
        h = self.tp_rank // (self.tp_size // num_kv_heads)
        return range(h, h + 1)

    def vocab_range(self, vocab_size: int) -> range:
        per = -(-vocab_size // self.tp_size)
        return range(min(vocab_size, self.tp_rank * per), min(vocab_size, (self.tp_rank + 1) * per))

    def vocab_sizes(self, vocab_size: int) -> list[int]:
        """Every rank's vocab-slice length (for gathers)."""
        return [len(ParallelContext(self.tp_size, r).vocab_range(vocab_size)) for r in range(self.tp_size)]

    def expert_range(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds: all of them, or its contiguous slice under EP."""
        if not self.expert_parallel:
            return range(num_experts)
        return self.moe_parallel().local_experts(num_experts)

    def sequence_parallel(self) -> SequenceParallelGroup:
        """This rank's sequence-parallel group for the Ulysses attention of image steps (kernels/ulysses.py)."""
        return SequenceParallelGroup(self.sp_size, self.sp_rank, self.sp_group)

    def moe_parallel(self) -> MoEParallel:
        """The routed-expert kernels' coordinates: TP on the width, or EP over whole experts."""
        if self.expert_parallel:
            return MoEParallel(ep_rank=self.tp_rank, ep_size=self.tp_size)
        return MoEParallel(tp_rank=self.tp_rank, tp_size=self.tp_size)

    @property
    def expert_tp_size(self) -> int:
        """How many ways each routed expert's width is split (1 under expert parallel)."""
        return 1 if self.expert_parallel else self.tp_size

    @property
    def expert_tp_rank(self) -> int:
        return 0 if self.expert_parallel else self.tp_rank


def check_layout_heads(num_heads: int, num_kv_heads: int, layout: ParallelLayout) -> None:
    """Refuse, with the sizes, a layout whose ranks cannot split the attention heads (tensor parallel, then Ulysses
    sequence parallel over each tensor-parallel rank's heads): checked before any rank process starts."""
    ctx = ParallelContext(layout.tp, 0)
    q, kv = len(ctx.q_head_range(num_heads)), len(ctx.kv_head_range(num_kv_heads))
    if layout.sp > 1:
        UlyssesHeads(q, kv, layout.sp)


def init_distributed(
    backend: str,
    init_method: str,
    rank: int,
    layout: ParallelLayout | int,
    expert_parallel: bool = False,
    timeout_s: float = 300.0,
) -> ParallelContext:
    """Join the process group ("gloo" on CPU, "nccl" on GPU) and return this rank's context.

    `layout` is the rank grid (an int: that many tensor-parallel ranks). Every tensor-parallel, CFG and
    sequence-parallel group of the grid is created here, once, by every rank in the same order (torch.distributed
    requires all ranks to take part in each `new_group`); this rank keeps its own three. A layout of tensor parallel
    only keeps the WORLD group as its tensor-parallel group. With nccl the caller must have selected this rank's
    CUDA device.
    """
    import datetime

    if isinstance(layout, int):
        layout = ParallelLayout(tp=layout)
    world_size = layout.world_size
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    me = layout.coords(rank)
    groups: dict[str, Any] = {"tp": None, "cfg": None, "sp": None}
    if world_size > layout.tp:
        for kind, ranks_lists in (("tp", layout.tp_groups()), ("sp", layout.sp_groups()), ("cfg", layout.cfg_groups())):
            for ranks in ranks_lists:
                g = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    groups[kind] = g
    return ParallelContext(tp_size=layout.tp, tp_rank=me.tp_rank, expert_parallel=expert_parallel,
                           group=groups["tp"], cfg_size=layout.cfg, cfg_rank=me.cfg_rank, cfg_group=groups["cfg"],
                           sp_size=layout.sp, sp_rank=me.sp_rank, sp_group=groups["sp"])
