"""OpenAI Images API shapes: request bodies (JSON variants), responses, SSE events and the error object."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OutputFormat = Literal["png", "jpeg", "webp"]


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

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = "auto"
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: OutputFormat | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: str | None = None
    background: str | None = None
    user: str | None = None
    stream: bool | None = False
    partial_images: int | None = None
    # extensions
    seed: int | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0)
    bot_task: str | None = None
    use_system_prompt: str | None = None
    system_prompt: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    infer_align_image_size: bool | None = None


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
