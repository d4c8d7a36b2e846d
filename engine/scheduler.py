"""The scheduler: owns the waiting and running requests, the KV cache manager and the encoder cache's books,
decides what runs in each step, and applies what the worker did.

A step is `schedule()` -> the worker's `execute()` -> `update_from_output()`, as in vLLM v1; `finish_requests()`
ends requests from outside (aborts). Nothing else changes scheduling state.

Every phase is a token range of a request's sequence(s), so one policy packs them all under one token budget (FCFS
over the running requests, then admissions from the waiting queue):

* encoder stage: a waiting request's condition images are encoded (VAE posterior + SigLIP2) before it may
  prefill, under a compute budget of encodes in flight (what encoding one image of `max_num_encoder_pixels` pixels
  costs, each image weighed by its FLOPs: the model's `encode_flops`; at least one image), images shared by
  several requests once; it does not hold a seat in the running batch, and requests behind it (text-to-image
  ones, edits whose images are cached) are admitted meanwhile. The worker may finish an encode in a later step
  (engine/encode_stage.py): a key stays in flight until a `RunnerOutput` reports it, and only then may its
  requests prefill, so encodes never stall the decode and diffusion of others;
* text phase: the uncomputed tail of the cond row (prefill chunks, then one decode token per step); when the chunk
  reaches the end of the row the worker samples the next token under the stage machine's forcing;
* image phase: first the rows' prefixes up to the generated image's `<timestep>` (the cond row keeps the think
  phase's KV), then every denoising step recomputes `<timestep>`.. last `<img>` of each row in place (CFG rows in
  the same forward); a Taylor-cache step needs no tokens at all;
* VAE decode: no tokens; requests are decoded together, batched by size. The worker may finish a decode in a later
  step (engine/decode_stage.py): its VAE bytes and FLOPs stay in flight (`decoding`, `decode_flops`: at most what
  decoding one image of `max_num_encoder_pixels` pixels costs, at least one image) until a `RunnerOutput` reports
  it ended, and the request keeps its seat until its image arrives.

A bidirectional image block is never split across forwards. When the KV blocks run out the most recently admitted
running request is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffgentor.engine.cfg_groups import choose_owner, row_groups_for
from diffgentor.engine.config import SchedulerConfig
from diffgentor.engine.encoder_cache import EncoderCacheManager, EncoderKey
from diffgentor.engine.kv_cache_manager import KVCacheManager, compute_block_hashes
from diffgentor.engine.model_interface import ModelRequestLogic
from diffgentor.engine.request import FinishReason, RequestStatus
from diffgentor.engine.request_contract import RequestError
from diffgentor.engine.request_state import RequestState, SeqState, block_extra_keys, enter_image_phase
from diffgentor.engine.scheduler_output import (
    FINAL_IMAGE,
    Chunk,
    DecodeKey,
    DiffusionStart,
    DiffusionStep,
    EncoderInput,
    NewRequestData,
    RunnerOutput,
    SampleSpec,
    SchedulerOutput,
)
from diffgentor.engine.step_cost import StepCost
from diffgentor.engine.vae_budget import VaeBudget


def chunk_end(start: int, target: int, budget: int, spans: Sequence[tuple[int, int]]) -> int:
    """End of the next chunk from `start` toward `target` within `budget`, never cutting a bidirectional span.

    May return `start` (nothing fits before a span that does not fit) or exceed the budget (a span that
    `start` is already inside must be finished in one go).
    """
    end = min(target, start + budget)
    for a, b in spans:
        if a < end < b:
            end = a if a >= start else min(b, target)
            if a >= start:
                break
    return end


def whole_span_end(start: int, target: int, room: int, spans: Sequence[tuple[int, int]]) -> int:
    """End of the bidirectional span that begins at `start` (cut at `target`) if it fits `room` tokens, else
    `start`."""
    for a, b in spans:
        if a == start and min(b, target) - start <= room:
            return min(b, target)
    return start



@dataclass
class RequestOutput:
    """What one step did to one request, for the engine core to turn into events and results."""

    state: RequestState
    new_token_ids: list[int] = field(default_factory=list)  # sampled token, then any forced closing tokens
    partial_image: tuple[int, Any] | None = None  # (preview index, uint8 [H, W, 3])
    image: Any = None  # the final uint8 [H, W, 3] image
    finish_reason: FinishReason | None = None
    error: str | None = None
    status: int | None = None  # an error's HTTP status where known


_S = RequestStatus
TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    _S.WAITING: frozenset({_S.ENCODING, _S.PREFILL, _S.THINK, _S.IMAGE_PREFILL, _S.FINISHED}),
    _S.ENCODING: frozenset({_S.PREFILL, _S.THINK, _S.IMAGE_PREFILL, _S.FINISHED}),
    _S.PREFILL: frozenset({_S.THINK, _S.FINISHED}),
    _S.THINK: frozenset({_S.IMAGE_PREFILL, _S.FINISHED}),
    _S.IMAGE_PREFILL: frozenset({_S.DIFFUSE, _S.FINISHED}),
    _S.DIFFUSE: frozenset({_S.VAE_DECODE, _S.FINISHED}),
    _S.VAE_DECODE: frozenset({_S.FINISHED}),
    _S.FINISHED: frozenset(),
}
"""Every status change a request may make (a request may also stay where it is, except once finished). Admission
goes from WAITING (no condition image) or ENCODING to the request's first phase: PREFILL, THINK (a prompt that fits
in one chunk) or IMAGE_PREFILL (a fixed-size image request has no text phase); preemption changes no status."""


class IllegalTransition(RuntimeError):
    """The scheduler tried a status change its table does not allow: an engine bug, never a request's fault."""


