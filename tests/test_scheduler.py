"""The scheduler on its own, driven with fake worker outputs (no model): admission, budgets, image-block
atomicity, the encoder stage, preemption, prefix caching, CFG rows, aborts in every phase, and no leaks.

Requests are real `RequestState`s built from a tiny checkpoint's metadata (config, tokenizer, prompts; no weights),
so every layout rule is the engine's own. The fake worker answers each plan the way `ModelRunner.execute` would:
a token for every sampled chunk (forced / ratio tokens as the stage machine asks), one finished denoising step per
diffusion step, an image per VAE decode, bytes per encode.
"""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from PIL import Image

from diffgentor.engine import scheduler as scheduler_module
from diffgentor.engine.cfg_groups import GroupedKVCacheManager
from diffgentor.engine.config import SchedulerConfig
from diffgentor.engine.input_processor import load_processor_context
from diffgentor.engine.kv_cache_manager import KVCacheManager
from diffgentor.engine.request import FinishReason, GenerationRequest, RequestStatus
from diffgentor.engine.request_state import build_request_state
from diffgentor.engine.scheduler import TRANSITIONS, IllegalTransition, Scheduler, chunk_end, move
from diffgentor.engine.scheduler_output import FINAL_IMAGE, RunnerOutput, SchedulerOutput
from diffgentor.engine.testing.tiny_model import write_tiny_metadata
from diffgentor.engine.vae_budget import VaeBudget

SPANS = [(10, 20), (30, 50)]
ENC_BYTES = 1000


# ------------------------------------------------------------------------------------------------ chunk_end
def test_chunk_end_stops_before_a_span_that_does_not_fit():
    assert chunk_end(0, 100, 15, SPANS) == 10
    assert chunk_end(0, 100, 25, SPANS) == 25  # span (10, 20) fits whole
    assert chunk_end(20, 100, 15, SPANS) == 30


def test_chunk_end_returns_start_when_a_span_at_start_does_not_fit():
    assert chunk_end(10, 100, 5, SPANS) == 10
    assert chunk_end(30, 100, 10, SPANS) == 30


def test_chunk_end_finishes_a_span_it_is_inside():
    # prefix caching may resume inside a block: the rest of the block must run in one go
    assert chunk_end(15, 100, 2, SPANS) == 20
    assert chunk_end(35, 100, 1, SPANS) == 50


def test_chunk_end_respects_target_and_budget():
    assert chunk_end(50, 60, 100, SPANS) == 60
    assert chunk_end(0, 8, 100, SPANS) == 8
    assert chunk_end(0, 100, 0, SPANS) == 0


# ------------------------------------------------------------------------------------------------ harness
@pytest.fixture(scope="module")
def ctx_distil(tmp_path_factory):
    return load_processor_context(write_tiny_metadata(tmp_path_factory.mktemp("meta") / "tiny-distil", distil=True))


@pytest.fixture(scope="module")
def ctx_instruct(tmp_path_factory):
    return load_processor_context(write_tiny_metadata(tmp_path_factory.mktemp("meta") / "tiny-instruct"))


def png(h: int, w: int, seed: int) -> bytes:
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


IMG_A, IMG_B, IMG_C = png(64, 96, 1), png(96, 64, 2), png(80, 80, 3)


class Harness:
    """A scheduler plus a fake worker; `step()` is one schedule -> execute -> update_from_output round."""

    def __init__(self, ctx, num_blocks=512, block_size=16, max_num_seqs=8, max_tokens=4096,
                 encoder_pixels=1 << 20, encoder_bytes=1 << 20, prefix_caching=True, ratio_pick: int = 0,
                 ratio_in_text: bool = False, image_tokens: int | None = None, vae_budget: VaeBudget | None = None,
                 encode_delay: int = 0, cfg_groups: int = 1, decode_delay: int = 0, image_cost=None,
                 encode_defer_ms: float | None = None):
        self.ctx = ctx
        # the fake worker reports an encode this many steps after the step that scheduled it (0: the same step, as
        # inline encodes do); a step that only waits for encodes gets the oldest one (engine/encode_stage.py)
        self.encode_delay = encode_delay
        self.encoding: dict = {}  # key -> steps left before the fake worker reports it
        # likewise for VAE decodes (engine/decode_stage.py): key -> [steps left, request id, preview index]
        self.decode_delay = decode_delay
        self.decoding: dict = {}
        self.ratio_pick = ratio_pick  # which offered ratio token the fake model picks (0: the first, -1: the last)
        # the fake model ends free text (think/recaption) at once with the largest ratio token it may sample
        self.ratio_in_text = ratio_in_text
        self.ratio_tokens = list(ctx.tokenizer.special.ratio)
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching) if cfg_groups == 1 else \
            GroupedKVCacheManager(cfg_groups, num_blocks, block_size, prefix_caching)
        config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens,
                                 max_num_image_tokens=image_tokens, max_num_encoder_pixels=encoder_pixels,
                                 async_encode=encode_delay > 0, encode_defer_ms=encode_defer_ms)
        self.sched = Scheduler(config, self.kv, ctx.request_logic, encoder_bytes, vae_budget, cfg_groups,
                               image_cost=image_cost)
        self.worker_encoded: set = set()  # what a real worker would hold in its encoder cache
        self.worker_requests: set[str] = set()
        self.plans: list[SchedulerOutput] = []
        self.outputs = []
        self.text_token = ctx.tokenizer.encode("a")[0]

    def add(self, rid: str, **kw) -> None:
        kw.setdefault("prompt", f"request {rid}")
        kw.setdefault("max_new_tokens", 3)
        kw.setdefault("num_inference_steps", 2)
        kw.setdefault("seed", 7)
        self.sched.add_request(build_request_state(self.ctx, GenerationRequest(request_id=rid, **kw)))

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        for rid in plan.finished_request_ids:
            self.worker_requests.discard(rid)
        for key in plan.encoder_evictions:
            self.worker_encoded.discard(key)
        for e in plan.encoder_inputs:
            assert e.key not in self.encoding and e.key not in self.worker_encoded, "encoded twice"
            self.encoding[e.key] = self.encode_delay
        if plan.wait_for_vae:
            assert (self.encoding or self.decoding) and not (plan.chunks or plan.new_requests or plan.vae_decodes)
            if self.encoding:
                self.encoding[next(iter(self.encoding))] = 0
            else:
                self.decoding[next(iter(self.decoding))] = 0
        for key, left in list(self.encoding.items()):
            if left <= 0:
                del self.encoding[key]
                self.worker_encoded.add(key)
                out.encoded[key] = ENC_BYTES
            else:
                self.encoding[key] = left - 1
        for new in plan.new_requests:
            assert all(k in self.worker_encoded for k in new.cond_keys), "admitted before its images were encoded"
            self.worker_requests.add(new.request_id)
        for c in plan.chunks:
            assert c.request_id in self.worker_requests
            if c.sample is not None:
                spec = c.sample
                tok = spec.forced_token if spec.forced_token is not None else (
                    spec.ratio_ids[self.ratio_pick] if spec.ratio_ids else self.text_token)
                if self.ratio_in_text and spec.forced_token is None and not spec.ratio_ids:
                    tok = [t for t in self.ratio_tokens if t not in (spec.banned_ids or ())][-1]
                out.sampled_tokens[c.request_id] = tok
        for d in plan.diffusion_steps:
            out.diffusion_steps_done[d.request_id] = d.step
            if d.preview_index is not None:
                self.decoding[(d.request_id, d.preview_index)] = self.decode_delay
        for rid in plan.vae_decodes:
            assert (rid, FINAL_IMAGE) not in self.decoding, "decoded twice"
            self.decoding[(rid, FINAL_IMAGE)] = self.decode_delay
        for key, left in list(self.decoding.items()):
            if left > 0:
                self.decoding[key] = left - 1
                continue
            del self.decoding[key]
            out.decoded.append(key)
            rid, index = key
            if rid not in self.worker_requests:
                continue  # finished meanwhile (aborted): the image is dropped
            if index == FINAL_IMAGE:
                out.images[rid] = np.zeros((4, 4, 3), np.uint8)
            else:
                out.partial_images[rid] = (index, np.zeros((4, 4, 3), np.uint8))
        return out

    def step(self):
        plan = self.sched.schedule()
        self.check_plan(plan)
        self.plans.append(plan)
        if not plan.has_model_work:
            self.execute(plan)
            outs = self.sched.unschedulable()
        else:
            outs = self.sched.update_from_output(plan, self.execute(plan))
        self.outputs += outs
        return plan, outs

    def check_plan(self, plan: SchedulerOutput) -> None:
        budget = self.sched.config.max_num_batched_tokens
        for c in plan.chunks:
            for a, b in c.layout.full_attn_spans:  # an image block is never split (a chunk may start inside one
                # only where the prefix cache served its first whole blocks, and then finishes it)
                assert not (a < c.end < b), (c.start, c.end, a, b)
        if len(plan.chunks) > 1:  # over budget only when one indivisible chunk needed it
            assert plan.num_tokens <= budget or any(c.diffusion for c in plan.chunks) or any(
                any(a <= c.start < b for a, b in c.layout.full_attn_spans) for c in plan.chunks)
        assert len(self.sched.running) <= self.sched.config.max_num_seqs

    def run(self, max_steps=500):
        for _ in range(max_steps):  # the engine core's loop; the last step hands the finished ids to the worker
            if not self.sched.has_requests():
                break
            self.step()
        assert not self.sched.has_requests(), "did not finish"
        assert not self.worker_requests

    def finished(self) -> dict[str, FinishReason]:
        return {o.state.request_id: o.finish_reason for o in self.outputs if o.finish_reason is not None}

    def assert_no_leaks(self) -> None:
        assert self.kv.num_free_blocks == self.kv.num_blocks
        for kv in getattr(self.kv, "groups", [self.kv]):
            assert all(c == 0 for c in kv.pool.ref_cnt)
        assert self.sched.requests == {} and not self.sched.waiting and not self.sched.running
        assert self.sched.encoder_cache.pins == {}
        assert self.sched.num_encoding == 0 and not self.encoding
        assert self.sched.num_decoding == 0 and not self.decoding


