"""Sequence-parallel (Ulysses) image steps of the model on CPU / gloo: SP2 and TP2 x SP2 ranks reproduce the
single-process backbone (fp32 <= 1e-4) for denoising steps whose odd-sized image blocks are split over the ranks,
batched with a text sequence's decode tokens that run whole, and for that sequence's text step after them (which
reads the cache the split steps wrote); SP2 also with FP8 experts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffgentor.engine.models.hunyuan_image_3.backbone import StepRows
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
from diffgentor.engine.parallel import ParallelContext, init_distributed
from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk
from diffgentor.kernels.rope import positions_2d
from diffgentor.kernels.ulysses import UlyssesHeads

from helpers import PUBLISHED_INSTRUCT_CONFIG

BLOCK = 4
ATOL = 1e-4
# sequence A: 10 prompt tokens (a 2 x 2 condition block at 3..7), then the denoising chunk: 2 causal rows (timestep,
# guidance) and a 3 x 3 image block = 11 rows (odd: the last rank's share is padded)
PROMPT_A, COND = 10, (3, 7, 2, 2)
TS, IMG = 10, (12, 21, 3, 3)
TABLE_A = [5, 2, 7, 1, 3, 9]
# sequence B: 6 prompt tokens, then decode tokens batched with A's denoising steps
PROMPT_B = 6
TABLE_B = [11, 4, 8]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("sp") / "tiny")


def _chunk_a() -> SequenceChunk:
    return SequenceChunk(range(TS, IMG[1]), IMG[1], TABLE_A, [COND[:2], IMG[:2]])


@torch.no_grad()
def workload(model: HunyuanImage3ForCausalMM) -> dict[str, torch.Tensor]:
    """Prefill A and B whole; two denoising steps of A (new image embeddings each), each batched with one decode
    token of B; a last decode of B. Sequence parallel splits only A's denoising chunks."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    cache = model.make_kv_cache(16, BLOCK)
    ids_a = torch.randint(0, cfg.vocab_size, (IMG[1],), generator=g)
    ids_b = torch.randint(0, cfg.vocab_size, (PROMPT_B + 3,), generator=g)
    pos_a = positions_2d(IMG[1], [COND, IMG])
    res: dict[str, torch.Tensor] = {}

    emb = torch.cat([model.embed_tokens(ids_a[:PROMPT_A]), model.embed_tokens(ids_b[:PROMPT_B])])
    emb[COND[0] : COND[1]] = 0.5 * torch.randn(COND[1] - COND[0], cfg.hidden_size, generator=g)
    md = AttentionMetadata.build([SequenceChunk(range(PROMPT_A), PROMPT_A, TABLE_A, [COND[:2]]),
                                  SequenceChunk(range(PROMPT_B), PROMPT_B, TABLE_B)], BLOCK)
    pos = torch.cat([pos_a[:PROMPT_A], positions_2d(PROMPT_B, [])])
    res["prefill"] = model(emb, pos, md, cache)

    for step in range(2):
        img = model.embed_tokens(ids_a[TS : IMG[1]])
        img[IMG[0] - TS :] = 0.5 * torch.randn(IMG[1] - IMG[0], cfg.hidden_size, generator=g)
        b = PROMPT_B + step
        text = StepRows(model.embed_tokens(ids_b[b : b + 1]), torch.tensor([[b, b]]),
                        AttentionMetadata.build([SequenceChunk([b], b + 1, TABLE_B)], BLOCK))
        image = StepRows(img, pos_a[TS : IMG[1]], AttentionMetadata.build([_chunk_a()], BLOCK))
        if model.sequence_parallel:
            h_text, h_img = model.forward_sequence_parallel(text, image, cache)
        else:  # one process: the same rows as one flat batch
            md = AttentionMetadata.build([SequenceChunk([b], b + 1, TABLE_B), _chunk_a()], BLOCK)
            h = model(torch.cat([text.hidden, image.hidden]), torch.cat([text.positions, image.positions]), md,
                      cache)
            h_text, h_img = h[:1], h[1:]
        res[f"text{step}"], res[f"image{step}"] = h_text, h_img

    # text after the split steps reads what they cached (B's tokens; nothing ever attends to A's image block after
    # its last denoising step, and a rank's cache holds that block's K/V only for its own heads)
    b = PROMPT_B + 2
    md = AttentionMetadata.build([SequenceChunk([b], b + 1, TABLE_B)], BLOCK)
    res["after"] = model(model.embed_tokens(ids_b[b : b + 1]), torch.tensor([[b, b]]), md, cache)
    res["logits_after"] = model.logits(res["after"])
    return res


