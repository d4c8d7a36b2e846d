"""A request inside the engine core: validated inputs, its sequences, stage machine and progress.

Input processing happens here, before the request takes any KV block, in two halves:
* `process_request` (heavy, CPU; the API server runs it in a thread pool): validation, image decoding with a
  pixel limit, VAE bucket crop / stretch and SigLIP2 patches -> a msgspec `ProcessedRequest` (raw arrays);
* `state_from_processed` (light; the engine core): system prompt, stage machine and the first prompt.
`build_request_state` runs both (offline path). Anything wrong raises `RequestError` with a message meant for
the user.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from diffgentor.engine.encoder_cache import EncoderInput, encoder_key
from diffgentor.engine.models.hunyuan_image_3.config import GenerationDefaults, HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.embedding import cond_layout
from diffgentor.engine.models.hunyuan_image_3.image_processing import ImageProcessor, VaeCondImage, VitCondImage
from diffgentor.engine.models.hunyuan_image_3.prompt import BuiltPrompt, PromptBuilder, common_prefix_len
from diffgentor.engine.models.hunyuan_image_3.sampling import SamplingParams
from diffgentor.engine.models.hunyuan_image_3.stage_machine import StageMachine
from diffgentor.engine.models.hunyuan_image_3.system_prompt import SystemPrompts, choose_system_prompt
from diffgentor.engine.models.hunyuan_image_3.tokenizer import HunyuanTokenizer
from diffgentor.engine.request import GenerationRequest, RequestStatus
from diffgentor.engine.vocabulary import BOT_TASKS, MAX_COND_IMAGES, RequestError

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# the decoders a condition image may use: the formats clients send photos in; never PostScript / EPS (PIL hands
# those to Ghostscript) or the many rarely used decoders PIL would otherwise try on any upload
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
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
class ProcessorContext:
    """What input processing needs from the loaded checkpoint (shared by all requests)."""

    config: HunyuanImage3Config
    defaults: GenerationDefaults
    tokenizer: HunyuanTokenizer
    builder: PromptBuilder
    images: ImageProcessor
    system_prompts: SystemPrompts | None
    request_defaults: dict[str, Any] = field(default_factory=dict)  # env-imposed defaults (EngineConfig)


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
    phase: str  # "text" | "image"
    status: RequestStatus = RequestStatus.WAITING
    uncond: SeqState | None = None
    ratio_index: int | None = None
    # auto size: the bucket indexes whose image phase fits the model's positions (None: all of them), and the
    # ratio tokens of the others, never sampled (derived once here: the scheduler reads it every text step)
    allowed_ratios: tuple[int, ...] | None = None
    banned_ratio_ids: tuple[int, ...] | None = None
    step: int = 0
    sent_to_worker: bool = False
    diffusion_started: bool = False
    generated: list[int] = field(default_factory=list)
    detokenizer: Any = None  # the engine core's IncrementalDetokenizer for streamed text deltas
    arrival: float = field(default_factory=time.perf_counter)
    times: dict[str, float] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_preemptions: int = 0
    taylor_schedule: list[bool] | None = None
    encoder_inputs: list[EncoderInput] = field(default_factory=list)  # one per condition image, input order
    encoder_checked: bool = False  # the scheduler looked its images up in the encoder cache (and pinned them)
    encode_deferrals: int = 0  # steps its encode was held back for other requests' first prefill
    preview_steps: tuple[int, ...] = ()  # denoising steps whose predicted clean image is streamed as a preview

    @property
    def rows(self) -> list[SeqState]:
        return [self.cond] + ([self.uncond] if self.uncond is not None else [])

    def mark(self, name: str) -> None:
        self.times.setdefault(name, time.perf_counter())


_OBJECT_REPR_RE = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _without_reprs(text: str) -> str:
    """A decoder's message without object reprs (PIL names the `BytesIO` it could not identify)."""
    return _OBJECT_REPR_RE.sub("the data", text)


def _decode_image(data: bytes, i: int, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode one encoded image, refusing decompression bombs before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
        if img.width * img.height > max_pixels:
            raise RequestError(f"input image {i} has {img.width}x{img.height} pixels; the limit is {max_pixels}")
        img.load()
        return img.convert("RGB")
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"input image {i} could not be read: it is not a "
                           f"{', '.join(ALLOWED_IMAGE_FORMATS)} image") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this request's error
        raise RequestError(f"input image {i} could not be read: {type(e).__name__}: {_without_reprs(str(e))}") from None


