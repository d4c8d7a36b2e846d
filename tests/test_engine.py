"""The engine core on the tiny model: batch invariance, golden generations, no leaks, prefix caching."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffgentor.engine.models.hunyuan_image_3.reference_pipeline import HunyuanImage3Pipeline, ImageRequest
from diffgentor.engine.offline import Engine
from diffgentor.engine.request import FinishReason
from diffgentor.engine.testing.tiny_model import make_tiny


@pytest.fixture(scope="module")
def tiny_distil(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.Distil-3.0", distil=True)


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-instruct", distil=False)


def _engine(path, **kw) -> Engine:
    args = dict(num_kv_blocks=768, device="cpu", dtype="float32", max_num_seqs=16, max_num_batched_tokens=4096)
    args.update(kw)
    return Engine.from_pretrained(path, environ={}, **args)


def _img(h: int, w: int, seed: int) -> bytes:
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mixed_requests() -> list[dict]:
    """8 requests mixing bot_tasks, sizes, 0-3 condition images and seeds."""
    base = dict(max_new_tokens=6, num_inference_steps=3, output_type="latent")
    imgs = [_img(64, 96, 1), _img(112, 48, 2), _img(80, 80, 3)]
    specs = [
        dict(bot_task="think_recaption", image_size="256x256", images=imgs[:1], seed=1),
        dict(bot_task="recaption", image_size="208x304", images=imgs[:2], seed=2),
        dict(bot_task="image", image_size="256x256", images=[], seed=3),
        dict(bot_task="image", image_size="auto", images=imgs[1:2], seed=4),
        dict(bot_task="think_recaption", image_size="256x256", images=imgs, seed=5),
        dict(bot_task="auto", images=imgs[2:], seed=6),
        dict(bot_task="image", image_size="352x160", images=imgs[:3], seed=7),
        dict(bot_task="recaption", image_size="256x256", images=[], seed=8),
    ]
    return [dict(request_id=f"r{i}", prompt=f"make variant {i} of this", infer_align_image_size=False, **base, **s)
            for i, s in enumerate(specs)]


def _assert_same(a, b) -> None:
    assert a.finish_reason == b.finish_reason, (a.request_id, a.error, b.error)
    assert a.generated_ids == b.generated_ids, a.request_id
    if a.latents is not None or b.latents is not None:
        assert torch.allclose(a.latents, b.latents, atol=1e-4, rtol=0), (a.request_id,
                                                                         (a.latents - b.latents).abs().max())


def test_batch_invariance(tiny_distil):
    reqs = _mixed_requests()
    eng = _engine(tiny_distil)
    batched = eng.generate(reqs)
    assert all(r.error is None for r in batched), [r.error for r in batched]
    assert {r.finish_reason for r in batched} == {FinishReason.IMAGE, FinishReason.TEXT} or \
        {r.finish_reason for r in batched} == {FinishReason.IMAGE, FinishReason.LENGTH}
    alone_engine = _engine(tiny_distil, enable_prefix_caching=False)
    for req, got in zip(reqs, batched):
        (alone,) = alone_engine.generate([req])
        _assert_same(got, alone)
    assert eng.core.kv.num_free_blocks == eng.core.kv.num_blocks
    assert eng.core.stats.steps < sum(1 for _ in reqs) * 6  # they really ran together


def test_cfg_rows_batch_invariance(tiny_instruct):
    reqs = _mixed_requests()[:4]
    eng = _engine(tiny_instruct)
    batched = eng.generate(reqs)
    for req, got in zip(reqs, batched):
        (alone,) = _engine(tiny_instruct).generate([req])
        _assert_same(got, alone)


def test_engine_matches_reference_pipeline_with_full_reprefill(tiny_distil):
    """Diffusion over the think phase's KV (engine) equals a fresh full prefill of the same sequence."""
    img = _img(64, 96, 11)
    eng = _engine(tiny_distil)
    (res,) = eng.generate([dict(prompt="add a moon", images=[img], seed=5, max_new_tokens=8, num_inference_steps=3,
                                image_size="256x256", infer_align_image_size=False, output_type="latent")])
    pipe = HunyuanImage3Pipeline.from_pretrained(tiny_distil)
    ref = pipe.generate(ImageRequest(prompt="add a moon", images=[img], seed=5, max_new_tokens=8,
                                     num_inference_steps=3, image_size="256x256"), trace=True, reuse_text_kv=False)
    assert res.generated_ids == ref.generated_ids
    assert torch.allclose(res.latents, ref.trace["final_latents"], atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny_distil"])
def test_golden_whole_generation_through_engine(golden_root, name):
    gdir = golden_root / name
    manifest = json.loads((gdir / "manifest.json").read_text())["files"]
    key = "image_gen.safetensors" if name == "tiny" else "gen.safetensors"
    entry = manifest[key]
    golden = load_file(str(gdir / key))
    images = []
    system = None
    if name == "tiny_distil":
        images = [(gdir / f).read_bytes() for f in ("cond0_64x96.png", "cond1_112x48.png")]
        text = entry["decoded_collapsed"][len("<|startoftext|>"):]
        system = text[: text.index("\n\nUser: ")]
    eng = _engine(gdir / "checkpoint")
    (res,) = eng.generate([dict(
        prompt=entry["prompt"], images=images, seed=entry["seed"], image_size="256x256", bot_task="image",
        use_system_prompt="custom" if system else "None", system_prompt=system,
        num_inference_steps=entry["steps"], guidance_scale=entry["guidance_scale"], infer_align_image_size=False,
    )])
    assert res.error is None
    assert (res.latents - golden["final_latents"][0]).abs().max() < 1e-4
    diff = np.abs(np.asarray(res.image).astype(int) - golden["image_uint8_hwc"].numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).sum() < 64


def test_no_leaks_with_finished_aborted_failed_and_preempted(tiny_distil, monkeypatch):
    # few blocks: the requests cannot all hold their KV at once, so some get preempted
    eng = _engine(tiny_distil, num_kv_blocks=100, max_num_batched_tokens=512)
    core = eng.core
    reqs = [eng.make_request(r) for r in _mixed_requests()]
    bad = eng.make_request(dict(request_id="bad", prompt="x", images=[b"not an image"]))
    eng.add_request(bad)
    for r in reqs:
        eng.add_request(r)
    assert core.kv.num_free_blocks == core.kv.num_blocks  # nothing scheduled yet
    first = core.step()
    assert [e.kind for e in first.events if e.request_id == "bad"] == ["error"]  # refused, reported by the step
    assert first.finished["bad"].finish_reason == FinishReason.ERROR
    # a request that fails inside the worker must fail alone
    real = core.executor.worker.runner._run

    def flaky(chunks, step_of):
        if any(c.request_id == "r1" for _, c in chunks):
            raise RuntimeError("injected failure")
        return real(chunks, step_of)

    monkeypatch.setattr(core.executor.worker.runner, "_run", flaky)
    results = {}
    for _ in range(2):
        results.update(core.step().finished)
    core.abort("r7")
    while core.has_unfinished_requests():  # the last iteration hands the finished ids to the worker
        results.update(core.step().finished)
    assert set(results) == {r.request_id for r in reqs}
    assert results["r1"].finish_reason == FinishReason.ERROR and "injected" in results["r1"].error
    assert results["r7"].finish_reason == FinishReason.ABORT
    ok = [r for rid, r in results.items() if rid not in ("r1", "r7")]
    assert all(r.finish_reason in (FinishReason.IMAGE, FinishReason.TEXT, FinishReason.LENGTH) for r in ok)
    assert core.scheduler.num_preemptions > 0
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert all(c == 0 for c in core.kv.pool.ref_cnt)
    assert core.requests == {} and core.executor.worker.runner.requests == {}


def test_prefix_cache_computes_shared_system_prompt_once(tiny_distil):
    eng = _engine(tiny_distil, max_num_seqs=4)
    reqs = [dict(prompt=f"a red cube number {i}", bot_task="image", image_size="256x256", seed=i,
                 use_system_prompt="en_unified", num_inference_steps=1, output_type="latent") for i in range(16)]
    results = eng.generate(reqs)
    assert all(r.finish_reason == FinishReason.IMAGE for r in results)
    stats = eng.core.kv.stats
    system_tokens = len(eng.core.ctx.tokenizer.encode(eng.core.ctx.system_prompts.resolve("en_unified", "image")))
    shared_blocks = system_tokens // eng.core.config.cache.block_size
    assert shared_blocks >= 1
    assert stats.hits >= 15 * shared_blocks * eng.core.config.cache.block_size
    # computed once: prefill tokens fall well short of 16 full prompts
    assert eng.core.stats.phase_tokens["prefill"] < 16 * results[0].num_prompt_tokens - 15 * system_tokens // 2


def test_bad_requests_get_clear_errors(tiny_distil):
    eng = _engine(tiny_distil)
    img = _img(32, 32, 0)
    bad = [
        dict(prompt="x", images=[img] * 4),
        dict(prompt="x", images=[b"\x89PNG garbage"]),
        dict(prompt="x", max_new_tokens=0),
        dict(prompt="x", bot_task="dance"),
        dict(prompt="x", image_size="12x"),
        dict(prompt="x", num_inference_steps=0),
        dict(prompt=""),
    ]
    results = eng.generate(bad + [dict(prompt="fine", bot_task="image", image_size="256x256",
                                       num_inference_steps=1, output_type="latent")])
    for r in results[:-1]:
        assert r.finish_reason == FinishReason.ERROR and r.error
    assert results[-1].finish_reason == FinishReason.IMAGE
    assert eng.core.kv.num_free_blocks == eng.core.kv.num_blocks
    (bad_type,) = eng.generate([dict(prompt="x", output_type="jpeg")])
    assert "output_type" in bad_type.error


def test_stream_yields_text_then_image(tiny_distil):
    eng = _engine(tiny_distil)
    events = list(eng.stream([dict(request_id="s", prompt="a cat", bot_task="think_recaption",
                                   image_size="256x256", max_new_tokens=5, num_inference_steps=1)]))
    kinds = [e.kind for e in events]
    assert kinds[-2:] == ["image", "finished"]
    assert "text" in kinds and kinds.index("text") < kinds.index("image")
    image = events[-2].image
    assert isinstance(image, Image.Image) and image.size == (256, 256) and image.mode == "RGB"


def test_taylor_cache_skips_backbone_steps(tiny_distil):
    eng = _engine(tiny_distil)
    base = dict(prompt="a cat", bot_task="image", image_size="256x256", num_inference_steps=8, seed=3,
                output_type="latent")
    (plain,) = eng.generate([base])
    full_tokens = eng.core.stats.phase_tokens["diffuse"]
    eng.core.stats = type(eng.core.stats)()
    (cached,) = eng.generate([{**base, "use_taylor_cache": True}])
    assert cached.error is None and cached.latents is not None
    # default interval 5: the backbone runs at steps 0 and 5 only
    assert eng.core.stats.phase_tokens["diffuse"] == 2 * full_tokens // 8
    rel = (cached.latents - plain.latents).norm() / plain.latents.norm()
    assert 0 < rel < 1.0


def test_chunked_prefill_equals_one_shot(tiny_distil):
    req = dict(request_id="a", prompt="add a moon", images=[_img(64, 96, 0)], seed=9, max_new_tokens=6,
               image_size="256x256", num_inference_steps=2, output_type="latent")
    results = []
    for budget in (4096, 96):
        eng = _engine(tiny_distil, num_kv_blocks=256, max_num_batched_tokens=budget)
        (res,) = eng.generate([dict(req)])
        assert res.error is None
        results.append((res, eng.core.stats.steps))
    (a, steps_a), (b, steps_b) = results
    assert steps_b > steps_a  # the small budget really chunked the prompt
    assert a.generated_ids == b.generated_ids
    assert torch.allclose(a.latents, b.latents, atol=1e-4)


def test_shared_condition_image_is_encoded_once_and_each_request_keeps_its_own_draw(tiny_distil):
    """Two edits of one photo with different seeds, batched with a text-to-image request: one encode, and each edit
    equals the same edit run alone (its own seeded posterior sample, not the other's)."""
    photo = _img(96, 128, 5)
    base = dict(prompt="make it night", images=[photo], bot_task="think_recaption", image_size="256x256",
                max_new_tokens=5, num_inference_steps=2, output_type="latent")
    reqs = [dict(base, request_id="e1", seed=1), dict(base, request_id="e2", seed=2),
            dict(request_id="t", prompt="a cat", bot_task="think_recaption", image_size="256x256",
                 max_new_tokens=5, num_inference_steps=2, output_type="latent", seed=3)]
    eng = _engine(tiny_distil, max_num_encoder_pixels=1)
    together = {r.request_id: r for r in eng.generate(reqs)}
    enc = eng.core.scheduler.encoder_cache.stats
    assert (enc.misses, enc.hits) == (1, 1)
    for r in reqs[1:2]:  # e2: served by e1's encode
        (alone,) = _engine(tiny_distil).generate([r])
        got = together[r["request_id"]]
        assert got.generated_ids == alone.generated_ids
        assert torch.allclose(got.latents, alone.latents, atol=1e-4)
    assert not torch.allclose(together["e1"].latents, together["e2"].latents, atol=1e-3)


def test_progressive_previews_leave_the_final_image_unchanged(tiny_distil):
    req = dict(prompt="a red cube", bot_task="image", image_size="256x256", num_inference_steps=4, seed=11)
    eng = _engine(tiny_distil, enable_prefix_caching=False)  # a prefix-cache hit would change the numerics slightly
    plain = [e for e in eng.stream([dict(req, request_id="plain")]) if e.kind == "image"]
    events = list(eng.stream([dict(req, request_id="prev", partial_images=2)]))
    kinds = [e.kind for e in events]
    assert kinds == ["partial_image", "partial_image", "image", "finished"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    previews = [np.asarray(e.image) for e in events[:2]]
    final = np.asarray(events[2].image)
    assert previews[0].shape == final.shape and not np.array_equal(previews[0], previews[1])
    assert np.array_equal(final, np.asarray(plain[0].image))


def test_request_whose_image_phase_cannot_fit_is_refused_up_front(tiny_distil):
    """A prompt that fits the text phase, but whose image phase (the prompt again plus the smallest image) cannot fit
    the model's positions: refused at admission with 400, before any step, instead of thinking first and failing at
    the phase switch. A request whose generated text makes the image phase too long fails there with 400, not 500
    (schemathesis found the 500)."""
    from diffgentor.engine.request_contract import RequestError
    from diffgentor.engine.request_state import build_request_state

    eng = _engine(tiny_distil)
    ctx = eng.core.ctx

    def verdict(k: int) -> str:
        req = eng.make_request(dict(request_id=f"k{k}", prompt="x " * k, bot_task="think_recaption", max_new_tokens=4))
        try:
            build_request_state(ctx, req)
        except RequestError as e:
            return "image" if "image phase needs" in str(e) else "text"  # else: the prompt alone is too long
        return "ok"

    lo, hi = 1, 16384  # 16384 "x " need ~33k positions: refused for the text phase already
    assert verdict(lo) == "ok" and verdict(hi) == "text"
    while hi - lo > 1:  # the shortest prompt the text phase refuses
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if verdict(mid) != "text" else (lo, mid)
    assert verdict(lo) == "image", "the image phase (prompt + smallest image) should not fit just below the text limit"
    eng.add_request(dict(request_id="big", prompt="x " * lo, bot_task="think_recaption",
                         max_new_tokens=4))
    assert not eng.core.requests  # refused: never queued
    events = eng.core.step().events
    assert [(e.kind, e.status) for e in events] == [("error", 400)], events
    assert "image phase needs at least" in events[0].error
    assert eng.core.kv.num_free_blocks == eng.core.kv.num_blocks and not eng.core.has_unfinished_requests()
    # the same prompt as a text-only request never enters the image phase: not refused for it
    req = eng.make_request(dict(request_id="t", prompt="x " * lo, bot_task="auto", max_new_tokens=2))
    build_request_state(ctx, req)


def test_one_loop_one_output_channel(tiny_distil):
    """Every driver is `while core.has_unfinished_requests(): core.step()`: each step returns one EngineCoreOutputs
    (a refusal made at add time included), and a finished request's worker-side state is released by the next plan
    that same loop runs (no separate release call)."""
    eng = _engine(tiny_distil)
    core = eng.core
    plans = []
    execute = core.executor.execute_model
    core.executor.execute_model = lambda plan: (plans.append(plan), execute(plan))[1]
    eng.add_request(dict(request_id="ok", prompt="a cube", bot_task="image", seed=1,
                         image_size="256x256", num_inference_steps=1, output_type="latent"))
    eng.add_request(dict(request_id="bad", prompt="x", images=[b"not an image"]))
    outputs = []
    while core.has_unfinished_requests():
        outputs.append(core.step())
    assert [e.kind for e in outputs[0].events if e.request_id == "bad"] == ["error"]
    finished = {rid: res for o in outputs for rid, res in o.finished.items()}
    assert finished["bad"].finish_reason == FinishReason.ERROR
    assert finished["ok"].finish_reason == FinishReason.IMAGE and finished["ok"].latents is not None
    ended = next(i for i, o in enumerate(outputs) if "ok" in o.finished)
    assert plans[-1].finished_request_ids == ["ok"] and not plans[-1].has_model_work
    assert len(outputs) == ended + 2  # one more iteration released it
    assert core.executor.worker.runner.requests == {}


def _queued(path, reqs: list[dict]):
    """An engine with `reqs` added to its core, stepped by the test."""
    eng = _engine(path)
    for r in reqs:
        eng.add_request(r)
    return eng, eng.core


def _hold(monkeypatch, module, name: str):
    """Hold `module.name` (a stage's encode or decode function) until the returned event is set."""
    import threading

    gate = threading.Event()
    real = getattr(module, name)

    def held(*args):
        gate.wait(timeout=120)
        return real(*args)

    monkeypatch.setattr(module, name, held)
    return gate


def test_latency_first_setting_changes_no_result(tiny_distil):
    """`--encode-defer-ms --max-num-image-tokens 1 --no-async-decode` (docs/decisions.md, "Latency first") only moves
    when work runs: edits and text-to-image requests give what the default settings give."""
    reqs = _mixed_requests()[:4]
    want = _engine(tiny_distil).generate(reqs)
    got = _engine(tiny_distil, encode_defer_ms=60_000, max_num_image_tokens=1, async_decode=False).generate(reqs)
    for a, b in zip(got, want):
        _assert_same(a, b)


def test_encodes_in_flight_change_no_result(tiny_distil, monkeypatch):
    """The encode thread is held for several steps while the requests without images think and denoise: no
    request with images is admitted before its encode is reported, the step runs on the cores the encode thread
    leaves, and every result equals the one with inline encodes (each posterior drawn from its own generator)."""
    from diffgentor.engine import encode_stage

    gate = _hold(monkeypatch, encode_stage, "encode_groups")
    reqs = _mixed_requests()[:5]  # four with images, one without
    eng, core = _queued(tiny_distil, reqs)
    stage = core.executor.worker.runner.encodes
    finished = {}
    for _ in range(4):
        finished.update(core.step().finished)
        assert core.snapshot().num_encoding > 0 and stage.num_pending > 0
        assert torch.get_num_threads() == max(1, stage.total_threads - encode_stage.BACKGROUND_THREADS)
        assert {st.request_id for st in core.scheduler.running} <= {"r2"}  # the one without images
        assert all(not core.requests[f"r{i}"].status.admitted for i in (0, 1, 3, 4))  # never before the encode
    assert core.stats.tokens > 0  # they stepped meanwhile
    gate.set()
    while core.has_unfinished_requests():
        finished.update(core.step().finished)
    assert all(res.error is None for res in finished.values())
    assert torch.get_num_threads() == stage.total_threads  # the step has every core back
    inline = _engine(tiny_distil, async_encode=False).generate(reqs)
    for req, want in zip(reqs, inline):
        _assert_same(finished[req["request_id"]], want)
    eng.close()


def test_decodes_in_flight_change_no_image_and_aborts_drop_theirs(tiny_distil, monkeypatch):
    """The decode thread is held while other requests think and denoise: a request whose decode is in flight is not
    finished (its image comes from a later step), the steps go on meanwhile, an aborted request's decode ends
    without an image, and every image (previews included) equals the one decoded inside the step."""
    from diffgentor.engine import decode_stage

    gate = _hold(monkeypatch, decode_stage, "decode_groups")
    base = dict(infer_align_image_size=False, bot_task="image", image_size="256x256", num_inference_steps=2)
    reqs = [dict(request_id="first", prompt="a red cube", seed=1, **base),
            dict(request_id="aborted", prompt="a blue cube", seed=2, **base),
            dict(request_id="thinker", prompt="a green cube", seed=3, **{
                **base, "bot_task": "think_recaption", "max_new_tokens": 24, "num_inference_steps": 3,
                "partial_images": 1}),
            dict(request_id="edit", prompt="make it purple", seed=4, images=[_img(64, 96, 1)], **base)]
    eng, core = _queued(tiny_distil, reqs)
    stage = core.executor.worker.runner.decodes
    finished = eng.results  # each step through the offline frontend's output processing (text, images)
    while not stage.num_pending:
        eng.process_outputs(core.step())
    core.abort("aborted")
    tokens = core.stats.tokens
    for _ in range(4):
        eng.process_outputs(core.step())
        assert "first" not in finished and core.scheduler.num_decoding > 0
        assert core.snapshot().num_decoding == core.scheduler.num_decoding  # the decode queue /metrics shows
    assert core.stats.tokens > tokens  # the others stepped meanwhile
    gate.set()
    events = []
    while core.has_unfinished_requests():
        events += eng.process_outputs(core.step())
    assert finished["aborted"].finish_reason == FinishReason.ABORT
    assert not any(e.request_id == "aborted" and e.kind == "image" for e in events)
    assert core.executor.worker.runner.requests == {} and core.scheduler.num_decoding == 0
    previews = [e.image for e in events if e.kind == "partial_image"]
    eng.close()
    want = {r.request_id: r for r in _engine(tiny_distil, async_decode=False).generate(
        [r for r in reqs if r["request_id"] != "aborted"])}
    for rid, res in want.items():
        assert finished[rid].error is None, finished[rid].error
        _assert_same(finished[rid], res)
        a, b = np.asarray(finished[rid].image, np.int16), np.asarray(res.image, np.int16)
        if torch.equal(finished[rid].latents, res.latents):  # same latents: the very same pixels
            assert np.array_equal(a, b), rid
        else:  # another batch (no aborted request) moved the latents by float rounding only
            assert np.abs(a - b).max() <= 1, rid
    assert len(previews) == 1


def _collect_background_work(runner, alive: set[str]):
    """Wait for the encode / decode threads as a step with nothing else to run does, until an encode is reported."""
    from diffgentor.engine.decode_stage import wait_for_vae
    from diffgentor.engine.scheduler_output import RunnerOutput

    out = RunnerOutput()
    for _ in range(10):
        if out.encoded:
            break
        wait_for_vae(runner.encodes, runner.decodes)
        runner.encodes.collect(runner.encoder_cache, out)
        runner.decodes.collect(out, alive)
    return out


def test_background_vae_threads_keep_one_thread_and_an_idle_step_decodes_inline(tiny_distil):
    """CPU: the encode and decode threads run every module with a team of one, also while the step only waits for
    them (a larger team would throttle the step's OpenMP team for the rest of the process: docs/decisions.md,
    "Background VAE threads run one thread each"); a lone request's final decode, with nothing else to run and no
    VAE work in flight, runs on the step's thread with every core."""
    import threading

    from diffgentor.engine.encode_stage import BACKGROUND_THREADS

    assert BACKGROUND_THREADS == 1
    eng = _engine(tiny_distil)
    runner = eng.core.executor.worker.runner
    seen = []  # (thread name, intra-op team) before each VAE module
    for part in (runner.model.vae.encoder, runner.model.vae.decoder):
        part.register_forward_pre_hook(lambda m, a: seen.append((threading.current_thread().name,
                                                                  torch.get_num_threads())))
    total = torch.get_num_threads()
    res = eng.generate([dict(prompt="a red cube", image_size="256x256", seed=5, num_inference_steps=2)])
    assert res[0].error is None and seen and all(n == total for name, n in seen)
    assert {name for name, _ in seen} == {threading.current_thread().name}  # inline, on every core
    seen.clear()
    reqs = [dict(r, output_type="pil") for r in _mixed_requests()[:3:2]]  # an edit and a text-to-image request
    assert all(r.error is None for r in eng.generate(reqs))
    background = [n for name, n in seen if name.startswith("diffgentor-")]
    assert background and set(background) == {1}
    assert torch.get_num_threads() == total  # the step's team is whole again
    eng.close()


def test_an_encode_pauses_while_a_decode_is_in_flight(tiny_distil):
    """CPU: the decode of a finished image has the background cores before a queued request's encode (the encode
    thread waits at its next module while a decode runs), and goes on once the decode has ended."""
    import threading

    from diffgentor.engine.decode_stage import DecodeJob
    from diffgentor.engine.request_state import build_request_state
    from diffgentor.engine.scheduler_output import FINAL_IMAGE

    eng = _engine(tiny_distil)
    runner = eng.core.executor.worker.runner
    calls = []
    release = threading.Event()

    def hold(m, a):
        calls.append("decode")
        release.wait(timeout=120)

    runner.model.vae.encoder.register_forward_pre_hook(lambda m, a: calls.append("encode"))
    runner.model.vae.decoder.register_forward_pre_hook(hold)
    st = build_request_state(eng.core.ctx, eng.make_request(
        dict(request_id="e", prompt="x", images=[_img(64, 96, 1)], image_size="256x256")))
    runner.decodes.submit([DecodeJob(("t", FINAL_IMAGE), torch.zeros(runner.config.latent_channels, 2, 2))])
    for _ in range(1000):
        if calls:
            break
        time.sleep(0.01)
    runner.encodes.submit(st.encoder_inputs)
    time.sleep(1.0)
    assert calls == ["decode"]  # the encode waits before its first encoder module
    release.set()
    out = _collect_background_work(runner, alive={"t"})
    assert calls == ["decode", "encode"] and out.decoded == [("t", FINAL_IMAGE)] and "t" in out.images
    assert st.encoder_inputs[0].key in out.encoded
    eng.close()


def test_step_time_target_chunks_prefill_and_changes_no_result(tiny_distil):
    """`max_step_ms` far below a prefill's measured cost: the core's estimate (engine/step_cost.py) caps the steps'
    tokens, so the edit's prompt is chunked beside the other request's steps, and every result is the same."""
    reqs = [dict(request_id="t", prompt="a red cube", seed=3, max_new_tokens=8, image_size="256x256",
                 bot_task="think_recaption", num_inference_steps=2, output_type="latent"),
            dict(request_id="e", prompt="add a moon", images=[_img(64, 96, 0)], seed=9, max_new_tokens=6,
                 image_size="256x256", num_inference_steps=2, output_type="latent")]
    runs = []
    for target in (None, 0.001):
        eng = _engine(tiny_distil, num_kv_blocks=256, max_step_ms=target)
        core = eng.core
        eng.add_request(reqs[0])
        finished = dict(core.step().finished)  # measured: the first prefill gives the estimate
        eng.add_request(reqs[1])
        most = 0
        while core.has_unfinished_requests():
            most = max(most, core.scheduler.step_token_budget())
            finished.update(core.step().finished)
        runs.append((finished, core.stats.steps, most))
        eng.close()
    (free, steps_free, _), (capped, steps_capped, budget) = runs
    assert budget < 4096 and steps_capped > steps_free  # the target bound and chunked the prompt
    for rid in ("t", "e"):
        _assert_same(capped[rid], free[rid])
