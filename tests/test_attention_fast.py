"""The torch attention backend's fast path (docs/decisions.md): 4-D fused SDPA per group of equal-shape sequences,
no mask tensor for decode / whole-causal / end-of-KV image rows, GQA without copies; same results as
`paged_attention_reference` on mixed flat batches, and a sequence's rows do not depend on its batch."""

from __future__ import annotations

import random

import pytest
import torch
from torch.profiler import profile

from diffgentor.kernels.attention import (
    AttentionMetadata,
    SequenceChunk,
    TorchPagedAttention,
    paged_attention_reference,
    plan_sdpa_groups,
)
from diffgentor.kernels.kv_cache import PagedKVCache
from diffgentor.kernels.sdpa_rules import fused_kernels, record_sdpa_calls

HQ, HKV, D, BS = 8, 2, 16, 4


def _rand(n: int, h: int, seed: int) -> torch.Tensor:
    return torch.randn(n, h, D, generator=torch.Generator().manual_seed(seed))


class _Seqs:
    """Sequences with shuffled pages in one cache; `step` writes a flat batch and runs backend + reference."""

    def __init__(self, lens: list[int], num_blocks: int = 64, seed: int = 0) -> None:
        pool = list(range(num_blocks))
        random.Random(seed).shuffle(pool)
        self.tables = [[pool.pop() for _ in range(-(-n // BS))] for n in lens]
        self.q = [_rand(n, HQ, 100 + s) for s, n in enumerate(lens)]
        self.k = [_rand(n, HKV, 200 + s) for s, n in enumerate(lens)]
        self.v = [_rand(n, HKV, 300 + s) for s, n in enumerate(lens)]
        self.cache = PagedKVCache(1, num_blocks, BS, HKV, D)

    def step(self, parts, spans, backend: TorchPagedAttention):
        """parts: (seq, query start, query end, kv_len) -> (backend out, reference out, metadata)."""
        chunks = [SequenceChunk(range(a, b), kv, self.tables[s], spans[s]) for s, a, b, kv in parts]
        md = AttentionMetadata.build(chunks, BS)
        q, k, v = (torch.cat([t[s][a:b] for s, a, b, _ in parts]) for t in (self.q, self.k, self.v))
        self.cache.store(0, md, k, v)
        backend.plan(md)
        return backend.run(q, k, v, self.cache, 0), paged_attention_reference(q, md, self.cache, 0, D**-0.5), md


def test_mixed_flat_batch_equals_reference_and_groups_by_shape():
    # seqs 0, 1: identical-shape whole prefills; 2: text prefill; 3: image-conditioned prefill;
    # 4, 5: decode-ready prefixes
    lens = [12, 12, 9, 30, 7, 11]
    spans = [[], [], [], [(4, 20)], [], []]
    seqs = _Seqs(lens)
    be = TorchPagedAttention(HQ, HKV, D)
    out, ref, md = seqs.step([(0, 0, 12, 12), (1, 0, 12, 12), (2, 0, 5, 5), (3, 0, 30, 30), (4, 0, 6, 6),
                              (5, 0, 10, 10)], spans, be)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    kinds = {g.seqs: (g.kind, g.mask is None) for g in plan_sdpa_groups(md)}
    assert kinds[(0, 1)] == ("causal", True)  # equal shapes share ONE call, is_causal, no mask tensor
    assert kinds[(3,)] == ("mask", False)  # rows inside an image block see keys past themselves
    # step 2: two decodes, a chunk after a prefix (n != m: bottom-right causal needs the mask), a diffusion-like
    # re-run of seq 3's image block (every row sees all keys up to the block end = kv_len: no mask)
    out, ref, md = seqs.step([(4, 6, 7, 7), (2, 5, 9, 9), (5, 10, 11, 11), (3, 4, 20, 20)], spans, be)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    kinds = {g.seqs: g.kind for g in plan_sdpa_groups(md)}
    assert kinds == {(0,): "full", (1,): "mask", (2,): "full", (3,): "full"}


def test_equal_shapes_batch_and_rows_do_not_depend_on_the_batch():
    lens = [30, 9, 30, 9, 30]
    seqs = _Seqs(lens, seed=1)
    be = TorchPagedAttention(HQ, HKV, D)
    seqs.step([(s, 0, n - 1, n - 1) for s, n in enumerate(lens)], [[]] * 5, be)
    # step order 0, 1, 4, 3, 2: three equal 12-row chunks (rows not adjacent: gathered) share ONE call; the two
    # decodes of equal kv_len do not (below MIN_BATCH_ROWS rows the CPU kernel is not batch invariant)
    parts = [(0, 17, 29, 29), (1, 7, 8, 8), (4, 17, 29, 29), (3, 7, 8, 8), (2, 17, 29, 29)]
    out, ref, md = seqs.step(parts, [[]] * 5, be)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    groups = plan_sdpa_groups(md)
    assert sorted(g.seqs for g in groups) == [(0, 2, 4), (1,), (3,)]
    assert next(g for g in groups if g.batch == 3).row_index is not None
    # each sequence alone gives the same bits as in the batch
    row = 0
    for s, a, b, kv in parts:
        md_alone = AttentionMetadata.build([SequenceChunk(range(a, b), kv, seqs.tables[s])], BS)
        be.plan(md_alone)
        alone = be.run(seqs.q[s][a:b], None, None, seqs.cache, 0)
        assert torch.equal(alone, out[row : row + b - a]), s
        row += b - a


@pytest.mark.parametrize("hkv", [1, 2, 8])
def test_gqa_ratios_and_chunked_prefill(hkv):
    n, spans = 26, [(3, 11), (12, 20)]
    q, k, v = _rand(n, HQ, 1), _rand(n, hkv, 2), _rand(n, hkv, 3)
    table = list(range(7))
    random.Random(2).shuffle(table)
    cache = PagedKVCache(1, 8, BS, hkv, D)
    be = TorchPagedAttention(HQ, hkv, D)
    for a, b in [(0, 3), (3, 20), (20, 21), (21, 26)]:  # chunk boundaries never split a block
        md = AttentionMetadata.build([SequenceChunk(range(a, b), b, table, spans)], BS)
        cache.store(0, md, k[a:b], v[a:b])
        be.plan(md)
        torch.testing.assert_close(be.run(q[a:b], k[a:b], v[a:b], cache, 0),
                                   paged_attention_reference(q[a:b], md, cache, 0, D**-0.5), atol=1e-5, rtol=1e-5)


def test_uses_the_fused_kernel_not_the_math_fallback():
    seqs = _Seqs([40, 40, 30], seed=3)
    be = TorchPagedAttention(HQ, HKV, D)
    parts = [(0, 0, 40, 40), (1, 0, 20, 20), (2, 0, 30, 30)]
    spans = [[(5, 30)], [], []]
    chunks = [SequenceChunk(range(a, b), kv, seqs.tables[s], spans[s]) for s, a, b, kv in parts]
    md = AttentionMetadata.build(chunks, BS)
    q, k, v = (torch.cat([t[s][a:b] for s, a, b, _ in parts]) for t in (seqs.q, seqs.k, seqs.v))
    seqs.cache.store(0, md, k, v)
    be.plan(md)
    with profile() as prof:
        be.run(q, k, v, seqs.cache, 0)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


def test_store_skips_unwritten_rows_and_checks_the_slot_range_on_the_host():
    cache = PagedKVCache(1, 2, BS, HKV, D)
    k, v = _rand(3, HKV, 4), _rand(3, HKV, 5)
    md = AttentionMetadata.build([SequenceChunk([0, 1], 2, [1]), SequenceChunk([2], 3, [0], write_kv=False)], BS)
    cache.store(0, md, k, v)
    kk, vv = cache.gather(0, torch.tensor([1]), 2)
    assert torch.equal(kk, k[:2]) and torch.equal(vv, v[:2])
    assert cache.layer(0)[0].abs().sum() == 0  # the write_kv=False row went nowhere
    bad = AttentionMetadata.build([SequenceChunk([0], 1, [5])], BS)  # page 5 of a 2-page cache
    with pytest.raises(IndexError):
        cache.store(0, bad, k[:1], v[:1])


def test_decode_rows_of_different_lengths_are_one_padded_call_where_invariance_is_not_asked():
    """Without the batch-invariance rule (the default off CPU) every decode token joins ONE SDPA call, padded to the
    longest context and masked per row, beside the step's other groups; same results as the reference. On CPU
    (invariance asked) the same step keeps one call per decode row."""
    lens = [9, 30, 17, 5, 23, 12]
    seqs = _Seqs(lens, seed=4)
    fast = TorchPagedAttention(HQ, HKV, D, batch_invariant=False)
    seqs.step([(s, 0, n - 1, n - 1) for s, n in enumerate(lens)], [[]] * len(lens), fast)
    # five decodes of five different kv_lens, not adjacent in the flat batch (a prefill chunk sits between them)
    parts = [(0, 8, 9, 9), (1, 29, 30, 30), (5, 0, 12, 12), (2, 16, 17, 17), (3, 4, 5, 5), (4, 22, 23, 23)]
    out, ref, md = seqs.step(parts, [[]] * len(lens), fast)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with record_sdpa_calls() as rec:
        fast.run(torch.cat([seqs.q[s][a:b] for s, a, b, _ in parts]), None, None, seqs.cache, 0)
    assert len(rec.calls) == 2  # the decode group and the prefill chunk
    for c in rec.calls:  # GQA heads as query rows: no K/V repeat, and a fused CUDA kernel stays eligible
        assert not c.masked_gqa and {"flash", "efficient"} & set(fused_kernels(c, torch.bfloat16)), c.describe()
    assert (5, HKV, HQ // HKV, D) in [c.q_shape for c in rec.calls]
    groups = plan_sdpa_groups(md, batch_invariant=False)
    assert sorted(g.seqs for g in groups) == [(0, 1, 3, 4, 5), (2,)]
    dec = next(g for g in groups if g.batch == 5)
    assert (dec.n, dec.m, dec.kind) == (1, 30, "mask") and dec.row_index is not None
    assert len(plan_sdpa_groups(md)) == 6  # CPU default: batch invariant, one call per decode row


def test_each_groups_sdpa_layout_is_decided_once_per_forward(monkeypatch):
    """The per-group layout (`sdpa_layout`: enable_gqa / repeated K/V heads / heads as query rows) is a function of
    the plan, so the first layer of a forward decides it and every later layer reuses it: as many decisions as
    groups per forward, not groups x layers; a new plan decides again. Same results as the reference throughout."""
    from diffgentor.kernels import attention as attn

    calls: list[str] = []

    def counted(group, hq, hkv):
        calls.append(attn_layout(group, hq, hkv))
        return calls[-1]

    attn_layout = attn.sdpa_layout
    monkeypatch.setattr(attn, "sdpa_layout", counted)
    lens = [9, 30, 17, 5, 23, 12]
    seqs = _Seqs(lens, seed=5)
    be = TorchPagedAttention(HQ, HKV, D, batch_invariant=False)
    seqs.step([(s, 0, n - 1, n - 1) for s, n in enumerate(lens)], [[]] * len(lens), be)
    first = len(calls)
    assert first == len(be._groups)
    # decodes (heads as rows), a chunk after a prefix (masked: K/V repeated), an image block (full: enable_gqa)
    parts = [(0, 8, 9, 9), (1, 29, 30, 30), (5, 8, 12, 12), (2, 16, 17, 17), (3, 4, 5, 5), (4, 7, 23, 23)]
    out, ref, md = seqs.step(parts, [[], [], [], [], [(7, 23)], []], be)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    q = torch.cat([seqs.q[s][a:b] for s, a, b, _ in parts])
    for _ in range(3):  # three more layers of the same forward
        torch.testing.assert_close(be.run(q, None, None, seqs.cache, 0), out, atol=0, rtol=0)
    groups = plan_sdpa_groups(md, batch_invariant=False)
    assert len(calls) == first + len(groups)
    assert sorted(calls[first:]) == ["gqa", "heads_as_rows", "repeat_kv"]
