"""The worker: owns the model, the paged KV cache and each request's device-side state.

Each step it receives a `SchedulerOutput` and runs every scheduled chunk of every request in ONE flat
forward (prefill chunks, decode tokens and diffusion image blocks together, so the MoE sees them as one
batch), then samples tokens, takes Euler steps and decodes finished latents. Per-request generators
live here: the request seed's generator draws the condition posteriors then the initial noise (official order);
a second generator seeded alike draws the text tokens. A failure is pinned on the request that caused
it: when a batched forward raises, each request is retried alone and only the failing ones are reported.
On CUDA a decode-only step (one text token per sequence) replays a captured graph instead (`engine.cuda_graph`),
tensor parallel included.

CFG parallel (engine/cfg_groups.py): every rank receives the whole plan but runs only the chunks of its CFG group
(`Chunk.group`). Every group adds every request and draws its noise (the seeded generator stays in step everywhere).
For a request whose conditional and unconditional rows are on different groups, each group computes its own row's
velocity and ONE all-reduce over the CFG group per step (each group fills its rows' slots of a zeroed fp32 buffer, so
the sum is exact) gives every group both velocities; every group then takes the same Euler step, so the latents stay
identical without a broadcast. Only the request's owner group (its cond row's) samples, decodes and reports it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffgentor.engine.cuda_graph import DecodeGraphRunner, cuda_graphs_allowed
from diffgentor.engine.decode_stage import DecodeJob, DecodeStage, wait_for_vae
from diffgentor.engine.encode_stage import EncodeStage
from diffgentor.engine.encoder_cache import EncoderKey
from diffgentor.engine.models.hunyuan_image_3.execution import (
    CondImage,
    EncodedImage,
    FlowMatchSchedule,
    GenInputs,
    HunyuanImage3ForCausalMM,
    SamplingParams,
    StepRows,
    assemble_embeddings,
    cfg_combine,
    condition_from_encoded,
    constrain_batch,
    euler_step,
    guidance_value,
    initial_noise,
    make_generator,
    sample_batch,
    to_uint8,
)
from diffgentor.engine.scheduler_output import (
    FINAL_IMAGE,
    Chunk,
    DiffusionStart,
    DiffusionStep,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
)
from diffgentor.engine.vae_budget import VaeBudget
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk
from diffgentor.kernels.kv_cache import PagedKVCache


@dataclass
class _Diffusion:
    schedule: FlowMatchSchedule
    latents: Tensor
    guidance_scale: float
    use_cfg: bool
    embedded_guidance: float | None
    taylor: object | None = None  # TaylorCache when the request uses it


@dataclass
class _WorkerRequest:
    conds: list[CondImage]
    gen_rng: torch.Generator
    sample_rng: torch.Generator
    sampling: SamplingParams
    diffusion: _Diffusion | None = None
    extra: dict = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: HunyuanImage3ForCausalMM, num_blocks: int, block_size: int,
                 enforce_eager: bool = False, max_num_seqs: int = 16, vae_budget: VaeBudget | None = None,
                 async_encode: bool = False, async_decode: bool = False) -> None:
        self.model = model
        self.config = model.config
        self.vae_budget = vae_budget  # None: one VAE call per size (CPU); else calls sized to the plan's budget
        self.block_size = block_size
        # One page past the KV cache manager's ids 0..num_blocks-1: the scratch block that CUDA-graph padding rows
        # write to and read from (engine/cuda_graph.py); never handed to a request.
        self.scratch_block = num_blocks
        self.kv_cache: PagedKVCache = model.make_kv_cache(num_blocks + 1, block_size)
        use_graphs, _ = cuda_graphs_allowed(model.device, enforce_eager)
        self.decode_graphs: DecodeGraphRunner | None = (
            DecodeGraphRunner(model, self.kv_cache, self.scratch_block, max_num_seqs) if use_graphs else None
        )
        self.requests: dict[str, _WorkerRequest] = {}
        self.parallel = model.model.parallel
        self.tokens_run = 0  # tokens this worker has forwarded (under CFG parallel: its group's share of the plans)
        self.row_groups: dict[str, tuple[int, ...]] = {}  # CFG parallel: request -> its rows' groups (cond first)
        self.split_grids: dict[str, tuple[int, int]] = {}  # requests whose rows are on different groups -> grid
        self.encoder_cache: dict[EncoderKey, EncodedImage] = {}  # the scheduler decides what enters and leaves
        self.encodes = EncodeStage(model, async_encode, vae_budget)  # inline, or a thread beside the steps
        self.decodes = DecodeStage(model, lambda z: to_uint8(model.decode_latents(z)), self.encodes, async_decode,
                                   vae_budget)  # likewise

    # ------------------------------------------------------------------ per-request state
    def _add_request(self, new: NewRequestData) -> None:
        # Generators live on the model's device, like the official code's (torch.Generator(self.device)):
        # on CUDA a seed then gives the official image, and draws happen where the logits / latents are.
        dev = self.model.device
        gen_rng = make_generator(new.seed, dev)
        for k in new.cond_keys:  # a tensor-parallel rank may still be encoding what rank 0 reported
            if k not in self.encoder_cache and self.encodes.is_pending(k):
                self.encodes.store(self.encodes.wait_for(k), self.encoder_cache, None)
        conds = [condition_from_encoded(self.model, self.encoder_cache[k], v, t, gen_rng)
                 for k, v, t in zip(new.cond_keys, new.vae_images, new.vit_images)]
        self.requests[new.request_id] = _WorkerRequest(conds, gen_rng, make_generator(new.seed, dev), new.sampling)

    def _start_diffusion(self, ds: DiffusionStart) -> None:
        req = self.requests[ds.request_id]
        latents = initial_noise(req.gen_rng, (1, self.config.latent_channels, *ds.grid))[0].to(self.model.device)
        taylor = None
        if ds.use_taylor_cache:
            from diffgentor.engine.models.hunyuan_image_3.execution import TaylorCache, TaylorCacheConfig

            taylor = TaylorCache(TaylorCacheConfig(), ds.num_steps)
        req.diffusion = _Diffusion(
            schedule=FlowMatchSchedule.create(ds.num_steps, ds.flow_shift),
            latents=latents,
            guidance_scale=ds.guidance_scale,
            use_cfg=ds.use_cfg,
            embedded_guidance=guidance_value(ds.guidance_scale) if self.config.cfg_distilled else None,
            taylor=taylor,
        )

    def _gen_inputs(self, request_id: str, step: int) -> GenInputs:
        d = self.requests[request_id].diffusion
        t = float(d.schedule.timesteps[step])
        r = float(d.schedule.timesteps_r[step]) if self.config.use_meanflow else None
        return GenInputs(d.latents, t, r, d.embedded_guidance)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        t0 = time.perf_counter()
        for rid in plan.finished_request_ids:
            self.requests.pop(rid, None)
            self.row_groups.pop(rid, None)
            self.split_grids.pop(rid, None)
        for key in plan.encoder_evictions:
            if key not in self.encoder_cache and self.encodes.is_pending(key):  # a rank behind rank 0
                self.encodes.store(self.encodes.wait_for(key), self.encoder_cache, None)
            self.encoder_cache.pop(key, None)
        idle = not (plan.chunks or plan.diffusion_steps or plan.vae_decodes)
        self.encodes.submit(plan.encoder_inputs, step_idle=idle)
        t_enc = time.perf_counter()
        for new in plan.new_requests:
            try:
                self._add_request(new)
            except Exception as e:  # noqa: BLE001 - the request's own images or settings
                out.failed[new.request_id] = f"condition image encoding failed: {e}"
        for ds in plan.diffusion_starts:
            if ds.row_groups is not None:  # recorded even for a failed request: every rank sizes the same exchange
                rows = ds.row_groups[:2 if ds.use_cfg else 1]
                self.row_groups[ds.request_id] = rows
                if len(set(rows)) > 1:
                    self.split_grids[ds.request_id] = ds.grid
            if ds.request_id not in out.failed:
                self._start_diffusion(ds)

        step_of: dict[int, int] = {}
        for st in plan.diffusion_steps:
            for i in st.chunk_indexes:
                step_of[i] = st.step
        chunks = [(i, c) for i, c in enumerate(plan.chunks)
                  if c.request_id not in out.failed and self._runs(c.group)]
        self.encodes.fit_step_threads(decoding=self.decodes.asynchronous and self.decodes.num_pending > 0)
        try:
            hidden = self._forward(chunks, step_of, out)
            self.tokens_run += sum(c.end - c.start for _, c in chunks)
            t1 = time.perf_counter()
            self._sample(chunks, hidden, out)
            previews = self._diffuse(plan, hidden, out)
        finally:
            self.encodes.fit_step_threads(decoding=self.decodes.asynchronous and self.decodes.num_pending > 0)
        t2 = time.perf_counter()
        self._decode(plan, out, previews)
        t3 = time.perf_counter()
        if plan.wait_for_vae:
            wait_for_vae(self.encodes, self.decodes)
        self.encodes.collect(self.encoder_cache, out)
        self.decodes.collect(out, self.requests)
        out.timings.update(encode=t_enc - t0 + time.perf_counter() - t3, forward=t1 - t_enc, post=t2 - t1,
                           vae=t3 - t2)
        return out

    def _embed(self, i: int, c: Chunk, step_of: dict[int, int]) -> tuple[Tensor, Tensor]:
        req = self.requests[c.request_id]
        gen = self._gen_inputs(c.request_id, step_of[i]) if c.diffusion else None
        emb = assemble_embeddings(self.model, c.layout, c.token_ids, req.conds, c.start, c.end, gen)
        return emb, c.layout.positions_for(c.start, c.end)

    def _run(self, chunks: list[tuple[int, Chunk]], step_of: dict[int, int]) -> dict[int, Tensor]:
        if not chunks:
            return {}
        if self.decode_graphs is not None:  # a decode-only step replays its bucket's CUDA graph
            decoded = self.decode_graphs.run([c for _, c in chunks])
            if decoded is not None:
                return {i: decoded[r : r + 1] for r, (i, _) in enumerate(chunks)}
        if self.model.sequence_parallel and any(c.diffusion for _, c in chunks):
            return self._run_sequence_parallel(chunks, step_of)
        h = self.model(*self._rows(chunks, step_of), self.kv_cache)
        return {i: part for (i, _), part in zip(chunks, h.split([c.end - c.start for _, c in chunks]))}

    def _rows(self, chunks: list[tuple[int, Chunk]], step_of: dict[int, int]
              ) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """The chunks' embeddings, RoPE positions and attention metadata, as one flat batch in chunk order."""
        seq_chunks, embeds, positions = [], [], []
        for i, c in chunks:
            emb, pos = self._embed(i, c, step_of)
            embeds.append(emb)
            positions.append(pos)
            seq_chunks.append(SequenceChunk(range(c.start, c.end), c.end, c.block_table, c.layout.full_attn_spans))
        dev = self.model.device
        meta = AttentionMetadata.build(seq_chunks, self.block_size, device=dev)
        return torch.cat(embeds), torch.cat(positions).to(dev), meta

    def _run_sequence_parallel(self, chunks: list[tuple[int, Chunk]], step_of: dict[int, int]) -> dict[int, Tensor]:
        """Sequence parallel: the denoising image blocks' rows are split over the group, the text chunks run whole
        on every rank (`HunyuanImage3ForCausalMM.forward_sequence_parallel`); every rank gets every row's states."""
        text = [(i, c) for i, c in chunks if not c.diffusion]
        image = [(i, c) for i, c in chunks if c.diffusion]
        whole = StepRows(*self._rows(text, step_of)) if text else None
        h_text, h_image = self.model.forward_sequence_parallel(whole, StepRows(*self._rows(image, step_of)),
                                                               self.kv_cache)
        out: dict[int, Tensor] = {}
        for part, h in ((text, h_text), (image, h_image)):
            if part:
                out.update({i: x for (i, _), x in zip(part, h.split([c.end - c.start for _, c in part]))})
        return out

    def _forward(self, chunks, step_of, out: RunnerOutput) -> dict[int, Tensor]:
        try:
            return self._run(chunks, step_of)
        except Exception:  # noqa: BLE001 - find the request(s) at fault, keep the others
            by_req: dict[str, list] = defaultdict(list)
            for i, c in chunks:
                by_req[c.request_id].append((i, c))
            hidden: dict[int, Tensor] = {}
            for rid, part in by_req.items():
                try:
                    hidden.update(self._run(part, step_of))
                except Exception as e:  # noqa: BLE001
                    out.failed[rid] = f"forward failed: {type(e).__name__}: {e}"
            return hidden

    def _sample(self, chunks, hidden: dict[int, Tensor], out: RunnerOutput) -> None:
        """Every sampling row of the step at once: one [B, hidden] gather, one lm_head (vocab-parallel under tensor
        parallel), the forcing and the sampler over [B, V], and one device-to-host copy of the B ids."""
        rows = [(i, c) for i, c in chunks
                if c.sample is not None and i in hidden and c.request_id not in out.failed]
        if not rows:
            return
        ids = self._sample_ids(rows, hidden)
        for (_, c), tok in zip(rows, ids.tolist()):  # the step's one device-to-host copy
            out.sampled_tokens[c.request_id] = tok

    def _sample_ids(self, rows: list[tuple[int, Chunk]], hidden: dict[int, Tensor]) -> Tensor:
        """Sampled ids [B] on the device; reads nothing back to the host."""
        last = torch.cat([hidden[i][-1:] for i, _ in rows])
        logits = constrain_batch(self.model.logits(last), [c.sample for _, c in rows])
        return sample_batch(logits, [c.sample.params for _, c in rows],
                            [self.requests[c.request_id].sample_rng for _, c in rows])

    # ------------------------------------------------------------------ CFG groups
    def _runs(self, group: int) -> bool:
        """Whether this rank's CFG group runs work placed on `group`."""
        return self.parallel.cfg_size == 1 or group == self.parallel.cfg_rank

    def _owns(self, request_id: str) -> bool:
        """This group reports the request (its cond row is here); always with one group."""
        rows = self.row_groups.get(request_id)
        return rows is None or self._runs(rows[0])

    def _has_rows(self, request_id: str) -> bool:
        rows = self.row_groups.get(request_id)
        return rows is None or any(self._runs(g) for g in rows)

    def _exchange_velocities(self, plan: SchedulerOutput, steps: list[DiffusionStep], hidden: dict[int, Tensor],
                             out: RunnerOutput) -> dict[str, list[Tensor]]:
        """Both rows' velocities of every split request of the step, on every CFG group: each group writes its rows
        into a zeroed fp32 buffer and one all-reduce sums them (x + 0 is exact). Every rank runs it with the same
        sizes (from the plan and the placements, never from its own failures): a row that failed here stays zero
        (its failure reaches the core through this group's report)."""
        c = self.config.latent_channels
        sizes = [c * self.split_grids[st.request_id][0] * self.split_grids[st.request_id][1] for st in steps]
        buf = torch.zeros(2 * sum(sizes), dtype=torch.float32, device=self.model.device)
        off = 0
        for st, n in zip(steps, sizes):
            rid = st.request_id
            if rid not in out.failed and rid in self.requests:
                try:
                    mine = [r for r, g in enumerate(self.row_groups[rid]) if self._runs(g)]
                    for r, v in zip(mine, self._row_velocities(plan, st, hidden)):
                        buf[off + r * n : off + (r + 1) * n] = v.flatten()
                except Exception as e:  # noqa: BLE001 - the request's own rows
                    out.failed[rid] = f"velocity failed: {type(e).__name__}: {e}"
            off += 2 * n
        self.parallel.cfg_all_reduce(buf)
        both, off = {}, 0
        for st, n in zip(steps, sizes):
            h, w = self.split_grids[st.request_id]
            both[st.request_id] = [buf[off : off + n].view(c, h, w), buf[off + n : off + 2 * n].view(c, h, w)]
            off += 2 * n
        return both

    def _row_velocities(self, plan: SchedulerOutput, st: DiffusionStep, hidden: dict[int, Tensor]) -> list[Tensor]:
        """The velocities of the request's rows this group runs (cond first): from the step's forward (and fed to
        the Taylor cache), or the Taylor cache's prediction when the step skips the backbone."""
        rid = st.request_id
        d = self.requests[rid].diffusion
        t = float(d.schedule.timesteps[st.step])
        tt = torch.tensor([t], device=self.model.device, dtype=torch.float32)
        image_hidden = []
        mine = [i for i in st.chunk_indexes if self._runs(plan.chunks[i].group)]
        if mine:
            for i in mine:
                c = plan.chunks[i]
                slot = c.layout.slots("gen")[0]
                image_hidden.append(hidden[i][slot.start - c.start : slot.end - c.start])
            if d.taylor is not None:
                d.taylor.update(st.step, torch.stack(image_hidden))
        else:  # Taylor-cache step: the backbone is skipped, its output extrapolated
            image_hidden = list(d.taylor.predict(st.step))
        grid = plan.chunks[mine[0]].layout.slots("gen")[0].grid if mine else self.requests[rid].extra["grid"]
        self.requests[rid].extra["grid"] = grid
        return [self.model.velocity(h[None], grid, tt)[0] for h in image_hidden]

    def _diffuse(self, plan: SchedulerOutput, hidden: dict[int, Tensor], out: RunnerOutput
                 ) -> dict[str, tuple[int, Tensor]]:
        """Euler steps; returns the progressive previews due this step: the predicted clean latents
        x0 = x_t - sigma * v (the flow's straight-line estimate), decoded with the step's VAE batch."""
        previews: dict[str, tuple[int, Tensor]] = {}
        split = [st for st in plan.diffusion_steps if st.request_id in self.split_grids]
        exchanged = self._exchange_velocities(plan, split, hidden, out) if split else {}
        for st in plan.diffusion_steps:
            rid = st.request_id
            if rid in out.failed or not self._has_rows(rid):  # failed, or a request of another CFG group
                continue
            d = self.requests[rid].diffusion
            preds = exchanged[rid] if rid in exchanged else self._row_velocities(plan, st, hidden)
            pred = cfg_combine(preds[0], preds[1], d.guidance_scale) if d.use_cfg else preds[0]
            sigma, sigma_next = d.schedule.sigma_pair(st.step)
            owner = self._owns(rid)
            if st.preview_index is not None and owner:
                previews[rid] = (st.preview_index, euler_step(d.latents, pred, sigma, 0.0))
            d.latents = euler_step(d.latents, pred, sigma, sigma_next)
            if owner:
                out.diffusion_steps_done[rid] = st.step
        return previews

    def _decode(self, plan: SchedulerOutput, out: RunnerOutput, previews: dict[str, tuple[int, Tensor]]) -> None:
        """The step's final images and previews to the decode stage (engine/decode_stage.py), inline or on its
        thread; `collect` reports what ended. Only the owner CFG group decodes (`_owns`). A decode that cannot run
        (its request failed this step) is reported ended at once, so the scheduler's VAE budget never waits for it."""
        jobs = []
        for rid in plan.vae_decodes:
            if rid in out.failed:
                out.decoded.append((rid, FINAL_IMAGE))
            elif self._owns(rid):
                jobs.append(DecodeJob((rid, FINAL_IMAGE), self.requests[rid].diffusion.latents))
        for st in plan.diffusion_steps:
            if st.preview_index is None or not (st.request_id in out.failed or self._owns(st.request_id)):
                continue
            if st.request_id in previews:
                jobs.append(DecodeJob((st.request_id, st.preview_index), previews[st.request_id][1]))
            else:
                out.decoded.append((st.request_id, st.preview_index))
        self.decodes.submit(jobs, step_idle=not (plan.chunks or plan.diffusion_steps))

    def final_latents(self, request_id: str) -> Tensor:
        return self.requests[request_id].diffusion.latents
