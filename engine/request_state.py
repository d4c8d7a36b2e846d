"""A request inside the engine core: validated inputs, its sequences, stage machine and progress.

`state_from_processed` turns a `ProcessedRequest` (input processing's output, engine/input_processor.py, run in the
frontend) into a `RequestState`: system prompt, stage machine and the first prompt, before the request takes any KV
block. `build_request_state` runs both halves (tests). Anything wrong raises `RequestError` with a message meant
for the user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from diffgentor.engine.encoder_cache import encoder_key
from diffgentor.engine.input_processor import (
    ProcessedRequest,
    ProcessorContext,
    or_default,
    process_request,
    resolve_params,
    unpack_image,
)
from diffgentor.engine.models.hunyuan_image_3 import (
    BuiltPrompt,
    SamplingParams,
    StageMachine,
    VaeCondImage,
    VitCondImage,
    common_prefix_len,
    cond_layout,
    image_tokens,
)
from diffgentor.engine.request import GenerationRequest, RequestStatus
from diffgentor.engine.request_contract import RequestError
from diffgentor.engine.request_defaults import OFFLINE_DEFAULT_SEED
from diffgentor.engine.scheduler_output import EncoderInput

MAX_PARTIAL_IMAGES = 3  # OpenAI's bound on streamed previews


def _preview_steps(num_steps: int, num_previews: int) -> tuple[int, ...]:
    """Denoising steps (0-based) after which progressive previews are decoded: evenly spaced, never the last step
    (that one is the final image); fewer than asked when there are too few steps."""
    if num_previews <= 0 or num_steps < 2:
        return ()
    return tuple(sorted({min(num_steps - 2, max(0, round((i + 1) * num_steps / (num_previews + 1)) - 1))
                         for i in range(num_previews)}))


@dataclass
class SeqState:
    """One row of a request (cond, or the CFG uncond row): its tokens and how many have KV."""

    seq_id: str
    token_ids: list[int]
    layout: BuiltPrompt
    num_computed: int = 0
    cacheable: int = 0  # tokens whose full blocks may enter the prefix cache (never the generated image)
    allocated: bool = False


@dataclass
class RequestState:
    req: GenerationRequest
    request_id: str
    seed: int
    bot_task: str
    system_prompt: str
    sampling: SamplingParams
    max_new_tokens: int
    num_steps: int
    guidance_scale: float
    flow_shift: float
    use_cfg: bool
    use_taylor_cache: bool
    align_image_size: bool
    vae_images: list[VaeCondImage]
    vit_images: list[VitCondImage | None]
    image_digests: list[str]
    machine: StageMachine
    cond: SeqState
    status: RequestStatus = RequestStatus.WAITING  # moved by the scheduler only (engine/scheduler.py)
    uncond: SeqState | None = None
    ratio_index: int | None = None
    step: int = 0
    generated: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    times: dict[str, float] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_preemptions: int = 0
    encoder_inputs: list[EncoderInput] = field(default_factory=list)  # one per condition image, input order
    preview_steps: tuple[int, ...] = ()  # denoising steps whose predicted clean image is streamed as a preview
    # CFG parallel (engine/cfg_groups.py): the group of the cond row (the owner) and of the uncond row, set when the
    # request is first scheduled and kept for its life; None with one CFG group
    row_groups: tuple[int, int] | None = None

    @property
    def phase(self) -> str:
        """"text" or "image": the status's phase once admitted; before, the first phase (text when the stage
        machine has a text phase)."""
        return self.status.phase or ("text" if self.machine.prompt_task is not None else "image")

    @property
    def rows(self) -> list[SeqState]:
        return [self.cond] + ([self.uncond] if self.uncond is not None else [])

    def mark(self, name: str) -> None:
        self.times.setdefault(name, time.perf_counter())


def state_from_processed(ctx: ProcessorContext, p: ProcessedRequest) -> RequestState:
    """The light half (engine core): the stage machine and the first prompt from a `ProcessedRequest`."""
    req = p.request
    params = resolve_params(ctx, req, len(p.images))
    d = ctx.defaults
    conds = [unpack_image(x) for x in p.images]
    vae_images = [v for v, _ in conds]
    vit_images = [t if ctx.config.has_vision else None for _, t in conds]
    layouts = [cond_layout(v, t, ctx.config.latent_downsample) for v, t in zip(vae_images, vit_images)]
    digests = [x.digest for x in p.images]
    bot_task, max_new, steps, guidance = params.bot_task, params.max_new, params.steps, params.guidance
    system, image_size, fixed_ratio = params.system, params.image_size, params.fixed_ratio

    try:
        machine = StageMachine.for_request(
            ctx.tokenizer, bot_task=bot_task, image_size=image_size, base_size=ctx.config.image_base_size,
            template=d.sequence_template, max_new_tokens=max_new,
        )
    except ValueError as e:
        raise RequestError(str(e)) from None
    use_cfg = not ctx.config.cfg_distilled and guidance > 1.0
    seed = int(or_default(req.seed, or_default(ctx.request_defaults.seed, OFFLINE_DEFAULT_SEED)))
    rid = req.request_id
    if machine.prompt_task is not None:
        layout = ctx.builder.text_prompt(req.prompt, task=machine.prompt_task, system_prompt=system,
                                         cond_images=layouts)
        phase = "text"
    else:
        layout = ctx.builder.image_prompt(req.prompt, ratio_index=fixed_ratio, system_prompt=system,
                                          cond_images=layouts, cfg=use_cfg)
        phase = "image"
    limit = ctx.config.max_position_embeddings
    need = len(layout) + (max_new + _max_image_tokens(ctx) if phase == "text" else 0)
    if len(layout) > limit:
        raise RequestError(f"the prompt needs {len(layout)} tokens; the model allows {limit}", "prompt")
    if phase == "text" and bot_task != "auto":
        # the image phase repeats the prompt and condition images and adds the image: refuse now a request whose
        # image phase could not fit even with no think text and the smallest image, instead of failing it there
        ratio = fixed_ratio if fixed_ratio is not None else _smallest_ratio_index(ctx)
        shortest = ctx.builder.image_prompt(req.prompt, ratio_index=ratio, system_prompt=system,
                                            cond_images=layouts, cfg=use_cfg)
        if len(shortest) > limit:
            raise RequestError(f"the image phase needs at least {len(shortest)} tokens (the prompt, its "
                               f"{len(layouts)} condition image(s) and the image); the model allows {limit}", "prompt")
        if fixed_ratio is None:  # auto size: only buckets whose image phase fits the model's positions
            machine.limit_ratios(_fitting_ratios(ctx, len(shortest) - _image_tokens(ctx, ratio), max_new, limit))
    state = RequestState(
        req=req, request_id=rid, seed=seed, bot_task=bot_task, system_prompt=system, sampling=params.sampling,
        max_new_tokens=max_new, num_steps=steps, guidance_scale=guidance, flow_shift=params.shift,
        use_cfg=use_cfg, use_taylor_cache=bool(or_default(req.use_taylor_cache,
                                                          ctx.request_defaults.use_taylor_cache)),
        align_image_size=params.align, vae_images=vae_images, vit_images=vit_images, image_digests=digests,
        machine=machine, cond=SeqState(f"{rid}#cond", list(layout.token_ids), layout),
        ratio_index=fixed_ratio, num_prompt_tokens=len(layout),
    )
    state.times["max_tokens_estimate"] = float(need)
    state.encoder_inputs = [EncoderInput(encoder_key(dg, v.ratio_index, v.pixels.shape, params.align,
                                                     t.pixel_values.shape if t is not None else ()), v, t)
                            for dg, v, t in zip(digests, vae_images, vit_images)]
    n_previews = int(req.partial_images or 0)
    if not 0 <= n_previews <= MAX_PARTIAL_IMAGES:
        raise RequestError(f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, got {n_previews}",
                           "partial_images")
    if n_previews and req.output_type == "latent":
        raise RequestError("partial_images needs output_type 'pil' (previews are decoded images)", "partial_images")
    state.preview_steps = _preview_steps(steps, n_previews)
    if phase == "image":
        enter_image_phase(state, layout)
    return state


def build_request_state(ctx: ProcessorContext, req: GenerationRequest) -> RequestState:
    """Validate and preprocess a request (no model work, no KV blocks): both halves in one process."""
    return state_from_processed(ctx, process_request(ctx, req))


def _image_tokens(ctx: ProcessorContext, ratio_index: int) -> int:
    h, w = ctx.builder.resolution.buckets[ratio_index]
    ds = ctx.config.latent_downsample
    return image_tokens(h, w, ds)


def _smallest_ratio_index(ctx: ProcessorContext) -> int:
    sizes = [_image_tokens(ctx, r) for r in range(len(ctx.builder.resolution.buckets))]
    return sizes.index(min(sizes))


def _fitting_ratios(ctx: ProcessorContext, without_image: int, max_new: int, limit: int) -> tuple[int, ...] | None:
    """Auto size: the buckets the model may pick, so that its image phase fits the model's positions (the image
    phase's length is `without_image` plus the bucket's image tokens plus the think text). Those that fit with a
    full-length think text; if none does, those that fit with none (a long text then fails at the phase switch);
    None when every bucket fits (the official pick, unrestricted). docs/decisions.md, "Auto size picks a bucket
    that fits"."""
    sizes = [_image_tokens(ctx, r) for r in range(len(ctx.builder.resolution.buckets))]
    for text in (max_new + 8, 0):  # + the closing tags the stage machine forces
        fit = tuple(r for r, n in enumerate(sizes) if without_image + text + n <= limit)
        if len(fit) == len(sizes):
            return None
        if fit:
            return fit
    return None  # not reached: the smallest bucket fits (checked by the caller)


