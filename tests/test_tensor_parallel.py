"""Tensor / expert parallel model on CPU (gloo): each rank loads only its slices and reproduces the single-process
model (prefill with a bidirectional image span, then a decode step through the paged cache), fp32 <= 1e-4."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffgentor.engine.models.hunyuan_image_3.backbone import MoEBlock
from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
from diffgentor.engine.models.hunyuan_image_3.weights import CheckpointError
from diffgentor.engine.parallel import ParallelContext, init_distributed
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk
from diffgentor.kernels.rope import positions_2d

BLOCK = 4
ATOL = 1e-4
N = 14
IMG = (4, 10, 2, 3)  # an image run of 6 tokens as a 2 x 3 grid, attended bidirectionally
TABLE = [5, 2, 7, 1, 3]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tp") / "tiny")


def backbone_bytes(model: HunyuanImage3ForCausalMM) -> int:
    """Bytes of the backbone (model.*) and lm_head parameters, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for mod in (model.model, model.lm_head):
        for p in mod.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


@torch.no_grad()
def workload(model: HunyuanImage3ForCausalMM) -> dict[str, torch.Tensor]:
    """Prefill (text + an image-style bidirectional span with replicated 'image' embeddings), then one decode."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (N,), generator=g)
    emb = model.embed_tokens(ids)
    emb[IMG[0] : IMG[1]] = 0.5 * torch.randn(IMG[1] - IMG[0], cfg.hidden_size, generator=g)
    pos = positions_2d(N, [IMG])
    cache = model.make_kv_cache(16, BLOCK)
    md = AttentionMetadata.build([SequenceChunk(range(N), N, TABLE, bidir_spans=[IMG[:2]])], BLOCK)
    h = model(emb, pos, md, cache)
    logits = model.logits(h)
    tok = int(logits[-1].argmax())
    md2 = AttentionMetadata.build([SequenceChunk([N], N + 1, TABLE)], BLOCK)
    h2 = model(model.embed_tokens(torch.tensor([tok])), torch.tensor([[N, N]]), md2, cache)
    return {"hidden": h, "logits": logits, "hidden_decode": h2, "logits_decode": model.logits(h2),
            "kv_heads": torch.tensor(cache.num_kv_heads)}


def _rank_main(rank: int, world: int, init_file: str, ckpt: str, modes: list[bool], out_dir: str) -> None:
    """One rank: for each mode (expert parallel off / on) build and load its shard, run the workload, save."""
    torch.set_num_threads(1)
    ctx = init_distributed("gloo", f"file://{init_file}", rank, world)
    try:
        for ep in modes:
            model = HunyuanImage3ForCausalMM.from_pretrained(ckpt, parallel=replace(ctx, expert_parallel=ep))
            res = workload(model)
            res["bytes"] = torch.tensor(backbone_bytes(model))
            moe = model.model.layers[-1].mlp
            assert isinstance(moe, MoEBlock)
            w13 = next(iter(moe.experts.parameters()))
            res["experts_held"] = torch.tensor(len(list(moe.experts.children())))
            res["expert_rows"] = torch.tensor(w13.shape[0])
            torch.save(res, Path(out_dir) / f"rank{rank}_ep{int(ep)}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_runs(ckpt, tmp_path_factory):
    """world size -> ep flag -> per-rank results; one spawn per world size (2: TP and EP; 4: TP, KV replicated)."""
    out: dict[int, dict[bool, list[dict[str, torch.Tensor]]]] = {}
    for world, modes in ((2, [False, True]), (4, [False])):
        d = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(_rank_main, args=(world, str(d / "rdv"), str(ckpt), modes, str(d)), nprocs=world, join=True)
        out[world] = {ep: [torch.load(d / f"rank{r}_ep{int(ep)}.pt") for r in range(world)] for ep in modes}
    return out


@pytest.fixture(scope="module")
def single(ckpt):
    model = HunyuanImage3ForCausalMM.from_pretrained(ckpt)
    return workload(model), backbone_bytes(model), model.config


def _check_equal(ranks, ref):
    for r, res in enumerate(ranks):
        for key in ("hidden", "logits", "hidden_decode", "logits_decode"):
            err = (res[key] - ref[key]).abs().max().item()
            assert err <= ATOL, f"rank {r} {key}: max |tp - single| = {err:.3g}"
        assert int(res["logits"].shape[-1]) == int(ref["logits"].shape[-1])  # full vocab gathered


@pytest.mark.parametrize("world,ep", [(2, False), (2, True), (4, False)], ids=["tp2", "ep2", "tp4-kv-replicated"])
def test_parallel_ranks_match_single_process(single, world_runs, world, ep):
    ref, full_bytes, cfg = single
    ranks = world_runs[world][ep]
    _check_equal(ranks, ref)
    ratios = [int(r["bytes"]) / full_bytes for r in ranks]
    # replicated parts (norms, fp32 routers; at tp > n_kv the KV projections) keep it a bit above 1/world
    print(f"\nworld={world} ep={ep}: per-rank backbone bytes / single = {[round(x, 3) for x in ratios]}")
    assert all(x <= 1.0 / world + 0.1 for x in ratios), ratios
    inter = cfg.moe_intermediate_size[-1]
    for res in ranks:
        if ep:
            assert int(res["experts_held"]) == cfg.num_experts // world
            assert int(res["expert_rows"]) == 2 * inter
        else:
            assert int(res["experts_held"]) == cfg.num_experts
            assert int(res["expert_rows"]) == 2 * inter // world
        want_kv = max(1, cfg.num_key_value_heads // world)
        assert int(res["kv_heads"]) == want_kv


# ------------------------------------------------------------------------------------------- no process group
def test_parallel_context_ranges():
    one = ParallelContext()
    assert one.all_reduce(t := torch.ones(3)) is t and not one.is_parallel
    assert one.vocab_range(10) == range(10) and one.kv_head_range(8) == range(8)
    assert [ParallelContext(4, r).kv_head_range(2) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2),
                                                                           range(1, 2)]
    assert [ParallelContext(2, r).kv_head_range(8) for r in range(2)] == [range(0, 4), range(4, 8)]
    # q heads of a rank belong to the KV group it holds (32 q / 8 kv at tp 16)
    for r in range(16):
        ctx = ParallelContext(16, r)
        (kv,) = ctx.kv_head_range(8)
        assert all(h // 4 == kv for h in ctx.q_head_range(32))
    assert ParallelContext(3, 2).vocab_range(10) == range(8, 10)
    assert ParallelContext(3, 0).vocab_sizes(10) == [4, 4, 2]
    ep = ParallelContext(2, 1, expert_parallel=True)
    assert ep.expert_range(64) == range(32, 64) and ep.moe_parallel().ep_rank == 1
    with pytest.raises(ValueError):
        ParallelContext(3, 0).kv_head_range(8)


def test_sharded_load_validates_full_shapes(ckpt, tmp_path):
    """A rank's loader checks the header's FULL shapes: a mis-shaped expert another EP rank owns is reported."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    shard = bad / index[key]
    tensors = load_file(str(shard))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="experts.3.down_proj"):
        # rank 0 of EP 2 holds experts 0, 1 only, yet expert 3's shape is still checked (no process group
        # is needed to build and load a rank's shard)
        HunyuanImage3ForCausalMM.from_pretrained(bad, parallel=ParallelContext(2, 0, expert_parallel=True))


def test_single_rank_kv_cache_unchanged(single):
    ref, _, cfg = single
    assert int(ref["kv_heads"]) == cfg.num_key_value_heads