def _rank_main(rank: int, tp: int, sp: int, init_file: str, ckpt: str, out_dir: str, fp8: bool) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("gloo", f"file://{init_file}", rank, ParallelLayout(tp=tp, sp=sp))
    calls = {"all_to_all": [], "all_gather": []}  # bytes sent by each sequence-parallel collective of this rank
    a2a, gather = dist.all_to_all_single, dist.all_gather_single

    def counted_a2a(out, x, *args, **kw):
        calls["all_to_all"].append(x.numel() * x.element_size())
        return a2a(out, x, *args, **kw)

    def counted_gather(out, x, *args, **kw):
        calls["all_gather"].append(x.numel() * x.element_size())
        return gather(out, x, *args, **kw)

    dist.all_to_all_single, dist.all_gather_single = counted_a2a, counted_gather
    try:
        model = HunyuanImage3ForCausalMM.from_pretrained(ckpt, parallel=ctx)
        assert model.sequence_parallel
        res = workload(model)
        res.update({k: torch.tensor(v) for k, v in calls.items()})
        if fp8:  # FP8 experts (per-token, untouched by the split): the same rows as one process with FP8 experts
            fp8_model = HunyuanImage3ForCausalMM.from_pretrained(ckpt, parallel=ctx, quantization="fp8")
            res.update({f"fp8_{k}": v for k, v in workload(fp8_model).items()})
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(ckpt: Path, d: Path, tp: int, sp: int, fp8: bool) -> list[dict[str, torch.Tensor]]:
    world = tp * sp
    mp.spawn(_rank_main, args=(tp, sp, str(d / "rdv"), str(ckpt), str(d), fp8), nprocs=world, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def single(ckpt):
    fp8 = workload(HunyuanImage3ForCausalMM.from_pretrained(ckpt, quantization="fp8"))
    return {**workload(HunyuanImage3ForCausalMM.from_pretrained(ckpt)), **{f"fp8_{k}": v for k, v in fp8.items()}}


LAYOUTS = [pytest.param(1, 2, id="sp2"), pytest.param(2, 2, id="tp2xsp2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_sequence_parallel_ranks_match_single_process(ckpt, single, tmp_path, tp, sp):
    fp8 = tp == 1  # FP8 experts checked on the cheaper layout
    ranks = _spawn(ckpt, tmp_path, tp, sp, fp8)
    cfg = HunyuanImage3Config.from_pretrained(ckpt)
    per = -(-(IMG[1] - TS) // sp)  # 11 image-block rows per split step: 6 per rank (the last rank's 6th is padding)
    heads = UlyssesHeads(cfg.num_attention_heads // tp, max(1, cfg.num_key_value_heads // tp), sp)
    sent_heads = heads.num_qo_heads + 2 * sp * heads.local_kv_heads  # every query head; each rank's KV heads, twice
    per_layer = [per * sent_heads * cfg.head_dim * 4, per * heads.num_qo_heads * cfg.head_dim * 4]  # q/k/v, out
    for r, res in enumerate(ranks):
        # exactly two all-to-alls per layer of each split step (fp32 bytes as counted) and one gather of the last
        # layer's rows per step; the whole-row steps (prefill, the last decode) send nothing
        assert res.pop("all_to_all").tolist() == per_layer * cfg.num_hidden_layers * 2, r
        assert res.pop("all_gather").tolist() == [per * cfg.hidden_size * 4] * 2, r
        assert res.keys() == {k for k in single if fp8 or not k.startswith("fp8_")}
        for key in res:
            ref = single[key]
            assert res[key].shape == ref.shape, (r, key)
            err = (res[key] - ref).abs().max().item()
            assert err <= ATOL, f"rank {r} {key}: max |tp{tp} x sp{sp} - single| = {err:.3g}"


def test_head_layout_checked_when_the_model_is_built(ckpt):
    """4 query heads over 3 sequence-parallel ranks: refused when the model is built, with the sizes."""
    with pytest.raises(ValueError, match="4 query heads .* do not split over 3"):
        HunyuanImage3ForCausalMM.from_pretrained(ckpt, parallel=ParallelContext(sp_size=3, sp_rank=0))


def test_plan_memory_splits_the_denoising_step(tmp_path, capsys):
    """plan-memory with --sequence-parallel-size 2: the same weights and KV per rank (KV heads are not split: every
    rank holds the prompt), a smaller forward peak where the 1024x1024 CFG step is the largest forward (its rows are
    split; a 2048-token prefill budget); heads that cannot split are refused."""
    import json

    from diffgentor.engine.memory_plan import add_parser, run

    ckpt = tmp_path  # plan-memory reads config.json only: the published Instruct config
    (ckpt / "config.json").write_text(json.dumps(PUBLISHED_INSTRUCT_CONFIG))
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    plans = {}
    for sp in (1, 2, 4):
        args = parser.parse_args([str(ckpt), "--gpu", "h100", "--tensor-parallel-size", "4", "--json",
                                  "--max-num-batched-tokens", "2048", "--sequence-parallel-size", str(sp)])
        assert run(args) == 0
        plans[sp] = json.loads(capsys.readouterr().out)
    for sp in (2, 4):
        p, one = plans[sp], plans[1]
        assert p["sequence_parallel_size"] == sp
        assert (p["weight_bytes"], p["kv_block_bytes"], p["min_kv_blocks"]) == \
            (one["weight_bytes"], one["kv_block_bytes"], one["min_kv_blocks"])
        assert p["activations"]["residual"] < one["activations"]["residual"]
        assert p["activation_peak"] < one["activation_peak"]
    assert plans[4]["activation_peak"] < plans[2]["activation_peak"]
    bad = parser.parse_args([str(ckpt), "--gpu", "h100", "--tensor-parallel-size", "4", "--sequence-parallel-size",
                             "3"])
    assert run(bad) == 2
    assert "do not split over 3 sequence-parallel ranks" in capsys.readouterr().out