# ------------------------------------------------------------------------------------------------ scenarios
def test_fcfs_admission_and_token_budget(ctx_distil):
    h = Harness(ctx_distil, max_tokens=64, max_num_seqs=2)
    for i in range(3):
        h.add(f"t{i}", image_size="256x256", bot_task="think_recaption")
    plan, _ = h.step()
    assert [c.request_id for c in plan.chunks] == ["t0"] and plan.num_tokens == 64  # chunked to the budget
    assert [n.request_id for n in plan.new_requests] == ["t0"]
    while len(h.sched.running) < 2:
        h.step()
    assert [st.request_id for st in h.sched.running] == ["t0", "t1"]  # max_num_seqs holds t2 back
    assert [st.request_id for st in h.sched.waiting] == ["t2"]
    h.run()
    assert h.finished() == {"t0": FinishReason.IMAGE, "t1": FinishReason.IMAGE, "t2": FinishReason.IMAGE}
    h.assert_no_leaks()


def test_chunked_prefill_never_splits_an_image_block(ctx_distil):
    h = Harness(ctx_distil, max_tokens=24)  # smaller than every image block
    h.add("e", images=[IMG_A, IMG_B], image_size="256x256", bot_task="think_recaption")
    h.run()
    assert h.finished() == {"e": FinishReason.IMAGE}
    spans = [c for p in h.plans for c in p.chunks if any(a == c.start for a, _ in c.layout.full_attn_spans)]
    assert spans and all(c.end - c.start > 24 for c in spans)  # whole blocks ran over the budget
    h.assert_no_leaks()


def test_encoder_stage_lets_text_to_image_requests_go_first(ctx_distil):
    h = Harness(ctx_distil, encoder_pixels=1)  # one image per step
    h.add("edit", images=[IMG_A, IMG_B, IMG_C], image_size="256x256")
    h.add("t2i", image_size="256x256")
    plan, _ = h.step()
    # not blocked behind the edit's encodes, and its first token is not delayed by one either
    assert [n.request_id for n in plan.new_requests] == ["t2i"] and not plan.encoder_inputs
    assert [st.request_id for st in h.sched.waiting] == ["edit"]
    encodes = []
    while not any(n.request_id == "edit" for n in plan.new_requests):
        plan, _ = h.step()
        encodes.append(len(plan.encoder_inputs))
        if plan.encoder_inputs:
            assert any(c.request_id == "t2i" for c in plan.chunks)  # decode kept stepping during the encodes
    assert encodes == [1, 1, 1, 0]  # the budget: one image per step (always at least one)
    assert len(plan.new_requests[0].cond_keys) == 3
    h.run()
    assert set(h.finished().values()) == {FinishReason.IMAGE}
    h.assert_no_leaks()


