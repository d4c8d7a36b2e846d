"""OpenAI Images API shapes: request bodies (JSON variants), responses, SSE events and the error object.

The pydantic models validate the requests and are also the schemas of the OpenAPI document (server/http/openapi.py), so
the constraints written here (ranges, patterns, enums) are the ones the server enforces. OpenAI parameters the server
cannot honour are refused by name (`check_supported`: 400 `unsupported_parameter` / `unsupported_value`), never
ignored; the tables below are also what the README's parameter table lists."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from diffgentor.engine.models.hunyuan_image_3.system_prompt import ALL_KINDS
from diffgentor.engine.request_contract import BOT_TASKS

OutputFormat = Literal["png", "jpeg", "webp"]
Quality = Literal["low", "medium", "high", "auto"]
# `auto` (any case), empty, or WIDTHxHEIGHT (`x`, `X` or `*`); the server parses sizes with this same pattern
SIZE_PATTERN = r"^\s*(?:([aA][uU][tT][oO])|(\d{1,6})\s*[xX*]\s*(\d{1,6}))?\s*$"
SIZE_RE = re.compile(SIZE_PATTERN)
MIN_OUTPUT_SIDE = 16
# an image reference the server reads: a base64 data URL of an image, or an http(s) URL
IMAGE_URL_PATTERN = r"^(?:https?://\S+|data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=\s]*)$"
TEXT_ONLY_BOT_TASKS = ("auto",)  # a free text answer, never an image: refused by the images API
EXTENSION_MARK = "x-diffgentor-extension"  # marks a request field OpenAI does not define
IMAGE_BOT_TASKS = tuple(t for t in BOT_TASKS if t not in TEXT_ONLY_BOT_TASKS)

# OpenAI parameters this server refuses whatever their value (400 unsupported_parameter), with the reason
UNSUPPORTED_PARAMETERS: dict[str, str] = {
    "mask": "the model edits by instruction, not by mask: say in the prompt which region to change",
    "style": "`style` (vivid / natural) is a DALL-E 3 setting; describe the style in the prompt",
    "input_fidelity": "the model reads its input images at one fixed fidelity",
    "complexity": "the think / recaption budget is set with `max_new_tokens` and `bot_task`",
    "markup": "the model edits by instruction, not by a markup overlay",
    "frame_count": "only still images are generated (no GIF output)",
    "frame_duration_ms": "only still images are generated (no GIF output)",
    "svg": "only raster images are generated (no SVG output)",
}
# OpenAI values this server refuses (400 unsupported_value); the other values of these parameters are honoured
UNSUPPORTED_VALUES: dict[str, dict[str, str]] = {
    "background": {"transparent": "the model generates opaque RGB images (no alpha channel)"},
    "output_format": {"gif": "only png, jpeg and webp are produced", "svg": "only png, jpeg and webp are produced"},
    "quality": {q: "quality is low, medium, high or auto (diffusion step counts)" for q in
                ("standard", "hd", "xhigh", "max")},
}


def _integral(v: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (JSON Schema's `integer` accepts it), 5.5 stays a float
    and is refused."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def json_int(ge: int | None = None, le: int | None = None) -> Any:
    """An integer parameter within [ge, le] that also takes integral JSON numbers such as 5.0."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


def steps_for_quality(quality: str | None, default_steps: int) -> int:
    """Diffusion steps of an OpenAI `quality`, relative to the checkpoint's default: high (and auto) = the default,
    medium = half, low = a quarter, rounded up (docs/decisions.md, "quality as diffusion steps")."""
    div = {"low": 4, "medium": 2}.get(quality or "auto", 1)
    return max(1, math.ceil(default_steps / div))


