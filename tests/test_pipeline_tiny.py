"""End to end over the tiny checkpoints: `HunyuanImage3Pipeline.generate` from a `make_tiny` folder.

Covers the request defaults (think_recaption, en_unified, auto size) with 0..3 condition images on the
Instruct (CFG) and Distil (guidance / MeanFlow) checkpoints, docs/decisions.md: Think budget (a spent token budget
closes the
open stages and still yields an image), docs/decisions.md: KV reuse (diffusion over the text phase's KV pages equals a
full re-prefill), determinism, request validation and a bf16 load.

The tiny models are random, so what the text phase samples depends on the seed. The seeds below were
picked so that the 8-token budget runs out inside `<think>` (no end tag sampled, no free `<img_size>` /
ratio token that would stop the phase early) and the model picks one of the small 256-scale buckets;
the test asserts those facts rather than assuming them.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffgentor.engine.models.hunyuan_image_3.backbone import keep_fp32_param
from diffgentor.engine.models.hunyuan_image_3.flow_match import (
    FlowMatchSchedule,
    cfg_combine,
    guidance_value,
)
from diffgentor.engine.models.hunyuan_image_3.reference_pipeline import (
    HunyuanImage3Pipeline,
    ImageRequest,
    ImageResult,
    RequestError,
    _Seq,
)
from diffgentor.engine.testing.tiny_model import make_tiny

PROMPT = "a red house by the lake"
BUDGET = 8
# (width, height): square, wide 2:1 and tall 1:3 -- all snap to 256-scale buckets (a 3:4 or 9:16 image
# would snap to one of the four 1024-scale extra buckets and cost 12x the tokens).
COND_SIZES = ((64, 64), (96, 48), (32, 96))
COND_COLORS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
# seed per (distil, number of condition images): the budget runs out inside <think>
TRUNC_SEEDS = {(False, 0): 8, (False, 1): 8, (False, 2): 8, (False, 3): 1,
               (True, 0): 1, (True, 1): 1, (True, 2): 1, (True, 3): 2}
FEW_STEPS = 2  # for the runs that are not about the default schedule


def cond_images(n: int) -> list[Image.Image]:
    out = []
    for (w, h), color in zip(COND_SIZES[:n], COND_COLORS):
        img = Image.new("RGB", (w, h), color)
        img.paste((255, 255, 255), (w // 4, h // 4, w // 2, h // 2))
        out.append(img)
    return out


def default_request(distil: bool, n: int, **kw) -> ImageRequest:
    kw.setdefault("seed", TRUNC_SEEDS[(distil, n)])
    return ImageRequest(PROMPT, images=cond_images(n), max_new_tokens=BUDGET, **kw)


class Runs:
    """Pipelines and the default-request results, computed once per session and shared by tests."""

    def __init__(self, ckpts: dict[bool, object]) -> None:
        self.ckpts = ckpts
        self.pipes = {d: HunyuanImage3Pipeline.from_pretrained(p) for d, p in ckpts.items()}
        self._results: dict[tuple[bool, int], ImageResult] = {}

    def default(self, distil: bool, n: int) -> ImageResult:
        key = (distil, n)
        if key not in self._results:
            self._results[key] = self.pipes[distil].generate(default_request(distil, n), trace=True)
        return self._results[key]


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    return {d: make_tiny(tmp_path_factory.mktemp(f"tiny_distil_{d}"), distil=d) for d in (False, True)}


@pytest.fixture(scope="session")
def runs(tiny_ckpts) -> Runs:
    return Runs(tiny_ckpts)


def bucket_wh(pipe: HunyuanImage3Pipeline, ratio_index: int) -> tuple[int, int]:
    h, w = pipe.builder.resolution.get(ratio_index)
    return w, h


def unified_system_prompt(pipe: HunyuanImage3Pipeline) -> str:
    return pipe.system_prompts.stored["en_unified"].strip()


# ---------------------------------------------------------------------------- defaults, docs/decisions.md: Think budget


@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
@pytest.mark.parametrize("distil", [False, True], ids=["instruct", "distil"])
def test_default_request_yields_image_after_budget_closes_stages(runs, distil, n_images):
    pipe = runs.pipes[distil]
    sp = pipe.tok.special
    res = runs.default(distil, n_images)
    tr = res.trace

    assert isinstance(res.image, Image.Image) and res.image.mode == "RGB"
    assert res.ratio_index is not None and 0 <= res.ratio_index < len(pipe.builder.resolution)
    assert res.image.size == bucket_wh(pipe, res.ratio_index)
    assert res.image_size == pipe.builder.resolution.get(res.ratio_index)
    assert max(res.image_size) <= 512  # a 256-scale bucket (the seed was picked for it)

    # Think budget (docs/decisions.md): BUDGET sampled tokens inside <think>, then the stage machine's closing tokens
    # (forced
    # transitions included) and the greedy ratio pick, which is the result's ratio.
    sampled = res.generated_ids[:BUDGET]
    assert res.truncated
    assert not {sp.end_think, sp.end_recaption, *sp.ratio} & set(sampled)
    closing = [sp.end_think, sp.recaption, sp.end_recaption, sp.answer, sp.boi, pipe.builder.size_id]
    assert res.generated_ids[BUDGET:] == closing + [sp.ratio[res.ratio_index]]
    cot = [sp.think] + sampled + [sp.end_think, sp.recaption, sp.end_recaption]
    assert res.text == pipe.tok.decode(cot)
    assert res.text.startswith("<think>") and res.text.endswith("</think><recaption></recaption>")

    # the prompts: en_unified from the checkpoint's system_prompt.py, the condition blocks, the CoT ids
    system = unified_system_prompt(pipe)
    assert "multimodal model" in system  # our tiny system_prompt.py, not a built-in text
    layouts = [c.layout for c in tr["conds"]]
    assert len(layouts) == n_images
    text_built = pipe.builder.text_prompt(PROMPT, task="think", system_prompt=system, cond_images=layouts)
    assert tr["text_prompt_ids"] == text_built.token_ids
    image_built = pipe.builder.image_prompt(
        PROMPT, ratio_index=res.ratio_index, system_prompt=system, cond_images=layouts, cot_ids=cot,
        cfg=not distil,
    )
    assert tr["image_prompt_ids"] == image_built.token_ids
    assert res.num_prompt_tokens == len(image_built)
    assert tr["image_prompt_ids"].count(sp.joint_img_sep) == n_images
    for cond, (w, h) in zip(tr["conds"], COND_SIZES):
        assert cond.vae.ratio_index == pipe.builder.resolution.nearest(w, h)[0]
    assert len(tr["step_preds"]) == pipe.defaults.diff_infer_steps


def test_fixed_size_closes_at_end_of_recaption(runs):
    pipe = runs.pipes[False]
    sp = pipe.tok.special
    req = ImageRequest(PROMPT, image_size="256x256", max_new_tokens=BUDGET, seed=0, num_inference_steps=FEW_STEPS)
    res = pipe.generate(req)
    assert res.ratio_index == 16 and res.image_size == (256, 256) and res.image.size == (256, 256)
    assert res.truncated
    assert not {sp.end_think, sp.end_recaption} & set(res.generated_ids[:BUDGET])
    # fixed size: </recaption> ends the phase, no answer prefix and no ratio pick
    assert res.generated_ids[BUDGET:] == [sp.end_think, sp.recaption, sp.end_recaption]
    assert res.text.endswith("</think><recaption></recaption>")


def test_bot_task_image_auto_size_is_one_greedy_ratio_step(runs):
    pipe = runs.pipes[True]
    sp = pipe.tok.special
    res = pipe.generate(ImageRequest(PROMPT, bot_task="image", seed=3, num_inference_steps=FEW_STEPS), trace=True)
    assert res.trace["text_prompt_ids"][-3:] == [sp.answer, sp.boi, pipe.builder.size_id]
    assert len(res.generated_ids) == 1 and res.generated_ids[0] == sp.ratio[res.ratio_index]
    assert res.text == "" and not res.truncated
    assert res.image.size == bucket_wh(pipe, res.ratio_index)
    built = pipe.builder.image_prompt(PROMPT, ratio_index=res.ratio_index, system_prompt=unified_system_prompt(pipe))
    assert res.trace["image_prompt_ids"] == built.token_ids  # no CoT section


@pytest.mark.parametrize(
    "distil, seed, ends_with_eos", [(False, 0, False), (True, 4, True)], ids=["budget", "eos"]
)
def test_bot_task_auto_answers_with_text_only(runs, distil, seed, ends_with_eos):
    pipe = runs.pipes[distil]
    res = pipe.generate(ImageRequest(PROMPT, bot_task="auto", max_new_tokens=BUDGET, seed=seed))
    assert res.image is None and res.ratio_index is None and res.image_size is None
    assert res.text == pipe.tok.decode(res.generated_ids)
    assert 0 < len(res.generated_ids) <= BUDGET
    assert (res.generated_ids[-1] == pipe.tok.special.eos) is ends_with_eos
    assert res.truncated is (not ends_with_eos)
    assert "diffuse" not in res.timings


def test_infer_align_image_size_resizes_to_condition_aspect(runs):
    pipe = runs.pipes[True]
    w0, h0 = COND_SIZES[1]  # 2:1; its bucket 176x336 is 1:1.909, more than 0.01 away in H/W
    req = ImageRequest(PROMPT, images=cond_images(2)[1:], bot_task="image", image_size="176x336", seed=0,
                       infer_align_image_size=True, num_inference_steps=FEW_STEPS)
    res = pipe.generate(req)
    scale = math.sqrt(256**2 / (w0 * h0))
    assert res.image.size == (round(w0 * scale), round(h0 * scale))
    assert res.image_size == (176, 336)


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("distil, n_images", [(False, 0), (True, 0)], ids=["instruct", "distil"])
def test_same_request_is_deterministic_and_seed_matters(runs, distil, n_images):
    pipe = runs.pipes[distil]
    first = runs.default(distil, n_images)
    again = pipe.generate(default_request(distil, n_images), trace=True)
    assert again.generated_ids == first.generated_ids and again.text == first.text
    assert torch.equal(again.trace["final_latents"], first.trace["final_latents"])
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))

    seed = TRUNC_SEEDS[(distil, n_images)] + 100
    other = pipe.generate(default_request(distil, n_images, seed=seed, num_inference_steps=FEW_STEPS), trace=True)
    assert not torch.equal(other.trace["init_latents"], first.trace["init_latents"])
    assert not torch.equal(other.trace["step_latents"][0], first.trace["step_latents"][0])


# ---------------------------------------------------------------------------- docs/decisions.md: KV reuse


@pytest.mark.parametrize("distil, n_images", [(False, 1), (True, 1)], ids=["instruct", "distil"])
def test_diffusion_over_reused_think_kv_equals_full_prefill(runs, distil, n_images):
    pipe = runs.pipes[distil]
    reused = runs.default(distil, n_images)
    fresh = pipe.generate(default_request(distil, n_images), trace=True, reuse_text_kv=False)
    a, b = reused.trace, fresh.trace

    # the reuse path recomputed only what the text phase never ran: its last token (the ratio pick)
    assert a["reused_kv_tokens"] == len(a["text_prompt_ids"]) + len(reused.generated_ids) - 1
    assert a["image_prompt_ids"][: a["reused_kv_tokens"]] == (a["text_prompt_ids"] + reused.generated_ids)[:-1]
    assert b["reused_kv_tokens"] == 0

    assert fresh.generated_ids == reused.generated_ids and b["image_prompt_ids"] == a["image_prompt_ids"]
    assert torch.equal(b["init_latents"], a["init_latents"])
    assert len(a["step_preds"]) == len(b["step_preds"]) == pipe.defaults.diff_infer_steps
    for pa, pb in zip(a["step_preds"], b["step_preds"]):
        assert pa.dtype == torch.float32
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5)
    torch.testing.assert_close(a["final_latents"], b["final_latents"], rtol=0, atol=1e-5)

    # Independently of `reuse_text_kv`: the first denoiser step from token 0 in a fresh cache, built from
    # the generated CoT ids with the public helpers, gives the reuse path's first velocity.
    sp = pipe.tok.special
    cot = [sp.think] + reused.generated_ids[: reused.generated_ids.index(sp.end_recaption) + 1]
    use_cfg = not distil
    built = pipe.builder.image_prompt(
        PROMPT, ratio_index=reused.ratio_index, system_prompt=unified_system_prompt(pipe),
        cond_images=[c.layout for c in a["conds"]], cot_ids=cot, cfg=use_cfg,
    )
    assert built.token_ids == a["image_prompt_ids"]
    kv, pool = pipe.new_cache(2 * len(built))
    rows = [(_Seq(), built, list(built.token_ids))]
    if use_cfg:
        rows.append((_Seq(), built, list(built.uncond_token_ids)))
    sched = FlowMatchSchedule.create(pipe.defaults.diff_infer_steps, pipe.defaults.flow_shift)
    r = float(sched.timesteps_r[0]) if pipe.config.use_meanflow else None
    scale = pipe.defaults.diff_guidance_scale
    g = guidance_value(scale) if pipe.config.cfg_distilled else None
    preds = pipe.denoise(rows, a["conds"], a["init_latents"], float(sched.timesteps[0]), r, g, kv, pool,
                         first_step=True)
    pred = cfg_combine(preds[0], preds[1], scale) if use_cfg else preds[0]
    torch.testing.assert_close(pred, a["step_preds"][0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- validation


def _unreadable() -> bytes:
    return random.Random(0).randbytes(512)


BAD_REQUESTS = [
    (dict(images=[Image.new("RGB", (32, 32))] * 4), "at most 3"),
    (dict(images=[Image.new("RGB", (32, 32)), _unreadable()]), "input image 1 could not be read"),
    (dict(max_new_tokens=0), "max_new_tokens must be positive"),
    (dict(max_new_tokens=-3), "max_new_tokens must be positive"),
    (dict(bot_task="paint"), "unknown bot_task 'paint'"),
    (dict(image_size="abc"), "not 'HxW'"),
    (dict(image_size="0x256"), "positive"),
    (dict(num_inference_steps=0), "num_inference_steps must be positive"),
    (dict(num_inference_steps=-1), "num_inference_steps must be positive"),
    (dict(use_system_prompt="en_klingon"), "unknown use_system_prompt"),
]


@pytest.mark.parametrize("kwargs, match", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_request_is_a_request_error_before_any_work(runs, monkeypatch, kwargs, match):
    pipe = runs.pipes[True]

    def no_work(*args, **kw):
        raise AssertionError("model work started for an invalid request")

    monkeypatch.setattr(pipe.model, "encode_condition_vae", no_work)
    monkeypatch.setattr(pipe.model, "forward", no_work)
    monkeypatch.setattr(pipe, "text_phase", no_work)
    with pytest.raises(RequestError, match=match):
        pipe.generate(ImageRequest(PROMPT, **kwargs))


# ---------------------------------------------------------------------------- bf16


def test_bf16_load_generates_with_fp32_router_and_vae(tiny_ckpts):
    pipe = HunyuanImage3Pipeline.from_pretrained(tiny_ckpts[True], dtype=torch.bfloat16)
    model = pipe.model
    assert model.dtype == torch.bfloat16
    routers = [(n, p) for n, p in model.named_parameters() if keep_fp32_param(n)]
    assert routers and all(p.dtype == torch.float32 for _, p in routers)
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    assert model.lm_head.weight.dtype == torch.bfloat16

    res = pipe.generate(default_request(True, 1, image_size="256x256", num_inference_steps=FEW_STEPS), trace=True)
    assert isinstance(res.image, Image.Image) and res.image.size == (256, 256)
    assert res.truncated and res.text.startswith("<think>")
    assert torch.isfinite(res.trace["final_latents"]).all()
    assert res.trace["final_latents"].dtype == torch.float32