def test_latency_first_encodes_wait_for_the_running_requests_then_their_deadline(ctx_distil):
    """`encode_defer_ms`: a queued edit's encode is not scheduled while text-to-image requests run (they keep every
    core), it is as soon as none runs, one that has waited its deadline goes ahead beside them (no starvation), and
    an edit does not wait for another edit; with one image step at a time the text-to-image requests' denoising
    steps go first come first served."""
    h = Harness(ctx_distil, encode_delay=2, encode_defer_ms=60_000, image_tokens=1)
    h.add("t0", image_size="256x256", max_new_tokens=2)
    h.add("edit", images=[IMG_A], image_size="256x256")
    h.add("t1", image_size="256x256", max_new_tokens=2, seed=8)
    first_image_step = {}
    while not h.plans or h.sched.running:
        plan, _ = h.step()
        assert not plan.encoder_inputs  # others run: the edit's encode waits
        for d in plan.diffusion_steps:
            first_image_step.setdefault(d.request_id, len(h.plans))
        assert len(plan.diffusion_steps) <= 1  # one image step per engine step
    assert first_image_step["t0"] < first_image_step["t1"]
    assert h.finished() == {"t0": FinishReason.IMAGE, "t1": FinishReason.IMAGE}
    plan, _ = h.step()
    assert [e.key for e in plan.encoder_inputs] and not h.sched.running  # nothing runs: the encode goes now
    h.run()
    assert h.finished()["edit"] is FinishReason.IMAGE
    h.assert_no_leaks()

    h = Harness(ctx_distil, encode_delay=2, encode_defer_ms=60_000)
    h.add("edit", images=[IMG_A], image_size="256x256")
    h.add("t0", image_size="256x256", max_new_tokens=4)
    plan, _ = h.step()
    assert not plan.encoder_inputs and [n.request_id for n in plan.new_requests] == ["t0"]
    h.sched.waiting[0].arrival -= 61.0  # the edit has waited past its deadline
    plan, _ = h.step()
    assert plan.encoder_inputs and any(c.request_id == "t0" for c in plan.chunks)  # beside the running request
    h.run()
    assert set(h.finished().values()) == {FinishReason.IMAGE}
    h.assert_no_leaks()

    h = Harness(ctx_distil, encode_delay=2, encode_defer_ms=60_000)
    h.add("e0", images=[IMG_A], image_size="256x256", max_new_tokens=6)
    while not h.sched.running:
        h.step()
    h.add("e1", images=[IMG_B], image_size="256x256")
    plan, _ = h.step()
    assert plan.encoder_inputs and h.sched.running  # beside an edit: no deferral
    h.run()
    h.assert_no_leaks()


def test_encodes_are_deferred_at_most_twice_for_new_arrivals(ctx_distil):
    h = Harness(ctx_distil)
    h.add("edit", images=[IMG_A], image_size="256x256")
    for i in range(4):  # a new text-to-image request every step
        h.add(f"t{i}", image_size="256x256", seed=i)
        plan, _ = h.step()
        if plan.encoder_inputs:
            break
    assert i == 2  # held back for two steps that admitted new requests, then encoded anyway
    h.run()
    h.assert_no_leaks()


def test_async_encodes_never_stall_the_steps_and_never_admit_early(ctx_distil):
    h = Harness(ctx_distil, encoder_pixels=1, encode_delay=3)  # each encode takes three more steps
    h.add("edit", images=[IMG_A, IMG_B], image_size="256x256")
    h.add("t2i", image_size="256x256", bot_task="think_recaption", max_new_tokens=8)
    plan, _ = h.step()
    # encoded beside the steps: not held back for the text-to-image request's first prefill
    assert len(plan.encoder_inputs) == 1 and [n.request_id for n in plan.new_requests] == ["t2i"]
    t2i_steps = 1
    while not any(n.request_id == "edit" for n in plan.new_requests):
        plan, _ = h.step()
        t2i_steps += any(c.request_id == "t2i" for c in plan.chunks) or any(
            d.request_id == "t2i" for d in plan.diffusion_steps)
        assert h.sched.num_encoding <= 1  # the budget bounds the encodes in flight, not the ones per step
    assert t2i_steps == len(h.plans)  # the text-to-image request stepped in every step meanwhile
    assert len(h.plans) >= 9  # two encodes of four steps each before the edit's admission
    h.run()
    assert h.finished() == {"edit": FinishReason.IMAGE, "t2i": FinishReason.IMAGE}
    h.assert_no_leaks()


def test_a_step_with_only_encodes_in_flight_waits_for_one(ctx_distil):
    h = Harness(ctx_distil, encode_delay=5)
    h.add("edit", images=[IMG_A], image_size="256x256")
    plan, _ = h.step()
    assert plan.encoder_inputs and not plan.wait_for_vae
    plan, _ = h.step()  # nothing else to run: the worker blocks until the encode is done instead of spinning
    assert plan.wait_for_vae and plan.has_model_work and h.sched.num_encoding == 0
    plan, _ = h.step()
    assert [n.request_id for n in plan.new_requests] == ["edit"] and not plan.wait_for_vae
    h.run()
    assert h.finished() == {"edit": FinishReason.IMAGE}
    h.assert_no_leaks()


def test_abort_while_encoding_frees_everything_once_the_encode_reports(ctx_distil):
    h = Harness(ctx_distil, encode_delay=2)
    h.add("edit", images=[IMG_A, IMG_B], image_size="256x256")
    h.add("t2i", image_size="256x256")
    h.step()
    assert h.sched.num_encoding == 2
    h.sched.finish_requests(["edit"], FinishReason.ABORT)
    assert h.sched.encoder_cache.pins == {} and "edit" not in h.sched.requests
    assert h.sched.has_unfinished_requests()  # the encodes still report (the worker cannot recall them)
    h.run()
    assert h.finished() == {"t2i": FinishReason.IMAGE}
    h.assert_no_leaks()
    h.add("again", images=[IMG_A], image_size="256x256")  # the finished encode serves a later request
    plan, _ = h.step()
    assert not plan.encoder_inputs and [n.request_id for n in plan.new_requests] == ["again"]
    h.run()
    h.assert_no_leaks()


def test_async_decodes_never_stall_the_steps_and_finish_only_when_reported(ctx_distil):
    """A finished image is decoded beside the steps (engine/decode_stage.py): the request still thinking steps in
    every step meanwhile, the decoding request is never scheduled again (decoded twice) nor finished before the
    worker reports its image, and keeps its seat until then."""
    h = Harness(ctx_distil, decode_delay=4)
    h.add("fast", image_size="256x256", bot_task="image", num_inference_steps=2, partial_images=1)
    h.add("slow", image_size="256x256", bot_task="think_recaption", max_new_tokens=40)
    while ("fast", FINAL_IMAGE) not in h.sched.decoding:
        h.step()
    decode_step = len(h.plans)
    while "fast" not in h.finished():
        plan, _ = h.step()
        assert any(c.request_id == "slow" for c in plan.chunks)  # never waits for the decode
        assert "fast" not in plan.vae_decodes
        if "fast" not in h.finished():
            assert h.sched.running[0].request_id == "fast"  # keeps its seat until the image arrives
    assert len(h.plans) - decode_step == 4  # reported by the fourth step after the one that sent it
    assert any(o.partial_image for o in h.outputs if o.state.request_id == "fast")  # the preview came through
    h.run()
    assert h.finished() == {"fast": FinishReason.IMAGE, "slow": FinishReason.IMAGE}
    h.assert_no_leaks()