def int_range_pattern(lo: int, hi: int) -> str:
    """A regular expression (no anchors) matching the decimal integers lo..hi, leading zeros allowed: the size
    pattern of the OpenAPI document says exactly which sides the server takes."""
    pieces = []
    while lo <= hi:
        k = 0  # widest block lo..lo+10**k-1 that starts at lo and fits
        while lo % 10 ** (k + 1) == 0 and lo + 10 ** (k + 1) - 1 <= hi:
            k += 1
        step = 10**k
        digit = (lo // step) % 10
        m = 1
        while digit + m <= 9 and lo + (m + 1) * step - 1 <= hi:
            m += 1
        head = str(lo // (step * 10)) if lo >= step * 10 else ""
        last = str(digit) if m == 1 else f"[{digit}-{digit + m - 1}]"
        pieces.append(head + last + (r"\d" * k if k < 2 else rf"\d{{{k}}}"))
        lo += m * step
    return "0*(?:" + "|".join(pieces) + ")"


def size_pattern(max_side: int) -> str:
    """The `size` values the server takes: `auto` (any case) or WIDTHxHEIGHT, each side MIN_OUTPUT_SIDE..max_side."""
    side = int_range_pattern(MIN_OUTPUT_SIDE, max_side)
    return rf"^\s*(?:[aA][uU][tT][oO]|{side}\s*[xX*]\s*{side})?\s*$"


class OpenAIError(Exception):
    """Raised anywhere in a handler; answered as `{"error": {message, type, param, code}}` with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param_name(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as OpenAI names parameters: `images[0].image_url`."""
    out = ""
    for x in loc:
        if x == "body":
            continue
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first pydantic / FastAPI validation error as OpenAI answers a bad parameter: 400 with `param`, code
    `missing_required_parameter`, `invalid_type` or `invalid_value`."""
    err = errors[0] if errors else {}
    param = _param_name(tuple(err.get("loc", ()))) or None
    kind = str(err.get("type", ""))
    if kind == "missing":
        return OpenAIError(400, f"missing required parameter: {param}", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return unknown_parameter(param or "")
    msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    typed = kind.endswith("_type") or kind.endswith("_parsing") or kind in ("model_attributes_type", "dict_type")
    return OpenAIError(400, msg, param, "invalid_type" if typed else "invalid_value")


def unknown_parameter(name: str) -> OpenAIError:
    """OpenAI's answer to a parameter it does not define (a misspelt `qualty` is not silently dropped)."""
    return OpenAIError(400, f"unknown parameter: {name!r} (see GET /openapi.json for the parameters this server "
                       "takes)", name, "unknown_parameter")


def check_supported(fields: Mapping[str, Any]) -> None:
    """400 for an OpenAI parameter or value the server cannot honour, naming it (a parameter that is absent or
    null is not a request for anything)."""
    for name, why in UNSUPPORTED_PARAMETERS.items():
        if fields.get(name) is not None:
            raise OpenAIError(400, f"{name} is not supported: {why}", name, "unsupported_parameter")
    for name, refused in UNSUPPORTED_VALUES.items():
        value = fields.get(name)
        if isinstance(value, str) and value in refused:
            raise OpenAIError(400, f"{name}={value!r} is not supported: {refused[value]}", name, "unsupported_value")
    images = fields.get("images")
    for i, ref in enumerate(images if isinstance(images, list) else []):
        if isinstance(ref, dict) and ref.get("file_id") is not None:
            raise OpenAIError(400, f"images[{i}].file_id: file references are not supported (this server has no "
                              "file store); send image_url", f"images[{i}].file_id", "unsupported_parameter")


def _extension(description: str | None = None, **schema: Any) -> dict[str, Any]:
    """Field arguments of a diffgentor extension: marked `x-diffgentor-extension` in the OpenAPI document (OpenAI
    does not define it; other servers ignore or refuse it)."""
    return {"description": description, "json_schema_extra": {EXTENSION_MARK: True, **schema}}


def _check_size(v: Any) -> Any:
    """`size` in plain words when it is not `auto` or WIDTHxHEIGHT (the document carries the exact pattern)."""
    if isinstance(v, str) and not SIZE_RE.match(v):
        raise ValueError(f"size must be 'auto' or WIDTHxHEIGHT in pixels, such as 1024x1024 or 1536x1024; got {v!r}")
    return v


SizeText = Annotated[str, AfterValidator(_check_size), Field(json_schema_extra={"pattern": SIZE_PATTERN})]


class _Common(BaseModel):
    """Fields shared by generations and edits, with the HunyuanImage / diffgentor extensions. A parameter neither
    OpenAI nor this server defines is a 400 `unknown_parameter` (extra="forbid"); OpenAI's own parameters that the
    server cannot honour are refused by name before that (`check_supported`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})
    model: str | None = Field(None, description="one of GET /v1/models; 404 otherwise")
    n: json_int(1, 10) | None = 1
    size: SizeText | None = Field("auto", description="`auto` or WIDTHxHEIGHT: the aspect ratio of the output, which "
                                  "is the resolution bucket of the checkpoint nearest to it")
    quality: Quality | None = Field("auto", description="diffusion steps relative to the checkpoint's default: "
                                    "high and auto = the default, medium = half, low = a quarter (rounded up); "
                                    "`num_inference_steps` overrides it")
    background: Literal["opaque", "auto"] | None = Field(
        "auto", description="images are opaque; `transparent` is refused (400 unsupported_value)")
    moderation: Literal["low", "auto"] | None = Field("auto", description="accepted: this server applies no "
                                                      "content moderation of its own")
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json", description="`b64_json`: the image in the response; `url`: a link to it on this server, valid for "
                                "a limited time (`--image-url-ttl-s`, default 3600 s)")
    output_format: OutputFormat | None = "png"
    output_compression: json_int(0, 100) | None = Field(
        None, description="jpeg / webp quality, 0-100 (default 100, the least compression); png is "
                                        "lossless and ignores it, as OpenAI documents")
    stream: bool | None = Field(False, description="true: a text/event-stream of text deltas, partial images, then "
                                                   "the image")
    partial_images: json_int(0, 3) | None = Field(0, description="with stream: this many progressive previews "
                                           "(decoded predictions at evenly spaced diffusion steps) before the image")
    user: str | None = Field(None, description="accepted (an end-user id for abuse monitoring); not stored")
    safety_identifier: str | None = Field(None, description="accepted (an end-user id for abuse monitoring); not "
                                                            "stored")
    # diffgentor extensions (EXTENSIONS; each marked in the OpenAPI document)
    seed: json_int(0, 2**63 - 1) | None = Field(None, **_extension(  # the engine's seeds: non-negative 64-bit
        "the seed of the first image (image i uses seed + i); random when absent"))
    num_inference_steps: json_int(1, 200) | None = Field(None, **_extension("diffusion steps; overrides `quality`"))
    guidance_scale: float | None = Field(None, ge=0, **_extension("CFG scale (CFG-distilled checkpoints ignore it)"))
    bot_task: str | None = Field(None, **_extension("what the model writes before the image",
                                                    enum=[*IMAGE_BOT_TASKS, None]))
    use_system_prompt: Literal[ALL_KINDS] | None = Field(None, **_extension(
        "a system-prompt kind of the checkpoint, or `custom` (with system_prompt)"))
    system_prompt: str | None = Field(None, **_extension("the system prompt of use_system_prompt=custom"))
    max_new_tokens: json_int(1) | None = Field(None, **_extension("the think / recaption token budget"))
    infer_align_image_size: bool | None = Field(None, **_extension(
        "edits: output size aligned to the first input image instead of a resolution bucket"))
    stream_text_deltas: bool | None = Field(False, **_extension(
        "with stream: also send `<kind>.text_delta` events (the think / recaption text as it is decoded); off by "
        "default, so a stream carries only OpenAI's event types"))

    @model_validator(mode="after")
    def _defaults_for_nulls(self):
        """OpenAI's parameters are nullable; null means the default."""
        for name in ("n", "size", "quality", "background", "moderation", "response_format", "output_format", "stream",
                     "partial_images", "stream_text_deltas"):
            if getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        return self


EXTENSION_FIELDS = tuple(k for k, f in _Common.model_fields.items()
                         if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(EXTENSION_MARK))
FORM_FIELDS = tuple(_Common.model_fields)  # the fields a multipart edit may carry besides its images
REFUSED_FIELDS = tuple(UNSUPPORTED_PARAMETERS)  # read from a multipart body too, to be refused by name


class ImageGenerationRequest(_Common):
    pass


ImageURL = Annotated[str, Field(pattern=IMAGE_URL_PATTERN)]


class ImageRef(BaseModel):
    """An input image by URL (`file_id` references are refused: this server has no file store)."""

    model_config = ConfigDict(extra="forbid")

    image_url: ImageURL


class ImageEditJSONRequest(_Common):
    """The JSON variant of /v1/images/edits: `images: [{image_url}]` (http(s) or data: URLs)."""

    images: list[ImageRef] = Field(default_factory=list)
    image: None = Field(None, description="multipart only: JSON edits send their images as `images`")

    @field_validator("image", mode="before")
    @classmethod
    def _no_image_field(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("JSON edits send their images as images: [{\"image_url\": ...}] (`image` is the "
                             "multipart field)")
        return v

    def image_urls(self) -> list[str]:
        return [r.image_url for r in self.images]


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every non-2xx answer of the API."""

    error: ErrorObject


class InputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the image (response_format b64_json)")
    url: str | None = Field(None, description="where to GET the image for a limited time (response_format url)")
    revised_prompt: str = Field(description="the recaption the image was generated from (or the think text)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"]
    output_format: OutputFormat
    quality: Literal["low", "medium", "high"] | None = Field(
        None, description="the quality the steps came from (absent when num_inference_steps set them)")
    size: str = Field(description="WIDTHxHEIGHT of the returned images")
    usage: Usage


# ------------------------------------------------------------------------------------------------ stream events
Kind = Literal["image_generation", "image_edit"]


class TextDeltaEvent(BaseModel):
    """A think / recaption text delta (a diffgentor event: the model writes text before its image)."""

    type: Literal["image_generation.text_delta", "image_edit.text_delta"]
    delta: str
    index: int = Field(description="which of the n images")
    created_at: int


class _ImageEventFields(BaseModel):
    b64_json: str
    created_at: int
    size: str = Field(description="WIDTHxHEIGHT of this image")
    quality: Quality
    background: Literal["opaque"]
    output_format: OutputFormat
    index: int = Field(description="which of the n images")


class PartialImageEvent(_ImageEventFields):
    """A progressive preview (the decoded prediction of the clean image at a diffusion step)."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class CompletedEvent(_ImageEventFields):
    type: Literal["image_generation.completed", "image_edit.completed"]
    revised_prompt: str
    usage: Usage


class ErrorEvent(BaseModel):
    """The stream's last event (before `[DONE]`) when the request failed."""

    type: Literal["error"]
    error: ErrorObject


STREAM_EVENTS: tuple[type[BaseModel], ...] = (TextDeltaEvent, PartialImageEvent, CompletedEvent, ErrorEvent)
DONE = "[DONE]"  # the data of the stream's very last event, which has no event name


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def usage(prompt_tokens: int, image_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": max(0, prompt_tokens - image_tokens)},
        "output_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
    }


def sse(event: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def sse_event(event: BaseModel) -> bytes:
    """One stream event, named by its `type`, from its model (so the document's event schemas are what is sent)."""
    data = event.model_dump(exclude_none=True)
    return sse(data["type"], data)


def now() -> int:
    return int(time.time())
