"""KV cache manager: which request owns which paged-KV block, with an automatic prefix cache.

Two layers, in the spirit of vLLM v1's block pool / KV cache manager (own implementation):

* `BlockPool` owns block ids ``0..num_blocks-1``, a reference count per block and a free queue in LRU order
  (freed blocks join the tail, allocations take from the head). A FULL block may carry a content hash; it stays
  findable through that hash while it is in use and while it is free ("cached but evictable"), until an
  allocation evicts it, which drops the hash.
* `KVCacheManager` keeps a block table per request id and implements the scheduler-facing calls:
  `get_computed_blocks` -> `allocate_slots` -> (model runs) -> `cache_full_blocks` -> ... -> `free`.

Block hashes are chain hashes over full blocks only: ``H(parent_hash, token_ids_of_block, extra_key)`` with
SHA-256 over a canonical byte encoding, so they are identical across processes (no use of Python ``hash()``).
``extra_key`` separates blocks whose token ids are equal but whose content differs, e.g. ``<img>`` placeholder
tokens whose embeddings come from an image: pass that image's content digest as the block's extra key.
A partial last block never has a hash, so it is never shared.

Contract for the scheduler (per request):

1. ``n = get_computed_blocks(rid, prompt_ids, extra_keys)`` - claims (ref +1) the longest cached full-block
   prefix, never the whole prompt (at least one token is left to compute). Call it once, before the first
   ``allocate_slots``.
2. ``allocate_slots(rid, num_tokens_total)`` - grows the block table to cover ``num_tokens_total`` tokens;
   returns the NEW block ids, or ``None`` with no side effects if the pool is short (then preempt someone, or
   ``free(rid)`` to give back the prefix claimed in step 1).
3. after the model computed tokens: ``cache_full_blocks(rid, token_ids, extra_keys, num_computed_tokens)``.
4. ``free(rid)`` when finished, aborted or preempted.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

BlockHash = bytes  # 32-byte SHA-256 digest

__all__ = [
    "BlockHash",
    "BlockPool",
    "KVCacheManager",
    "PrefixCacheStats",
    "UnknownRequestError",
    "compute_block_hashes",
    "hash_block_tokens",
]


class UnknownRequestError(KeyError):
    """The request id has no blocks in the manager: never allocated, or already freed (double free)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown request"


# ---------------------------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------------------------


def _encode_key(obj: Any, out: bytearray) -> None:
    """Canonical, process-independent byte encoding of an extra key (None/bool/int/float/str/bytes/tuple/list)."""
    if obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"T" if obj else b"F"
    elif isinstance(obj, int):
        raw = str(obj).encode()
        out += b"i" + struct.pack("<I", len(raw)) + raw
    elif isinstance(obj, float):
        out += b"f" + struct.pack("<d", obj)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        out += b"s" + struct.pack("<I", len(raw)) + raw
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out += b"b" + struct.pack("<I", len(raw)) + raw
    elif isinstance(obj, (tuple, list)):
        out += b"t" + struct.pack("<I", len(obj))
        for item in obj:
            _encode_key(item, out)
    else:
        raise TypeError(f"unsupported extra_key type {type(obj).__name__}; use str/bytes/int/tuple/None")


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: Any = None) -> BlockHash:
    """Chain hash of one full block: SHA-256 over (parent_hash, token ids, extra_key), stable across processes."""
    buf = bytearray(b"dgkv1")
    if parent_hash is None:
        buf += b"R"
    else:
        buf += b"P" + struct.pack("<I", len(parent_hash)) + bytes(parent_hash)
    toks = [int(t) for t in token_ids]
    buf += struct.pack(f"<I{len(toks)}q", len(toks), *toks)
    _encode_key(extra_key, buf)
    return hashlib.sha256(bytes(buf)).digest()