def _max_image_tokens(ctx: ProcessorContext) -> int:
    ds = ctx.config.latent_downsample
    return max(image_tokens(h, w, ds) for h, w in ctx.builder.resolution.buckets) + 8


def enter_image_phase(st: RequestState, layout: BuiltPrompt) -> None:
    """Switch a request's rows to its image-phase sequence (the model's `image_phase_layout`, or the first prompt of
    a request without a text phase); the cond row keeps the KV of the common prefix."""
    ids = list(layout.token_ids)
    keep = common_prefix_len(st.cond.token_ids[: st.cond.num_computed], ids)
    st.cond.token_ids, st.cond.layout = ids, layout
    st.cond.num_computed = min(st.cond.num_computed, keep)
    st.cond.cacheable = layout.gen_timestep_index
    if st.use_cfg:
        st.uncond = SeqState(f"{st.request_id}#uncond", list(layout.uncond_token_ids), layout,
                             cacheable=layout.gen_timestep_index)



def _slot_source(st: RequestState, slot) -> tuple:
    """What fills an image slot's embeddings: the generated image (unique to the request), the VAE latents of a
    condition image (its file, crop or stretch, bucket, grid, and the seed its posterior is sampled with) or its
    SigLIP2 tokens (its file, patch grid and padded length)."""
    if slot.kind == "gen":
        return ("gen", st.request_id)
    i = slot.cond_index
    if slot.kind == "cond_vae":
        return ("vae", st.image_digests[i], bool(st.align_image_size), int(st.vae_images[i].ratio_index),
                tuple(slot.grid), int(st.seed))
    return ("vit", st.image_digests[i], tuple(slot.grid), slot.end - slot.start)


