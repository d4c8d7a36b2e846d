"""The scheduler: which token ranges of which requests run in the next forward, under one token budget.

Every phase is a token range of a request's sequence(s), so one policy packs them all (FCFS over the
running requests, then admissions from the waiting queue):

* text phase: the uncomputed tail of the cond row (prefill chunks, then one decode token per step); when
  the chunk reaches the end of the row the worker samples the next token under the stage machine's forcing;
* image phase: first the rows' prefixes up to the generated image's `<timestep>` (the cond row keeps the
  think phase's KV, decision 2), then every denoising step recomputes `<timestep>`.. last `<img>` of each
  row in place (CFG rows in the same forward); a Taylor-cache step needs no tokens at all;
* VAE decode: no tokens; requests are decoded together, batched by size.

A bidirectional image block is never split across forwards. When the KV blocks run out the most
recently admitted running request is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from diffgentor.engine.block_manager import KVCacheManager, compute_block_hashes
from diffgentor.engine.plan import Chunk, DiffusionStart, DiffusionStep, NewRequestData, SampleSpec, SchedulerOutput
from diffgentor.engine.request import RequestStatus
from diffgentor.engine.request_state import RequestState, SeqState, block_extra_keys


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


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 8192
    block_size: int = 16


@dataclass
class Scheduler:
    config: SchedulerConfig
    kv: KVCacheManager
    waiting: deque[RequestState] = field(default_factory=deque)
    running: list[RequestState] = field(default_factory=list)
    num_preemptions: int = 0

    def add(self, st: RequestState) -> None:
        self.waiting.append(st)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ KV blocks
    def _ensure_seq(self, st: RequestState, seq: SeqState) -> None:
        """Claim the prefix-cached blocks of a row the first time it needs KV."""
        if seq.allocated:
            return
        n = len(seq.token_ids)
        keys = block_extra_keys(st, seq, self.config.block_size, n)
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
            victim = next((r for r in reversed(later)
                           if not self._in_plan(r, plan) and any(q.allocated for q in r.rows)), None)
            if victim is None:
                return False
            self.preempt(victim)
        return True

    @staticmethod
    def _in_plan(st: RequestState, plan: SchedulerOutput) -> bool:
        return any(c.request_id == st.request_id for c in plan.chunks)

    def free_kv(self, st: RequestState) -> None:
        for seq in st.rows:
            if seq.allocated:
                self.kv.free(seq.seq_id)
                seq.allocated = False

    def preempt(self, st: RequestState) -> None:
        """Recompute-style preemption: drop the request's KV; it restarts from its current tokens later."""
        self.free_kv(st)
        for seq in st.rows:
            seq.num_computed = 0
        st.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(st)
        st.status = RequestStatus.WAITING
        self.waiting.appendleft(st)

    def _prefix_in_flight(self, st: RequestState) -> bool:
        if not self.kv.enable_prefix_caching or st.cond.allocated:
            return False
        seq = st.cond
        n = len(seq.token_ids)
        hashes = compute_block_hashes(seq.token_ids, self.config.block_size,
                                      block_extra_keys(st, seq, self.config.block_size, n))
        i = self.kv.num_cached_prefix_blocks(hashes)
        return i < len(hashes) and hashes[i] in self.kv.inflight_hashes()

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for st in list(self.running):
            if st in self.running:
                budget -= self._schedule_request(st, plan, budget)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            st = self.waiting[0]
            if budget <= 0 and st.status is not RequestStatus.VAE_DECODE:
                break
            if self.running and self._prefix_in_flight(st):
                break  # another request is computing this prompt's next blocks: wait a step and hit the cache
            used = self._schedule_request(st, plan, budget, admitting=True)
            if used < 0:
                break
            self.waiting.popleft()
            self.running.append(st)
            if not st.sent_to_worker:
                plan.new_requests.append(NewRequestData(st.request_id, st.seed, st.vae_images, st.vit_images,
                                                        st.sampling))
                st.sent_to_worker = True
            budget -= used
        return plan

    def _schedule_request(self, st: RequestState, plan: SchedulerOutput, budget: int, admitting: bool = False) -> int:
        """Add the request's work for this step; returns tokens used (-1: could not admit)."""
        if st.status is RequestStatus.VAE_DECODE:
            plan.vae_decodes.append(st.request_id)
            return 0
        if st.phase == "text":
            return self._schedule_text(st, plan, budget, admitting)
        return self._schedule_image(st, plan, budget, admitting)

    def _add_chunk(self, st, seq, start, end, plan, sample=None, diffusion=False) -> int:
        plan.chunks.append(Chunk(st.request_id, seq.seq_id, seq.token_ids, seq.layout, start, end,
                                 self.kv.block_table(seq.seq_id), sample, diffusion))
        return end - start

    def _schedule_text(self, st: RequestState, plan: SchedulerOutput, budget: int, admitting: bool) -> int:
        seq = st.cond
        self._ensure_seq(st, seq)
        target = len(seq.token_ids)
        start = seq.num_computed
        end = chunk_end(start, target, max(budget, 0), seq.layout.full_attn_spans)
        if end <= start:
            if plan.chunks or budget <= 0:
                return -1 if admitting else 0
            end = chunk_end(start, target, target - start, seq.layout.full_attn_spans)
        if not self._allocate(st, seq, end, plan, admitting):
            return self._cannot_fit(st, plan, admitting)
        sample = None
        if end == target:
            m = st.machine
            sample = SampleSpec(st.sampling, m.forced_token, st_ratio_ids(st) if m.needs_ratio_pick else None)
        if st.status in (RequestStatus.WAITING, RequestStatus.PREFILL):
            st.status = RequestStatus.PREFILL if end < st.num_prompt_tokens else RequestStatus.THINK
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
                if end <= start:
                    if plan.chunks or used:
                        break
                    end = chunk_end(start, ts, ts - start, layout.full_attn_spans)
                if not self._allocate(st, seq, end, plan, admitting):
                    return self._cannot_fit(st, plan, admitting)
                used += self._add_chunk(st, seq, start, end, plan)
            if admitting and not used:
                return -1
            if st.status in (RequestStatus.WAITING, RequestStatus.PREFILL, RequestStatus.THINK):
                st.status = RequestStatus.PREFILL if st.step == 0 else RequestStatus.DIFFUSE
            return used
        # a denoising step: every row's image block, atomically
        full_step = not st.use_taylor_cache or _taylor_full_step(st)
        need = (slot_end - ts) * len(st.rows) if full_step else 0
        if need > budget and (plan.chunks or budget < 0):
            return -1 if admitting else 0
        for seq in st.rows:
            if not self._allocate(st, seq, slot_end, plan, admitting):
                return self._cannot_fit(st, plan, admitting)
        if not st.diffusion_started:
            h, w = layout.slots("gen")[0].grid
            plan.diffusion_starts.append(DiffusionStart(st.request_id, (h, w), st.num_steps, st.flow_shift,
                                                        st.guidance_scale, st.use_cfg, st.use_taylor_cache))
            st.diffusion_started = True
            st.mark("diffusion_start")
        idx = []
        if full_step:
            for seq in st.rows:
                idx.append(len(plan.chunks))
                self._add_chunk(st, seq, ts, slot_end, plan, diffusion=True)
        plan.diffusion_steps.append(DiffusionStep(st.request_id, st.step, idx))
        st.status = RequestStatus.DIFFUSE
        return need

    def _cannot_fit(self, st: RequestState, plan: SchedulerOutput, admitting: bool) -> int:
        """The request's blocks cannot be had this step: drop what it put in the plan, then wait
        (admission) or preempt itself (running)."""
        self._drop_from_plan(st, plan)
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


def st_ratio_ids(st: RequestState) -> tuple[int, ...]:
    return tuple(st.machine.sp.ratio)


def _taylor_full_step(st: RequestState) -> bool:
    """Whether this denoising step runs the backbone (the Taylor cache extrapolates the others)."""
    if st.taylor_schedule is None:
        from diffgentor.engine.models.hunyuan_image_3.taylor_cache import TaylorCacheConfig, full_step_schedule

        st.taylor_schedule = full_step_schedule(TaylorCacheConfig(), st.num_steps)
    return st.taylor_schedule[st.step]
