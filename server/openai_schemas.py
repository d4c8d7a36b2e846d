"""OpenAI Images API shapes: request bodies (JSON variants), responses, SSE events and the error object.

The pydantic models validate the requests and are also the schemas of the OpenAPI document (server/openapi.py), so
the constraints written here (ranges, patterns, enums) are the ones the server enforces."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffgentor.engine.models.hunyuan_image_3.pipeline import BOT_TASKS

OutputFormat = Literal["png", "jpeg", "webp"]
# `auto` (any case), empty, or WIDTHxHEIGHT (`x`, `X` or `*`); the server parses sizes with this same pattern
SIZE_PATTERN = r"^\s*(?:([aA][uU][tT][oO])|(\d{1,6})\s*[xX*]\s*(\d{1,6}))?\s*$"
SIZE_RE = re.compile(SIZE_PATTERN)
TEXT_ONLY_BOT_TASKS = ("auto",)  # a free text answer, never an image: refused by the images API
IMAGE_BOT_TASKS = tuple(t for t in BOT_TASKS if t not in TEXT_ONLY_BOT_TASKS)


class OpenAIError(Exception):
    """Raised anywhere in a handler; answered as `{"error": {message, type, param, code}}` with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
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


class _Common(BaseModel):
    """Fields shared by generations and edits, with the HunyuanImage / diffgentor extensions."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})
    model: str | None = Field(None, description="one of GET /v1/models; 404 otherwise")
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field("auto", json_schema_extra={"pattern": SIZE_PATTERN},
                             description="`auto` or WIDTHxHEIGHT, each side within 16..the server's max output side")
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json", description="images are returned as b64_json; `url` is refused (400 unsupported_value)")
    output_format: OutputFormat | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: str | None = Field(None, description="accepted and ignored")
    background: str | None = Field(None, description="accepted and ignored")
    user: str | None = Field(None, description="accepted and ignored")
    stream: bool | None = Field(False, description="true: a text/event-stream of text deltas, then the image")
    partial_images: int | None = Field(None, description="accepted and ignored")
    input_fidelity: str | None = Field(None, description="accepted and ignored")
    # extensions
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # the engine's seeds are non-negative 64-bit integers
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0)
    bot_task: str | None = Field(None, json_schema_extra={"enum": [*IMAGE_BOT_TASKS, None]})
    use_system_prompt: str | None = Field(None, description="a system-prompt kind of the checkpoint, or `custom`")
    system_prompt: str | None = None
    max_new_tokens: int | None = Field(None, ge=1, description="the think / recaption token budget")
    infer_align_image_size: bool | None = None


FORM_FIELDS = tuple(_Common.model_fields)  # the fields a multipart edit may carry besides its images


class ImageGenerationRequest(_Common):
    pass


class ImageRef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image_url: str | None = None
    file_id: str | None = None


class ImageEditJSONRequest(_Common):
    """The JSON variant of /v1/images/edits: `images: [{image_url}]` (http(s) or data: URLs)."""

    images: list[ImageRef] = Field(default_factory=list)
    image: list[ImageRef] | ImageRef | str | list[str] | None = None  # lenient: plain URLs are accepted too

    def image_urls(self) -> list[str]:
        refs: list[Any] = list(self.images)
        if self.image is not None:
            refs += self.image if isinstance(self.image, list) else [self.image]
        urls = []
        for r in refs:
            if isinstance(r, str):
                urls.append(r)
            elif r.image_url:
                urls.append(r.image_url)
            else:
                raise OpenAIError(400, "file_id image references are not supported; send image_url", "images",
                                  "unsupported_file_id")
        return urls


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
    b64_json: str
    revised_prompt: str = Field(description="the recaption the image was generated from (or the think text)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    usage: Usage


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


def now() -> int:
    return int(time.time())
