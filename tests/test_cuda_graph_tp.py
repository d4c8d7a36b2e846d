"""CUDA-graph decode steps under tensor parallel, on CPU (gloo): what a graph captures (the static decode forward,
all-reduces included) equals the eager forward on every rank and the single-process model, and which steps the
real config would capture on every layout of `plan-memory` (batch buckets x width buckets).

The capture itself needs CUDA and NCCL for the collectives inside it: `test_gpu_tp2_graph_replay_equals_eager`
(gpu, two GPUs) captures and replays at TP=2; bench/gpu_check.py's cuda_graphs section captures on one GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffgentor.engine.config import EngineConfig, ModelConfig
from diffgentor.engine.cuda_graph import batch_buckets, graph_keys, pick_bucket
from diffgentor.engine.memory_plan import GPUS, graph_pool_bytes, plan_for
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
from diffgentor.engine.parallel import ParallelContext, init_distributed
from diffgentor.engine.testing.tiny_model import make_tiny

from helpers import PUBLISHED_INSTRUCT_CONFIG, static_and_eager_decode

ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tpgraph") / "tiny")


def _rank_main(rank: int, world: int, init_file: str, ckpt: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("gloo", f"file://{init_file}", rank, world)
    try:
        model = HunyuanImage3ForCausalMM.from_pretrained(ckpt, parallel=ctx)
        res = static_and_eager_decode(model)
        assert (res["runner"].select(res["chunks"]).bucket, len(res["chunks"])) == (4, 3)  # one padding row
        torch.save({k: res[k] for k in ("static", "eager", "kv_heads")}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_static_decode_forward_at_tp2_equals_eager(ckpt, tmp_path):
    """Every rank's static decode forward (embedding all-reduce, o_proj and MoE all-reduces, its own KV heads) gives
    the eager forward's hidden states, and both equal the single-process model's."""
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rdv"), str(ckpt), str(tmp_path)), nprocs=2, join=True)
    single = static_and_eager_decode(HunyuanImage3ForCausalMM.from_pretrained(ckpt))
    torch.testing.assert_close(single["static"], single["eager"], rtol=0, atol=1e-5)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert int(res["kv_heads"]) < int(single["kv_heads"])  # this rank holds half the KV heads
        err = (res["static"] - res["eager"]).abs().max().item()
        assert err <= ATOL, f"rank {r}: static vs eager {err:.3g}"
        err = (res["static"] - single["eager"]).abs().max().item()
        assert err <= ATOL, f"rank {r}: static vs single process {err:.3g}"


def _gpu_rank_main(rank: int, world: int, init_file: str, ckpt: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    ctx = init_distributed("nccl", f"file://{init_file}", rank, world)
    try:
        model = HunyuanImage3ForCausalMM.from_pretrained(ckpt, dtype=torch.bfloat16, device=f"cuda:{rank}",
                                                         attn_backend="sdpa", parallel=ctx)
        res = static_and_eager_decode(model, use_graphs=True)
        runner = res["runner"]
        out = {k: res[k].float().cpu() for k in ("static", "eager")}
        out["captured"] = torch.tensor(len(runner.captured))
        out["disabled"] = torch.tensor(runner.disabled_reason is not None)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_tp2_graph_replay_equals_eager(ckpt, tmp_path):
    """Two GPUs, NCCL: both ranks capture the decode step (all-reduces inside the graph) in lockstep and the replay
    equals the eager forward within bf16 rounding."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, found {torch.cuda.device_count()}")
    mp.spawn(_gpu_rank_main, args=(2, str(tmp_path / "rdv"), str(ckpt), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert not bool(res["disabled"]) and int(res["captured"]) == 1, r
        err = float((res["static"] - res["eager"]).norm() / res["eager"].norm())
        assert err < 5e-2, (r, err)


# ------------------------------------------------------------------------------------------------ what is captured

# plan-memory's layouts (README, "The first hour on GPUs"): card, tensor parallel size, quantization, expert parallel
PLAN_LAYOUTS = [("h200", 1, "fp8", False), ("b200", 1, "fp8", False), ("h200", 2, "none", False),
                ("h100", 2, "fp8", False), ("h100", 4, "none", False), ("h100", 4, "fp8", False),
                ("h100", 4, "fp8", True), ("h100", 8, "none", False)]
IMAGE_TOKENS = 64 * 64 + 1024 + 6  # one 1024x1024 condition image: VAE tokens + at most 1024 ViT tokens + specials
PROMPT_AND_THINK = 300 + 120 + 1024  # system prompt and instruction, then a long reasoning text


@pytest.mark.parametrize("gpu,tp,quant,ep", PLAN_LAYOUTS, ids=[f"{g}-tp{t}-{q}{'-ep' if e else ''}"
                                                               for g, t, q, e in PLAN_LAYOUTS])
@pytest.mark.parametrize("attn_impl", ["sdpa", "flashinfer"])
def test_real_config_captures_edit_contexts_on_every_layout(gpu, tp, quant, ep, attn_impl):
    """For the published config on each layout: graphs are on (tensor parallel included), the captured keys are
    every batch bucket up to max_num_seqs x the width buckets up to max_position_embeddings (one width with
    FlashInfer's paged kernel), the decode contexts of 2- and 3-image edits (past the old 8192-key limit) and the
    longest context the model allows fall into a captured width, and the plan reserves the graph pool."""
    cfg = HunyuanImage3Config.from_dict(PUBLISHED_INSTRUCT_CONFIG)
    config = EngineConfig(model=ModelConfig(quantization=quant, attn_impl=attn_impl))
    parallel = ParallelContext(tp, 0, expert_parallel=ep)
    plan = plan_for(config, cfg, parallel, gpu)
    assert plan.fits, plan.problems
    paged = attn_impl == "flashinfer"
    keys = [tuple(k) for k in plan.graph_keys]  # what plan-memory lists
    seqs = config.scheduler.max_num_seqs
    assert keys == list(graph_keys(seqs, cfg.max_position_embeddings, config.cache.block_size, paged))
    batches = sorted({b for b, _ in keys})
    widths = sorted({w for _, w in keys})
    assert batches == list(batch_buckets(config.scheduler.max_num_seqs)) == [1, 2, 4, 8, 16]
    widest = math.ceil(cfg.max_position_embeddings / config.cache.block_size)
    assert widths[-1] == widest == 1425
    assert widths == ([widest] if paged else [32, 64, 128, 256, 512, 1024, widest])
    for images in (2, 3):
        context = images * IMAGE_TOKENS + PROMPT_AND_THINK
        assert 8192 < context <= cfg.max_position_embeddings
        width = pick_bucket(math.ceil(context / config.cache.block_size), widths)
        assert width is not None and (paged or width * config.cache.block_size < 2 * context), (images, width)
        for b in (1, 3, 16):
            assert (pick_bucket(b, batches), width) in keys
    assert plan.graph_pool_bytes == graph_pool_bytes(cfg, parallel, config.scheduler.max_num_seqs,
                                                     config.cache.block_size,
                                                     plan.moe_impl, plan.quantization if quant != "none" else None,
                                                     2, attn_impl) > 0
    eager = EngineConfig(model=ModelConfig(quantization=quant, enforce_eager=True))
    assert plan_for(eager, cfg, parallel, gpu).graph_pool_bytes == 0
    listed = "decode graphs for batches 1, 2, 4, 8, 16 x contexts up to " + \
        ("22800" if paged else "512, 1024, 2048, 4096, 8192, 16384, 22800") + " keys"
    assert GPUS[gpu].name in plan.render() and listed in plan.render()
