"""KV cache manager: ref counts, LRU free queue, prefix cache with extra keys, no-side-effect failures."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from diffgentor.engine.kv_cache_manager import (
    BlockPool,
    KVCacheManager,
    UnknownRequestError,
    compute_block_hashes,
    hash_block_tokens,
)

BS = 4


def assert_all_free(m: KVCacheManager) -> None:
    assert m.num_free_blocks == m.num_blocks
    assert all(r == 0 for r in m.pool.ref_cnt)
    assert m.usage == 0.0


def check_refcounts(m: KVCacheManager) -> None:
    """ref count of every block == number of live block tables holding it; free queue == blocks with ref 0."""
    expect = [0] * m.num_blocks
    for table in m._tables.values():
        for b in table:
            expect[b] += 1
    assert m.pool.ref_cnt == expect
    assert sorted(m.pool.free_queue()) == [b for b in range(m.num_blocks) if expect[b] == 0]


def prefill(m, rid, toks, keys=None):
    """What the scheduler does for a new request: hit, allocate, compute, cache."""
    n = m.get_computed_blocks(rid, toks, keys)
    new = m.allocate_slots(rid, len(toks))
    assert new is not None
    m.cache_full_blocks(rid, toks, keys, len(toks))
    return n


# --- hashing ---------------------------------------------------------------------------------------------------


def test_hash_chain_and_keys():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert len(a) == 32 and a == hash_block_tokens(None, (1, 2, 3, 4), None)
    assert a != hash_block_tokens(None, [1, 2, 3, 5])
    assert a != hash_block_tokens(None, [1, 2, 3, 4], "img:abc")
    assert hash_block_tokens(None, [1, 2, 3, 4], "img:abc") != hash_block_tokens(None, [1, 2, 3, 4], "img:abd")
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    # the key is type-tagged: "1" vs 1 vs b"1" differ
    assert len({hash_block_tokens(None, [0], k) for k in ("1", 1, b"1", ("1",))}) == 4
    hs = compute_block_hashes(list(range(10)), BS)
    assert len(hs) == 2  # partial last block has no hash
    assert hs[1] == hash_block_tokens(hs[0], [4, 5, 6, 7])
    assert compute_block_hashes(list(range(10)), BS, parent_hash=hs[0], start_block=1) == hs[1:]
    with pytest.raises(ValueError):
        compute_block_hashes(list(range(10)), BS, extra_keys=[None])
    with pytest.raises(TypeError):
        hash_block_tokens(None, [1], object())


_SUBPROC = (
    "from diffgentor.engine.kv_cache_manager import compute_block_hashes;"
    "print(','.join(h.hex() for h in compute_block_hashes(list(range(100, 113)), 4, "
    "[None, 'img:deadbeef', (1, b'x'), None])))"
)


def test_hash_stable_across_processes():
    mine = ",".join(
        h.hex() for h in compute_block_hashes(list(range(100, 113)), 4, [None, "img:deadbeef", (1, b"x"), None])
    )
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _SUBPROC], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == mine


# --- pool ------------------------------------------------------------------------------------------------------


def test_pool_lru_and_eviction_drops_hash():
    p = BlockPool(4, BS)
    b = p.get_new_blocks(2)
    assert b == [0, 1] and p.num_free_blocks == 2 and p.usage == 0.5
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert p.cache_block(0, h)
    p.free_blocks([0, 1])
    assert p.free_queue() == [2, 3, 0, 1]  # freed to the tail
    assert p.get_cached_block(h) == 0  # cached but evictable
    assert p.get_new_blocks(2) == [2, 3]
    assert p.get_cached_block(h) == 0
    assert p.get_new_blocks(1) == [0]  # evicts block 0
    assert p.get_cached_block(h) is None and p.block_hash[0] is None
    with pytest.raises(RuntimeError):
        p.get_new_blocks(2)
    p.free_blocks([0])
    with pytest.raises(RuntimeError, match="double free"):
        p.free_blocks([0])


# --- manager ---------------------------------------------------------------------------------------------------


def test_shared_system_prompt_16_requests():
    m = KVCacheManager(num_blocks=64, block_size=BS)
    system = list(range(1000, 1010))  # 2 full blocks + 2 tokens
    prompts = {f"r{i}": system + [i, 50 + i, 60 + i] for i in range(16)}
    n0 = prefill(m, "r0", prompts["r0"])
    assert n0 == 0
    shared = m.block_table("r0")[:2]
    for i in range(1, 16):
        n = prefill(m, f"r{i}", prompts[f"r{i}"])
        assert n == 2 * BS
        assert m.block_table(f"r{i}")[:2] == shared
        # the third block (system tail + user tokens) differs per request, never shared
        assert m.block_table(f"r{i}")[2] != m.block_table("r0")[2]
        check_refcounts(m)
    assert [m.pool.ref_cnt[b] for b in shared] == [16, 16]
    st = m.stats
    assert st.requests == 16 and st.hits == 15 * 2 * BS and st.queries == 16 * 13
    assert 0 < st.hit_rate < 1
    # 2 shared blocks + 2 own blocks per request
    assert m.num_free_blocks == 64 - 2 - 16 * 2
    for i in range(16):
        m.free(f"r{i}")
        live = 15 - i
        if live:
            assert [m.pool.ref_cnt[b] for b in shared] == [live, live]
        check_refcounts(m)
    assert_all_free(m)
    # still cached while free: a new sharer hits without recomputation
    assert m.get_computed_blocks("late", prompts["r3"]) == 3 * BS  # r3's own full third block too
    assert m.block_table("late")[:2] == shared
    assert m.get_computed_blocks("other", system + [99]) == 2 * BS
    assert m.block_table("other") == shared
    m.free("other")
    m.free("late")
    assert_all_free(m)


def test_extra_keys_separate_images():
    m = KVCacheManager(16, BS)
    img = [7, 7, 7, 7, 7, 7, 7, 7]  # <img> placeholders: same ids, different pictures
    toks = [1, 2, 3, 4] + img + [9]
    ka = [None, "img:aaaa", "img:aaaa", None]
    kb = [None, "img:bbbb", "img:bbbb", None]
    prefill(m, "a", toks, ka)
    assert prefill(m, "b", toks, kb) == BS  # only the text block before the image is shared
    assert m.block_table("a")[0] == m.block_table("b")[0]
    assert set(m.block_table("a")[1:]).isdisjoint(m.block_table("b")[1:])
    assert prefill(m, "a2", toks, ka) == 3 * BS  # same image: shared
    assert m.block_table("a2")[:3] == m.block_table("a")[:3]
    for r in ("a", "b", "a2"):
        m.free(r)
    assert_all_free(m)


def test_never_whole_prompt_and_partial_not_shared():
    m = KVCacheManager(16, BS)
    toks = list(range(8))  # exactly two full blocks
    prefill(m, "a", toks)
    assert m.get_computed_blocks("b", toks) == BS  # last token must be computed
    m.free("b")
    # partial blocks carry no hash
    m2 = KVCacheManager(16, BS)
    toks = list(range(6))
    prefill(m2, "a", toks)
    partial = m2.block_table("a")[1]
    assert m2.pool.block_hash[partial] is None
    assert m2.get_computed_blocks("b", toks + [0, 0, 1]) == BS
    assert partial not in m2.block_table("b")
    m2.free("a")
    m2.free("b")
    assert_all_free(m2)
    m.free("a")
    assert_all_free(m)


def test_decode_fills_blocks_then_shared():
    m = KVCacheManager(16, BS)
    toks = [1, 2, 3, 4, 5, 6]
    prefill(m, "a", toks)
    for t in (7, 8, 9):  # decode: one token at a time
        toks = toks + [t]
        assert m.allocate_slots("a", len(toks)) is not None
        m.cache_full_blocks("a", toks, None, len(toks))
    assert len(m.block_table("a")) == 3
    assert m.get_computed_blocks("b", toks + [10]) == 2 * BS
    m.free("a")
    m.free("b")
    assert_all_free(m)


def test_allocation_failure_no_side_effects():
    m = KVCacheManager(4, BS)
    prefill(m, "a", list(range(10)))  # 3 blocks
    snap = (m.pool.ref_cnt[:], m.pool.free_queue(), m.block_table("a"), dict(m.pool._cached))
    assert m.allocate_slots("a", 20) is None
    assert m.allocate_slots("new", 8) is None
    assert not m.has_request("new")
    assert (m.pool.ref_cnt, m.pool.free_queue(), m.block_table("a"), m.pool._cached) == snap
    assert m.allocate_slots("a", 13) == [3]
    assert m.allocate_slots("a", 13) == []
    m.free("a")
    assert_all_free(m)


def test_free_order_tail_evicted_first_and_eviction_drops_hash():
    m = KVCacheManager(4, BS)
    toks = list(range(13))
    prefill(m, "a", toks)  # blocks 0,1,2 cached + 3 partial
    m.free("a")
    assert m.pool.free_queue() == [3, 2, 1, 0]
    h2 = m.pool.block_hash[2]
    assert m.allocate_slots("x", 8) == [3, 2]  # evicts the tail first
    assert m.pool.block_hash[2] is None and m.pool.get_cached_block(h2) is None
    assert m.get_computed_blocks("b", toks) == 2 * BS  # prefix 0,1 survived
    assert m.block_table("b") == [0, 1]
    m.free("x")
    m.free("b")
    assert_all_free(m)


def test_errors_unknown_and_double_free():
    m = KVCacheManager(4, BS)
    with pytest.raises(UnknownRequestError, match="never allocated, or already freed"):
        m.free("nope")
    with pytest.raises(UnknownRequestError):
        m.block_table("nope")
    with pytest.raises(UnknownRequestError):
        m.cache_full_blocks("nope", [1, 2, 3, 4], None, 4)
    m.allocate_slots("a", 5)
    m.free("a")
    with pytest.raises(UnknownRequestError):
        m.free("a")
    m.get_computed_blocks("c", [1, 2])
    with pytest.raises(RuntimeError):
        m.get_computed_blocks("c", [1, 2])
    with pytest.raises(ValueError):
        m.cache_full_blocks("c", [1, 2, 3, 4], None, 4)  # holds no block for it
    m.free("c")
    assert_all_free(m)


def test_prefix_caching_disabled_and_reset():
    m = KVCacheManager(8, BS, enable_prefix_caching=False)
    toks = list(range(9))
    prefill(m, "a", toks)
    assert prefill(m, "b", toks) == 0
    assert m.pool.num_cached_blocks == 0 and m.stats.queries == 0
    m.free("a")
    m.free("b")
    assert_all_free(m)

    m = KVCacheManager(8, BS)
    prefill(m, "a", toks)
    m.free("a")
    assert m.reset_prefix_cache() == 2
    assert all(h is None for h in m.pool.block_hash)
    assert m.get_computed_blocks("b", toks) == 0
    m.free("b")
    assert_all_free(m)


@pytest.mark.parametrize("seed", range(5))
def test_random_mix_returns_everything(seed):
    rng = random.Random(seed)
    m = KVCacheManager(24, BS, enable_prefix_caching=seed % 2 == 0)
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 14))] for _ in range(3)]
    live: dict[str, tuple[list[int], list]] = {}
    nxt = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            rid = f"q{nxt}"
            nxt += 1
            toks = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
            keys = [rng.choice([None, "img:1", "img:2"]) for _ in range(64)]
            n = m.get_computed_blocks(rid, toks, keys)
            assert n < len(toks) and n % BS == 0
            if m.allocate_slots(rid, len(toks)) is None:
                m.free(rid)  # gives back the claimed prefix
            else:
                m.cache_full_blocks(rid, toks, keys, len(toks))
                live[rid] = (toks, keys)
        elif op < 0.7 and live:
            rid = rng.choice(sorted(live))
            toks, keys = live[rid]
            toks = toks + [rng.randrange(5)]
            if m.allocate_slots(rid, len(toks)) is None:
                m.abort(rid)  # preempted
                del live[rid]
            else:
                live[rid] = (toks, keys)
                m.cache_full_blocks(rid, toks, keys, len(toks))
        elif live:
            rid = rng.choice(sorted(live))
            m.free(rid)
            del live[rid]
        check_refcounts(m)
        assert m.num_free_blocks + sum(1 for r in m.pool.ref_cnt if r) == m.num_blocks
    for rid in list(live):
        m.free(rid)
    assert_all_free(m)
    # every cached hash points at a block that carries it
    for h, b in m.pool._cached.items():
        assert m.pool.block_hash[b] == h