def test_a_step_with_only_decodes_in_flight_waits_for_one(ctx_distil):
    h = Harness(ctx_distil, decode_delay=5)
    h.add("t2i", image_size="256x256", bot_task="image", num_inference_steps=2)
    while not h.sched.decoding:
        plan, _ = h.step()
    assert plan.vae_decodes == ["t2i"] and not plan.wait_for_vae
    plan, outs = h.step()  # nothing else to run: the worker blocks until the decode has ended
    assert plan.wait_for_vae and plan.has_model_work and not plan.vae_decodes
    assert h.finished() == {"t2i": FinishReason.IMAGE} and h.sched.num_decoding == 0
    h.run()
    h.assert_no_leaks()


def test_abort_while_decoding_frees_everything_once_the_decode_reports(ctx_distil):
    h = Harness(ctx_distil, decode_delay=3)
    h.add("t2i", image_size="256x256", bot_task="image", num_inference_steps=2)
    h.add("other", image_size="256x256", bot_task="think_recaption", max_new_tokens=12)
    while not h.sched.decoding:
        h.step()
    h.sched.finish_requests(["t2i"], FinishReason.ABORT)
    assert "t2i" not in h.sched.requests and [st.request_id for st in h.sched.running] == ["other"]
    assert h.kv.num_free_blocks + sum(len(h.kv.block_table(q.seq_id)) for q in h.sched.running[0].rows
                                      if q.allocated) == h.kv.num_blocks
    assert h.sched.num_decoding == 1 and h.sched.has_unfinished_requests()  # its decode still reports
    h.run()
    assert h.finished() == {"other": FinishReason.IMAGE}  # the aborted request's image is dropped
    h.assert_no_leaks()


def test_encoder_cache_dedupes_shared_images_and_counts(ctx_distil):
    h = Harness(ctx_distil)
    h.add("a", images=[IMG_A], seed=1, image_size="256x256")
    h.add("b", images=[IMG_A, IMG_B], seed=2, image_size="256x256")
    plan, _ = h.step()
    assert len(plan.encoder_inputs) == 2  # IMG_A once for both requests
    stats = h.sched.encoder_cache.stats
    assert (stats.hits, stats.misses) == (1, 2)
    h.run()
    h.add("c", images=[IMG_B], seed=3, image_size="256x256")  # cached from an earlier request
    plan, _ = h.step()
    assert not plan.encoder_inputs and [n.request_id for n in plan.new_requests] == ["c"]
    assert (stats.hits, stats.misses) == (2, 2)
    h.run()
    assert set(h.finished().values()) == {FinishReason.IMAGE}
    h.assert_no_leaks()


def test_encoder_cache_evicts_lru_but_never_a_pinned_entry(ctx_distil):
    h = Harness(ctx_distil, encoder_bytes=ENC_BYTES, encoder_pixels=1)  # room for one entry
    h.add("a", images=[IMG_A, IMG_B], image_size="256x256")
    h.step()
    h.step()  # the second encode: both entries are pinned by the waiting request, the cache holds more than its bound
    assert h.sched.encoder_cache.num_bytes == 2 * ENC_BYTES
    h.step()  # admitted: pins released
    h.add("b", images=[IMG_C], image_size="256x256")
    h.step()  # IMG_C encoded: the least recently used entries go
    cache = h.sched.encoder_cache
    assert cache.num_bytes == ENC_BYTES and cache.stats.evictions == 2
    plan, _ = h.step()
    assert len(plan.encoder_evictions) == 2  # the worker is told
    h.run()
    h.assert_no_leaks()
    assert h.worker_encoded == set(cache.entries)


def test_preemption_by_recompute_and_readmission(ctx_distil):
    h = Harness(ctx_distil, num_blocks=40, max_num_seqs=4)
    for i in range(4):
        h.add(f"r{i}", image_size="256x256", bot_task="think_recaption", max_new_tokens=8, seed=i)
    h.run()
    assert h.sched.num_preemptions > 0
    assert h.finished() == {f"r{i}": FinishReason.IMAGE for i in range(4)}
    h.assert_no_leaks()


# ------------------------------------------------------------------------------------------------ status
def test_the_transition_table_rejects_every_other_status_change(ctx_distil):
    S = RequestStatus
    for old in S:
        for new in S:
            st = build_request_state(ctx_distil, GenerationRequest(request_id="s", prompt="p", bot_task="image"))
            st.status = old
            if new in TRANSITIONS[old] or (new is old and old is not S.FINISHED):
                move(st, new)
                assert st.status is new
            else:
                with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
                    move(st, new)
                assert st.status is old
    assert not TRANSITIONS[S.FINISHED] and S.PREFILL not in TRANSITIONS[S.THINK]  # no way back
    assert S.DIFFUSE not in TRANSITIONS[S.ENCODING]  # noise is drawn only after the image phase's prefill


def test_each_request_walks_its_statuses_once_through_preemption(ctx_distil, monkeypatch):
    """Preemption keeps a request's status (its worker state stays): it is sent to the worker once, starts its
    diffusion once, and passes each status in order whatever it was preempted in."""
    walked: dict[str, list[RequestStatus]] = {}

    def recording_move(st, new):
        if new is not st.status:
            walked.setdefault(st.request_id, [st.status]).append(new)
        move(st, new)

    monkeypatch.setattr(scheduler_module, "move", recording_move)
    h = Harness(ctx_distil, num_blocks=48, max_num_seqs=4)
    for i in range(4):
        h.add(f"r{i}", image_size="256x256", bot_task="think_recaption", max_new_tokens=8, seed=i,
              images=[IMG_A] if i % 2 else [])
    h.add("img", image_size="256x256", bot_task="image", images=[IMG_B])
    h.run()
    assert h.sched.num_preemptions > 0
    assert set(h.finished().values()) == {FinishReason.IMAGE}
    S = RequestStatus
    for i in range(4):
        first = [S.WAITING, S.ENCODING] if i % 2 else [S.WAITING]
        assert walked[f"r{i}"] in (first + [S.PREFILL, S.THINK, S.IMAGE_PREFILL, S.DIFFUSE, S.VAE_DECODE, S.FINISHED],
                                   first + [S.THINK, S.IMAGE_PREFILL, S.DIFFUSE, S.VAE_DECODE, S.FINISHED])
    assert walked["img"] == [S.WAITING, S.ENCODING, S.IMAGE_PREFILL, S.DIFFUSE, S.VAE_DECODE, S.FINISHED]
    for rid in walked:
        assert sum(n.request_id == rid for p in h.plans for n in p.new_requests) == 1
        assert sum(d.request_id == rid for p in h.plans for d in p.diffusion_starts) == 1
    h.assert_no_leaks()