def compute_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[Any] | None = None,
    parent_hash: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Chain hashes of the full blocks ``start_block..`` of ``token_ids`` (``parent_hash``: hash of the block before).

    ``extra_keys[i]`` is the extra key of block ``i`` (absolute index); ``None`` means no extra keys at all.
    """
    num_full = len(token_ids) // block_size
    if extra_keys is not None and len(extra_keys) < num_full:
        raise ValueError(f"extra_keys has {len(extra_keys)} entries but token_ids has {num_full} full blocks")
    hashes: list[BlockHash] = []
    parent = parent_hash
    for i in range(start_block, num_full):
        key = None if extra_keys is None else extra_keys[i]
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], key)
        hashes.append(parent)
    return hashes


# ---------------------------------------------------------------------------------------------------------------
# Block pool
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters (tokens), independent of preemption bookkeeping."""

    requests: int = 0  # get_computed_blocks calls with prefix caching on
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    """Block ids with reference counts, an LRU free queue and a hash -> block prefix-cache index."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_cnt: list[int] = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        # Insertion order is the LRU order: head (first) is evicted/allocated first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.stats = PrefixCacheStats()

    # --- queries -------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref > 0)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_queue(self) -> list[int]:
        """Free block ids, head (next to be allocated) first."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    # --- mutation ------------------------------------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[int]:
        """Pop ``n`` blocks from the head of the free queue (evicting their hashes), each with ref 1."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks: only {len(self._free)} free")
        out = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            self._evict(bid)
            self.ref_cnt[bid] = 1
            out.append(bid)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Claim cached blocks: ref +1, and out of the free queue if they were free."""
        for bid in block_ids:
            if self.ref_cnt[bid] == 0:
                del self._free[bid]
            self.ref_cnt[bid] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """ref -1 each, in the given order; blocks reaching 0 join the tail of the free queue (hash kept)."""
        for bid in block_ids:
            if self.ref_cnt[bid] <= 0:
                raise RuntimeError(f"double free of block {bid} (ref count already 0)")
            self.ref_cnt[bid] -= 1
            if self.ref_cnt[bid] == 0:
                self._free[bid] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, in-use block under ``block_hash``. False if another block already holds that hash."""
        if self.ref_cnt[block_id] <= 0:
            raise RuntimeError(f"cannot cache free block {block_id}")
        current = self.block_hash[block_id]
        if current is not None:
            if current != block_hash:
                raise RuntimeError(f"block {block_id} already cached under a different hash")
            return True
        if block_hash in self._cached:
            return False  # an identical block exists; this copy stays private and uncached
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def _evict(self, bid: int) -> None:
        h = self.block_hash[bid]
        if h is not None:
            self.block_hash[bid] = None
            if self._cached.get(h) == bid:
                del self._cached[h]

    def reset_prefix_cache(self) -> int:
        """Drop every block hash (blocks in use stay allocated, just no longer findable). Returns #dropped."""
        n = len(self._cached)
        self._cached.clear()
        self.block_hash = [None] * self.num_blocks
        return n


