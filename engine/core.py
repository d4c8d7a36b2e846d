"""The engine core: admits requests, runs scheduler -> worker steps, and turns results into events.

`EngineCore.step()` is the busy loop's body: the scheduler packs a `SchedulerOutput`, the worker
executes it in one forward, and `_update` feeds sampled tokens to each request's stage machine, advances
diffusion steps, finishes decoded images and frees KV blocks. Every request-level failure (bad input,
a worker error pinned on it) becomes that request's error event; the others carry on.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from diffgentor.engine.block_manager import KVCacheManager
from diffgentor.engine.config import EngineConfig
from diffgentor.engine.model_runner import ModelRunner
from diffgentor.engine.models.hunyuan_image_3.config import GenerationDefaults
from diffgentor.engine.models.hunyuan_image_3.image_processing import ImageProcessor
from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
from diffgentor.engine.models.hunyuan_image_3.prompt import PromptBuilder
from diffgentor.engine.models.hunyuan_image_3.system_prompt import SystemPrompts
from diffgentor.engine.models.hunyuan_image_3.tokenizer import HunyuanTokenizer
from diffgentor.engine.parallel import ParallelContext
from diffgentor.engine.plan import RunnerOutput, SchedulerOutput
from diffgentor.engine.request import (
    CoreSnapshot,
    EngineEvent,
    FinishReason,
    GenerationRequest,
    RequestResult,
    RequestStatus,
)
from diffgentor.engine.request_state import (
    ProcessedRequest,
    ProcessorContext,
    RequestError,
    RequestState,
    block_extra_keys,
    enter_image_phase,
    process_request,
    state_from_processed,
)
from diffgentor.engine.scheduler import Scheduler, SchedulerConfig


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
    """One engine replica. Its drivers (the offline `Engine`, the engine-core process loop, a tensor-parallel rank)
    use only the public methods, which `TPExecutor` implements too, so either can sit behind them."""

    failed: str | None = None  # a fatal error (only a tensor-parallel executor ever has one)

    def __init__(
        self,
        model: HunyuanImage3ForCausalMM,
        tokenizer: HunyuanTokenizer,
        defaults: GenerationDefaults,
        system_prompts: SystemPrompts | None,
        config: EngineConfig,
        num_blocks: int,
    ) -> None:
        self.config = config
        self.model = model
        mc = model.config
        builder = PromptBuilder.from_config(tokenizer, mc, template=defaults.sequence_template)
        req_defaults = config.request_defaults()
        if config.default_num_inference_steps:
            req_defaults["num_inference_steps"] = config.default_num_inference_steps
        self.ctx = ProcessorContext(mc, defaults, tokenizer, builder, ImageProcessor(mc), system_prompts, req_defaults)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.block_size), self.kv
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.requests: dict[str, RequestState] = {}
        self.results: dict[str, RequestResult] = {}
        self._to_free: list[str] = []
        self.stats = StepStats()

    @classmethod
    def from_config(cls, config: EngineConfig, parallel: ParallelContext | None = None) -> EngineCore:
        """Load the checkpoint and build the core; `parallel` makes this a tensor-parallel rank's replica (the model
        loads only the rank's shards; its collectives keep the replicas in lockstep, see `engine.tp_executor`)."""
        if config.model is None:
            raise ValueError("EngineConfig.model (the checkpoint folder) is required")
        path = Path(config.model)
        dtype = getattr(torch, config.resolve_dtype())
        model = HunyuanImage3ForCausalMM.from_pretrained(
            path, dtype=dtype, device=config.resolve_device(), attn_backend=config.attn_impl, moe_impl=config.moe_impl,
            parallel=parallel,
        )
        tok = HunyuanTokenizer.from_pretrained(path, require_distil_tokens=model.config.cfg_distilled)
        c = model.config
        kv_heads = len(parallel.kv_head_range(c.num_key_value_heads)) if parallel else c.num_key_value_heads
        bytes_per_block = 2 * c.num_hidden_layers * config.block_size * kv_heads * c.head_dim * \
            torch.finfo(dtype).bits // 8
        free = torch.cuda.mem_get_info()[0] if config.on_cuda() else None
        num_blocks = config.resolve_num_blocks(bytes_per_block, free)
        if parallel is not None and parallel.is_parallel:  # replicas must schedule alike: the smallest cache wins
            import torch.distributed as dist

            n = torch.tensor([num_blocks], dtype=torch.int64, device=model.device if config.on_cuda() else "cpu")
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=parallel.group)
            num_blocks = int(n.item())
        return cls(model, tok, GenerationDefaults.from_pretrained(path), SystemPrompts.from_pretrained(path),
                   config, num_blocks)

    # ------------------------------------------------------------------ requests
    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    def add_request(self, req: GenerationRequest) -> list[EngineEvent]:
        """Validate, preprocess and queue; a bad request is answered at once with its error (no block taken)."""
        try:
            p = process_request(self.ctx, req)
        except RequestError as e:
            return self._reject(req.request_id, 400, str(e))
        return self.add_processed(p)

    def add_processed(self, p: ProcessedRequest) -> list[EngineEvent]:
        """Queue a request whose images the caller already decoded (the API server does, in its own process).
        A refusal is one error event carrying its HTTP status: 400 bad input or duplicate id, 429 queue full."""
        rid = p.request.request_id
        if rid in self.requests:
            return self._reject(rid, 400, f"duplicate request id {rid!r}")
        if len(self.scheduler.waiting) >= self.config.max_waiting_requests:
            return self._reject(rid, 429, "too many waiting requests; retry later")
        try:
            st = state_from_processed(self.ctx, p)
        except RequestError as e:
            return self._reject(rid, 400, str(e))
        self.requests[rid] = st
        self.scheduler.add(st)
        return []

    def _reject(self, rid: str, status: int, msg: str) -> list[EngineEvent]:
        if rid not in self.requests:  # a duplicate id must not clobber the running request's result
            self.results[rid] = RequestResult(request_id=rid, finish_reason=FinishReason.ERROR, error=msg)
        return [self._error_event(rid, msg, status=status)]

    def abort(self, request_id: str) -> list[EngineEvent]:
        st = self.requests.get(request_id)
        if st is None:
            return []
        return self._finish(st, FinishReason.ABORT, error="aborted")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def needs_release(self) -> bool:
        """Finished requests still hold worker-side state (latents, caches) that an idle `run_until_done` frees."""
        return bool(self._to_free)

    def close(self) -> None:
        """Nothing to stop in-process (a tensor-parallel executor stops its ranks)."""

    def poll_failures(self) -> list[EngineEvent]:
        """Between steps: nothing can fail in-process (a tensor-parallel executor checks its ranks here)."""
        return []

    def snapshot(self) -> CoreSnapshot:
        kv, sched = self.kv, self.scheduler
        return CoreSnapshot(
            num_running=len(sched.running), num_waiting=len(sched.waiting), kv_usage=float(kv.usage),
            num_free_blocks=int(kv.num_free_blocks), prefix_cache_queries=int(kv.stats.queries),
            prefix_cache_hits=int(kv.stats.hits), num_preemptions=int(sched.num_preemptions),
            diffusion_steps=self.stats.diffusion_steps,
        )

    # ------------------------------------------------------------------ the loop body
    def step(self) -> list[EngineEvent]:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        plan.finished_request_ids.extend(self._to_free)
        self._to_free = []
        events: list[EngineEvent] = []
        if plan.is_empty:
            events += self._unschedulable()
            return events
        t1 = time.perf_counter()
        out = self.runner.execute(plan)
        t2 = time.perf_counter()
        events += self._update(plan, out)
        t3 = time.perf_counter()
        s = self.stats
        s.steps += 1
        s.schedule_s += t1 - t0
        s.execute_s += t2 - t1
        s.update_s += t3 - t2
        s.forward_s += out.timings.get("forward", 0.0)
        s.post_s += out.timings.get("post", 0.0)
        s.vae_s += out.timings.get("vae", 0.0)
        s.tokens += plan.num_tokens
        s.diffusion_steps += len(plan.diffusion_steps)
        for c in plan.chunks:
            kind = "diffuse" if c.diffusion else ("decode" if c.end - c.start == 1 and c.sample else "prefill")
            s.phase_tokens[kind] += c.end - c.start
        return events

    def _unschedulable(self) -> list[EngineEvent]:
        """Nothing could run although work is queued: the head request can never fit the KV cache."""
        events: list[EngineEvent] = []
        if self.scheduler.waiting and not self.scheduler.running:
            st = self.scheduler.waiting.popleft()
            self.scheduler.running.append(st)
            events += self._finish(st, FinishReason.ERROR, error="the request does not fit in the KV cache",
                                   status=400)
        return events

    def _update(self, plan: SchedulerOutput, out: RunnerOutput) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for rid, msg in out.failed.items():
            st = self.requests.get(rid)
            if st is not None:
                events += self._finish(st, FinishReason.ERROR, error=msg)
        bs = self.config.block_size
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
            kv = self.kv
            if kv.enable_prefix_caching and seq.allocated and limit // bs > kv.num_registered_blocks(seq.seq_id):
                kv.cache_full_blocks(seq.seq_id, seq.token_ids, block_extra_keys(st, seq, bs, limit), limit)
        for rid, tok in out.sampled_tokens.items():
            st = self.requests.get(rid)
            if st is not None:
                events += self._on_token(st, tok)
        for rid, step in out.diffusion_steps_done.items():
            st = self.requests.get(rid)
            if st is None:
                continue
            st.step = step + 1
            if st.step >= st.num_steps:
                st.mark("diffusion_end")
                st.status = RequestStatus.VAE_DECODE
                self.scheduler.free_kv(st)  # the image needs no KV any more
                if st.req.output_type == "latent":
                    res = self._result(st, FinishReason.IMAGE)
                    res.latents = self.runner.final_latents(rid).detach().cpu()
                    events += self._finish(st, FinishReason.IMAGE, result=res)
        for rid, img in out.images.items():
            st = self.requests.get(rid)
            if st is not None:
                events += self._on_image(st, img)
        return events

    def _on_token(self, st: RequestState, tok: int) -> list[EngineEvent]:
        m = st.machine
        if st.status is RequestStatus.PREFILL:
            st.status = RequestStatus.THINK
        st.mark("first_token")
        m.feed(tok)
        st.generated.append(tok)
        st.cond.token_ids.append(tok)
        if m.needs_close:
            closing = m.close()
            st.generated.extend(closing)
            st.cond.token_ids.extend(closing)
        events = self._text_delta(st)
        if not m.finished:
            return events
        st.mark("think_end")
        if st.bot_task == "auto":
            reason = FinishReason.TEXT if tok == self.ctx.tokenizer.special.eos else FinishReason.LENGTH
            return events + self._finish(st, reason)
        if st.ratio_index is None:
            st.ratio_index = m.ratio_index
        if st.ratio_index is None:
            return events + self._finish(st, FinishReason.ERROR, error="the model did not choose an image size")
        try:
            enter_image_phase(self.ctx, st)
        except RequestError as e:
            return events + self._finish(st, FinishReason.ERROR, error=str(e))
        return events

    def _text_delta(self, st: RequestState) -> list[EngineEvent]:
        text = self._text(st)
        if text.startswith(st.text_sent) and len(text) > len(st.text_sent):
            delta = text[len(st.text_sent):]
            st.text_sent = text
            return [EngineEvent(request_id=st.request_id, kind="text", text=delta)]
        return []

    def _text(self, st: RequestState) -> str:
        prefix = []
        if st.machine.start_id is not None:
            prefix = [st.machine.start_id]
        return self.ctx.tokenizer.decode(prefix + st.generated)

    def _on_image(self, st: RequestState, img) -> list[EngineEvent]:
        pil = Image.fromarray(img)
        if st.align_image_size and st.vae_images:
            pil = self.ctx.images.align_output_size(pil, st.vae_images)
        st.mark("vae_end")
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        res = self._result(st, FinishReason.IMAGE)
        res.image = pil
        res.latents = self.runner.final_latents(st.request_id).detach().cpu()
        events = [EngineEvent(request_id=st.request_id, kind="image", image_png=buf.getvalue())]
        return events + self._finish(st, FinishReason.IMAGE, result=res)

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
        layout = st.cond.layout
        size = layout.gen_image_size if st.phase == "image" else None
        return RequestResult(
            request_id=st.request_id, finish_reason=reason, text=self._text(st) if st.generated else "",
            generated_ids=list(st.generated), image_size=size, ratio_index=st.ratio_index,
            truncated=st.machine.truncated, num_prompt_tokens=st.num_prompt_tokens,
            num_generated_tokens=len(st.generated), timings=timings, error=error,
        )

    def _finish(self, st: RequestState, reason: FinishReason, error: str | None = None,
                result: RequestResult | None = None, status: int | None = None) -> list[EngineEvent]:
        self.scheduler.free_kv(st)
        if st in self.scheduler.running:
            self.scheduler.running.remove(st)
        elif st in self.scheduler.waiting:
            self.scheduler.waiting.remove(st)
        self.requests.pop(st.request_id, None)
        if st.sent_to_worker:
            self._to_free.append(st.request_id)
        st.status = RequestStatus.FINISHED
        self.results[st.request_id] = result or self._result(st, reason, error)
        if reason in (FinishReason.ERROR, FinishReason.ABORT):
            return [self._error_event(st.request_id, error or reason.value, reason, status)]
        return [EngineEvent(request_id=st.request_id, kind="finished", finish_reason=reason.value)]

    @staticmethod
    def _error_event(rid: str, msg: str, reason: FinishReason = FinishReason.ERROR,
                     status: int | None = None) -> EngineEvent:
        return EngineEvent(request_id=rid, kind="error", error=msg, finish_reason=reason.value, status=status)

    def run_until_done(self, request_ids: Iterable[str] | None = None) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        while self.has_unfinished():
            events += self.step()
        if self._to_free:
            self.runner.execute(SchedulerOutput(finished_request_ids=self._to_free))
            self._to_free = []
        return events