def move(st: RequestState, new: RequestStatus) -> None:
    """Set `st.status` to `new` through `TRANSITIONS` (staying put is allowed, except once finished)."""
    old = st.status
    if new is old and old is not RequestStatus.FINISHED:
        return
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"request {st.request_id!r}: {old.value} -> {new.value} is not a legal transition")
    st.status = new


MAX_ENCODE_DEFERRALS = 2
"""Steps a waiting request's encode may be held back for other requests' first prefill (see `_schedule_encodes`)."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, model: ModelRequestLogic,
                 encoder_cache_bytes: int = 512 * 1024 * 1024, vae_budget: VaeBudget | None = None,
                 cfg_parallel_size: int = 1, step_cost: StepCost | None = None,
                 image_cost: ModelRequestLogic | None = None) -> None:
        """`config`: `EngineConfig.scheduler` (with ``async_encode`` the worker encodes beside the steps, so an
        encode never delays a step and is never held back for other requests' first prefill); `kv` holds the block
        size; `model`: the model's answers about a request (engine/model_interface.py): its image-phase sequence
        and which denoising steps run the backbone; `vae_budget`: the VAE work one step may carry
        (engine/vae_budget.py, from the GPU memory plan), None = unbounded; `cfg_parallel_size` 2: each request's
        rows are placed on CFG groups (engine/cfg_groups.py) and `kv` is a GroupedKVCacheManager; the config's
        ``max_step_ms``: the step-time target, a step's tokens capped at what `step_cost` (engine/step_cost.py, kept up
        to date by the core) says fits; None, or no `step_cost`: the target does not bind; `image_cost`: what an image
        encode or decode costs (`encode_flops`, `decode_flops`; default: `model`'s answers), the unit of the VAE work
        in flight (see `_schedule_encodes`, `_vae_fits`)."""
        self.config = config
        self.kv = kv
        self.model = model
        self.block_size = kv.block_size
        self.vae_budget = vae_budget
        self.cfg_parallel_size = cfg_parallel_size
        self.step_cost = step_cost
        self.max_step_s = None if config.max_step_ms is None else config.max_step_ms / 1000.0
        self.image_cost = model if image_cost is None else image_cost
        side = math.isqrt(config.max_num_encoder_pixels)  # the budget: what an image of this many pixels costs
        self._budget_hw = (side, -(-config.max_num_encoder_pixels // side))  # at least that many pixels
        self.requests: dict[str, RequestState] = {}
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.encoder_cache = EncoderCacheManager(encoder_cache_bytes)
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # worker-side state to free, sent with the next plan
        self._failed_outputs: list[RequestOutput] = []  # requests failed while scheduling, reported next update
        self._image_left: int | None = config.max_num_image_tokens  # this step's denoising budget left
        self._slack = 0  # see schedule()
        self._time_left: float | None = None  # this step's seconds left under the target (None: it does not bind)
        self._reserve_s = 0.0  # of them, what running requests' think tokens not yet planned reserve
        self._reserve_start = 0.0  # the reserve at the start of the step
        self._vae_decode_bytes = 0  # per-image decode bytes admitted into the step being planned
        self._vae_decodes: set[str] = set()  # the step's admitted final decodes
        self.encoding: dict[EncoderKey, tuple[float, int]] = {}  # sent, not reported yet -> (FLOPs, VAE bytes)
        self._encode_deferrals: dict[str, int] = {}  # request id -> steps its encode was held back
        self.decoding: dict[DecodeKey, int] = {}  # decodes sent, not reported ended yet -> VAE bytes
        self.decode_flops: dict[DecodeKey, float] = {}  # the same decodes -> what each costs
        self._step_decode_flops = 0.0  # decode FLOPs in flight, this step's admitted decodes included

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, st: RequestState) -> None:
        if st.request_id in self.requests:
            raise ValueError(f"duplicate request id {st.request_id!r}")
        self.requests[st.request_id] = st
        self.waiting.append(st)

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, or encodes and decodes the worker has not reported yet (an aborted request's encode or
        decode still runs to its end; its report empties the queue)."""
        return bool(self.waiting or self.running or self.encoding or self.decoding)

    @property
    def num_encoding(self) -> int:
        """Condition images the worker is encoding (sent, not reported yet): the encode queue."""
        return len(self.encoding)

    @property
    def num_decoding(self) -> int:
        """Final images and previews the worker is decoding (sent, not reported ended yet)."""
        return len(self.decoding)

    def has_finished_requests(self) -> bool:
        """Finished requests still hold worker-side state that the next plan frees."""
        return bool(self._finished_ids)

    def has_requests(self) -> bool:
        """Whether the next `schedule()` has anything for the worker: requests to run or state to free."""
        return self.has_unfinished_requests() or self.has_finished_requests()

    def take_finished_ids(self) -> list[str]:
        out, self._finished_ids = self._finished_ids, []
        return out

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[RequestState]:
        """End requests in any phase (abort, error): free their KV, encoder pins and seats at once."""
        done = []
        for rid in request_ids:
            st = self.requests.get(rid)
            if st is not None:
                self._free(st)
                done.append(st)
        return done

    def _free(self, st: RequestState) -> None:
        self.free_kv(st)
        if st in self.running:
            self.running.remove(st)
        elif st in self.waiting:
            self.waiting.remove(st)
        self.requests.pop(st.request_id, None)
        self._encode_deferrals.pop(st.request_id, None)
        if st.status.admitted:
            self._finished_ids.append(st.request_id)
        elif st.status is RequestStatus.ENCODING:
            for e in st.encoder_inputs:
                self.encoder_cache.unpin(e.key)
        move(st, RequestStatus.FINISHED)

    # ------------------------------------------------------------------ KV blocks
    def _row_group(self, st: RequestState, seq: SeqState) -> int:
        """The CFG group `seq` runs on (0 with one group); places the request on its first call."""
        if self.cfg_parallel_size == 1:
            return 0
        if st.row_groups is None:
            owners = (r.row_groups[0] for r in self.running if r.row_groups is not None)
            owner = choose_owner(owners, [self.kv.free_blocks_of(g) for g in range(self.cfg_parallel_size)])
            st.row_groups = row_groups_for(owner, self.cfg_parallel_size)
        return st.row_groups[0 if seq is st.cond else 1]

    def _ensure_seq(self, st: RequestState, seq: SeqState) -> None:
        """Claim the prefix-cached blocks of a row the first time it needs KV (on its CFG group's pool)."""
        if seq.allocated:
            return
        if self.cfg_parallel_size > 1:
            self.kv.place(seq.seq_id, self._row_group(st, seq))
        n = len(seq.token_ids)
        keys = block_extra_keys(st, seq, self.block_size, n)
        # Hits are whole cached blocks, never the last prompt token (the KV manager's rule) and never a block
        # holding generated-image tokens (those are never registered), so they are safe to attend to as is.
        hit = self.kv.get_computed_blocks(seq.seq_id, seq.token_ids[:n], keys)
        seq.num_computed = max(seq.num_computed, hit)
        seq.allocated = True

    def _allocate(self, st: RequestState, seq: SeqState, end: int, plan: SchedulerOutput, admitting: bool) -> bool:
        """Grow `seq` to `end` tokens; a running request may preempt later-admitted ones (an admission never
        preempts). False if the blocks cannot be had."""
        self._ensure_seq(st, seq)
        while self.kv.allocate_slots(seq.seq_id, end) is None:
            if admitting:
                return False
            later = self.running[self.running.index(st) + 1:]
            group = self._row_group(st, seq)  # only blocks on this row's CFG group help
            victim = next((r for r in reversed(later) if not self._in_plan(r, plan)
                           and any(q.allocated and self._row_group(r, q) == group for q in r.rows)), None)
            if victim is None:
                return False
            self.preempt(victim)
        return True

    @staticmethod
    def _in_plan(st: RequestState, plan: SchedulerOutput) -> bool:
        return any(c.request_id == st.request_id for c in plan.chunks) or \
            any(d.request_id == st.request_id for d in plan.diffusion_steps)

    def free_kv(self, st: RequestState) -> None:
        for seq in st.rows:
            if seq.allocated:
                self.kv.free(seq.seq_id)
                seq.allocated = False

    def preempt(self, st: RequestState) -> None:
        """Recompute-style preemption: drop the request's KV; it restarts from its current tokens later (its status
        stays: the worker keeps its state, latents included)."""
        self.free_kv(st)
        for seq in st.rows:
            seq.num_computed = 0
        st.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(st)
        self.waiting.appendleft(st)

    def _prefix_in_flight(self, st: RequestState) -> bool:
        if not self.kv.enable_prefix_caching or st.cond.allocated:
            return False
        seq = st.cond
        n = len(seq.token_ids)
        hashes = compute_block_hashes(seq.token_ids, self.block_size,
                                      block_extra_keys(st, seq, self.block_size, n))
        i = self.kv.num_cached_prefix_blocks(hashes)
        return i < len(hashes) and hashes[i] in self.kv.inflight_hashes()

    # ------------------------------------------------------------------ encoder stage
    def _missing_encodes(self, st: RequestState) -> list[EncoderInput]:
        """The request's condition images not in the encoder cache. The first look pins its entries and counts
        hits (cached, or already wanted by another waiting request: one encode serves both) and misses."""
        cache = self.encoder_cache
        if st.status is RequestStatus.WAITING and st.encoder_inputs:
            move(st, RequestStatus.ENCODING)
            for e in st.encoder_inputs:
                if cache.contains(e.key) or cache.pins.get(e.key, 0) > 0:
                    cache.stats.hits += 1
                else:
                    cache.stats.misses += 1
                cache.pin(e.key)
        return [e for e in st.encoder_inputs if not cache.contains(e.key)]

    def _schedule_encodes(self, needs_encode: list[tuple[RequestState, list[EncoderInput]]],
                          plan: SchedulerOutput) -> None:
        """Encodes for waiting requests, within the compute budget and the VAE budget of the encodes in flight (one
        always fits when none is). The compute budget weighs each image by its cost (`image_cost.encode_flops`: its
        VAE pixels and its vision-tower rows: a 256x256 image runs the same tower as a 1024x1024 one), up to what one
        image of `max_num_encoder_pixels` pixels with the same tower rows costs.

        Inline encodes (not `async_encode`): a step that admits new requests (their prefill ends in their first
        think token) carries no encode, so an encode never delays another request's first token; a request is
        deferred so at most `MAX_ENCODE_DEFERRALS` times, then its encode rides along anyway (no starvation under a
        stream of arrivals)."""
        admitting = bool(plan.new_requests) and not self.config.async_encode
        defer_s = None if self.config.encode_defer_ms is None else self.config.encode_defer_ms / 1000.0
        # latency first (SchedulerConfig.encode_defer_ms): while requests without condition images run (short jobs:
        # no encode), a queued encode waits, at most until its deadline; edits do not wait for other edits
        if defer_s is not None and any(not st.encoder_inputs for st in self.running):
            now = time.perf_counter()
            needs_encode = [(st, m) for st, m in needs_encode if now - st.arrival >= defer_s]
        vae = self.vae_budget
        encoding = self.encoding
        flops = sum(f for f, _ in encoding.values())
        vae_bytes = sum(b for _, b in encoding.values())
        busy = bool(encoding)  # one encode always fits when no VAE work is in flight
        if self.config.async_encode and vae is not None:
            if any(st.status is RequestStatus.VAE_DECODE and st.request_id not in self._vae_decodes
                   and (st.request_id, FINAL_IMAGE) not in self.decoding for st in (*self.running, *self.waiting)):
                return  # a final decode waits for the encodes in flight: no new ones until it has run
            step_decodes = self._vae_decode_bytes - vae_bytes  # this step's decodes run beside the new encodes
            if step_decodes > 0:
                vae_bytes += step_decodes + vae.decode_fixed_bytes
                busy = True
        for st, missing in needs_encode:
            if admitting and self._encode_deferrals.get(st.request_id, 0) < MAX_ENCODE_DEFERRALS:
                self._encode_deferrals[st.request_id] = self._encode_deferrals.get(st.request_id, 0) + 1
                continue
            for e in missing:
                if e.key in encoding:
                    continue
                cost_flops = self.image_cost.encode_flops(*e.vae.size_hw, e.vit_patches)
                if encoding and flops + cost_flops > self._encode_budget(e):
                    return
                cost = vae.image_bytes(*e.vae.pixels.shape[-2:]) if vae is not None else 0
                if busy and vae is not None and vae_bytes + cost > vae.budget_bytes:
                    return
                busy = True
                flops += cost_flops
                vae_bytes += cost
                encoding[e.key] = (cost_flops, cost)
                plan.encoder_inputs.append(e)

    def _encode_budget(self, e: EncoderInput) -> float:
        """What encoding an image of `max_num_encoder_pixels` pixels with `e`'s vision-tower rows costs."""
        return self.image_cost.encode_flops(*self._budget_hw, e.vit_patches)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput(finished_request_ids=self.take_finished_ids(),
                               encoder_evictions=self.encoder_cache.take_evictions())
        budget = self.step_token_budget()
        # tokens the step-time target took off max_num_batched_tokens: an image block it cut may still run whole in
        # them (never split, and never left waiting for a step with nothing else to run)
        self._slack = self.config.max_num_batched_tokens - budget
        self._start_step_clock()
        self._image_left = self.config.max_num_image_tokens
        self._admit_vae_decodes()
        for st in list(self.running):
            if st in self.running:
                budget -= self._schedule_request(st, plan, budget)
        seats = self.config.max_num_seqs - len(self.running)
        needs_encode: list[tuple[RequestState, list[EncoderInput]]] = []
        for st in list(self.waiting):
            if seats <= 0:  # seats counts the running requests and the ones reserved for their encodes
                break
            if budget <= 0 and st.status is not RequestStatus.VAE_DECODE:
                break
            new = not st.status.admitted
            if new:
                missing = self._missing_encodes(st)
                if missing:  # encode first, prefill once encoded; it keeps a seat, later requests may go first
                    needs_encode.append((st, missing))
                    seats -= 1
                    continue
            if self.running and self._prefix_in_flight(st):
                continue  # another request is computing this prompt's next blocks: wait a step and hit the cache
            used = self._schedule_request(st, plan, budget, admitting=True)
            if used < 0:
                if st.status is RequestStatus.FINISHED:
                    continue  # it could never fit: failed, the queue moves on
                break
            self.waiting.remove(st)
            self.running.append(st)
            seats -= 1
            if new:  # its status left WAITING / ENCODING in _schedule_request: the worker gets it now
                for e in st.encoder_inputs:
                    self.encoder_cache.touch(e.key)
                    self.encoder_cache.unpin(e.key)
                self._encode_deferrals.pop(st.request_id, None)
                plan.new_requests.append(NewRequestData(st.request_id, st.seed, st.vae_images, st.vit_images,
                                                        st.sampling, [e.key for e in st.encoder_inputs]))
            budget -= used
        self._schedule_encodes(needs_encode, plan)
        plan.wait_for_vae = bool(self.encoding or self.decoding) and not plan.has_model_work
        return plan

    def step_token_budget(self) -> int:
        """`max_num_batched_tokens`, or fewer where the step-time target binds (`max_step_s`): running requests'
        decode tokens come first in the step, prefill chunks take what is left."""
        budget = self.config.max_num_batched_tokens
        cost, target = self.step_cost, self.max_step_s
        fit = cost.tokens_within(target) if cost is not None and target is not None else None
        return budget if fit is None else min(budget, fit)

    # ------------------------------------------------------------------ step-time target
    def _start_step_clock(self) -> None:
        """The step's seconds under the target, and what the running requests' think tokens reserve of them: a
        denoising block takes only what leaves every running request its next text token."""
        cost, target = self.step_cost, self.max_step_s
        self._time_left, self._reserve_s = None, 0.0
        if cost is None or target is None or cost.seconds_per_token is None:
            return
        self._time_left = target
        self._reserve_s = cost.seconds_per_token * sum(st.phase == "text" for st in self.running)
        self._reserve_start = self._reserve_s

    def _blocks_timed(self) -> bool:
        """Denoising blocks are sized by their own measured rate (`StepCost.seconds_per_block_token`), apart from
        the text tokens' budget."""
        return self._time_left is not None and self.step_cost.seconds_per_block_token is not None

    def _text_budget(self, st: RequestState, plan: SchedulerOutput, budget: int, admitting: bool) -> int:
        """`budget`, or fewer text tokens where the step's seconds left bind (at least one in a step with nothing
        else); with timed blocks also within `max_num_batched_tokens` (the blocks no longer count in `budget`)."""
        if self._time_left is None:
            return budget
        per = self.step_cost.seconds_per_token
        if not admitting and st.phase == "text":
            self._reserve_s = max(0.0, self._reserve_s - per)  # its own reserved token is being planned
        fit = int(self._time_left / per + 1e-9)
        budget = min(budget, fit if plan.chunks else max(fit, 1))
        if self._blocks_timed():
            budget = min(budget, self.config.max_num_batched_tokens - plan.num_tokens)
        return budget

    def _block_fits(self, need: int, plan: SchedulerOutput) -> bool:
        """A denoising block of `need` tokens fits the step's seconds left beside the reserved think tokens; one that
        could never fit beside them runs when no other block is in the step (never left waiting)."""
        if not need or not self._blocks_timed():
            return True
        seconds = need * self.step_cost.seconds_per_block_token
        if seconds <= self._time_left - self._reserve_s + 1e-12:
            return True
        return seconds > self.max_step_s - self._reserve_start and not any(c.diffusion for c in plan.chunks)

    def _charge(self, tokens: int, diffusion: bool) -> None:
        """Take a planned chunk's estimated seconds off the step's time left."""
        if self._time_left is None:
            return
        block = self.step_cost.seconds_per_block_token
        self._time_left -= tokens * (block if diffusion and block is not None else self.step_cost.seconds_per_token)

    def unschedulable(self) -> list[RequestOutput]:
        """Nothing could run although work is queued: the first waiting request whose images are encoded can never
        fit the KV cache. It is failed (400) so the queue moves on."""
        failed, self._failed_outputs = self._failed_outputs, []
        if self.running or failed:
            return failed
        for st in list(self.waiting):
            if st.status.admitted or all(self.encoder_cache.contains(e.key) for e in st.encoder_inputs):
                self._free(st)
                return [RequestOutput(st, finish_reason=FinishReason.ERROR, status=400,
                                      error="the request does not fit in the KV cache")]
        return []

    # ------------------------------------------------------------------ VAE budget
    def _decode_bytes(self, st: RequestState) -> int:
        vae = self.vae_budget
        return 0 if vae is None else vae.grid_bytes(*st.cond.layout.slots("gen")[0].grid)

    def _decode_cost(self, st: RequestState) -> float:
        return self.image_cost.decode_flops(*st.cond.layout.gen_image_size)

    def _vae_fits(self, st: RequestState) -> bool:
        """Admit one more image into this step's decode (the first always fits: any image gets through): within the
        VAE budget (memory) and, with the decodes in flight, within what decoding one image of
        `max_num_encoder_pixels` pixels costs (`image_cost.decode_flops`), the compute the encodes get too."""
        vae = self.vae_budget
        cost = self._decode_bytes(st)
        if vae is not None and self._vae_decode_bytes and self._vae_decode_bytes + cost > vae.decode_bytes_left():
            return False
        flops, budget = self._decode_cost(st), self.image_cost.decode_flops(*self._budget_hw)
        if self._step_decode_flops and self._step_decode_flops + flops > budget:
            return False
        self._vae_decode_bytes += cost
        self._step_decode_flops += flops
        return True

    def _send_decode(self, st: RequestState, index: int) -> None:
        """The worker decodes it beside the steps: its VAE bytes and cost stay in flight until it is reported."""
        key = (st.request_id, index)
        self.decoding[key] = self._decode_bytes(st)
        self.decode_flops[key] = self._decode_cost(st)

    def _vae_bytes_in_flight(self) -> int:
        """VAE bytes of the encodes and decodes running beside the steps. An asynchronous encode (a side CUDA
        stream) overlaps the step's decodes, so both share the one VAE budget the memory plan reserves; an inline
        encode runs before the step's decodes, one after the other, and each has the budget to itself. Decodes in
        flight are only ever earlier steps' asynchronous ones (an inline decode is reported by its own step)."""
        if self.vae_budget is None:
            return 0
        encodes = sum(b for _, b in self.encoding.values()) if self.config.async_encode else 0
        return encodes + sum(self.decoding.values())

    def _admit_vae_decodes(self) -> None:
        """Final decodes first, in queue order (running, then waiting), within the step's VAE budget; previews of
        this step's denoising steps take what is left."""
        self._vae_decode_bytes = self._vae_bytes_in_flight()
        self._step_decode_flops = sum(self.decode_flops.values())
        self._vae_decodes = {st.request_id for st in (*self.running, *self.waiting)
                             if st.status is RequestStatus.VAE_DECODE
                             and (st.request_id, FINAL_IMAGE) not in self.decoding and self._vae_fits(st)}

    def _schedule_request(self, st: RequestState, plan: SchedulerOutput, budget: int, admitting: bool = False) -> int:
        """Add the request's work for this step; returns tokens used (-1: could not admit)."""
        if st.status is RequestStatus.VAE_DECODE:
            if st.request_id in self._vae_decodes:  # else it waits for a step with VAE budget left (or its decode)
                plan.vae_decodes.append(st.request_id)
                self._send_decode(st, FINAL_IMAGE)
            return 0
        budget = self._text_budget(st, plan, budget, admitting)
        if st.phase == "text":
            return self._schedule_text(st, plan, budget, admitting)
        return self._schedule_image(st, plan, budget, admitting)

    def _add_chunk(self, st, seq, start, end, plan, sample=None, diffusion=False) -> int:
        self._charge(end - start, diffusion)
        plan.chunks.append(Chunk(st.request_id, seq.seq_id, seq.token_ids, seq.layout, start, end,
                                 self.kv.block_table(seq.seq_id), sample, diffusion, self._row_group(st, seq)))
        return end - start

    def _schedule_text(self, st: RequestState, plan: SchedulerOutput, budget: int, admitting: bool) -> int:
        seq = st.cond
        self._ensure_seq(st, seq)
        target = len(seq.token_ids)
        start = seq.num_computed
        end = chunk_end(start, target, max(budget, 0), seq.layout.full_attn_spans)
        if end <= start and self._slack:
            end = whole_span_end(start, target, max(budget, 0) + self._slack, seq.layout.full_attn_spans)
        if end <= start:
            if plan.chunks or budget <= 0:
                return -1 if admitting else 0
            end = chunk_end(start, target, target - start, seq.layout.full_attn_spans)
        if not self._allocate(st, seq, end, plan, admitting):
            return self._cannot_fit(st, plan, admitting)
        sample = None
        if end == target:  # the worker samples the next token under the model's forcing (the verifier's too)
            f = st.machine.forcing
            sample = SampleSpec(st.sampling, f.forced_token, f.ratio_ids, f.banned_ids)
        if st.status in (RequestStatus.WAITING, RequestStatus.ENCODING, RequestStatus.PREFILL):
            move(st, RequestStatus.PREFILL if end < st.num_prompt_tokens else RequestStatus.THINK)
            st.mark("first_scheduled")
        return self._add_chunk(st, seq, start, end, plan, sample)

    def _schedule_image(self, st: RequestState, plan: SchedulerOutput, budget: int, admitting: bool) -> int:
        layout = st.cond.layout
        ts = layout.gen_timestep_index
        slot_end = layout.slots("gen")[0].end
        used = 0
        pending = [seq for seq in st.rows if (self._ensure_seq(st, seq) or True) and seq.num_computed < ts]
        if pending:  # prefixes first (chunked like any prefill)
            for seq in pending:
                start = seq.num_computed
                end = chunk_end(start, ts, max(budget - used, 0), layout.full_attn_spans)
                if end <= start and self._slack:
                    end = whole_span_end(start, ts, max(budget - used, 0) + self._slack, layout.full_attn_spans)
                if end <= start:
                    if plan.chunks or used:
                        break
                    end = chunk_end(start, ts, ts - start, layout.full_attn_spans)
                if not self._allocate(st, seq, end, plan, admitting):
                    return self._cannot_fit(st, plan, admitting)
                used += self._add_chunk(st, seq, start, end, plan)
            if admitting and not used:
                return -1
            if not st.status.admitted:
                move(st, RequestStatus.IMAGE_PREFILL)
            st.mark("first_scheduled")
            return used
        # a denoising step: every row's image block, atomically
        full_step = self.model.runs_backbone(st, st.step)
        need = (slot_end - ts) * len(st.rows) if full_step else 0
        cap = self.config.max_num_image_tokens
        timed = self._blocks_timed()  # sized by its seconds, apart from the text tokens' budget
        if not self._block_fits(need, plan):
            return -1 if admitting else 0
        if cap is None:
            room = self.config.max_num_batched_tokens - plan.num_tokens if timed else budget
            if need > room and (plan.chunks or room < 0):
                return -1 if admitting else 0
        elif need > self._image_left and self._image_left < cap:  # its own budget, already partly spent
            return -1 if admitting else 0
        for seq in st.rows:
            if not self._allocate(st, seq, slot_end, plan, admitting):
                return self._cannot_fit(st, plan, admitting)
        if st.status is not RequestStatus.DIFFUSE:
            if not st.status.admitted:  # admitted with every row's prefix found in the prefix cache
                move(st, RequestStatus.IMAGE_PREFILL)
            h, w = layout.slots("gen")[0].grid
            plan.diffusion_starts.append(DiffusionStart(st.request_id, (h, w), st.num_steps, st.flow_shift,
                                                        st.guidance_scale, st.use_cfg, st.use_taylor_cache,
                                                        st.row_groups))
            move(st, RequestStatus.DIFFUSE)
            st.mark("diffusion_start")
        idx = []
        if full_step:
            for seq in st.rows:
                idx.append(len(plan.chunks))
                self._add_chunk(st, seq, ts, slot_end, plan, diffusion=True)
        preview = st.preview_steps.index(st.step) if st.step in st.preview_steps else None
        if preview is not None and not self._vae_fits(st):
            preview = None  # a preview never displaces a final image from the step's VAE budget
        if preview is not None:
            self._send_decode(st, preview)
        plan.diffusion_steps.append(DiffusionStep(st.request_id, st.step, idx, preview))
        st.mark("first_scheduled")
        if cap is not None:
            self._image_left -= need
            return 0  # nothing taken from the prefill / text budget
        return 0 if timed else need

    def _blocks_needed(self, st: RequestState) -> int:
        """KV blocks the request needs at once in its current phase on one pool (every row up to its end; under
        CFG parallel its rows are on different groups' pools)."""
        bs = self.block_size
        if st.phase == "text":
            return -(-len(st.cond.token_ids) // bs)
        end = st.cond.layout.slots("gen")[0].end
        rows = len({self._row_group(st, q) for q in st.rows}) if self.cfg_parallel_size > 1 else 1
        return len(st.rows) // rows * -(-end // bs)

    @property
    def blocks_per_pool(self) -> int:
        """Blocks one row's pool holds: the whole cache, or one CFG group's."""
        return self.kv.blocks_per_group if self.cfg_parallel_size > 1 else self.kv.num_blocks

    def _cannot_fit(self, st: RequestState, plan: SchedulerOutput, admitting: bool) -> int:
        """The request's blocks cannot be had this step: drop what it put in the plan, then wait
        (admission) or preempt itself (running); one that could never fit the whole cache fails (400) instead of
        cycling between preemption and re-admission."""
        self._drop_from_plan(st, plan)
        need = self._blocks_needed(st)
        if need > self.blocks_per_pool:
            self._free(st)
            self._failed_outputs.append(RequestOutput(
                st, finish_reason=FinishReason.ERROR, status=400,
                error=f"the request does not fit in the KV cache (it needs {need} blocks of "
                      f"{self.block_size} tokens; the cache has {self.blocks_per_pool})"))
            return -1 if admitting else 0
        if admitting:
            self.free_kv(st)
            for seq in st.rows:
                seq.num_computed = 0
            return -1
        self.preempt(st)
        return 0

    @staticmethod
    def _drop_from_plan(st: RequestState, plan: SchedulerOutput) -> None:
        plan.chunks[:] = [c for c in plan.chunks if c.request_id != st.request_id]
        plan.diffusion_steps[:] = [d for d in plan.diffusion_steps if d.request_id != st.request_id]

    # ------------------------------------------------------------------ applying the worker's answer
    def update_from_output(self, plan: SchedulerOutput, out: RunnerOutput) -> list[RequestOutput]:
        """Advance every request the step touched; returns one `RequestOutput` per request with news, in order."""
        outputs: dict[str, RequestOutput] = {o.state.request_id: o for o in self._failed_outputs}
        self._failed_outputs = []

        def output(st: RequestState) -> RequestOutput:
            return outputs.setdefault(st.request_id, RequestOutput(st))

        def finish(st: RequestState, reason: FinishReason, error: str | None = None, status: int | None = None):
            self._free(st)
            o = output(st)
            o.finish_reason, o.error, o.status = reason, error, status

        cache = self.encoder_cache
        for key, nbytes in out.encoded.items():
            self.encoding.pop(key, None)
            cache.insert(key, nbytes)
        for key in out.encode_failed:
            self.encoding.pop(key, None)
        for key in out.decoded:
            self.decoding.pop(tuple(key), None)
            self.decode_flops.pop(tuple(key), None)
        if out.encode_failed:
            for st in list(self.waiting):
                bad = [out.encode_failed[e.key] for e in st.encoder_inputs if e.key in out.encode_failed]
                if bad and not st.status.admitted:
                    finish(st, FinishReason.ERROR, f"condition image encoding failed: {bad[0]}")
        for rid, msg in out.failed.items():
            st = self.requests.get(rid)
            if st is not None:
                finish(st, FinishReason.ERROR, msg)

        self._record_computed(plan)
        for rid, tok in out.sampled_tokens.items():
            st = self.requests.get(rid)
            if st is not None:
                self._on_token(st, tok, output(st), finish)
        for rid, step in out.diffusion_steps_done.items():
            st = self.requests.get(rid)
            if st is None:
                continue
            st.step = step + 1
            if st.step >= st.num_steps:
                st.mark("diffusion_end")
                move(st, RequestStatus.VAE_DECODE)
                self.free_kv(st)  # the image needs no KV any more
                if st.req.output_type == "latent":
                    finish(st, FinishReason.IMAGE)
        for rid, preview in out.partial_images.items():
            st = self.requests.get(rid)
            if st is not None:
                output(st).partial_image = preview
        for rid, img in out.images.items():
            st = self.requests.get(rid)
            if st is not None:
                st.mark("vae_end")
                output(st).image = img
                finish(st, FinishReason.IMAGE)
        return list(outputs.values())

    def _record_computed(self, plan: SchedulerOutput) -> None:
        """Count the KV the forward wrote, and register blocks that just filled in the prefix cache."""
        bs = self.block_size
        kv = self.kv
        for c in plan.chunks:
            st = self.requests.get(c.request_id)
            if st is None or c.diffusion:
                continue
            seq = st.cond if c.seq_id == st.cond.seq_id else st.uncond
            if seq is None or seq.token_ids is not c.token_ids:
                continue
            seq.num_computed = max(seq.num_computed, c.end)
            limit = min(seq.num_computed, seq.cacheable or seq.num_computed)
            # only when a block filled up (not on every decode token): the keys cost a pass over the image slots
            if kv.enable_prefix_caching and seq.allocated and limit // bs > kv.num_registered_blocks(seq.seq_id):
                kv.cache_full_blocks(seq.seq_id, seq.token_ids, block_extra_keys(st, seq, bs, limit), limit)

    def _on_token(self, st: RequestState, tok: int, o: RequestOutput, finish) -> None:
        m = st.machine
        move(st, RequestStatus.THINK)
        st.mark("first_token")
        m.feed(tok)
        new = [tok]
        if m.needs_close:
            new += m.close()
        st.generated.extend(new)
        st.cond.token_ids.extend(new)
        o.new_token_ids.extend(new)
        if not m.finished:
            return
        st.mark("think_end")
        if st.bot_task == "auto":
            finish(st, FinishReason.TEXT if tok in m.stop_ids else FinishReason.LENGTH)
            return
        if st.ratio_index is None:
            st.ratio_index = m.ratio_index
        if st.ratio_index is None:
            finish(st, FinishReason.ERROR, "the model did not choose an image size")
            return
        try:
            layout = self.model.image_phase_layout(st)
        except RequestError as e:  # the request's own inputs and text do not fit: a client error
            finish(st, FinishReason.ERROR, str(e), status=400)
            return
        enter_image_phase(st, layout)
        move(st, RequestStatus.IMAGE_PREFILL)