def test_prefix_cache_hit_and_in_flight_dedupe(ctx_distil):
    h = Harness(ctx_distil, max_tokens=32)
    h.add("a", image_size="256x256", use_system_prompt="en_unified", prompt="same prompt")
    h.step()
    h.add("b", image_size="256x256", use_system_prompt="en_unified", prompt="same prompt")
    plan, _ = h.step()
    assert all(c.request_id == "a" for c in plan.chunks)  # b waits while a computes the shared blocks
    h.run()
    assert h.kv.stats.hits > 0
    assert h.finished() == {"a": FinishReason.IMAGE, "b": FinishReason.IMAGE}
    h.assert_no_leaks()


def test_cfg_rows_step_together(ctx_instruct):
    h = Harness(ctx_instruct)
    h.add("cfg", image_size="256x256", bot_task="image", guidance_scale=5.0)
    h.run()
    steps = [d for p in h.plans for d in p.diffusion_steps]
    assert steps and all(len(d.chunk_indexes) == 2 for d in steps)  # cond and uncond in the same forward
    h.assert_no_leaks()


def test_cfg_parallel_places_rows_on_groups_with_their_own_kv(ctx_instruct):
    """CFG parallel (engine/cfg_groups.py): a CFG request's cond row (text phase included) runs on its owner group
    and its uncond row on the other, each row's blocks come from its group's pool (block ids per group, so both rows
    may hold the same ids), requests without CFG spread over the groups, and everything is freed."""
    h = Harness(ctx_instruct, num_blocks=64, cfg_groups=2)
    h.add("cfg_a", image_size="256x256", bot_task="think_recaption", guidance_scale=5.0)
    h.add("cfg_b", image_size="256x256", bot_task="image", guidance_scale=5.0)
    h.add("plain_a", image_size="256x256", bot_task="image", guidance_scale=1.0)
    h.add("plain_b", image_size="256x256", bot_task="image", guidance_scale=1.0)
    peak = [0, 0]
    while h.sched.has_requests():
        h.step()
        peak = [max(p, 64 - h.kv.free_blocks_of(g)) for g, p in enumerate(peak)]
    assert set(h.finished().values()) == {FinishReason.IMAGE}
    groups: dict[tuple[str, bool], set[int]] = {}
    tables: dict[tuple[str, bool], list[int]] = {}
    for plan in h.plans:
        for c in plan.chunks:
            uncond = c.seq_id.endswith("#uncond")
            groups.setdefault((c.request_id, uncond), set()).add(c.group)
            if c.diffusion:
                tables[(c.request_id, uncond)] = c.block_table
        for ds in plan.diffusion_starts:
            assert ds.row_groups is not None
    assert all(len(g) == 1 for g in groups.values()), groups  # placed once, for good
    g = {k: next(iter(v)) for k, v in groups.items()}
    for rid in ("cfg_a", "cfg_b"):
        assert g[(rid, False)] != g[(rid, True)]
    assert g[("cfg_a", False)] != g[("cfg_b", False)]  # owners balanced
    assert {g[("plain_a", False)], g[("plain_b", False)]} == {0, 1}  # data parallel
    assert set(tables[("cfg_a", False)]) & set(tables[("cfg_a", True)])  # per-group ids: the same numbers reused
    assert min(peak) > 0
    h.assert_no_leaks()


@pytest.mark.parametrize("phase", ["encoding", "prefill", "think", "diffuse", "vae_decode"])
def test_abort_in_each_phase_frees_everything(ctx_distil, phase):
    h = Harness(ctx_distil, max_tokens=16)
    h.add("x", images=[IMG_A], image_size="256x256", bot_task="think_recaption", max_new_tokens=4)
    h.add("other", image_size="256x256")
    want = {"encoding": RequestStatus.ENCODING, "prefill": RequestStatus.PREFILL, "think": RequestStatus.THINK,
            "diffuse": RequestStatus.DIFFUSE, "vae_decode": RequestStatus.VAE_DECODE}[phase]
    st = h.sched.requests["x"]
    for _ in range(300):
        if st.status is want:
            break
        h.step()
    assert st.status is want
    (done,) = h.sched.finish_requests(["x"], FinishReason.ABORT)
    assert done is st and st.status is RequestStatus.FINISHED
    assert h.sched.finish_requests(["x"], FinishReason.ABORT) == []  # twice is harmless
    h.run()
    assert h.finished() == {"other": FinishReason.IMAGE}
    assert "x" not in h.worker_requests
    h.assert_no_leaks()


def test_previews_at_evenly_spaced_steps(ctx_distil):
    h = Harness(ctx_distil)
    h.add("p", image_size="256x256", bot_task="image", num_inference_steps=8, partial_images=3)
    h.run()
    previews = [(d.step, d.preview_index) for p in h.plans for d in p.diffusion_steps if d.preview_index is not None]
    assert previews == [(1, 0), (3, 1), (5, 2)]
    got = [o.partial_image[0] for o in h.outputs if o.partial_image is not None]
    assert got == [0, 1, 2]


def _vae_work(h: Harness, plan: SchedulerOutput) -> tuple[list[int], list[int]]:
    """(decode pixels of the plan's final images and previews, encode pixels of its condition images)."""
    grids = [h.sched.requests[rid].cond.layout.slots("gen")[0].grid for rid in plan.vae_decodes]
    grids += [h.sched.requests[d.request_id].cond.layout.slots("gen")[0].grid for d in plan.diffusion_steps
              if d.preview_index is not None]
    decodes = [gh * 16 * gw * 16 for gh, gw in grids]
    return decodes, [int(e.vae.pixels.shape[-2] * e.vae.pixels.shape[-1]) for e in plan.encoder_inputs]


def _run_recording_vae_work(h: Harness, check=None) -> list[tuple[list[int], list[int]]]:
    """Run to the end, recording each plan's VAE work; `check(plan)` sees every plan right after it is made."""
    work = []
    for _ in range(500):
        if not h.sched.has_unfinished_requests():
            break
        plan = h.sched.schedule()
        if check is not None:
            check(plan)
        work.append(_vae_work(h, plan))
        h.check_plan(plan)
        h.plans.append(plan)
        if plan.has_model_work:
            h.outputs += h.sched.update_from_output(plan, h.execute(plan))
        else:
            h.execute(plan)
            h.outputs += h.sched.unschedulable()
    assert not h.sched.has_unfinished_requests()
    return work