def _pick(value, default):
    return default if value is None else value


# --------------------------------------------------------------------------------------------- processed inputs
class ProcessedImage(msgspec.Struct, kw_only=True, array_like=True):
    """One condition image after the heavy CPU work: VAE bucket pixels and SigLIP2 patches as raw arrays."""

    digest: str  # sha256 of the encoded file (prefix-cache key of the image's KV blocks)
    original_size: tuple[int, int]  # (width, height)
    vae_ratio_index: int
    vae_shape: tuple[int, ...]  # [3, H, W] float32 in [-1, 1]
    vae_pixels: bytes
    vit_shape: tuple[int, ...] = ()  # [max_num_patches, 3*p*p] float32; () = the checkpoint has no ViT
    vit_values: bytes = b""
    vit_mask: bytes = b""  # [max_num_patches] int64
    vit_spatial_shape: tuple[int, int] = (0, 0)


class ProcessedRequest(msgspec.Struct, kw_only=True):
    """A validated request with its images decoded and preprocessed (`process_request`), ready for the engine
    core to turn into a `RequestState` without touching an encoded image. `request.images` is emptied."""

    request: GenerationRequest
    images: list[ProcessedImage] = msgspec.field(default_factory=list)


def _to_processed(vae: VaeCondImage, vit: VitCondImage | None, digest: str) -> ProcessedImage:
    px = vae.pixels.detach().to(torch.float32).contiguous()
    kw: dict[str, Any] = {}
    if vit is not None:
        vals = vit.pixel_values.detach().to(torch.float32).contiguous()
        kw = dict(vit_shape=tuple(vals.shape), vit_values=vals.numpy().tobytes(),
                  vit_mask=vit.pixel_attention_mask.detach().to(torch.int64).contiguous().numpy().tobytes(),
                  vit_spatial_shape=(int(vit.spatial_shapes[0]), int(vit.spatial_shapes[1])))
    return ProcessedImage(digest=digest, original_size=(int(vae.original_size[0]), int(vae.original_size[1])),
                          vae_ratio_index=int(vae.ratio_index), vae_shape=tuple(px.shape),
                          vae_pixels=px.numpy().tobytes(), **kw)


