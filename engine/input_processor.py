"""Input processing, run in the frontend (the API server's thread pool, or the offline `Engine`) before a request
reaches the engine core: validation of every field, tokenisation against the model's context, image decoding with
a pixel limit, VAE bucket crop / stretch and SigLIP2 patches -> a msgspec `ProcessedRequest` (raw arrays) that the
engine core turns into its `RequestState` (engine/request_state.py) without touching an encoded image. Anything
wrong raises `RequestError` with a message meant for the user.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from diffgentor.engine.models.hunyuan_image_3 import (
    GenerationDefaults,
    HunyuanImage3Config,
    HunyuanImage3RequestLogic,
    HunyuanTokenizer,
    ImageProcessor,
    PromptBuilder,
    SamplingParams,
    SystemPrompts,
    VaeCondImage,
    VitCondImage,
    choose_system_prompt,
    image_tokens,
)
from diffgentor.engine.request import GenerationRequest
from diffgentor.engine.request_contract import BOT_TASKS, MAX_COND_IMAGES, RequestError
from diffgentor.engine.request_defaults import RequestDefaults, resolve_request_defaults

if TYPE_CHECKING:
    from diffgentor.engine.config import EngineConfig

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# the decoders a condition image may use: the formats clients send photos in; never PostScript / EPS (PIL hands
# those to Ghostscript) or the many rarely used decoders PIL would otherwise try on any upload
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass
class ProcessorContext:
    """What input processing needs from the loaded checkpoint (shared by all requests)."""

    config: HunyuanImage3Config
    defaults: GenerationDefaults
    tokenizer: HunyuanTokenizer
    builder: PromptBuilder
    images: ImageProcessor
    system_prompts: SystemPrompts | None
    request_defaults: RequestDefaults  # what a request gets for each field it leaves unset

    @cached_property
    def request_logic(self) -> HunyuanImage3RequestLogic:
        """The model's answers to the scheduler (engine/model_interface.py, `ModelRequestLogic`)."""
        return HunyuanImage3RequestLogic(self.config, self.builder)


def load_processor_context(path: str | Path, engine_config: EngineConfig | None = None) -> ProcessorContext:
    """Everything input processing needs from a checkpoint folder, without loading any weight (API server);
    request defaults from ``engine_config`` and the checkpoint (`resolve_request_defaults`)."""
    path = Path(path)
    config = HunyuanImage3Config.from_pretrained(path)
    defaults = GenerationDefaults.from_pretrained(path)
    tok = HunyuanTokenizer.from_pretrained(path, require_distil_tokens=config.cfg_distilled)
    builder = PromptBuilder.from_config(tok, config, template=defaults.sequence_template)
    return ProcessorContext(config, defaults, tok, builder, ImageProcessor(config), SystemPrompts.from_pretrained(path),
                            resolve_request_defaults(defaults, engine_config))


_OBJECT_REPR_RE = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _without_reprs(text: str) -> str:
    """A decoder's message without object reprs (PIL names the `BytesIO` it could not identify)."""
    return _OBJECT_REPR_RE.sub("the data", text)


def decode_image(data: bytes, i: int, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode one encoded image, refusing decompression bombs before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
        if img.width * img.height > max_pixels:
            raise RequestError(f"input image {i} has {img.width}x{img.height} pixels; the limit is {max_pixels}",
                               "image", "invalid_image")
        img.load()
        return img.convert("RGB")
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"input image {i} could not be read: it is not a "
                           f"{', '.join(ALLOWED_IMAGE_FORMATS)} image", "image", "invalid_image") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this request's error
        raise RequestError(f"input image {i} could not be read: {type(e).__name__}: {_without_reprs(str(e))}",
                           "image", "invalid_image") from None


