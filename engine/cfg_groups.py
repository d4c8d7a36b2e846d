"""CFG parallel, the scheduler's side: which CFG group each row of a request runs on, and one KV block pool per group.

With `--cfg-parallel-size 2` (engine/parallel_layout.py) every CFG group is a full tensor-parallel model copy with its
own paged KV cache of `num_blocks` blocks. The one scheduler places each request once, when it is first scheduled
(`RequestState.row_groups`, kept for the request's life, preemption included, because its worker-side state, e.g. a
Taylor cache of its row, lives on that group):

* a request with CFG: its conditional row (text phase, image prefix, denoising block) on its owner group, its
  unconditional row on the other group; their velocities are exchanged each denoising step (engine/model_runner.py);
* a request without CFG (Distil, or guidance <= 1): its one row on its owner group, so several such requests spread
  over the groups as data parallel.

The owner is the group owning the fewest running requests (then the one with more free blocks, then the first):
the owner runs the text phase, samples, decodes the image and reports the request.
`GroupedKVCacheManager` keeps the scheduler's KV interface (calls keyed by row id) over one `KVCacheManager` per
group; block ids are per group, as each group's cache is its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from diffgentor.engine.kv_cache_manager import KVCacheManager, PrefixCacheStats, UnknownRequestError


class GroupedKVCacheManager:
    """One `KVCacheManager` per CFG group; a row is `place`d on its group before its first KV call."""

    def __init__(self, num_groups: int, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.groups = [KVCacheManager(num_blocks, block_size, enable_prefix_caching) for _ in range(num_groups)]
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._group: dict[str, int] = {}  # row id -> its group, while it holds KV

    def place(self, row_id: str, group: int) -> None:
        held = self._group.get(row_id)
        if held is not None and held != group:
            raise RuntimeError(f"row {row_id!r} holds KV on CFG group {held}, cannot move to group {group}")
        self._group[row_id] = group

    def _m(self, row_id: str) -> KVCacheManager:
        try:
            return self.groups[self._group[row_id]]
        except KeyError:
            raise UnknownRequestError(f"row {row_id!r} is not placed on a CFG group") from None

    # --- the pool as a whole (metrics, admission) ----------------------------------------------------------------
    @property
    def blocks_per_group(self) -> int:
        return self.groups[0].num_blocks

    @property
    def num_blocks(self) -> int:
        """Blocks of every group's cache together (what /metrics counts)."""
        return sum(g.num_blocks for g in self.groups)

    @property
    def num_free_blocks(self) -> int:
        return sum(g.num_free_blocks for g in self.groups)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(requests=sum(g.stats.requests for g in self.groups),
                                queries=sum(g.stats.queries for g in self.groups),
                                hits=sum(g.stats.hits for g in self.groups))

    def free_blocks_of(self, group: int) -> int:
        return self.groups[group].num_free_blocks

    def inflight_hashes(self) -> set:
        return set().union(*(g.inflight_hashes() for g in self.groups))

    def num_cached_prefix_blocks(self, hashes: Sequence[Any]) -> int:
        """The longest cached prefix on any group (the prefix-wait heuristic's look-ahead)."""
        return max(g.num_cached_prefix_blocks(hashes) for g in self.groups)

    def reset_prefix_cache(self) -> int:
        return sum(g.reset_prefix_cache() for g in self.groups)

    # --- one row (routed to its group) -----------------------------------------------------------------------------
    def has_request(self, row_id: str) -> bool:
        return row_id in self._group and self._m(row_id).has_request(row_id)

    def block_table(self, row_id: str) -> list[int]:
        return self._m(row_id).block_table(row_id)

    def num_blocks_needed(self, row_id: str, num_tokens_total: int) -> int:
        return self._m(row_id).num_blocks_needed(row_id, num_tokens_total)

    def get_computed_blocks(self, row_id: str, token_ids: Sequence[int], extra_keys: Sequence[Any] | None = None
                            ) -> int:
        return self._m(row_id).get_computed_blocks(row_id, token_ids, extra_keys)

    def allocate_slots(self, row_id: str, num_tokens_total: int) -> list[int] | None:
        return self._m(row_id).allocate_slots(row_id, num_tokens_total)

    def cache_full_blocks(self, row_id: str, token_ids: Sequence[int], extra_keys: Sequence[Any] | None,
                          num_computed_tokens: int) -> None:
        self._m(row_id).cache_full_blocks(row_id, token_ids, extra_keys, num_computed_tokens)

    def num_registered_blocks(self, row_id: str) -> int:
        return self._m(row_id).num_registered_blocks(row_id) if row_id in self._group else 0

    def free(self, row_id: str) -> None:
        self._m(row_id).free(row_id)
        del self._group[row_id]

    abort = free


def choose_owner(owned: Iterable[int], free_blocks: Sequence[int]) -> int:
    """The group that owns a new request: fewest requests owned (`owned`: the owner group of each running
    request), then most free KV blocks, then the first."""
    counts = [0] * len(free_blocks)
    for g in owned:
        counts[g] += 1
    return min(range(len(free_blocks)), key=lambda g: (counts[g], -free_blocks[g], g))


def row_groups_for(owner: int, num_groups: int) -> tuple[int, int]:
    """(conditional row's group, unconditional row's group): the owner, and the next group round the ring."""
    return owner, (owner + 1) % num_groups


__all__ = ["GroupedKVCacheManager", "choose_owner", "row_groups_for"]