def test_vae_work_per_step_stays_within_the_budget(ctx_distil):
    """Edits with condition images of several sizes and previews, finishing close together: without a budget some
    step decodes (or encodes) more than two 256x256 images' worth; with that budget no step carries more, a larger
    image still goes alone, and every request ends with its image."""
    def workload(h: Harness) -> None:
        for i in range(6):
            h.add(f"e{i}", image_size=("256x256", "192x320", "320x192")[i % 3], bot_task="image",
                  num_inference_steps=3, partial_images=1 if i % 2 else 0,
                  images=[png(64 + 8 * i, 96 - 8 * i, 10 + i), png(96, 64, 30 + i)][: 1 + i % 2])

    budget = VaeBudget(budget_bytes=2 * 256 * 256, bytes_per_pixel=1, decode_fixed_bytes=0, latent_factor=16)

    def over(work) -> bool:
        return any(len(d) > 1 and sum(d) > budget.decode_bytes_left() or len(e) > 1 and sum(e) > budget.budget_bytes
                   for d, e in work)

    free = Harness(ctx_distil, max_num_seqs=8)
    workload(free)
    assert over(_run_recording_vae_work(free))  # the budget below binds on this workload

    h = Harness(ctx_distil, max_num_seqs=8, vae_budget=budget)
    workload(h)
    work = _run_recording_vae_work(h)
    assert not over(work), work
    assert set(h.finished().values()) == {FinishReason.IMAGE} and len(h.finished()) == 6
    assert any(len(d) == 2 for d, _ in work)  # the budget is used, not just one image a step


@pytest.mark.parametrize("decode_delay", [0, 3])
def test_async_encodes_and_decodes_share_the_vae_budget(ctx_distil, decode_delay):
    """On a GPU an asynchronous encode runs on a side stream beside the step's decodes: the VAE bytes of the encodes
    in flight plus the step's decodes stay within the one budget the memory plan reserves (more than one item
    only when they fit), and a final decode that waits for room is not starved by new encodes. Asynchronous
    decodes (`decode_delay`) hold their bytes until reported, like the encodes."""
    budget = VaeBudget(budget_bytes=2 * 256 * 256, bytes_per_pixel=1, decode_fixed_bytes=0, latent_factor=16)
    h = Harness(ctx_distil, max_num_seqs=8, vae_budget=budget, encode_delay=6,  # each encode spans six steps
                decode_delay=decode_delay)
    for i in range(3):  # text-to-image requests reach their decode while the edits' encodes are in flight
        h.add(f"t{i}", image_size="256x256", bot_task="image", num_inference_steps=2)
    for i in range(4):
        h.add(f"e{i}", image_size="256x256", bot_task="image", num_inference_steps=2,
              images=[png(64 + 8 * i, 96 - 8 * i, 40 + i)])

    def within_budget(plan: SchedulerOutput) -> None:
        decodes, _ = _vae_work(h, plan)
        in_flight = [b for _, b in h.sched.encoding.values()]  # sent and not reported, this step's included
        decoding = list(h.sched.decoding.values())  # likewise (this step's decodes and earlier ones)
        assert len(decoding) >= len(decodes)
        items = decoding + in_flight
        assert len(items) <= 1 or sum(items) <= budget.budget_bytes, (decoding, in_flight)

    _run_recording_vae_work(h, within_budget)
    assert set(h.finished().values()) == {FinishReason.IMAGE} and len(h.finished()) == 7
    h.assert_no_leaks()


class FakeImageCost:
    """A cost model of a known shape (`Scheduler(image_cost=...)`): an encode costs its VAE pixels plus `per_image`
    (standing in for the vision tower every condition image runs whatever its size), a decode its pixels."""

    def __init__(self, per_image: float = 0.0) -> None:
        self.per_image = per_image

    def encode_flops(self, height: int, width: int, vit_patches: int) -> float:
        return height * width + self.per_image

    def decode_flops(self, height: int, width: int) -> float:
        return float(height * width)


@pytest.mark.parametrize("per_image", [0, 1])
def test_encodes_in_flight_are_weighed_by_their_cost_not_their_pixels(ctx_distil, per_image):
    """Eight condition images of one bucket under a budget of four such images' pixels: when an encode costs only
    its pixels four are in flight at once; when each costs as much again per image, two (a pixel budget would let
    four through either way); the cost in flight never exceeds the budget's, and every request gets its image."""
    probe = Harness(ctx_distil)
    probe.add("p", images=[png(64, 96, 100)], image_size="256x256")
    (e,) = probe.step()[0].encoder_inputs
    px = e.vae.size_hw[0] * e.vae.size_hw[1]
    cost = FakeImageCost(per_image * px)
    h = Harness(ctx_distil, encoder_pixels=4 * px, encode_delay=3, image_cost=cost)
    for i in range(8):
        h.add(f"e{i}", images=[png(64, 96, 100 + i)], image_size="256x256", seed=i)
    budget = cost.encode_flops(*h.sched._budget_hw, e.vit_patches)
    most = 0
    while h.sched.has_requests():
        h.step()
        in_flight = [f for f, _ in h.sched.encoding.values()]
        assert len(in_flight) <= 1 or sum(in_flight) <= budget
        most = max(most, len(in_flight))
    assert most == (4 if per_image == 0 else 2)
    assert set(h.finished().values()) == {FinishReason.IMAGE} and len(h.finished()) == 8
    h.assert_no_leaks()


def test_decodes_in_flight_are_weighed_by_their_cost(ctx_distil):
    """Four text-to-image requests reach their decode in the same step, decoded beside the steps: a budget of two
    256x256 decodes' cost keeps at most two in flight (the others wait for a step with room), and each request
    still ends with its image."""
    h = Harness(ctx_distil, encoder_pixels=2 * 256 * 256, decode_delay=3, image_cost=FakeImageCost())
    for i in range(4):
        h.add(f"t{i}", image_size="256x256", bot_task="image", num_inference_steps=2, seed=i)
    most = 0
    while h.sched.has_requests():
        h.step()
        assert h.sched.num_decoding <= 2 and sum(h.sched.decode_flops.values()) <= 2 * 256 * 256
        most = max(most, h.sched.num_decoding)
    assert most == 2
    assert set(h.finished().values()) == {FinishReason.IMAGE} and len(h.finished()) == 4
    h.assert_no_leaks()


def test_real_cost_model_weighs_the_vision_tower_per_image(ctx_distil):
    """The checkpoint's cost model (the model's `encode_flops` / `decode_flops`, from its VAE and ViT shapes): the
    tower's part is the same for every image size (it runs its padded patch rows), so four 256x256 encodes carry it
    three times more than one 512x512 encode of the same pixels; the VAE grows faster than its pixels (its mid
    attention over the latent cells)."""
    cost = ctx_distil.request_logic
    tower = cost.encode_flops(256, 256, 64) - cost.encode_flops(256, 256, 0)
    assert tower > 0 and cost.encode_flops(512, 512, 64) - cost.encode_flops(512, 512, 0) == pytest.approx(tower)
    assert cost.encode_flops(512, 512, 0) > 4 * cost.encode_flops(256, 256, 0) > 0
    assert cost.decode_flops(512, 512) > 4 * cost.decode_flops(256, 256) > 0


