"""The rank grid of one model instance: tensor parallel x sequence parallel x CFG parallel.

A model instance runs on `world_size = tp * sp * cfg` rank processes. Rank r sits at coordinates

    r = cfg_rank * (sp * tp) + sp_rank * tp + tp_rank

(tensor parallel innermost: the ranks that exchange activations every layer are neighbours, i.e. the GPUs with the
fastest links on one node; CFG parallel outermost: its groups exchange one velocity per denoising step). Three kinds
of process group follow from the grid, each made once per rank by `engine.parallel.init_distributed`:

* tensor-parallel group: the tp ranks with the same (cfg, sp) coordinates; they hold the shards of one model copy;
* sequence-parallel group: the sp ranks with the same (cfg, tp) coordinates; they split one image block's tokens;
* CFG group: the cfg ranks with the same (sp, tp) coordinates, one per CFG group (a full TP x SP model copy each):
  the conditional and unconditional rows of a request run on different groups and their velocities are exchanged.

This module is torch-free: the config validates layouts and the memory plan prices them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CFG_PARALLEL = 2
"""Classifier-free guidance has two branches (conditional, unconditional): more CFG groups would have nothing to do."""


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in the grid."""

    tp_rank: int
    sp_rank: int
    cfg_rank: int


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the three parallel dimensions of one model instance (validated on construction)."""

    tp: int = 1
    cfg: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "cfg", "sp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{_FLAG[name]} must be an integer >= 1, got {v!r}")
        if self.cfg > MAX_CFG_PARALLEL:
            raise ValueError(f"--cfg-parallel-size must be 1 or {MAX_CFG_PARALLEL} (the conditional and unconditional "
                             f"rows of classifier-free guidance), got {self.cfg}")

    @property
    def world_size(self) -> int:
        return self.tp * self.cfg * self.sp

    @property
    def ranks_per_copy(self) -> int:
        """Ranks holding one full model copy (one CFG group): tp * sp."""
        return self.tp * self.sp

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the {self.describe()} layout of {self.world_size} ranks")
        return RankCoords(tp_rank=rank % self.tp, sp_rank=rank // self.tp % self.sp,
                          cfg_rank=rank // (self.tp * self.sp))

    def rank_of(self, tp_rank: int, sp_rank: int, cfg_rank: int) -> int:
        return cfg_rank * self.tp * self.sp + sp_rank * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        """Every tensor-parallel group's ranks (the same list, in the same order, on every rank)."""
        return [[self.rank_of(t, s, c) for t in range(self.tp)] for c in range(self.cfg) for s in range(self.sp)]

    def sp_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, s, c) for s in range(self.sp)] for c in range(self.cfg) for t in range(self.tp)]

    def cfg_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, s, c) for c in range(self.cfg)] for s in range(self.sp) for t in range(self.tp)]

    def group_leaders(self) -> list[int]:
        """Rank (tp 0, sp 0) of each CFG group: the rank that reports the requests its group owns."""
        return [self.rank_of(0, 0, c) for c in range(self.cfg)]

    def describe(self) -> str:
        """e.g. "tp2 x cfg2 x sp1 (4 ranks)"."""
        return f"tp{self.tp} x cfg{self.cfg} x sp{self.sp} ({self.world_size} rank{'s' * (self.world_size > 1)})"

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "cfg": self.cfg, "sp": self.sp, "world": self.world_size}


_FLAG = {"tp": "--tensor-parallel-size", "cfg": "--cfg-parallel-size", "sp": "--sequence-parallel-size"}

__all__ = ["MAX_CFG_PARALLEL", "ParallelLayout", "RankCoords"]
