"""CFG parallel on CPU / gloo (engine/cfg_groups.py, engine/model_runner.py): layouts CFG2, TP2 and TP2 x CFG2 give
the single-process engine's text, latents and images for an Instruct text-to-image request with CFG, a 3-image edit
and a batch of mixed requests (CFG and no CFG, Taylor cache, previews) in one run; each CFG group forwards only
its share of the tokens; a killed rank of a CFG group fails the in-flight requests and leaves no process behind.
Each test starts rank processes (about a minute on a loaded 2-core machine): all are marked slow; the scheduler's
placement and per-group KV books are tested fast in tests/test_scheduler.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgentor.engine.offline import Engine
from diffgentor.engine.request import FinishReason
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.engine.tp.executor import MultiprocExecutor

from helpers import alive_pids, kill_rank_mid_run, random_png

ENGINE_ARGS = dict(num_kv_blocks=256, device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=4096)
ATOL = 1e-4  # as the tensor-parallel engine tests


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cfg-parallel") / "tiny-instruct")


def _requests(steps: int = 3) -> list[dict]:
    base = dict(max_new_tokens=4, num_inference_steps=steps, infer_align_image_size=False)
    specs = [
        dict(request_id="t2i_cfg", bot_task="image", image_size="256x256", guidance_scale=5.0, seed=1),
        dict(request_id="edit3", bot_task="think_recaption", image_size="256x256", guidance_scale=4.0, seed=2,
             images=[random_png(64, 96, 1), random_png(80, 80, 2), random_png(72, 64, 3)]),
        dict(request_id="no_cfg", bot_task="think_recaption", image_size="208x304", guidance_scale=1.0, seed=3),
        dict(request_id="taylor", bot_task="image", image_size="256x256", guidance_scale=3.0, seed=4,
             use_taylor_cache=True, num_inference_steps=8, partial_images=2),
        dict(request_id="edit1_no_cfg", bot_task="image", image_size="256x256", guidance_scale=1.0, seed=5,
             images=[random_png(96, 64, 6)]),
    ]
    return [{**base, "prompt": f"variant {i} of a red fox", **s} for i, s in enumerate(specs)]


def _run(ckpt, **layout) -> tuple[dict, tuple, list[int], object]:
    """One batched run: results (final latents and images) and preview counts per request id; the executor's
    token counts; the rank pids; the executor."""
    with Engine.from_pretrained(ckpt, environ={}, **ENGINE_ARGS, **layout) as eng:
        ex = eng.core.executor
        pids = list(getattr(ex, "rank_pids", []))
        partials: dict[str, int] = {}
        for ev in eng.stream(_requests()):
            if ev.kind == "partial_image":
                partials[ev.request_id] = partials.get(ev.request_id, 0) + 1
        info = (ex, eng.core.stats.tokens, list(getattr(ex, "rank_tokens", [])))
        results = dict(eng.results)
    return {"results": results, "partials": partials}, info, pids, ex


@pytest.fixture(scope="module")
def single(ckpt):
    torch.manual_seed(0)
    return _run(ckpt)[0]


def _check_same(got: dict, ref: dict) -> None:
    for rid, b in ref["results"].items():
        a = got["results"][rid]
        assert a.error is None and b.error is None, (rid, a.error, b.error)
        assert a.finish_reason == b.finish_reason == FinishReason.IMAGE
        assert a.generated_ids == b.generated_ids, rid
        err = (a.latents - b.latents).abs().max().item()
        assert err <= ATOL, (rid, err)
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max()
        assert diff <= 1, (rid, diff)
    assert len(ref["results"]) == len(_requests())
    assert got["partials"] == ref["partials"] == {"taylor": 2}
    assert any(r.generated_ids for r in ref["results"].values())  # the think_recaption requests did decode text


def _check_split(info) -> None:
    """Each CFG group forwarded a share of the plans' tokens, and the shares add up to the plans (no group ran the
    other's rows); the ranks of one group ran the same tokens."""
    ex, tokens, rank_tokens = info
    per_group = [rank_tokens[r] for r in ex.layout.group_leaders()]
    assert all(t > 0 for t in per_group), rank_tokens
    assert sum(per_group) == tokens, (rank_tokens, tokens)
    for g in range(ex.layout.cfg):
        ranks = [ex.layout.rank_of(t, sp, g) for t in range(ex.layout.tp) for sp in range(ex.layout.sp)]
        assert len({rank_tokens[r] for r in ranks}) == 1, rank_tokens


@pytest.mark.slow
def test_cfg2_matches_single_process(ckpt, single):
    got, info, pids, ex = _run(ckpt, cfg_parallel_size=2)
    assert isinstance(ex, MultiprocExecutor) and ex.layout.describe() == "tp1 x cfg2 x sp1 (2 ranks)"
    assert not alive_pids(pids)  # the engine's close stopped every rank
    _check_same(got, single)
    _check_split(info)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2),
                                    dict(tensor_parallel_size=2, cfg_parallel_size=2),
                                    dict(cfg_parallel_size=2, sequence_parallel_size=2)],
                         ids=["tp2", "tp2xcfg2", "cfg2xsp2"])
def test_tp_layouts_match_single_process(ckpt, single, layout):
    got, info, pids, ex = _run(ckpt, **layout)
    assert not alive_pids(pids)
    _check_same(got, single)
    if ex.layout.cfg > 1:
        _check_split(info)


def _kill_a_rank(ckpt, rank: int, **layout) -> None:
    eng = Engine.from_pretrained(ckpt, environ={}, poll_s=0.1, **ENGINE_ARGS, **layout)
    try:
        kill_rank_mid_run(eng, [dict(r, num_inference_steps=50) for r in _requests()[:3]], rank)
    finally:
        eng.close()


@pytest.mark.slow
def test_killed_rank_of_the_second_cfg_group_fails_in_flight_requests(ckpt):
    _kill_a_rank(ckpt, 1, cfg_parallel_size=2)


@pytest.mark.slow
def test_killed_non_leader_rank_of_tp2xcfg2(ckpt):
    _kill_a_rank(ckpt, 3, tensor_parallel_size=2, cfg_parallel_size=2)


@pytest.mark.slow
def test_cfg2_with_fp8_experts_matches_single_process(ckpt):
    """FP8 experts (quantised at load, per-channel scales): each CFG group quantises its own full copy the same
    way, so CFG2 gives the single FP8 process's text, latents and image."""
    fp8 = dict(quantization="fp8")
    reqs = _requests()[:2]  # the T2I with CFG and the 3-image edit
    with Engine.from_pretrained(ckpt, environ={}, **ENGINE_ARGS, **fp8) as eng:
        ref = {r.request_id: r for r in eng.generate(reqs)}
    with Engine.from_pretrained(ckpt, environ={}, **ENGINE_ARGS, **fp8, cfg_parallel_size=2) as eng:
        got = {r.request_id: r for r in eng.generate(reqs)}
    for rid, b in ref.items():
        a = got[rid]
        assert a.error is None and b.error is None, (rid, a.error, b.error)
        assert a.generated_ids == b.generated_ids, rid
        assert (a.latents - b.latents).abs().max().item() <= ATOL, rid
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max()
        assert diff <= 1, (rid, diff)