def test_a_request_that_can_never_fit_fails_alone(ctx_distil):
    h = Harness(ctx_distil, num_blocks=6)
    h.add("big", images=[IMG_A, IMG_B, IMG_C], image_size="256x256")
    h.run()
    (o,) = [o for o in h.outputs if o.finish_reason is not None]
    assert o.finish_reason is FinishReason.ERROR and o.status == 400 and "KV cache" in o.error
    h.assert_no_leaks()


def test_an_image_phase_that_does_not_fit_fails_the_request_with_400(ctx_distil):
    """The think text made the image-phase sequence longer than the model's positions (the phase switch refuses it):
    the request's own inputs are at fault, so it fails alone with 400 (it was a 500), and frees everything."""
    from diffgentor.engine.request_contract import RequestError

    h = Harness(ctx_distil)

    def too_long(st):
        raise RequestError("the image-phase sequence needs 9489 tokens; the model allows 8192")

    real = h.sched.model
    h.sched.model = SimpleNamespace(image_phase_layout=too_long, runs_backbone=real.runs_backbone)
    h.add("long", image_size="256x256", bot_task="think_recaption", max_new_tokens=4)
    h.add("fine", image_size="256x256", bot_task="image")
    h.run()
    by_id = {o.state.request_id: o for o in h.outputs if o.finish_reason is not None}
    assert by_id["long"].finish_reason is FinishReason.ERROR and by_id["long"].status == 400
    assert by_id["fine"].finish_reason is FinishReason.IMAGE
    h.assert_no_leaks()


def test_auto_size_offers_only_buckets_whose_image_phase_fits(ctx_distil):
    """Two 4:3 condition images fill most of the tiny model's 8192 positions; the largest buckets (1024x768 and up)
    would not fit in the image phase. A model that picks the last offered ratio (the official pick is an argmax
    over all 37) gets only buckets that fit, and the request ends with an image instead of failing at the switch."""
    h = Harness(ctx_distil, ratio_pick=-1)
    h.add("fuse", images=[png(48, 64, 11), png(48, 64, 12)], bot_task="think_recaption", image_size="auto",
          max_new_tokens=4)
    st = h.sched.requests["fuse"]
    buckets = ctx_distil.builder.resolution.buckets
    allowed = st.machine.allowed_ratios
    assert allowed is not None and 0 < len(allowed) < len(buckets)
    assert len(buckets) - 1 not in allowed
    h.add("plain", bot_task="think_recaption", image_size="auto", max_new_tokens=4)
    assert h.sched.requests["plain"].machine.allowed_ratios is None  # everything fits: the official pick, unrestricted
    h.run()
    assert h.finished() == {"fuse": FinishReason.IMAGE, "plain": FinishReason.IMAGE}
    assert st.ratio_index == allowed[-1]
    h.assert_no_leaks()


def test_free_text_never_ends_with_a_ratio_token_that_would_not_fit(ctx_distil):
    """A ratio token also ends think/recaption text (auto size). A model that ends its text with the largest ratio
    token it may sample gets one whose image phase fits (CI's schemathesis run: the tiny model sampled the
    1024x768 bucket's token in its text, and the phase switch refused 9487 positions)."""
    h = Harness(ctx_distil, ratio_in_text=True)
    h.add("fuse", images=[png(48, 64, 11), png(48, 64, 12)], bot_task="think_recaption", image_size="auto",
          max_new_tokens=4)
    st = h.sched.requests["fuse"]
    h.run()
    assert h.finished() == {"fuse": FinishReason.IMAGE}, [(o.state.request_id, o.error) for o in h.outputs]
    assert st.ratio_index == max(st.machine.allowed_ratios)
    h.assert_no_leaks()


def test_denoising_blocks_have_their_own_budget(ctx_distil):
    """A step budget of 1.5 denoising blocks (as 8192 is for 1024x1024 blocks of 4099 tokens on the real model) runs
    one denoising step per engine step; a separate image budget of four blocks runs four requests' denoising steps
    in one step, and the prefills beside them keep their own budget."""
    def run(max_tokens, image_tokens):
        h = Harness(ctx_distil, num_blocks=4096, max_num_seqs=8, max_tokens=max_tokens, image_tokens=image_tokens)
        for i in range(4):
            h.add(f"img{i}", bot_task="image", image_size="1024x1024", num_inference_steps=3, seed=i)
        h.run()
        h.assert_no_leaks()
        return h.plans

    block = max(c.end - c.start for p in run(1 << 20, None) for c in p.chunks if c.diffusion)
    budget = block + block // 2

    def widest(plans):
        return max(sum(c.diffusion for c in p.chunks) for p in plans)

    assert widest(run(budget, None)) == 1
    plans = run(budget, 4 * block)
    assert widest(plans) == 4
    assert all(sum(c.end - c.start for c in p.chunks if not c.diffusion) <= budget for p in plans)
    with pytest.raises(ValueError, match="max_num_image_tokens"):
        SchedulerConfig(max_num_image_tokens=0)


