"""One request end to end over the engine-shaped model: text phase, diffusion, VAE decode.

This is the reference path the batching engine must reproduce (and what `verify-golden` drives). It
already uses the engine's interfaces: a paged KV cache with block tables, a flat token batch with
attention metadata (bidirectional image spans), per-request generators, and docs/decisions.md: KV reuse:
the diffusion phase reuses the text phase's KV pages and recomputes only from the first token where
the image-phase sequence differs. CFG rows (non-distilled checkpoints) are extra sequences of the
same forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from diffgentor.engine.parallel import ParallelContext
from diffgentor.engine.request_contract import BOT_TASKS, MAX_COND_IMAGES, RequestError
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk
from diffgentor.kernels.kv_cache import PagedKVCache

from .config import GenerationDefaults
from .embedding import (
    CondImage,
    GenInputs,
    assemble_embeddings,
    encode_condition,
)
from .flow_match import (
    FlowMatchSchedule,
    cfg_combine,
    euler_step,
    guidance_value,
    initial_noise,
)
from .image_processing import ImageProcessor, load_image, to_pil, to_uint8
from .model import HunyuanImage3ForCausalMM
from .prompt import BuiltPrompt, PromptBuilder, common_prefix_len
from .resolution import image_tokens
from .sampling import SamplingParams, make_generator, sample_row
from .stage_machine import StageMachine
from .system_prompt import (
    SystemPromptError,
    SystemPrompts,
    choose_system_prompt,
)
from .tokenizer import HunyuanTokenizer


@dataclass
class ImageRequest:
    """What a user asks for; None fields take the checkpoint's generation_config defaults."""

    prompt: str
    images: Sequence[Any] = ()
    seed: int = 42
    image_size: str = "auto"
    bot_task: str | None = None
    use_system_prompt: str | None = None
    system_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    max_new_tokens: int | None = None
    sampling: SamplingParams | None = None
    infer_align_image_size: bool = False
    cond_latent_seed: int | None = None
    """Seed of the condition-image posterior draw in the text phase; None = `seed` (see verify-golden)."""


@dataclass
class ImageResult:
    image: Image.Image | None
    text: str
    """Think/recaption text (or the text answer for bot_task auto)."""
    generated_ids: list[int]
    ratio_index: int | None
    image_size: tuple[int, int] | None
    truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    trace: dict[str, Any] = field(default_factory=dict)


