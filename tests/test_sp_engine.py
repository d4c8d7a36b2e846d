"""Sequence-parallel (Ulysses) engines on CPU / gloo: SP2 and TP2 x SP2 rank layouts executing the one scheduler's
plans give the single-process engine's latents, images and text for a batch of mixed requests
(Instruct text-to-image with CFG, a 3-image edit with CFG, a request without CFG whose image rows make the step's
row count odd, a think-and-recaption request with a preview and the Taylor cache); a killed sequence-parallel rank
fails the in-flight requests quickly; shutdown leaves no rank process behind. The engine comparisons and the killed
rank are `slow` (about a minute even for SP2 on 2 cores); by default sequence parallelism is held at the model level
(tests/test_sequence_parallel.py: SP2 ranks == one process) and the op level (tests/test_ulysses.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgentor.engine.offline import Engine
from diffgentor.engine.request import FinishReason
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.engine.tp.executor import MultiprocExecutor

from helpers import alive_pids, kill_rank_mid_run, random_png

ENGINE_ARGS = dict(num_kv_blocks=1024, device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=4096)
# CFG2 x SP2 is compared in tests/test_cfg_parallel.py
LAYOUTS = [pytest.param(1, 1, 2, id="sp2", marks=pytest.mark.slow),
           pytest.param(2, 1, 2, id="tp2xsp2", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sp-engine") / "tiny.Instruct-3.0")


def _requests(steps: int = 3) -> list[dict]:
    base = dict(num_inference_steps=steps, max_new_tokens=4, infer_align_image_size=False)
    specs = [
        dict(bot_task="image", image_size="256x256", guidance_scale=5.0, seed=1),  # t2i with CFG
        dict(bot_task="image", image_size="256x256", guidance_scale=4.0, seed=2,  # 3-image edit with CFG
             images=[random_png(64, 96, 1), random_png(80, 80, 2), random_png(48, 64, 3)]),
        dict(bot_task="image", image_size="192x320", guidance_scale=1.0, seed=3),  # no CFG: one row of 1 + 12*20
        dict(bot_task="think_recaption", image_size="256x256", guidance_scale=5.0, seed=4, partial_images=1,
             use_taylor_cache=True, images=[random_png(64, 64, 4)]),
    ]
    return [dict(request_id=f"r{i}", prompt=f"make variant {i}", **base, **s) for i, s in enumerate(specs)]


@pytest.fixture(scope="module")
def single(ckpt):
    torch.manual_seed(0)
    with Engine.from_pretrained(ckpt, environ={}, **ENGINE_ARGS) as eng:
        return eng.generate(_requests())


@pytest.mark.slow
def test_requests_cover_an_odd_row_count(single):
    """The request without CFG has one image chunk of 1 + 12 * 20 rows (timestep + grid): odd, so every step that
    batches it with CFG pairs splits an odd number of rows over 2 ranks (the last share padded)."""
    assert (1 + (192 // 16) * (320 // 16)) % 2 == 1
    assert all(r.error is None for r in single), [r.error for r in single]
    assert tuple(single[2].latents.shape[-2:]) == (192 // 16, 320 // 16)


@pytest.mark.parametrize("tp,cfg,sp", LAYOUTS)
def test_sp_engine_matches_single_process(ckpt, single, tp, cfg, sp):
    with Engine.from_pretrained(ckpt, environ={}, tensor_parallel_size=tp, cfg_parallel_size=cfg,
                                sequence_parallel_size=sp, **ENGINE_ARGS) as eng:
        ex = eng.core.executor
        assert isinstance(ex, MultiprocExecutor) and len(ex.rank_pids) == tp * cfg * sp
        pids = list(ex.rank_pids)
        got = eng.generate(_requests())
    assert not alive_pids(pids)  # shutdown stopped every rank
    for a, b in zip(got, single):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert a.finish_reason == b.finish_reason == FinishReason.IMAGE
        assert a.generated_ids == b.generated_ids, a.request_id
        err = (a.latents - b.latents).abs().max().item()
        assert err <= 1e-4, (a.request_id, err)
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max()
        assert diff <= 1, (a.request_id, diff)
    assert got[3].generated_ids  # the think_recaption request decoded text before its image


@pytest.mark.slow
def test_killed_sequence_parallel_rank_fails_in_flight_requests(ckpt):
    eng = Engine.from_pretrained(ckpt, environ={}, sequence_parallel_size=2, poll_s=0.1,
                                 **ENGINE_ARGS)
    try:
        kill_rank_mid_run(eng, _requests(steps=50), rank=1)  # rank 1 = (tp 0, sp 1): rank 0's sequence-parallel peer
    finally:
        eng.close()


def test_layout_that_cannot_split_the_heads_is_refused_before_any_rank_starts(ckpt):
    with pytest.raises(ValueError, match="4 query heads .* do not split over 3 sequence-parallel ranks"):
        Engine.from_pretrained(ckpt, environ={}, sequence_parallel_size=3, **ENGINE_ARGS)