# ---------------------------------------------------------------------------------------------------------------
# Manager
# ---------------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Per-request block tables over a `BlockPool`, with automatic prefix caching of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size)
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # full-block chain hashes known for the request
        self._num_cached: dict[str, int] = {}  # leading blocks already registered in the prefix cache

    # --- properties ----------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def stats(self) -> PrefixCacheStats:
        return self.pool.stats

    def has_request(self, request_id: str) -> bool:
        return request_id in self._tables

    def block_table(self, request_id: str) -> list[int]:
        return list(self._table(request_id))

    def num_blocks_needed(self, request_id: str, num_tokens_total: int) -> int:
        """How many new blocks `allocate_slots(request_id, num_tokens_total)` would take."""
        have = len(self._tables.get(request_id, ()))
        return max(0, _cdiv(num_tokens_total, self.block_size) - have)

    def _table(self, request_id: str) -> list[int]:
        try:
            return self._tables[request_id]
        except KeyError:
            raise UnknownRequestError(
                f"request {request_id!r} is not known to the KV cache manager (never allocated, or already freed)"
            ) from None

    # --- scheduler API -------------------------------------------------------------------------------------------
    def get_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], extra_keys: Sequence[Any] | None = None
    ) -> int:
        """Claim the longest cached full-block prefix of the prompt; returns the number of computed tokens.

        Never covers the whole prompt: at least one token is left for the model to compute (it needs logits).
        """
        if request_id in self._tables:
            raise RuntimeError(f"get_computed_blocks called twice for request {request_id!r} without free()")
        self._tables[request_id] = []
        self._hashes[request_id] = []
        self._num_cached[request_id] = 0
        if not self.enable_prefix_caching or not token_ids:
            return 0
        hashes = compute_block_hashes(token_ids, self.block_size, extra_keys)
        self._hashes[request_id] = hashes
        max_hit = (len(token_ids) - 1) // self.block_size
        hits: list[int] = []
        for h in hashes[:max_hit]:
            bid = self.pool.get_cached_block(h)
            if bid is None:
                break
            hits.append(bid)
        self.pool.touch(hits)
        self._tables[request_id] = hits
        self._num_cached[request_id] = len(hits)
        num_computed = len(hits) * self.block_size
        st = self.pool.stats
        st.requests += 1
        st.queries += len(token_ids)
        st.hits += num_computed
        return num_computed

    def allocate_slots(self, request_id: str, num_tokens_total: int) -> list[int] | None:
        """Grow the block table to cover ``num_tokens_total`` tokens; returns the NEW block ids.

        Returns ``None`` with no side effects when the pool lacks free blocks. A request not seen before is
        registered implicitly (equivalent to a `get_computed_blocks` that found nothing).
        """
        if num_tokens_total < 0:
            raise ValueError("num_tokens_total must be >= 0")
        need = self.num_blocks_needed(request_id, num_tokens_total)
        if need > self.pool.num_free_blocks:
            return None
        if request_id not in self._tables:
            self._tables[request_id] = []
            self._hashes[request_id] = []
            self._num_cached[request_id] = 0
        new = self.pool.get_new_blocks(need)
        self._tables[request_id].extend(new)
        return new

    def cache_full_blocks(
        self,
        request_id: str,
        token_ids: Sequence[int],
        extra_keys: Sequence[Any] | None,
        num_computed_tokens: int,
    ) -> None:
        """Register the hashes of the request's blocks that became full with ``num_computed_tokens`` computed."""
        table = self._table(request_id)
        if not self.enable_prefix_caching:
            return
        if num_computed_tokens > len(token_ids):
            raise ValueError("num_computed_tokens exceeds len(token_ids)")
        num_full = num_computed_tokens // self.block_size
        if num_full > len(table):
            raise ValueError(f"{num_full} full blocks computed but request {request_id!r} holds {len(table)} blocks")
        start = self._num_cached[request_id]
        if num_full <= start:
            return
        hashes = self._hashes[request_id]
        if len(hashes) < num_full:
            parent = hashes[-1] if hashes else None
            hashes.extend(
                compute_block_hashes(
                    token_ids[: num_full * self.block_size], self.block_size, extra_keys, parent, len(hashes)
                )
            )
        for i in range(start, num_full):
            self.pool.cache_block(table[i], hashes[i])
        self._num_cached[request_id] = num_full

    def num_registered_blocks(self, request_id: str) -> int:
        """Leading full blocks of the request already registered in the prefix cache."""
        return self._num_cached.get(request_id, 0)

    def inflight_hashes(self) -> set[BlockHash]:
        """Hashes of live requests' full prompt blocks that are not computed/registered yet: a request whose
        next uncached block is among them can wait a step and hit the cache instead of computing it again."""
        out: set[BlockHash] = set()
        for rid, hashes in self._hashes.items():
            out.update(hashes[self._num_cached.get(rid, 0):])
        return out

    def num_cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of a hash chain that are in the prefix cache now (no side effects)."""
        n = 0
        for h in hashes:
            if self.pool.get_cached_block(h) is None:
                break
            n += 1
        return n

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first (so its tail blocks are evicted before its prefix)."""
        table = self._table(request_id)
        del self._tables[request_id]
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        self.pool.free_blocks(reversed(table))

    abort = free

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (in-use blocks keep their data but are no longer shareable)."""
        return self.pool.reset_prefix_cache()