def test_banned_ids_are_never_sampled_and_forcing_wins():
    import torch

    from diffgentor.engine.models.hunyuan_image_3.sampling import SamplingParams, constrain_batch
    from diffgentor.engine.scheduler_output import SampleSpec

    logits = torch.zeros(10)
    logits[7] = 50.0
    out = constrain_batch(logits.clone()[None], [SampleSpec(SamplingParams(), banned_ids=(7, 9))])[0]
    assert out[7] == out[9] == torch.finfo(out.dtype).min and out.argmax() not in (7, 9)
    assert torch.equal(out[:7], logits[:7])
    forced = constrain_batch(logits.clone()[None], [SampleSpec(SamplingParams(), forced_token=9, banned_ids=(7, 9))])[0]
    assert forced.argmax() == 9  # a forced token (the stage machine's closing tags) is not a sampled one


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hs.integers(min_value=0, max_value=2**32 - 1))
def test_no_leaks_after_random_interleavings(ctx_distil, seed):
    """Random arrivals (text-to-image, edits sharing images, CFG-free), aborts at random moments, a tight KV cache
    and encoder cache: every request ends exactly once and nothing is left held."""
    rng = random.Random(seed)
    h = Harness(ctx_distil, num_blocks=rng.choice([24, 48, 200]), max_tokens=rng.choice([32, 128, 4096]),
                max_num_seqs=rng.choice([1, 2, 4]), encoder_pixels=rng.choice([1, 1 << 20]),
                encoder_bytes=rng.choice([ENC_BYTES, 1 << 20]), prefix_caching=rng.random() < 0.8,
                encode_delay=rng.choice([0, 0, 1, 3]))
    imgs = [IMG_A, IMG_B, IMG_C]
    added, aborted = [], set()
    for i in range(rng.randint(2, 6)):
        n_img = rng.choice([0, 0, 1, 2])
        h.add(f"q{i}", images=rng.sample(imgs, n_img), image_size="256x256", seed=rng.randint(0, 3),
              bot_task=rng.choice(["image", "think_recaption", "recaption"]), max_new_tokens=rng.randint(1, 4),
              partial_images=rng.randint(0, 2))
        added.append(f"q{i}")
        for _ in range(rng.randint(0, 4)):
            if h.sched.has_requests():
                h.step()
        if rng.random() < 0.3:
            victim = rng.choice(added)
            if h.sched.finish_requests([victim], FinishReason.ABORT):
                aborted.add(victim)
    h.run(max_steps=2000)
    ends = [o.state.request_id for o in h.outputs if o.finish_reason is not None]
    assert len(ends) == len(set(ends))  # never finished twice
    assert set(ends) | aborted == set(added) and not (set(ends) & aborted)
    h.assert_no_leaks()


def test_step_time_target_bounds_every_step_by_the_cost_model(ctx_distil):
    """With a step-time target and a (fake) cost per token, an edit's long prompt is chunked so that no step that
    also carries another request's think token is estimated above the target, while the other request thinks in
    every step; without the target the same prompt runs in one step far above it."""
    from diffgentor.engine.step_cost import StepCost

    per_token, target = 0.001, 0.040  # 1 ms a token, 40 ms a step: 40 tokens

    def run(max_step_s):
        h = Harness(ctx_distil, max_tokens=4096)
        h.sched.step_cost = StepCost(seconds_per_token=per_token)
        h.sched.max_step_s = max_step_s
        h.add("t2i", image_size="256x256", bot_task="think_recaption", max_new_tokens=60)
        h.step()  # its prefill alone
        h.add("edit", images=[IMG_A], image_size="256x256", bot_task="think_recaption", prompt="x " * 150)
        worst, shared = 0.0, 0
        while "edit" not in {c.request_id for p in h.plans for c in p.chunks if c.sample is not None}:
            plan, _ = h.step()
            ids = {c.request_id for c in plan.chunks}
            if {"t2i", "edit"} <= ids:
                shared += 1
                spans = any(any(a <= c.start < b or a < c.end <= b for a, b in c.layout.full_attn_spans)
                            for c in plan.chunks if c.request_id == "edit")
                if not spans:  # an image block runs whole whatever it costs
                    worst = max(worst, plan.num_tokens * per_token)
            if "edit" in ids or "t2i" in h.finished():
                assert "t2i" in ids or "t2i" in h.finished()  # the running request steps meanwhile
        h.run()
        assert set(h.finished().values()) == {FinishReason.IMAGE}
        h.assert_no_leaks()
        return worst, shared

    bounded, shared = run(target)
    assert shared >= 3 and bounded <= target  # chunked beside the think tokens, each step within the target
    unbounded, _ = run(None)
    assert unbounded > 4 * target


def test_step_cost_estimate_follows_the_measured_steps():
    from diffgentor.engine.step_cost import StepCost

    c = StepCost(weight=0.5)
    assert c.tokens_within(0.1) is None  # nothing measured: the target does not bind
    c.observe(100, 0.2)
    assert c.seconds_per_token == pytest.approx(0.002) and c.tokens_within(0.1) == 50
    c.observe(100, 0.1)
    assert c.seconds_per_token == pytest.approx(0.0015)
    c.observe(0, 1.0)  # a step without tokens says nothing about their cost
    assert c.seconds_per_token == pytest.approx(0.0015) and c.tokens_within(1e-9) == 1


def test_step_cost_fits_text_and_block_rates_apart():
    """Steps that mix think tokens and denoising blocks in varying proportions: the fit recovers each rate (a
    block token here costs a twentieth of a text token); denoising steps alone give the block rate and no text
    rate (the target then does not bind)."""
    from diffgentor.engine.step_cost import StepCost

    c = StepCost(weight=0.5)
    c.observe(10, 10 * 0.002)  # text only
    assert c.seconds_per_token == pytest.approx(0.002) and c.seconds_per_block_token is None
    for t, b in ((1, 500), (4, 250), (2, 1000), (8, 300)):
        c.observe(t, t * 0.002 + b * 0.0001, b)
    assert c.seconds_per_token == pytest.approx(0.002) and c.seconds_per_block_token == pytest.approx(0.0001)
    blocks = StepCost()
    blocks.observe(0, 0.05, 500)
    assert blocks.seconds_per_block_token == pytest.approx(0.0001) and blocks.seconds_per_token is None
    assert blocks.tokens_within(1.0) is None


def test_step_time_target_sizes_denoising_blocks_by_their_own_rate(ctx_distil):
    """A thinking request beside four text-to-image requests, with a (fake) cost per text token and a ten times
    smaller one per denoising-block token: every step that carries the thinking request's text is estimated within
    the target (its think token and two 256x256 blocks fit, a third does not), so the images denoise beside the
    think tokens; priced at the text rate (no block rate measured) a block never fits beside a think token."""
    from diffgentor.engine.step_cost import StepCost

    text_s, block_s, target = 0.001, 0.0001, 0.060

    def run(block_rate):
        h = Harness(ctx_distil)
        h.sched.step_cost = StepCost(seconds_per_token=text_s, seconds_per_block_token=block_rate)
        h.sched.max_step_s = target
        h.add("thinker", image_size="256x256", bot_task="think_recaption", max_new_tokens=80)
        for i in range(4):
            h.add(f"t{i}", image_size="256x256", bot_task="image", num_inference_steps=6, seed=i)
        blocks_beside = []
        while h.sched.has_requests():
            plan, _ = h.step()
            if any(c.request_id == "thinker" and c.sample is not None for c in plan.chunks):
                seconds = sum((c.end - c.start) * (block_rate if c.diffusion and block_rate else text_s)
                              for c in plan.chunks)
                assert seconds <= target + 1e-9, seconds
                blocks_beside.append(len({c.request_id for c in plan.chunks if c.diffusion}))
        assert set(h.finished().values()) == {FinishReason.IMAGE} and len(h.finished()) == 5
        h.assert_no_leaks()
        return blocks_beside

    timed = run(block_s)
    assert max(timed) == 2 and sum(timed) >= 8  # the images denoised beside the think tokens
    assert max(run(None)) == 0
