"""The engine core: admits requests, runs scheduler -> worker steps, and turns their outputs into events.

`EngineCore.step()` is the busy loop's body: `Scheduler.schedule()` packs a `SchedulerOutput`, the executor's
worker(s) execute it (encodes, one flat forward, sampling, Euler steps, VAE decodes) and
`Scheduler.update_from_output()` applies the result to the requests; the core only turns the per-request outputs
into events (new token ids, uint8 pixels) and results. Detokenising, aligning and encoding images is the
frontend's output processing (engine/output_processor.py), never the step's. Every driver is the same loop:

    while core.has_unfinished_requests():
        outputs = core.step()  # one EngineCoreOutputs: the step's events and the results of the requests it ended

Everything the core reports travels in those outputs, refusals of `add_processed` and aborts included (they come
with the next step); requests that finished release their worker-side state in the next plan, which that loop
also runs. Every request-level failure (bad input, a worker error pinned on it) becomes that request's error
event; the others carry on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffgentor.engine.cfg_groups import GroupedKVCacheManager
from diffgentor.engine.config import EngineConfig
from diffgentor.engine.executor import Executor, ExecutorError, UniProcExecutor
from diffgentor.engine.input_processor import ProcessedRequest, ProcessorContext, load_processor_context
from diffgentor.engine.kv_cache_manager import KVCacheManager
from diffgentor.engine.parallel import check_layout_heads
from diffgentor.engine.request import CoreSnapshot, EngineCoreEvent, FinishReason, ImagePixels, RequestResult
from diffgentor.engine.request_contract import RequestError
from diffgentor.engine.request_state import RequestState, state_from_processed
from diffgentor.engine.scheduler import RequestOutput, Scheduler
from diffgentor.engine.scheduler_output import RunnerOutput, SchedulerOutput
from diffgentor.engine.step_cost import StepCost
from diffgentor.engine.worker import Worker


@dataclass
class EngineCoreOutputs:
    """What one `EngineCore.step()` reports: the streamed events in order (token ids, previews, images, then one
    finished or error event per ended request) and the result of every request that ended."""

    events: list[EngineCoreEvent] = field(default_factory=list)
    finished: dict[str, RequestResult] = field(default_factory=dict)


@dataclass
class StepStats:
    steps: int = 0
    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0
    forward_s: float = 0.0
    post_s: float = 0.0
    vae_s: float = 0.0
    encode_s: float = 0.0  # condition-image encodes (VAE posterior, ViT) run by the encoder stage
    tokens: int = 0
    diffusion_steps: int = 0
    phase_tokens: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0, "diffuse": 0})
    # forward seconds attributed to each phase by its share of the step's tokens
    phase_forward_s: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0, "diffuse": 0.0})


class EngineCore:
    """The engine core: the one scheduler, a request's engine-side state (engine/request_state.py), and an
    `Executor` that runs each step's plan on the worker(s) (in-process, or one process per tensor-parallel rank).
    Input and output processing are the frontend's (engine/input_processor.py, engine/output_processor.py)."""

    failed: str | None = None  # a fatal error (a tensor-parallel rank was lost); every later request is refused

    def __init__(self, ctx: ProcessorContext, config: EngineConfig, executor: Executor) -> None:
        """`ctx`: the checkpoint's input processing (`load_processor_context(path, config)`); the model's answers to
        the scheduler come with it (`ctx.request_logic`)."""
        self.config = config
        self.ctx = ctx
        groups = executor.layout.cfg
        self.step_cost = StepCost()  # measured seconds per text and block token, for the step-time target
        cache = config.cache
        kv: KVCacheManager | GroupedKVCacheManager = (
            KVCacheManager(executor.num_blocks, cache.block_size, cache.enable_prefix_caching) if groups == 1 else
            GroupedKVCacheManager(groups, executor.num_blocks, cache.block_size, cache.enable_prefix_caching))
        self.scheduler = Scheduler(config.scheduler, kv, ctx.request_logic, cache.encoder_cache_bytes,
                                   vae_budget=executor.vae_budget, cfg_parallel_size=groups, step_cost=self.step_cost)
        self.executor = executor
        self.stats = StepStats()
        self._outputs = EngineCoreOutputs()  # what the next step() reports
        self._final_latents: dict[str, torch.Tensor] = {}  # request id -> latents of its finished diffusion

    @property
    def kv(self) -> KVCacheManager | GroupedKVCacheManager:
        return self.scheduler.kv

    @property
    def requests(self) -> dict[str, RequestState]:
        """The unfinished requests (the scheduler's)."""
        return self.scheduler.requests

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineCore:
        """Read the checkpoint's tokenizer and metadata here, and load the model in the worker: in this process, or
        with a layout of more than one rank in one process per rank (`MultiprocExecutor`, set by
        ``config.parallel``)."""
        if config.model.checkpoint is None:
            raise ValueError("EngineConfig.model.checkpoint (the checkpoint folder) is required")
        ctx = load_processor_context(Path(config.model.checkpoint), config)
        layout = config.parallel_layout()
        check_layout_heads(ctx.config.num_attention_heads, ctx.config.num_key_value_heads, layout)
        if layout.world_size > 1:
            from diffgentor.engine.tp.executor import MultiprocExecutor

            executor: Executor = MultiprocExecutor(config, layout=layout)
        else:
            executor = UniProcExecutor(Worker.load(config))
        return cls(ctx, config, executor)

    # ------------------------------------------------------------------ requests
    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def kernel_impls(self) -> dict[str, str]:
        """op -> the kernel implementation the workers run (attention, moe), as proven at start-up."""
        return self.executor.kernel_impls

    def add_processed(self, p: ProcessedRequest) -> None:
        """Queue a request that input processing (engine/input_processor.py, in the frontend) validated and whose
        images it decoded. A refusal is one error event, in the next step's outputs, carrying its HTTP status: 400
        bad input or duplicate id, 429 queue full."""
        self._check()
        rid = p.request.request_id
        if rid in self.requests:
            return self.reject(rid, 400, f"duplicate request id {rid!r}")
        if len(self.scheduler.waiting) >= self.config.scheduler.max_waiting_requests:
            return self.reject(rid, 429, "too many waiting requests; retry later")
        try:
            st = state_from_processed(self.ctx, p)
        except RequestError as e:
            return self.reject(rid, 400, str(e), e.param)
        self.scheduler.add_request(st)

    def reject(self, rid: str, status: int, msg: str, param: str | None = None) -> None:
        """Refuse a request (the frontend's input processing refuses through here too): its error event and result
        come with the next step's outputs."""
        if rid not in self.requests:  # a duplicate id must not clobber the running request's result
            self._outputs.finished[rid] = RequestResult(request_id=rid, finish_reason=FinishReason.ERROR, error=msg)
        self._outputs.events.append(self._error_event(rid, msg, status=status, param=param))

    def abort(self, request_id: str) -> None:
        """End a request in any phase; its abort error comes with the next step's outputs."""
        for st in self.scheduler.finish_requests([request_id], FinishReason.ABORT):
            self._outputs.events += self._finished(RequestOutput(st, finish_reason=FinishReason.ABORT,
                                                                 error="aborted"))

    def has_unfinished_requests(self) -> bool:
        """Whether `step()` has anything to do: requests to run, finished ones whose worker-side state the next plan
        releases, or outputs (refusals, aborts) not yet reported. A failed core has only its outputs left: the
        workers that would release state or report encodes in flight are gone."""
        pending = bool(self._outputs.events or self._outputs.finished)
        return pending if self.failed is not None else self.scheduler.has_requests() or pending

    def close(self) -> None:
        """Stop the worker processes, if any."""
        self.executor.close()

    def check_health(self) -> None:
        """Between steps, while idle: raises `ExecutorError` (the core has failed) if a worker was lost meanwhile;
        requests in flight then end with that error in the next step's outputs."""
        self._check()
        try:
            self.executor.check_health()
        except ExecutorError as e:
            self._fail(str(e))
            raise

    def _check(self) -> None:
        if self.failed is not None:
            raise ExecutorError(self.failed)

    def _execute(self, plan: SchedulerOutput) -> RunnerOutput:
        out = self.executor.execute_model(plan)
        self._final_latents.update(out.final_latents)
        return out

    def _fail(self, msg: str) -> None:
        """A worker was lost: every unfinished request ends with `msg`; the core refuses everything after."""
        self.failed = msg
        for st in self.scheduler.finish_requests(list(self.requests), FinishReason.ERROR):
            self._outputs.events += self._finished(RequestOutput(st, finish_reason=FinishReason.ERROR, error=msg,
                                                                 status=500))
        self.scheduler.take_finished_ids()
        self.executor.close()

    def snapshot(self) -> CoreSnapshot:
        kv, sched = self.kv, self.scheduler
        enc = sched.encoder_cache
        return CoreSnapshot(
            num_running=len(sched.running), num_waiting=len(sched.waiting), kv_usage=float(kv.usage),
            num_free_blocks=int(kv.num_free_blocks), prefix_cache_queries=int(kv.stats.queries),
            prefix_cache_hits=int(kv.stats.hits), num_preemptions=int(sched.num_preemptions),
            diffusion_steps=self.stats.diffusion_steps, encoder_cache_hits=enc.stats.hits,
            encoder_cache_misses=enc.stats.misses, encoder_cache_bytes=enc.num_bytes,
            num_encoding=sched.num_encoding, num_decoding=sched.num_decoding,
        )

    # ------------------------------------------------------------------ the loop body
    def step(self) -> EngineCoreOutputs:
        """schedule -> execute -> update_from_output; the outputs become events and results."""
        if self.failed is None:
            self._step()
        outputs, self._outputs = self._outputs, EngineCoreOutputs()
        return outputs

    def _step(self) -> None:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        try:
            if not plan.has_model_work:
                if plan.finished_request_ids or plan.encoder_evictions:
                    self._execute(plan)  # only frees worker-side state
                self._outputs.events += self._process(self.scheduler.unschedulable())
                return
            t1 = time.perf_counter()
            out = self._execute(plan)
        except ExecutorError as e:
            return self._fail(str(e))
        t2 = time.perf_counter()
        self._outputs.events += self._process(self.scheduler.update_from_output(plan, out))
        t3 = time.perf_counter()
        self._account(plan, out, t1 - t0, t2 - t1, t3 - t2)

    def _account(self, plan: SchedulerOutput, out: RunnerOutput, schedule_s: float, execute_s: float,
                 update_s: float) -> None:
        s = self.stats
        s.steps += 1
        s.schedule_s += schedule_s
        s.execute_s += execute_s
        s.update_s += update_s
        forward = out.timings.get("forward", 0.0)
        s.forward_s += forward
        s.post_s += out.timings.get("post", 0.0)
        s.vae_s += out.timings.get("vae", 0.0)
        s.encode_s += out.timings.get("encode", 0.0)
        s.tokens += plan.num_tokens
        s.diffusion_steps += len(plan.diffusion_steps)
        step_tokens = {"prefill": 0, "decode": 0, "diffuse": 0}
        for c in plan.chunks:
            kind = "diffuse" if c.diffusion else ("decode" if c.end - c.start == 1 and c.sample else "prefill")
            step_tokens[kind] += c.end - c.start
        # the step-time target's rates: text tokens and denoising-block tokens apart (engine/step_cost.py)
        self.step_cost.observe(step_tokens["prefill"] + step_tokens["decode"], forward, step_tokens["diffuse"])
        total = sum(step_tokens.values())
        for kind, n in step_tokens.items():
            s.phase_tokens[kind] += n
            if total:
                s.phase_forward_s[kind] += forward * n / total

    # ------------------------------------------------------------------ outputs -> events and results
    def _process(self, outputs: list[RequestOutput]) -> list[EngineCoreEvent]:
        """The requests' outputs as events: token ids and uint8 pixels, as the worker produced them (the frontend
        detokenises, aligns and encodes: engine/output_processor.py)."""
        events: list[EngineCoreEvent] = []
        for o in outputs:
            st = o.state
            final = o.finish_reason is not None
            if o.new_token_ids or (final and st.generated):
                first = len(st.generated) == len(o.new_token_ids)  # the request's first ids: name its text's prefix
                start = st.machine.start_id
                events.append(EngineCoreEvent(
                    request_id=st.request_id, kind="tokens", token_ids=list(o.new_token_ids), final=final,
                    prefix_ids=[start] if first and start is not None else []))
            if o.partial_image is not None and not final:
                index, img = o.partial_image
                events.append(EngineCoreEvent(request_id=st.request_id, kind="partial_image",
                                              pixels=ImagePixels.from_array(img), partial_image_index=index))
            if final:
                events += self._finished(o)
        return events

    def _finished(self, o: RequestOutput) -> list[EngineCoreEvent]:
        """A finished request: its result, and its last events (the image, then finished; or the error)."""
        st, reason = o.state, o.finish_reason
        rid = st.request_id
        res = self._result(st, reason, o.error)
        latents = self._final_latents.pop(rid, None)
        if reason in (FinishReason.ERROR, FinishReason.ABORT):
            self._outputs.finished[rid] = res
            return [self._error_event(rid, o.error or reason.value, reason, o.status)]
        events = []
        if reason is FinishReason.IMAGE:
            res.latents = latents
            if o.image is not None:
                events.append(EngineCoreEvent(request_id=rid, kind="image", pixels=ImagePixels.from_array(o.image)))
        self._outputs.finished[rid] = res
        return events + [EngineCoreEvent(request_id=rid, kind="finished", finish_reason=reason.value)]

    def _result(self, st: RequestState, reason: FinishReason, error: str | None = None) -> RequestResult:
        t = st.times
        now = time.perf_counter()
        first = t.get("first_scheduled", now)
        timings = {
            "queue": first - st.arrival,
            "think": t.get("think_end", t.get("diffusion_start", first)) - first if st.generated else 0.0,
            "diffuse": t.get("diffusion_end", now) - t["diffusion_start"] if "diffusion_start" in t else 0.0,
            "vae_decode": t.get("vae_end", now) - t["diffusion_end"] if "diffusion_end" in t else 0.0,
            "total": now - st.arrival,
        }
        if "first_token" in t:
            timings["first_token"] = t["first_token"] - st.arrival
        size = st.cond.layout.gen_image_size  # None unless its image-phase sequence was built
        return RequestResult(
            request_id=st.request_id, finish_reason=reason, generated_ids=list(st.generated), image_size=size,
            ratio_index=st.ratio_index, truncated=st.machine.truncated, num_prompt_tokens=st.num_prompt_tokens,
            num_generated_tokens=len(st.generated), timings=timings, error=error,
        )

    @staticmethod
    def _error_event(rid: str, msg: str, reason: FinishReason = FinishReason.ERROR, status: int | None = None,
                     param: str | None = None) -> EngineCoreEvent:
        return EngineCoreEvent(request_id=rid, kind="error", error=msg, finish_reason=reason.value, status=status,
                               param=param)
