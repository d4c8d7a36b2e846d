"""Ulysses sequence-parallel attention (kernels/ulysses.py) on CPU / gloo: two ranks, each holding half of a step's
rows (an odd count, so one rank's last row is padding), give the rows of the unsharded paged attention
(`paged_attention_reference`) for denoising-style chunks (causal timestep rows, then a bidirectional image block
over a cached prefix), with GQA heads split evenly and with one KV head repeated on both ranks; the head layouts
that cannot split are refused with the sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffgentor.kernels.attention import (
    AttentionMetadata,
    SequenceChunk,
    TorchPagedAttention,
    paged_attention_reference,
)
from diffgentor.kernels.kv_cache import PagedKVCache
from diffgentor.kernels.ulysses import RowShard, SequenceParallelGroup, UlyssesAttention, UlyssesHeads

BLOCK = 4
D = 8
NUM_BLOCKS = 16
# two sequences' denoising chunks: (prefix length in the cache, first row, causal rows before the block, block end)
SEQS = [dict(prefix=9, causal=2, block=5, table=[3, 0, 7, 9]),  # rows 9..15: 2 causal, then a 5-token block
        dict(prefix=6, causal=1, block=5, table=[12, 5, 1])]  # rows 6..11: 1 causal, then a 5-token block
HEAD_CASES = [(4, 2), (4, 1), (2, 2)]  # (query heads, KV heads): even split, KV head repeated, one head each


def _metadata(device: str = "cpu") -> AttentionMetadata:
    chunks = []
    for s in SEQS:
        start, end = s["prefix"], s["prefix"] + s["causal"] + s["block"]
        chunks.append(SequenceChunk(range(start, end), end, s["table"], [(start + s["causal"], end)]))
    return AttentionMetadata.build(chunks, BLOCK, device=device)


def _inputs(hq: int, hkv: int) -> dict[str, torch.Tensor]:
    """The step's q/k/v (every row, every head) and a cache holding both sequences' prefixes."""
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    n = sum(s["causal"] + s["block"] for s in SEQS)
    cache = PagedKVCache(1, NUM_BLOCKS, BLOCK, hkv, D)
    cache.kv[0].copy_(torch.randn(cache.kv[0].shape, generator=g))  # prefixes (and stale image slots)
    return dict(q=torch.randn(n, hq, D, generator=g), k=torch.randn(n, hkv, D, generator=g),
                v=torch.randn(n, hkv, D, generator=g), pages=cache.kv[0].clone())


def _reference(hq: int, hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _inputs(hq, hkv)
    cache = PagedKVCache(1, NUM_BLOCKS, BLOCK, hkv, D)
    cache.kv[0].copy_(x["pages"])
    md = _metadata()
    cache.store(0, md, x["k"], x["v"])
    return paged_attention_reference(x["q"], md, cache, 0, D**-0.5), cache.kv[0]


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        comm = SequenceParallelGroup(world, rank)
        for hq, hkv in HEAD_CASES:
            x = _inputs(hq, hkv)
            heads = UlyssesHeads(hq, hkv, world)
            cache = PagedKVCache(1, NUM_BLOCKS, BLOCK, hkv, D)
            cache.kv[0].copy_(x["pages"])
            op = UlyssesAttention(heads, comm, TorchPagedAttention(heads.local_qo_heads, heads.local_kv_heads, D))
            md = _metadata()
            op.plan(md)
            shard = op.shard
            out = op.run(shard.local(x["q"]), shard.local(x["k"]), shard.local(x["v"]),
                         cache.head_slice(heads.kv_range(rank)), 0)
            full = shard.gather(comm, out)
            torch.save(dict(out=out, full=full, pages=cache.kv[0], start=shard.start, real=shard.num_real,
                            kv_heads=list(heads.kv_range(rank))),
                       Path(out_dir) / f"rank{rank}_{hq}_{hkv}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp2_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ulysses")
    mp.spawn(_rank_main, args=(2, str(d / "rdv"), str(d)), nprocs=2, join=True)
    return {(hq, hkv): [torch.load(d / f"rank{r}_{hq}_{hkv}.pt") for r in range(2)] for hq, hkv in HEAD_CASES}


@pytest.mark.parametrize("hq,hkv", HEAD_CASES, ids=["gqa-even", "kv-repeated", "one-head-each"])
def test_ulysses_matches_unsharded_attention(sp2_runs, hq, hkv):
    ref, ref_pages = _reference(hq, hkv)
    n = ref.shape[0]
    assert n % 2 == 1  # the last rank carries a padding row
    for r, res in enumerate(sp2_runs[(hq, hkv)]):
        real = res["real"]
        err = (res["out"][:real] - ref[res["start"] : res["start"] + real]).abs().max().item()
        assert err <= 1e-5, f"rank {r}: max |ulysses - reference| = {err:.3g}"
        assert (res["full"] - ref).abs().max().item() <= 1e-5  # the gathered rows, on every rank
        # this rank stored every row's K/V for the KV heads it attends with (the others' slots are left alone)
        h = res["kv_heads"]
        assert torch.equal(res["pages"][..., h, :], ref_pages[..., h, :])
    assert sp2_runs[(hq, hkv)][1]["real"] < sp2_runs[(hq, hkv)][1]["out"].shape[0]


def test_head_layouts():
    even = UlyssesHeads(32, 8, 4)
    assert (even.local_qo_heads, even.local_kv_heads, even.repeats_kv) == (8, 2, False)
    assert even.qo_range(3) == range(24, 32) and even.kv_range(3) == range(6, 8)
    rep = UlyssesHeads(8, 2, 4)  # 2 query heads per rank, each pair of ranks shares one KV head
    assert rep.repeats_kv and rep.local_kv_heads == 1
    assert [rep.kv_range(r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    for r in range(4):  # each rank's KV head is the one its query heads read (query head h reads h // (Hq / Hkv))
        assert {h // (8 // 2) for h in rep.qo_range(r)} == set(rep.kv_range(r))
    with pytest.raises(ValueError, match="3 query heads .* do not split over 2"):
        UlyssesHeads(3, 1, 2)
    with pytest.raises(ValueError, match="3 KV heads .* neither split over 2"):
        UlyssesHeads(6, 3, 2)


def test_row_shard_pads_the_last_rank():
    x = torch.arange(7.0).unsqueeze(1)
    shards = [RowShard(7, 3, r) for r in range(3)]
    assert [s.per_rank for s in shards] == [3, 3, 3]
    assert [s.num_real for s in shards] == [3, 3, 1]
    assert shards[2].local(x).squeeze(1).tolist() == [6.0, 0.0, 0.0]
    assert torch.equal(torch.cat([s.local(x) for s in shards])[:7], x)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "flashinfer"])
def test_gpu_attention_reads_a_head_slice_of_the_cache(impl):
    """What a sequence-parallel rank runs on a GPU: its backend over `PagedKVCache.head_slice` (pages whose head
    stride skips the other heads), after storing only its heads' K/V; compared with the reference on the same
    slice (bf16)."""
    from diffgentor.kernels.attention import flashinfer_attention_available
    from diffgentor.kernels.attention_select import get_attention_backend

    if impl == "flashinfer" and not flashinfer_attention_available("cuda")[0]:
        pytest.skip(flashinfer_attention_available("cuda")[1])
    hq, hkv, d = 4, 4, 128
    heads = UlyssesHeads(hq, hkv, 2)
    g = torch.Generator().manual_seed(0)
    n = sum(s["causal"] + s["block"] for s in SEQS)
    cache = PagedKVCache(1, NUM_BLOCKS, BLOCK, hkv, d, dtype=torch.bfloat16, device="cuda")
    cache.kv[0].copy_(torch.randn(cache.kv[0].shape, generator=g).to(torch.bfloat16))
    view = cache.head_slice(heads.kv_range(1))
    q = torch.randn(n, heads.local_qo_heads, d, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(n, heads.local_kv_heads, d, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    md = _metadata("cuda")
    others = cache.kv[0][:, :, :, : heads.kv_range(1).start].clone()
    view.store(0, md, k, v)
    assert torch.equal(cache.kv[0][:, :, :, : heads.kv_range(1).start], others)  # other heads' pages untouched
    backend = get_attention_backend(impl, heads.local_qo_heads, heads.local_kv_heads, d)
    backend.plan(md, q_dtype=q.dtype, kv_dtype=view.dtype)
    got = backend.run(q, k, v, view, 0).float()
    want = paged_attention_reference(q, md, view, 0, d**-0.5).float()
    assert (got - want).abs().max().item() <= 2e-2