def block_extra_keys(st: RequestState, seq: SeqState, block_size: int, num_tokens: int) -> list[Any]:
    """Per-block prefix-cache keys: everything besides the token ids that shapes a block's KV. Every position whose
    embedding is not its token's (condition-image `<timestep>` slots, embedded as timestep 0; VAE latents; ViT
    tokens; the generated image) and every bidirectional attention span (its KV sees the whole span, later
    positions included) is named, with its extent and inputs, in the key of each block it touches. A prompt that
    types the same control tokens as text therefore never shares a block with a real image's, and the same image
    under another crop, bucket or seed never shares its blocks. None: a block of plain tokens, causal attention."""
    layout = seq.layout
    n_blocks = num_tokens // block_size
    features: list[tuple[int, int, tuple]] = [
        (slot.start, slot.end, ("img", slot.start, slot.end) + _slot_source(st, slot)) for slot in layout.image_slots]
    features += [(t, t + 1, ("timestep", t, 0)) for t in layout.cond_timestep_indexes]
    features += [(s, e, ("span", s, e, tuple(k for a, b, k in features if a < e and b > s)))
                 for s, e in layout.full_attn_spans]
    keys: list[Any] = [None] * n_blocks
    for start, end, key in features:
        for b in range(start // block_size, min(n_blocks, -(-end // block_size))):
            keys[b] = (key,) if keys[b] is None else keys[b] + (key,)
    return keys