def or_default(value, default):
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

    def prompt_tokens(self, latent_downsample: int) -> int:
        """The tokens the image takes in a prompt at least: its VAE latent grid, the `<timestep>` and boundary tokens
        around it, and its ViT patches (the sequence pads them to the processor's patch count)."""
        vit = self.vit_spatial_shape[0] * self.vit_spatial_shape[1] if self.vit_shape else 0
        return image_tokens(self.vae_shape[-2], self.vae_shape[-1], latent_downsample) + 2 + vit


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


def unpack_image(p: ProcessedImage) -> tuple[VaeCondImage, VitCondImage | None]:
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
class ResolvedParams:
    """A request's scalar fields, validated, with the defaults resolved (`resolve_params`)."""

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


def _check_text(name: str, text: str | None, max_chars: int, param: str | None = None) -> None:
    """A text field: within ``max_chars`` characters and encodable as UTF-8 (JSON may carry lone surrogates);
    `param`: its name in the HTTP API (default ``name``)."""
    param = param or name
    if text is None:
        return
    if not isinstance(text, str):
        raise RequestError(f"{name} must be a string", param)
    if len(text) > max_chars:
        raise RequestError(f"{name} is {len(text)} characters; the limit is {max_chars}", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is not valid Unicode text (it holds a lone surrogate)", param) from None


def _check_number(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    """A float field: finite and within [low, high] (``low_open``: (low, high])."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{name} must be a number", name) from None
    if not math.isfinite(v) or v > high or v < low or (low_open and v == low):
        raise RequestError(f"{name} must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}], "
                           f"got {v!r}", name)
    return v


def resolve_params(ctx: ProcessorContext, req: GenerationRequest, num_images: int,
             max_text_chars: int = MAX_TEXT_CHARS) -> ResolvedParams:
    """Validate a request's scalar fields and resolve the defaults (cheap; no image is touched). Text fields are
    bounded here so that no component tokenises an unbounded string; numbers must be finite and in range."""
    d = ctx.request_defaults
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise RequestError("prompt must be a non-empty string", "prompt")
    _check_text("prompt", req.prompt, max_text_chars)
    _check_text("system_prompt", req.system_prompt, max_text_chars)
    for name in ("bot_task", "use_system_prompt", "image_size", "request_id"):
        _check_text(name, getattr(req, name, None), 1000, "size" if name == "image_size" else None)
    bot_task = req.bot_task or d.bot_task
    if bot_task not in BOT_TASKS:
        raise RequestError(f"unknown bot_task {bot_task!r}; expected one of {', '.join(BOT_TASKS)}", "bot_task")
    if req.output_type not in ("pil", "latent"):
        raise RequestError(f"output_type must be 'pil' or 'latent', got {req.output_type!r}", "output_type")
    if num_images > MAX_COND_IMAGES:
        raise RequestError(f"{num_images} input images; at most {MAX_COND_IMAGES} are supported", "image",
                           "too_many_images")
    max_new = or_default(req.max_new_tokens, d.max_new_tokens)
    if max_new <= 0:
        raise RequestError(f"max_new_tokens must be positive, got {max_new}", "max_new_tokens")
    context = ctx.config.max_position_embeddings
    if max_new > context:
        raise RequestError(f"max_new_tokens must be at most {context} (the model's context), got {max_new}",
                           "max_new_tokens")
    steps = or_default(req.num_inference_steps, d.num_inference_steps)
    if steps <= 0:
        raise RequestError(f"num_inference_steps must be positive, got {steps}", "num_inference_steps")
    if steps > MAX_INFERENCE_STEPS:
        raise RequestError(f"num_inference_steps must be at most {MAX_INFERENCE_STEPS}, got {steps}",
                           "num_inference_steps")
    guidance = float(or_default(req.guidance_scale, d.guidance_scale))
    if guidance < 0:
        raise RequestError(f"guidance_scale must be >= 0, got {guidance}", "guidance_scale")
    guidance = _check_number("guidance_scale", guidance, 0.0, MAX_GUIDANCE_SCALE)
    shift = _check_number("flow_shift", or_default(req.flow_shift, d.flow_shift), 0.0, MAX_FLOW_SHIFT, low_open=True)
    try:
        sampling = SamplingParams(
            do_sample=or_default(req.do_sample, d.do_sample),
            temperature=_check_number("temperature", or_default(req.temperature, d.temperature), 0.0, MAX_TEMPERATURE),
            top_k=int(or_default(req.top_k, d.top_k)),
            top_p=_check_number("top_p", or_default(req.top_p, d.top_p), 0.0, 1.0),
        )
    except RequestError:
        raise
    except (ValueError, OverflowError) as e:  # temperature and top_p are checked above: top_k is left
        raise RequestError(str(e), "top_k") from None
    image_size = req.image_size or "auto"
    fixed_ratio = None
    if image_size != "auto":
        try:
            fixed_ratio, _ = ctx.builder.resolution.parse_size(image_size)
        except ValueError as e:
            raise RequestError(f"invalid image size {image_size!r}: {e}", "size", "invalid_size") from None

    kind = or_default(req.use_system_prompt, d.use_system_prompt)
    try:
        system = choose_system_prompt(ctx.system_prompts, kind, bot_task, req.system_prompt,
                                      kind_given=req.use_system_prompt is not None)
    except ValueError as e:
        raise RequestError(str(e), "use_system_prompt") from None
    align = aligns_output(ctx, req)
    return ResolvedParams(bot_task, int(max_new), int(steps), guidance, shift, sampling, image_size, fixed_ratio,
                          system, align)


def _check_context(ctx: ProcessorContext, params: ResolvedParams, req: GenerationRequest,
                   images: Sequence[ProcessedImage] = ()) -> None:
    """The prompt and system prompt, tokenised here (the API server's worker pool, never the engine core), plus
    the condition images' tokens must fit the model's context."""
    limit = ctx.config.max_position_embeddings
    need = len(ctx.tokenizer.encode(req.prompt)) + len(ctx.tokenizer.encode(params.system or ""))
    need += sum(x.prompt_tokens(ctx.config.latent_downsample) for x in images)
    if need > limit:
        raise RequestError(f"the prompt, system prompt and images need at least {need} tokens; the model's "
                           f"context is {limit}", "prompt")


def aligns_output(ctx: ProcessorContext, req: GenerationRequest) -> bool:
    """Whether the request's image is resized to its condition image's aspect ratio (infer_align_image_size)."""
    return bool(or_default(req.infer_align_image_size, ctx.request_defaults.infer_align_image_size))


def check_request(ctx: ProcessorContext, req: GenerationRequest, num_images: int,
                  max_text_chars: int = MAX_TEXT_CHARS) -> None:
    """Every check of a request's scalar fields (`process_request` makes them again): cheap, no image touched, no
    text tokenised; the API server runs it before it fetches any image URL."""
    resolve_params(ctx, req, num_images, max_text_chars)


def process_request(ctx: ProcessorContext, req: GenerationRequest,
                    max_image_pixels: int = MAX_IMAGE_PIXELS, max_text_chars: int = MAX_TEXT_CHARS) -> ProcessedRequest:
    """The heavy, per-request CPU half of input processing (the API server runs it in a thread pool):
    validation (text bounded, then tokenised against the context before any image is decoded), image decoding
    with a pixel limit, VAE bucket resize/crop and SigLIP2 preprocessing."""
    params = resolve_params(ctx, req, len(req.images), max_text_chars)
    _check_context(ctx, params, req)
    images = []
    for i, data in enumerate(req.images):
        pil = decode_image(data, i, max_image_pixels)
        vae = ctx.images.vae_image(pil, align_image_size=params.align)
        vit = ctx.images.vit_image(pil) if ctx.config.has_vision else None
        images.append(_to_processed(vae, vit, hashlib.sha256(data).hexdigest()))
    if images:
        _check_context(ctx, params, req, images)
    return ProcessedRequest(request=msgspec.structs.replace(req, images=[]), images=images)