class _BlockPool:
    """Block ids for the sequences of one request (the engine's KV cache manager replaces this)."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks - 1, -1, -1))

    def grow(self, table: list[int], length: int, block_size: int) -> None:
        need = -(-length // block_size)
        while len(table) < need:
            if not self.free:
                raise RuntimeError("KV cache exhausted for this request")
            table.append(self.free.pop())


@dataclass
class _Seq:
    table: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # tokens whose KV is valid, in order


@dataclass
class _Part:
    """Tokens [start, end) of one sequence in a forward, with their embeddings and RoPE positions."""

    seq: _Seq
    ids: list[int]
    start: int
    end: int
    embeds: Tensor
    positions: Tensor
    spans: Sequence[tuple[int, int]]


class HunyuanImage3Pipeline:
    """Loads a checkpoint folder and runs requests one at a time over the paged model."""

    def __init__(
        self,
        model: HunyuanImage3ForCausalMM,
        tokenizer: HunyuanTokenizer,
        defaults: GenerationDefaults,
        system_prompts: SystemPrompts | None,
        block_size: int = 16,
    ) -> None:
        self.model = model
        self.config = model.config
        self.tok = tokenizer
        self.defaults = defaults
        self.system_prompts = system_prompts
        self.block_size = block_size
        self.images = ImageProcessor(self.config)
        self.builder = PromptBuilder.from_config(tokenizer, self.config, template=defaults.sequence_template)

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
        parallel: ParallelContext | None = None,
    ) -> HunyuanImage3Pipeline:
        """parallel: this process's tensor / expert parallel rank; it loads only its shard and every rank of the
        group must then make the same model calls in the same order (the collectives pair up)."""
        model = HunyuanImage3ForCausalMM.from_pretrained(ckpt_dir, dtype=dtype, device=device, parallel=parallel)
        tok = HunyuanTokenizer.from_pretrained(ckpt_dir, require_distil_tokens=model.config.cfg_distilled)
        prompts = SystemPrompts.from_pretrained(ckpt_dir)
        return cls(model, tok, GenerationDefaults.from_pretrained(ckpt_dir), prompts)

    # ------------------------------------------------------------------ request resolution
    def system_prompt_for(self, req: ImageRequest, bot_task: str) -> str:
        kind = req.use_system_prompt if req.use_system_prompt is not None else self.defaults.use_system_prompt
        try:
            return choose_system_prompt(self.system_prompts, kind, bot_task, req.system_prompt,
                                        kind_given=req.use_system_prompt is not None)
        except SystemPromptError as e:
            raise RequestError(str(e)) from None

    def _validate(self, req: ImageRequest) -> str:
        bot_task = req.bot_task or self.defaults.bot_task
        if bot_task not in BOT_TASKS:
            raise RequestError(f"unknown bot_task {bot_task!r}; expected one of {BOT_TASKS}")
        if len(req.images) > MAX_COND_IMAGES:
            raise RequestError(f"{len(req.images)} input images; at most {MAX_COND_IMAGES} are supported")
        if req.max_new_tokens is not None and req.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be positive, got {req.max_new_tokens}")
        steps = req.num_inference_steps
        if steps is not None and steps <= 0:
            raise RequestError(f"num_inference_steps must be positive, got {steps}")
        return bot_task

    # ------------------------------------------------------------------ condition images
    @staticmethod
    def load_images(images: Sequence[Any]) -> list[Image.Image]:
        """Decode every input image (PIL, path or bytes) to RGB; the first unreadable one is a RequestError."""
        out: list[Image.Image] = []
        for i, src in enumerate(images):
            try:
                out.append(load_image(src))
            except Exception as e:  # noqa: BLE001 - any decoder failure is the request's error
                raise RequestError(f"input image {i} could not be read: {e}") from None
        return out

    def prepare_conditions(
        self, images: Sequence[Any], generator: torch.Generator, align: bool
    ) -> list[CondImage]:
        """Preprocess, VAE-encode (posterior sample from `generator`, in input order) and embed.

        Every image is decoded before the first one is encoded, so a bad image costs no model work.
        """
        pils = self.load_images(images)
        vaes = [self.images.vae_image(p, align_image_size=align) for p in pils]
        vits = [self.images.vit_image(p) if self.config.has_vision else None for p in pils]
        return [encode_condition(self.model, v, t, generator) for v, t in zip(vaes, vits)]

    # ------------------------------------------------------------------ embeddings and forward
    def embed(
        self,
        built: BuiltPrompt,
        ids: Sequence[int],
        conds: Sequence[CondImage],
        start: int,
        end: int,
        gen: tuple[Tensor, float, float | None, float | None] | None = None,
    ) -> Tensor:
        """Input embeddings of tokens [start, end) of a sequence laid out as `built` (ids may be uncond)."""
        return assemble_embeddings(self.model, built, ids, conds, start, end, GenInputs(*gen) if gen else None)

    def forward(self, kv: PagedKVCache, pool: _BlockPool, parts: Sequence[_Part]) -> list[Tensor]:
        """One flat forward over several sequences; returns each part's last hidden states [end-start, H].

        Tokens [start, end) of each sequence are (re)computed, written to its pages, and attend to its
        cached prefix [0, start) under its bidirectional spans.
        """
        chunks = []
        for p in parts:
            pool.grow(p.seq.table, p.end, self.block_size)
            del p.seq.ids[p.start :]
            p.seq.ids.extend(p.ids[p.start : p.end])
            chunks.append(
                SequenceChunk(
                    query_kv_indices=range(p.start, p.end),
                    kv_len=p.end,
                    block_table=list(p.seq.table),
                    bidir_spans=p.spans,
                )
            )
        dev = self.model.device
        meta = AttentionMetadata.build(chunks, self.block_size, device=dev)
        embeds = torch.cat([p.embeds for p in parts])
        positions = torch.cat([p.positions for p in parts]).to(dev)
        with torch.no_grad():
            hidden = self.model(embeds, positions, meta, kv)
        return list(hidden.split([p.end - p.start for p in parts]))

    def new_cache(self, total_tokens: int) -> tuple[PagedKVCache, _BlockPool]:
        blocks = -(-total_tokens // self.block_size) + 4
        return self.model.make_kv_cache(blocks, self.block_size), _BlockPool(blocks)

    # ------------------------------------------------------------------ phases
    def text_phase(
        self,
        built: BuiltPrompt,
        conds: Sequence[CondImage],
        machine: StageMachine,
        sampling: SamplingParams,
        generator: torch.Generator,
        kv: PagedKVCache,
        pool: _BlockPool,
        seq: _Seq,
        eos_ids: frozenset[int] = frozenset(),
        on_token: Any = None,
        logits_hook: Any = None,
    ) -> None:
        """Prefill `built` then decode one token per step under the stage machine until it finishes.

        `logits_hook(logits, last_token)` may edit the raw logits before the stage machine and the
        warpers see them (a logit bias; verify-golden uses it to replay the golden biased runs).
        """
        ids = list(built.token_ids)
        emb = self.embed(built, ids, conds, 0, len(ids))
        part = _Part(seq, ids, 0, len(ids), emb, built.positions, built.full_attn_spans)
        (hidden,) = self.forward(kv, pool, [part])
        last = hidden[-1:]
        last_token: int | None = None
        while not machine.finished:
            if machine.needs_close:
                for tok in machine.close():
                    ids.append(tok)
                    last = self._decode_one(kv, pool, seq, built, ids)
                if machine.finished:
                    break
            logits = self.model.logits(last)[0]
            if logits_hook is not None:
                logits_hook(logits, last_token)
            machine.constrain(logits)
            tok = sample_row(logits, sampling, generator)
            machine.feed(tok)
            last_token = tok
            if on_token is not None:
                on_token(tok)
            ids.append(tok)
            if machine.finished or tok in eos_ids:
                break
            last = self._decode_one(kv, pool, seq, built, ids)

    def _decode_one(self, kv: PagedKVCache, pool: _BlockPool, seq: _Seq, built: BuiltPrompt, ids: list[int]):
        """Compute the KV of the last token of `ids` (a text token: 1-D position = its index)."""
        n = len(ids)
        emb = self.model.embed_tokens(torch.tensor(ids[n - 1 :], device=self.model.device))
        pos = torch.tensor([[n - 1, n - 1]], dtype=torch.long)
        (hidden,) = self.forward(kv, pool, [_Part(seq, ids, n - 1, n, emb, pos, built.full_attn_spans)])
        return hidden

    def denoise(
        self,
        rows: Sequence[tuple[_Seq, BuiltPrompt, list[int]]],
        conds: Sequence[CondImage],
        latents: Tensor,
        t: float,
        r: float | None,
        g: float | None,
        kv: PagedKVCache,
        pool: _BlockPool,
        first_step: bool,
    ) -> list[Tensor]:
        """One denoiser call for every row (cond, uncond): the velocity [C, h, w] per row (fp32).

        First step: each row computes from its first token without valid KV through the end of the
        generated image block. Later steps: only `<timestep>` [`<guidance>` `<timestep_r>`] and the image
        tokens are recomputed in place, attending to the row's cached prefix.
        """
        parts = []
        for seq, built, ids in rows:
            slot = built.slots("gen")[0]
            if first_step:
                start = common_prefix_len(seq.ids, ids)
                start = min(start, built.gen_timestep_index)
            else:
                start = built.gen_timestep_index
            end = slot.end
            emb = self.embed(built, ids, conds, start, end, gen=(latents, t, r, g))
            parts.append(_Part(seq, ids, start, end, emb, built.positions[start:end], built.full_attn_spans))
        hidden = self.forward(kv, pool, parts)
        out = []
        tt = torch.tensor([t], device=self.model.device, dtype=torch.float32)
        for (_, built, _), part, h in zip(rows, parts, hidden):
            slot = built.slots("gen")[0]
            img = h[slot.start - part.start : slot.end - part.start][None]
            out.append(self.model.velocity(img, slot.grid, tt)[0])
        return out

    # ------------------------------------------------------------------ the whole request
    def generate(
        self, req: ImageRequest, trace: bool = False, on_token: Any = None, reuse_text_kv: bool = True
    ) -> ImageResult:
        """Run `req` end to end.

        `reuse_text_kv=False` runs the image phase in a fresh cache (every token re-prefilled) instead of
        over the text phase's KV pages (docs/decisions.md: KV reuse); both give the same result, up to rounding.
        """
        bot_task = self._validate(req)
        cfg = self.config
        timings: dict[str, float] = {}
        tr: dict[str, Any] = {}
        t_start = time.perf_counter()
        system = self.system_prompt_for(req, bot_task)
        sampling = req.sampling or SamplingParams.from_generation_defaults(self.defaults)
        max_new = req.max_new_tokens or self.defaults.max_new_tokens
        auto_size = req.image_size == "auto"
        fixed_ratio = None
        if not auto_size:
            try:
                fixed_ratio, _ = self.builder.resolution.parse_size(req.image_size)
            except ValueError as e:
                raise RequestError(str(e)) from None
        images = self.load_images(req.images)  # an unreadable image fails before any model work

        machine = StageMachine.for_request(
            self.tok, bot_task=bot_task, image_size=req.image_size, base_size=cfg.image_base_size,
            template=self.defaults.sequence_template, max_new_tokens=max_new,
        )
        # Condition images: the text phase and the image phase share one encoding (docs/decisions.md: KV reuse); the
        # official text phase draws its posterior from another seed, which `cond_latent_seed` mirrors.
        gen_rng = make_generator(req.seed, self.model.device)
        t0 = time.perf_counter()
        if req.cond_latent_seed is not None and machine.prompt_task is not None:
            text_conds = self.prepare_conditions(
                images, make_generator(req.cond_latent_seed, self.model.device), req.infer_align_image_size
            )
        else:
            text_conds = None
        conds = self.prepare_conditions(images, gen_rng, req.infer_align_image_size)
        timings["encode_images"] = time.perf_counter() - t0
        layouts = [c.layout for c in conds]

        cond_seq = _Seq()
        kv = pool = None
        ratio_index = fixed_ratio
        cot_ids: list[int] = []
        generated: list[int] = []
        text = ""
        if machine.prompt_task is not None:
            t0 = time.perf_counter()
            built_t = self.builder.text_prompt(
                req.prompt, task=machine.prompt_task, system_prompt=system, cond_images=layouts
            )
            kv, pool = self.new_cache(2 * (len(built_t) + max_new + self._image_budget(ratio_index)))
            eos = frozenset({self.tok.special.eos}) if bot_task == "auto" else frozenset()
            self.text_phase(
                built_t, text_conds or conds, machine, sampling, make_generator(req.seed, self.model.device), kv, pool,
                cond_seq, eos_ids=eos, on_token=on_token,
            )
            if text_conds is not None:
                cond_seq = _Seq(table=cond_seq.table)  # KV came from other latents: recompute
            generated = list(machine.tokens)
            timings["think"] = time.perf_counter() - t0
            tr["text_prompt_ids"] = list(built_t.token_ids)
            if bot_task == "auto":
                text = self.tok.decode(generated)
                timings["total"] = time.perf_counter() - t_start
                return ImageResult(None, text, generated, None, None, machine.truncated, timings,
                                   len(built_t), tr)
            cot_ids = machine.cot_ids
            text = self.tok.decode(cot_ids)
            if auto_size:
                ratio_index = machine.ratio_index
        if ratio_index is None:
            raise RequestError("the model did not choose an image size")

        # ---- image phase
        use_cfg = not cfg.cfg_distilled
        guidance = req.guidance_scale if req.guidance_scale is not None else self.defaults.diff_guidance_scale
        use_cfg = use_cfg and guidance > 1.0
        built = self.builder.image_prompt(
            req.prompt, ratio_index=ratio_index, system_prompt=system, cond_images=layouts,
            cot_ids=cot_ids or None, cfg=use_cfg,
        )
        if kv is None or not reuse_text_kv:
            kv, pool = self.new_cache(2 * len(built))
            cond_seq = _Seq()
        rows = [(cond_seq, built, list(built.token_ids))]
        if use_cfg:
            rows.append((_Seq(), built, list(built.uncond_token_ids)))
        steps = req.num_inference_steps or self.defaults.diff_infer_steps
        shift = req.flow_shift if req.flow_shift is not None else self.defaults.flow_shift
        sched = FlowMatchSchedule.create(steps, shift)
        slot = built.slots("gen")[0]
        latents = initial_noise(gen_rng, (1, cfg.latent_channels, *slot.grid))[0].to(self.model.device)
        g = guidance_value(guidance) if cfg.cfg_distilled else None
        reused = min(common_prefix_len(cond_seq.ids, rows[0][2]), built.gen_timestep_index)
        tr.update(image_prompt_ids=list(built.token_ids), init_latents=latents.clone(), step_preds=[],
                  step_latents=[], conds=conds, reused_kv_tokens=reused)
        t0 = time.perf_counter()
        for i in range(steps):
            sigma, sigma_next = sched.sigma_pair(i)
            t = float(sched.timesteps[i])
            r = float(sched.timesteps_r[i]) if cfg.use_meanflow else None
            preds = self.denoise(rows, conds, latents, t, r, g, kv, pool, first_step=(i == 0))
            pred = cfg_combine(preds[0], preds[1], guidance) if use_cfg else preds[0]
            latents = euler_step(latents, pred, sigma, sigma_next)
            if trace:
                tr["step_preds"].append(pred)
                tr["step_latents"].append(latents)
        timings["diffuse"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            decoded = self.model.decode_latents(latents[None])
        image = to_pil(decoded)[0]
        if req.infer_align_image_size and conds:
            image = self.images.align_output_size(image, [c.vae for c in conds])
        timings["vae_decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        if trace:
            tr.update(final_latents=latents, decoded=decoded, image_uint8=to_uint8(decoded)[0])
        return ImageResult(
            image, text, generated, ratio_index, built.gen_image_size, machine.truncated, timings,
            len(built), tr,
        )

    def _image_budget(self, ratio_index: int | None) -> int:
        if ratio_index is not None:
            h, w = self.builder.resolution.get(ratio_index)
        else:
            h, w = max(self.builder.resolution.buckets, key=lambda hw: hw[0] * hw[1])
        ds = self.config.latent_downsample
        return image_tokens(h, w, ds) + 16