def _tensor(data: bytes, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= int(d)
    t = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    if t.numel() != n:
        raise RequestError(f"a preprocessed image array has {t.numel()} values; its shape {tuple(shape)} needs {n}")
    return t.reshape(tuple(int(d) for d in shape))


def _from_processed(p: ProcessedImage) -> tuple[VaeCondImage, VitCondImage | None]:
    size = (int(p.original_size[0]), int(p.original_size[1]))
    vae = VaeCondImage(pixels=_tensor(p.vae_pixels, p.vae_shape, torch.float32), ratio_index=p.vae_ratio_index,
                       original_size=size)
    if not p.vit_shape:
        return vae, None
    vit = VitCondImage(
        pixel_values=_tensor(p.vit_values, p.vit_shape, torch.float32),
        pixel_attention_mask=_tensor(p.vit_mask, p.vit_shape[:1], torch.int64),
        spatial_shapes=torch.tensor(list(p.vit_spatial_shape), dtype=torch.int64),
        original_size=size,
    )
    return vae, vit


@dataclass
class _Params:
    bot_task: str
    max_new: int
    steps: int
    guidance: float
    shift: float
    sampling: SamplingParams
    image_size: str
    fixed_ratio: int | None
    system: str
    align: bool


MAX_TEXT_CHARS = 100_000  # any text field, engine side; the API server passes its own --max-prompt-chars
MAX_GUIDANCE_SCALE = 100.0
MAX_FLOW_SHIFT = 100.0
MAX_TEMPERATURE = 100.0
MAX_INFERENCE_STEPS = 1000


def _check_text(name: str, text: str | None, max_chars: int) -> None:
    """A text field: within ``max_chars`` characters and encodable as UTF-8 (JSON may carry lone surrogates)."""
    if text is None:
        return
    if not isinstance(text, str):
        raise RequestError(f"{name} must be a string")
    if len(text) > max_chars:
        raise RequestError(f"{name} is {len(text)} characters; the limit is {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None


def _check_number(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    """A float field: finite and within [low, high] (``low_open``: (low, high])."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{name} must be a number") from None
    if not math.isfinite(v) or v > high or v < low or (low_open and v == low):
        raise RequestError(f"{name} must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}], "
                           f"got {v!r}")
    return v


def _resolve(ctx: ProcessorContext, req: GenerationRequest, num_images: int,
             max_text_chars: int = MAX_TEXT_CHARS) -> _Params:
    """Validate a request's scalar fields and resolve the defaults (cheap; no image is touched). Text fields are
    bounded here so that no component tokenises an unbounded string; numbers must be finite and in range."""
    d, env = ctx.defaults, ctx.request_defaults
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise RequestError("prompt must be a non-empty string")
    _check_text("prompt", req.prompt, max_text_chars)
    _check_text("system_prompt", req.system_prompt, max_text_chars)
    for name in ("bot_task", "use_system_prompt", "image_size", "request_id"):
        _check_text(name, getattr(req, name, None), 1000)
    bot_task = req.bot_task or env.get("bot_task") or d.bot_task
    if bot_task not in BOT_TASKS:
        raise RequestError(f"unknown bot_task {bot_task!r}; expected one of {', '.join(BOT_TASKS)}")
    if req.output_type not in ("pil", "latent"):
        raise RequestError(f"output_type must be 'pil' or 'latent', got {req.output_type!r}")
    if num_images > MAX_COND_IMAGES:
        raise RequestError(f"{num_images} input images; at most {MAX_COND_IMAGES} are supported")
    max_new = _pick(req.max_new_tokens, env.get("max_new_tokens") or d.max_new_tokens)
    if max_new <= 0:
        raise RequestError(f"max_new_tokens must be positive, got {max_new}")
    context = ctx.config.max_position_embeddings
    if max_new > context:
        raise RequestError(f"max_new_tokens must be at most {context} (the model's context), got {max_new}")
    steps = _pick(req.num_inference_steps, env.get("num_inference_steps") or d.diff_infer_steps)
    if steps <= 0:
        raise RequestError(f"num_inference_steps must be positive, got {steps}")
    if steps > MAX_INFERENCE_STEPS:
        raise RequestError(f"num_inference_steps must be at most {MAX_INFERENCE_STEPS}, got {steps}")
    guidance = float(_pick(req.guidance_scale, d.diff_guidance_scale))
    if guidance < 0:
        raise RequestError(f"guidance_scale must be >= 0, got {guidance}")
    guidance = _check_number("guidance_scale", guidance, 0.0, MAX_GUIDANCE_SCALE)
    shift = _check_number("flow_shift", _pick(req.flow_shift, d.flow_shift), 0.0, MAX_FLOW_SHIFT, low_open=True)
    try:
        sampling = SamplingParams(
            do_sample=_pick(req.do_sample, d.do_sample),
            temperature=_check_number("temperature", _pick(req.temperature, d.temperature), 0.0, MAX_TEMPERATURE),
            top_k=int(_pick(req.top_k, d.top_k)),
            top_p=_check_number("top_p", _pick(req.top_p, d.top_p), 0.0, 1.0),
        )
    except (ValueError, OverflowError) as e:
        raise RequestError(str(e)) from None
    image_size = req.image_size or "auto"
    fixed_ratio = None
    if image_size != "auto":
        try:
            fixed_ratio, _ = ctx.builder.resolution.parse_size(image_size)
        except ValueError as e:
            raise RequestError(f"invalid image size {image_size!r}: {e}") from None

    kind = _pick(req.use_system_prompt, env.get("use_system_prompt") or d.use_system_prompt)
    try:
        system = choose_system_prompt(ctx.system_prompts, kind, bot_task, req.system_prompt,
                                      kind_given=req.use_system_prompt is not None)
    except ValueError as e:
        raise RequestError(str(e)) from None
    align = bool(_pick(req.infer_align_image_size, env.get("infer_align_image_size", False)))
    return _Params(bot_task, int(max_new), int(steps), guidance, shift, sampling, image_size, fixed_ratio, system,
                   align)


def _check_context(ctx: ProcessorContext, params: _Params, req: GenerationRequest,
                   images: Sequence[ProcessedImage] = ()) -> None:
    """The prompt and system prompt, tokenised here (the API server's worker pool, never the engine core), plus
    the condition images' tokens must fit the model's context."""
    limit = ctx.config.max_position_embeddings
    need = len(ctx.tokenizer.encode(req.prompt)) + len(ctx.tokenizer.encode(params.system or ""))
    ds = ctx.config.latent_downsample
    need += sum((x.vae_shape[-2] // ds) * (x.vae_shape[-1] // ds) + 2
                + (x.vit_spatial_shape[0] * x.vit_spatial_shape[1] if x.vit_shape else 0)
                for x in images)
    if need > limit:
        raise RequestError(f"the prompt, system prompt and images need at least {need} tokens; the model's "
                           f"context is {limit}")


def check_request(ctx: ProcessorContext, req: GenerationRequest, num_images: int,
                  max_text_chars: int = MAX_TEXT_CHARS) -> None:
    """Every check of a request's scalar fields (`process_request` makes them again): cheap, no image touched, no
    text tokenised; the API server runs it before it fetches any image URL."""
    _resolve(ctx, req, num_images, max_text_chars)


def process_request(ctx: ProcessorContext, req: GenerationRequest,
                    max_image_pixels: int = MAX_IMAGE_PIXELS, max_text_chars: int = MAX_TEXT_CHARS) -> ProcessedRequest:
    """The heavy, per-request CPU half of input processing (the API server runs it in a thread pool):
    validation (text bounded, then tokenised against the context before any image is decoded), image decoding
    with a pixel limit, VAE bucket resize/crop and SigLIP2 preprocessing."""
    params = _resolve(ctx, req, len(req.images), max_text_chars)
    _check_context(ctx, params, req)
    images = []
    for i, data in enumerate(req.images):
        pil = _decode_image(data, i, max_image_pixels)
        vae = ctx.images.vae_image(pil, align_image_size=params.align)
        vit = ctx.images.vit_image(pil) if ctx.config.has_vision else None
        images.append(_to_processed(vae, vit, hashlib.sha256(data).hexdigest()))
    if images:
        _check_context(ctx, params, req, images)
    return ProcessedRequest(request=msgspec.structs.replace(req, images=[]), images=images)


def state_from_processed(ctx: ProcessorContext, p: ProcessedRequest) -> RequestState:
    """The light half (engine core): the stage machine and the first prompt from a `ProcessedRequest`."""
    req = p.request
    params = _resolve(ctx, req, len(p.images))
    d = ctx.defaults
    conds = [_from_processed(x) for x in p.images]
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
    seed = int(_pick(req.seed, ctx.request_defaults.get("seed", 42)))
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
        raise RequestError(f"the prompt needs {len(layout)} tokens; the model allows {limit}")
    allowed_ratios = None
    if phase == "text" and bot_task != "auto":
        # the image phase repeats the prompt and condition images and adds the image: refuse now a request whose
        # image phase could not fit even with no think text and the smallest image, instead of failing it there
        ratio = fixed_ratio if fixed_ratio is not None else _smallest_ratio_index(ctx)
        shortest = ctx.builder.image_prompt(req.prompt, ratio_index=ratio, system_prompt=system,
                                            cond_images=layouts, cfg=use_cfg)
        if len(shortest) > limit:
            raise RequestError(f"the image phase needs at least {len(shortest)} tokens (the prompt, its "
                               f"{len(layouts)} condition image(s) and the image); the model allows {limit}")
        if fixed_ratio is None:
            allowed_ratios = _fitting_ratios(ctx, len(shortest) - _image_tokens(ctx, ratio), max_new, limit)
    banned_ratio_ids = None if allowed_ratios is None else tuple(
        t for r, t in enumerate(ctx.tokenizer.special.ratio) if r not in allowed_ratios)
    state = RequestState(
        req=req, request_id=rid, seed=seed, bot_task=bot_task, system_prompt=system, sampling=params.sampling,
        max_new_tokens=max_new, num_steps=steps, guidance_scale=guidance, flow_shift=params.shift,
        use_cfg=use_cfg, use_taylor_cache=bool(_pick(req.use_taylor_cache, ctx.request_defaults.get(
            "use_taylor_cache", False))),
        align_image_size=params.align, vae_images=vae_images, vit_images=vit_images, image_digests=digests,
        machine=machine, cond=SeqState(f"{rid}#cond", list(layout.token_ids), layout), phase=phase,
        ratio_index=fixed_ratio, allowed_ratios=allowed_ratios, num_prompt_tokens=len(layout),
        banned_ratio_ids=banned_ratio_ids,
    )
    state.times["max_tokens_estimate"] = float(need)
    state.encoder_inputs = [EncoderInput(encoder_key(dg, v, t, params.align), v, t)
                            for dg, v, t in zip(digests, vae_images, vit_images)]
    n_previews = int(req.partial_images or 0)
    if not 0 <= n_previews <= MAX_PARTIAL_IMAGES:
        raise RequestError(f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, got {n_previews}")
    if n_previews and req.output_type == "latent":
        raise RequestError("partial_images needs output_type 'pil' (previews are decoded images)")
    state.preview_steps = _preview_steps(steps, n_previews)
    if phase == "image":
        enter_image_phase(ctx, state, layout)
    return state


def build_request_state(ctx: ProcessorContext, req: GenerationRequest) -> RequestState:
    """Validate and preprocess a request (no model work, no KV blocks): both halves in one process."""
    return state_from_processed(ctx, process_request(ctx, req))


def load_processor_context(path: str | Path, request_defaults: dict[str, Any] | None = None) -> ProcessorContext:
    """Everything input processing needs from a checkpoint folder, without loading any weight (API server)."""
    from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config

    path = Path(path)
    config = HunyuanImage3Config.from_pretrained(path)
    defaults = GenerationDefaults.from_pretrained(path)
    tok = HunyuanTokenizer.from_pretrained(path, require_distil_tokens=config.cfg_distilled)
    builder = PromptBuilder.from_config(tok, config, template=defaults.sequence_template)
    return ProcessorContext(config, defaults, tok, builder, ImageProcessor(config), SystemPrompts.from_pretrained(path),
                            dict(request_defaults or {}))


def _image_tokens(ctx: ProcessorContext, ratio_index: int) -> int:
    h, w = ctx.builder.resolution.buckets[ratio_index]
    ds = ctx.config.latent_downsample
    return (h // ds) * (w // ds)


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
    return max((h // ds) * (w // ds) for h, w in ctx.builder.resolution.buckets) + 8


def enter_image_phase(ctx: ProcessorContext, st: RequestState, layout: BuiltPrompt | None = None) -> None:
    """Switch a request to its image-phase sequence(s); the cond row keeps the KV of the common prefix."""
    if layout is None:
        layouts = [cond_layout(v, t, ctx.config.latent_downsample) for v, t in zip(st.vae_images, st.vit_images)]
        layout = ctx.builder.image_prompt(
            st.req.prompt, ratio_index=st.ratio_index, system_prompt=st.system_prompt, cond_images=layouts,
            cot_ids=st.machine.cot_ids or None, cfg=st.use_cfg,
        )
    if len(layout) > ctx.config.max_position_embeddings:
        raise RequestError(f"the image-phase sequence needs {len(layout)} tokens (the prompt, its condition images, "
                           f"{len(st.machine.cot_ids or [])} think/recaption tokens and the image); the model allows "
                           f"{ctx.config.max_position_embeddings}: lower max_new_tokens, shorten the prompt or use "
                           "fewer condition images")
    ids = list(layout.token_ids)
    keep = common_prefix_len(st.cond.token_ids[: st.cond.num_computed], ids)
    st.cond.token_ids, st.cond.layout = ids, layout
    st.cond.num_computed = min(st.cond.num_computed, keep)
    st.cond.cacheable = layout.gen_timestep_index
    if st.use_cfg:
        st.uncond = SeqState(f"{st.request_id}#uncond", list(layout.uncond_token_ids), layout,
                             cacheable=layout.gen_timestep_index)
    st.phase = "image"



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
