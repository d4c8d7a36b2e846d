"""`diffgentor serve`: an OpenAI-compatible image API (FastAPI on uvicorn + uvloop) over the engine-core process.

Endpoints: POST /v1/images/edits (multipart `image` / `image[]`, or JSON with image URLs / data URLs),
POST /v1/images/generations, GET /v1/models, GET /v1/models/{model}, GET /images/{token} (the images of
`response_format=url` answers, server/http/image_store.py), GET /health, GET /metrics. The API server validates,
decodes and preprocesses images in a thread pool (`process_request`) and hands the engine core a `ProcessedRequest` over
ZeroMQ; it streams think/recaption deltas and encodes the output images. Errors are always OpenAI's
`{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import random
import re
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from diffgentor.engine.config import ServerConfig
from diffgentor.engine.core_proc import FinishedInfo
from diffgentor.engine.input_processor import ProcessedRequest, ProcessorContext, check_request, process_request
from diffgentor.engine.request import EngineEvent, GenerationRequest
from diffgentor.engine.request_contract import RequestError
from diffgentor.server.http import openapi
from diffgentor.server.http.aio import unless
from diffgentor.server.http.engine_client import EngineDeadError
from diffgentor.server.http.engine_pool import EnginePool, plan_engine_instances
from diffgentor.server.http.http_server import (
    ConnectionLimiter,
    DrainingServer,
    fd_capped,
    head_timeout_protocol,
)
from diffgentor.server.http.image_store import ImageStore
from diffgentor.server.http.limits import (
    CHARGE_SCOPE_KEY,
    RETRY_AFTER_S,
    BodyLimit,
    BudgetExceeded,
    ByteBudget,
)
from diffgentor.server.http.metrics import CONTENT_TYPE, ServerMetrics
from diffgentor.server.http.openai_schemas import (
    DONE,
    FORM_FIELDS,
    IMAGE_BOT_TASKS,
    REFUSED_FIELDS,
    SIZE_RE,
    TEXT_ONLY_BOT_TASKS,
    CompletedEvent,
    ErrorEvent,
    ImageEditJSONRequest,
    ImageGenerationRequest,
    ImagesResponse,
    OpenAIError,
    PartialImageEvent,
    TextDeltaEvent,
    check_supported,
    now,
    sse,
    sse_event,
    steps_for_quality,
    unknown_parameter,
    usage,
    validation_error,
)
from diffgentor.server.http.request_cost import ImageHeader, RequestCost, read_header, request_cost
from diffgentor.server.url_fetch import FetchError, FetchPolicy, UrlFetcher

logger = logging.getLogger("diffgentor.server")

MiB = 1 << 20
_RECAPTION_RE = re.compile(r"<recaption>(.*?)(?:</recaption>|$)", re.S)
_TAG_RE = re.compile(r"<[^<>\s]{1,40}>")


@dataclass
class AppState:
    ctx: ProcessorContext
    client: EnginePool
    metrics: ServerMetrics
    model_names: list[str]
    model_root: str
    api_key: str | None = None
    limits: ServerConfig = field(default_factory=ServerConfig)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="dg-input"))
    created: int = field(default_factory=now)
    fetcher: UrlFetcher | None = None  # built from `limits` when None and URL fetching is allowed
    playground: bool = True  # the page at / (diffgentor.server.http.playground); off with --no-playground
    # browser origins allowed to call the API (CORS); `*`: any, the default as in vLLM; empty: no CORS headers
    allowed_origins: tuple[str, ...] = ("*",)
    image_store: ImageStore = field(default_factory=ImageStore)  # response_format=url
    cost_budget: ByteBudget | None = None  # the memory cost of admitted requests; built from `limits` when None


# ------------------------------------------------------------------------------------------------ helpers
def _error_response(e: OpenAIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    extra = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else {}
    return JSONResponse(e.body(), status_code=e.status, headers={**extra, **(headers or {})} or None)


def _parse_size(size: str | None, limits: ServerConfig) -> str:
    """OpenAI's `size` (WIDTHxHEIGHT) as the engine's `image_size`, which is HEIGHTxWIDTH (the batch CLI's
    `--image_size` convention, engine/models/hunyuan_image_3/resolution.py); `auto` stays `auto`."""
    m = SIZE_RE.match(size or "")
    if not m:
        raise OpenAIError(400, f"invalid size {size!r}; use 'auto' or WIDTHxHEIGHT such as 1024x1024", "size",
                          "invalid_size")
    if m.group(2) is None:  # `auto` or empty
        return "auto"
    w, h = int(m.group(2)), int(m.group(3))
    if not (16 <= w <= limits.max_output_side and 16 <= h <= limits.max_output_side):
        raise OpenAIError(400, f"size {w}x{h} is out of range; each side must be within 16..{limits.max_output_side}",
                          "size", "invalid_size")
    return f"{h}x{w}"


def revised_prompt(text: str) -> str:
    """The recaption (what the image was generated from); the whole think text, untagged, when there is none."""
    m = _RECAPTION_RE.search(text or "")
    out = m.group(1) if m else (text or "")
    return _TAG_RE.sub("", out).strip()


def _encode_output(image: Image.Image, fmt: str, compression: int | None) -> bytes:
    """The image encoded once, in the requested format (from the engine's pixels: no PNG decoded again).
    `output_compression` as OpenAI documents it: 0-100 for jpeg and webp, default 100 (the least compression), used
    as the encoder's quality; png is lossless and ignores it."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format="JPEG" if fmt == "jpeg" else "WEBP",
                                  quality=100 if compression is None else compression)
    return buf.getvalue()


def _size_of(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


def _request_error(e: RequestError) -> OpenAIError:
    """The engine's refusal as an HTTP 400: the field it names (`RequestError.param`) and its code."""
    return OpenAIError(400, str(e), e.param, e.code)


async def _read_upload(f: UploadFile, i: int, limits: ServerConfig) -> bytes:
    data = await f.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise OpenAIError(413, f"image {i} is larger than {limits.max_upload_bytes} bytes", "image", "file_too_large")
    if not data:
        raise OpenAIError(400, f"image {i} is empty", "image", "invalid_image")
    return data


async def _fetch_url(url: str, i: int, limits: ServerConfig, fetcher: UrlFetcher | None = None, charge=None) -> bytes:
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise OpenAIError(400, f"image {i}: only base64 data URLs are supported", "images", "invalid_image_url")
        if len(payload) * 3 // 4 > limits.max_upload_bytes:
            raise OpenAIError(413, f"image {i} is larger than {limits.max_upload_bytes} bytes", "images",
                              "file_too_large")
        try:
            return await asyncio.to_thread(base64.b64decode, payload, validate=False)  # megabytes: off the loop
        except (binascii.Error, ValueError):
            raise OpenAIError(400, f"image {i}: the data URL is not valid base64", "images",
                              "invalid_image_url") from None
    if not url.startswith(("http://", "https://")):
        raise OpenAIError(400, f"image {i}: unsupported URL scheme (use http(s):// or data:)", "images",
                          "invalid_image_url")
    if fetcher is None:
        raise OpenAIError(400, f"image {i}: this server does not fetch image URLs (send the image as a data URL or "
                          "a multipart upload; the operator may allow fetching with --allowed-url-fetch)", "images",
                          "invalid_image_url")
    try:
        return await fetcher.fetch(url, charge)
    except FetchError as e:
        logger.info("image URL %d refused: %s", i, e.detail)
        raise OpenAIError(e.status, f"image {i}: {e.message}", "images", e.code) from None
    except BudgetExceeded:
        raise OpenAIError(429, "the server is holding too much image data; retry later", None,
                          "rate_limit_exceeded") from None


async def _fetch_images(state: AppState, request: Request, urls: list[str]) -> list[bytes] | None:
    """Every image of a JSON edit, under one deadline for the request; None when the client left meanwhile (the
    downloads are cancelled)."""
    charge = request.scope.get(CHARGE_SCOPE_KEY)

    async def fetch_all() -> list[bytes]:
        tasks = [asyncio.ensure_future(_fetch_url(u, i, state.limits, state.fetcher, charge))
                 for i, u in enumerate(urls)]
        try:
            async with asyncio.timeout(state.limits.request_fetch_deadline_s):
                return list(await asyncio.gather(*tasks))
        except TimeoutError:
            raise OpenAIError(400, "the image URLs could not be fetched in time", "images",
                              "invalid_image_url") from None
        finally:  # one URL failed or the client left: the other downloads stop too
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    done, images = await unless(fetch_all(), _wait_disconnect(request))
    return images if done else None


def _validate(model_cls, data: dict[str, Any], strict: bool):
    """OpenAI parameters the server cannot honour are refused by name first; then JSON bodies are typed, so
    strictly (`"n": "2"` or `"stream": 1` is a 400 invalid_type, as the OpenAPI document says; `"n": 5.0` is the
    integer 5); multipart fields are all text, parsed leniently."""
    check_supported(data)
    try:
        return model_cls.model_validate(data, strict=strict)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


# ------------------------------------------------------------------------------------------------ the app
def build_app(state: AppState) -> FastAPI:
    app = FastAPI(title="diffgentor", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", description=openapi.DESCRIPTION)
    app.router.redirect_slashes = False  # Starlette's redirect echoes the Host header; `_slash_twin` instead
    app.state.dg = state
    app.openapi = lambda: openapi.document(app, state.limits, api_key=state.api_key is not None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return _error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            other = _slash_twin(app, request)
            if other is not None:  # a path-only Location: never built from the client's Host header
                return Response(status_code=307, headers={"Location": other})
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(OpenAIError(e.status_code, str(e.detail), None, code), e.headers)  # 405: Allow

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        logger.exception("internal error")
        return _error_response(OpenAIError(500, f"internal server error: {type(e).__name__}", None, "internal_error"))

    app.add_middleware(_Guard, state=state)
    lim = state.limits
    if state.cost_budget is None:
        state.cost_budget = ByteBudget(lim.max_queued_cost_bytes)
    if state.fetcher is None and lim.allow_url_fetch:
        state.fetcher = UrlFetcher(FetchPolicy.build(lim.max_upload_bytes, lim.allowed_url_hosts,
                                                     deadline_s=lim.fetch_deadline_s))
    app.add_middleware(BodyLimit, max_body_bytes=lim.max_request_bytes, budget=ByteBudget(lim.max_inflight_bytes),
                       body_idle_timeout_s=lim.body_idle_timeout_s, body_deadline_s=lim.body_deadline_s)
    if state.allowed_origins:  # outermost: a browser's preflight (no API key) is answered before the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    if state.playground:
        from fastapi.responses import HTMLResponse

        from diffgentor.server.http.playground import CONTENT_SECURITY_POLICY, page_html

        @app.get("/", include_in_schema=False)
        async def playground():
            return HTMLResponse(page_html(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get("/health", **openapi.HEALTH)
    async def health():
        if state.client.healthy:
            return {"status": "ok"}
        return _error_response(OpenAIError(503, f"engine core is not running: {state.client.death_reason}", None,
                                           "engine_dead"))

    @app.get("/metrics", **openapi.METRICS)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "diffgentor",
                "root": state.model_root}

    @app.get("/v1/models", **openapi.MODELS)
    async def models():
        return {"object": "list", "data": [card(n) for n in state.model_names]}

    @app.get("/v1/models/{model:path}", **openapi.MODEL)
    async def model(model: str):
        if model not in state.model_names:
            raise OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                              f"{', '.join(state.model_names)}", "model", "model_not_found")
        return card(model)

    @app.get("/images/{token}", **openapi.STORED_IMAGE)
    async def stored_image(token: str):
        item = state.image_store.get(token)
        if item is None:
            raise OpenAIError(404, "no such image: image URLs expire (response_format=url keeps an image for "
                              f"{state.image_store.ttl_s:g} s)", None, "not_found")
        return Response(item.data, media_type=item.media_type, headers={"Cache-Control": "private, max-age=60"})

    @app.post("/v1/images/generations", **openapi.GENERATIONS)
    async def generations(request: Request):
        _require_json(request)
        body = await _json_body(state, request)
        params = _validate(ImageGenerationRequest, body, strict=True)
        return await _run_images(state, request, "image_generation", params, [])

    @app.post("/v1/images/edits", **openapi.EDITS)
    async def edits(request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = await _json_body(state, request)
            params = _validate(ImageEditJSONRequest, body, strict=True)
            urls = params.image_urls()
            _check_count(len(urls), state.limits)
            # fetched only after every cheap check (and the capacity reservation) passed
            return await _run_images(state, request, "image_edit", params, [], urls=urls)
        if not ctype.startswith("multipart/form-data"):
            raise OpenAIError(400, "send multipart/form-data (or application/json with image URLs)", None,
                              "invalid_content_type")
        try:
            form = await request.form(max_files=state.limits.max_images + 8, max_fields=64)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise OpenAIError(400, f"could not parse the multipart body: {e}", None, "invalid_multipart") from None
        files = [v for k in ("image", "image[]") for v in form.getlist(k)]
        _check_count(len(files), state.limits)
        images = []
        for i, f in enumerate(files):
            if not isinstance(f, UploadFile):
                raise OpenAIError(400, f"image {i} must be a file upload", "image", "invalid_image")
            images.append(await _read_upload(f, i, state.limits))
        check_supported({k: form.get(k) for k in REFUSED_FIELDS})  # e.g. a `mask` file
        _check_form_names(form.keys())
        fields = {k: form.get(k) for k in FORM_FIELDS if isinstance(form.get(k), str)}
        if "prompt" not in fields:
            raise OpenAIError(400, "prompt is required", "prompt", "missing_required_parameter")
        params = _validate(ImageEditJSONRequest, fields, strict=False)
        return await _run_images(state, request, "image_edit", params, images)

    return app


class _Guard:
    """API key and body-size checks for /v1/. Plain ASGI on purpose: Starlette's `@app.middleware("http")`
    (BaseHTTPMiddleware) swallows the client's disconnect, so a non-streaming request whose client hung up would
    run to its end in the engine."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            err = self._check(Headers(scope=scope))
            if err is not None:
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, headers: Headers) -> OpenAIError | None:
        state = self.state
        if state.api_key is not None:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                return OpenAIError(401, "incorrect or missing API key (Authorization: Bearer)", None,
                                   "invalid_api_key")
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > state.limits.max_request_bytes:
            return OpenAIError(413, f"request body larger than {state.limits.max_request_bytes} bytes", None,
                               "request_too_large")
        return None


def _slash_twin(app: FastAPI, request: Request) -> str | None:
    """The path with its trailing slash added or removed, when that one is a route: where a 404 redirects to."""
    from starlette.routing import Match

    path = request.url.path
    if path == "/":
        return None
    other = path[:-1] if path.endswith("/") else path + "/"
    scope = {**request.scope, "path": other}
    if any(route.matches(scope)[0] != Match.NONE for route in app.router.routes):
        query = request.scope.get("query_string", b"").decode("latin-1")
        return quote(other) + (f"?{query}" if query else "")
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from diffgentor import DISTRIBUTION

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0"


def _check_count(n: int, limits: ServerConfig) -> None:
    if n == 0:
        raise OpenAIError(400, "image is required: send 1 to 3 images as `image` or `image[]`", "image",
                          "missing_required_parameter")
    if n > limits.max_images:
        raise OpenAIError(400, f"{n} images; at most {limits.max_images} are supported", "image", "too_many_images")


def _require_json(request: Request) -> None:
    """A JSON body must say so: JSON sent as text/plain (or form data to a JSON-only endpoint) is refused."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise OpenAIError(400, f"send the request body as JSON with Content-Type: application/json (got "
                          f"{ctype or 'no Content-Type'})", None, "invalid_content_type")


def _check_form_names(names) -> None:
    """Every multipart field is a parameter: `svg[model]` (how clients send the nested `svg` object) is `svg`, refused
    by name; a name neither OpenAI nor this server defines is 400 unknown_parameter; a scalar parameter sent in
    pieces (`n[0]`) is refused instead of being read as absent."""
    known = set(FORM_FIELDS) | {"image", "image[]"}
    for name in names:
        base = name.split("[", 1)[0]
        if base in REFUSED_FIELDS:
            check_supported({base: name})
        if name in known:
            continue
        if base in known:
            raise OpenAIError(400, f"{base} takes a single value; the multipart field {name!r} is not one", base,
                              "invalid_value")
        raise unknown_parameter(name)


JSON_MARKS = (b'"', b",", b":", b"[", b"{")  # each string, member and element of a JSON text needs one of these


def _parse_json(body: bytes, max_text_chars: int) -> Any:
    """A request body's JSON (the worker pool runs it: parsing holds the GIL, but not the event loop). A text with
    more structure than any request can have (its text fields bound the quotes and separators; images are base64
    or URLs) is refused from a count of its marks before it is parsed: 5 million keys took seconds and 670 MB."""
    if sum(body.count(m) for m in JSON_MARKS) > 4 * max_text_chars + 65536:
        raise OpenAIError(400, "the JSON body has more strings, members or elements than any request needs", None,
                          "invalid_json")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the request body is not valid JSON", None, "invalid_json") from None


async def _json_body(state: AppState, request: Request) -> dict[str, Any]:
    body = await request.body()
    loop = asyncio.get_running_loop()
    parsed = await loop.run_in_executor(state.pool, _parse_json, body, state.limits.max_prompt_chars)
    if not isinstance(parsed, dict):
        raise OpenAIError(400, "the request body must be a JSON object", None, "invalid_json")
    return parsed


@dataclass
class _Outcome:
    index: int
    text: str = ""
    image: Image.Image | None = None
    info: FinishedInfo | None = None


async def _run_images(state: AppState, request: Request, kind: str, params, images: list[bytes],
                      urls: list[str] | None = None):
    limits = state.limits
    if params.model is not None and params.model not in state.model_names:
        raise OpenAIError(404, f"the model {params.model!r} does not exist; this server serves "
                          f"{', '.join(state.model_names)}", "model", "model_not_found")
    if not params.prompt.strip():
        raise OpenAIError(400, "prompt must be a non-empty string", "prompt", "invalid_value")
    if len(params.prompt) > limits.max_prompt_chars:
        raise OpenAIError(400, f"prompt is {len(params.prompt)} characters; the limit is {limits.max_prompt_chars}",
                          "prompt", "string_above_max_length")
    if params.n > limits.max_n:
        raise OpenAIError(400, f"n must be at most {limits.max_n}", "n", "invalid_value")
    if params.bot_task in TEXT_ONLY_BOT_TASKS:
        raise OpenAIError(400, f"bot_task {params.bot_task!r} answers in text only; use one of "
                          f"{', '.join(IMAGE_BOT_TASKS)}", "bot_task", "invalid_value")
    size = _parse_size(params.size, limits)
    rid = f"img-{uuid.uuid4().hex[:16]}"
    req = GenerationRequest(
        request_id=rid, prompt=params.prompt, images=[], image_size=size, bot_task=params.bot_task,
        use_system_prompt=params.use_system_prompt, system_prompt=params.system_prompt,
        num_inference_steps=_steps(state, params), guidance_scale=params.guidance_scale, seed=params.seed,
        max_new_tokens=params.max_new_tokens, infer_align_image_size=params.infer_align_image_size,
        partial_images=params.partial_images if params.stream else 0,  # previews exist only in a stream
    )
    try:  # every check of the request's fields, before any slot is taken or any URL fetched
        check_request(state.ctx, req, len(urls) if urls else len(images), limits.max_prompt_chars)
    except RequestError as e:
        raise _request_error(e) from None
    client = state.client
    if not client.healthy:
        raise OpenAIError(503, "the engine core is not running", None, "engine_unavailable")
    if params.n > client.capacity:
        raise OpenAIError(400, f"n={params.n} is more than this server can ever run at once ({client.capacity})",
                          "n", "invalid_value")
    sub_ids = [f"{rid}-{i}" for i in range(params.n)]
    if not client.reserve(sub_ids):  # the check and the taking of the slots in one step: no race
        raise OpenAIError(429, "too many requests in flight; retry later", None, "rate_limit_exceeded")
    held = _Held(state, sub_ids)
    streaming = False
    try:
        response = await _admitted(state, request, kind, params, req, images, urls, held)
        streaming = isinstance(response, StreamingResponse)  # it gives the slots back when the stream ends
        return response
    finally:
        if not streaming:
            held.release()


@dataclass
class _Held:
    """What an admitted request holds until its response is complete: engine slots and its memory cost."""

    state: AppState
    sub_ids: list[str]
    cost: int = 0

    def take_cost(self, cost: RequestCost) -> None:
        limits, budget = self.state.limits, self.state.cost_budget
        if cost.total > limits.max_request_cost_bytes:
            raise OpenAIError(400, f"this request would hold {cost.describe()} of memory; the limit is "
                              f"{limits.max_request_cost_bytes // MiB} MiB (send smaller or fewer images, or a "
                              "lower n)", "image", "request_too_large")
        if budget is not None:
            if not budget.take(cost.total):
                raise OpenAIError(429, "the server's queued and running requests hold its memory budget; retry "
                                  "later", None, "rate_limit_exceeded")
            self.cost = cost.total

    def release(self) -> None:
        self.state.client.release(self.sub_ids)
        if self.state.cost_budget is not None:
            self.state.cost_budget.give(self.cost)
        self.cost = 0


async def _admitted(state: AppState, request: Request, kind: str, params, req: GenerationRequest,
                    images: list[bytes], urls: list[str] | None, held: _Held):
    """`_run_images` once the request holds its engine slots (``held``): the images fetched, the request's memory
    cost taken from the budget (from the images' headers, before any is decoded), then processed and run."""
    limits, client, sub_ids = state.limits, state.client, held.sub_ids
    if urls:
        fetched = await _fetch_images(state, request, urls)
        if fetched is None:
            return Response(status_code=499)
        images = fetched
    loop = asyncio.get_running_loop()
    headers = await loop.run_in_executor(state.pool, _read_headers, images)
    for i, h in enumerate(headers):  # the check process_request does not make itself, from the headers read once
        if h is not None and min(h.width, h.height) < limits.min_image_side:
            raise _request_error(RequestError(f"input image {i} is {h.width}x{h.height} pixels; each side must be "
                                              f"at least {limits.min_image_side}", "image", "invalid_image"))
    # check_request validated the size already (the same parse)
    held.take_cost(request_cost(state.ctx, headers, req.image_size or "auto", params.n))
    req = msgspec.structs.replace(req, images=images)
    try:
        processed: ProcessedRequest = await loop.run_in_executor(state.pool, _process, state.ctx, req, limits)
    except RequestError as e:
        raise _request_error(e) from None
    base_seed = params.seed if params.seed is not None else state.ctx.request_defaults.seed
    if base_seed is None:  # no --seed: each seedless request draws its own
        base_seed = random.randrange(2**31 - params.n)
    subs = []
    for i in range(params.n):
        sub_req = msgspec.structs.replace(processed.request, request_id=sub_ids[i], seed=base_seed + i)
        subs.append(msgspec.structs.replace(processed, request=sub_req))
    ds = state.ctx.config.latent_downsample
    image_tokens = sum(x.prompt_tokens(ds) for x in processed.images)
    fmt = params.output_format or "png"
    if params.stream:
        # the slots not yet started go back when the stream ends, however it ends (the background task also runs
        # when the client left before the stream began)
        return StreamingResponse(_stream(state, kind, subs, fmt, params, image_tokens), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(held.release))

    work = asyncio.ensure_future(_collect_all(client, subs))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():  # the client went away: cancelling closes every generator, which aborts its request
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return Response(status_code=499)
    try:
        outcomes: list[_Outcome] = work.result()
    except EngineDeadError as e:
        raise OpenAIError(503, f"the engine core is not running: {e}", None, "engine_unavailable") from None
    for o in outcomes:
        _raise_for(o.info)
    data, prompt_tokens, out_tokens = [], 0, 0
    for o in outcomes:
        b = await loop.run_in_executor(state.pool, _encode_output, o.image, fmt, params.output_compression)
        data.append({**_image_ref(state, request, b, fmt, params.response_format),
                     "revised_prompt": revised_prompt(o.info.text)})
        prompt_tokens += o.info.num_prompt_tokens
        out_tokens += o.info.num_generated_tokens
    return ImagesResponse(
        created=now(), data=data, background="opaque", output_format=fmt, size=_size_of(outcomes[0].image),
        quality=None if params.num_inference_steps is not None else {"auto": "high"}.get(params.quality,
                                                                                           params.quality),
        usage=usage(prompt_tokens, image_tokens * len(outcomes), out_tokens)).model_dump(exclude_none=True)


def _image_ref(state: AppState, request: Request, data: bytes, fmt: str, response_format: str) -> dict[str, str]:
    """An image of a response: inline (`b64_json`) or a URL on this server (`url`, server/http/image_store.py)."""
    if response_format != "url":
        return {"b64_json": base64.b64encode(data).decode()}
    try:
        token = state.image_store.put(data, fmt)
    except ValueError as e:
        raise OpenAIError(500, str(e), "response_format", "image_store_full") from None
    return {"url": str(request.url_for("stored_image", token=token))}


def _steps(state: AppState, params) -> int | None:
    """`num_inference_steps` when given, else the steps of `quality` (None: the engine's default, which is what
    high and auto mean)."""
    if params.num_inference_steps is not None or params.quality in ("auto", "high"):
        return params.num_inference_steps
    return steps_for_quality(params.quality, state.ctx.request_defaults.num_inference_steps)


def _process(ctx: ProcessorContext, req: GenerationRequest, limits: ServerConfig) -> ProcessedRequest:
    """`process_request` under the server's limits (the minimum image side is checked from the headers first)."""
    return process_request(ctx, req, limits.max_image_pixels, max_text_chars=limits.max_prompt_chars)


def _read_headers(images: list[bytes]) -> list[ImageHeader | None]:
    return [read_header(d) for d in images]


def _raise_for(info: FinishedInfo | None) -> None:
    if info is None:
        raise OpenAIError(500, "the engine finished without a result", None, "internal_error")
    if info.finish_reason in ("error", "abort"):
        status = info.status if info.status in (400, 429, 500, 503) else 500
        raise OpenAIError(status, info.error or info.finish_reason, info.param if status == 400 else None,
                          "rate_limit_exceeded" if status == 429 else ("invalid_request" if status == 400 else
                                                                       "engine_error"))
    # a text-only bot_task (the server's default may be `auto`): the request's parameters, not a server fault
    if info.finish_reason == "length":
        raise OpenAIError(400, "the think / recaption text reached max_new_tokens before the image phase; raise "
                          "max_new_tokens", "max_new_tokens", "no_image")
    if info.finish_reason != "image":
        raise OpenAIError(400, f"the model answered without an image (finish_reason={info.finish_reason}); use a "
                          "bot_task that generates an image", "bot_task", "no_image")


async def _collect(client: EnginePool, index: int, sub: ProcessedRequest) -> _Outcome:
    out = _Outcome(index)
    gen = client.generate(sub)
    try:
        async for item in gen:
            if isinstance(item, FinishedInfo):
                out.info = item
            elif item.kind == "text":
                out.text += item.text
            elif item.kind == "image":
                out.image = item.image
    finally:
        await gen.aclose()
    return out


async def _collect_all(client: EnginePool, subs: list[ProcessedRequest]) -> list[_Outcome]:
    """Every sub-request's outcome, in order; the first that fails (error, abort, no image) cancels its siblings
    at once (which aborts them in the engine) and is raised."""
    tasks = [asyncio.ensure_future(_collect(client, i, s)) for i, s in enumerate(subs)]
    try:
        for fut in asyncio.as_completed(tasks):
            _raise_for((await fut).info)
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client hangs up: the body is already read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(state: AppState, kind: str, subs: list[ProcessedRequest], fmt: str, params, image_tokens: int):
    """SSE: (with `stream_text_deltas`) `<kind>.text_delta` events as the think/recaption text is decoded,
    `<kind>.partial_image` previews,
    `<kind>.completed` per image (b64_json, revised_prompt, usage), then `data: [DONE]`; an error is one `error`
    event, then [DONE]. Each event is its model in openai_schemas (the OpenAPI document's event schemas)."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def pump(i: int, sub: ProcessedRequest) -> None:
        gen = state.client.generate(sub)
        try:
            async for item in gen:
                await queue.put((i, item))
        except EngineDeadError as e:
            await queue.put((i, FinishedInfo(request_id="", finish_reason="error", status=503, error=str(e))))
        except Exception:  # noqa: BLE001 - whatever failed, the client gets a final error event
            logger.exception("stream %d failed", i)
            await queue.put((i, FinishedInfo(request_id="", finish_reason="error", status=500,
                                             error="internal server error")))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(subs)]
    texts = [""] * len(subs)
    images: list[Image.Image | None] = [None] * len(subs)
    remaining = len(subs)
    shown = dict(quality=params.quality, background="opaque", output_format=fmt)  # what every image event says

    async def encoded(image: Image.Image) -> dict[str, str]:
        b = await loop.run_in_executor(state.pool, _encode_output, image, fmt, params.output_compression)
        return {"b64_json": base64.b64encode(b).decode(), "size": _size_of(image)}

    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, EngineEvent):
                if item.kind == "text":
                    texts[i] += item.text
                    if not params.stream_text_deltas:  # opt-in: OpenAI's streams have no text events
                        continue
                    yield sse_event(TextDeltaEvent(type=f"{kind}.text_delta", delta=item.text, index=i,
                                                   created_at=now()))
                elif item.kind == "partial_image":
                    yield sse_event(PartialImageEvent(
                        type=f"{kind}.partial_image", partial_image_index=item.partial_image_index or 0, index=i,
                        created_at=now(), **shown, **await encoded(item.image)))
                elif item.kind == "image":
                    images[i] = item.image
                continue
            remaining -= 1
            try:
                _raise_for(item)
            except OpenAIError as e:
                yield sse_event(ErrorEvent(type="error", **e.body()))
                yield sse(None, DONE)
                return
            yield sse_event(CompletedEvent(
                type=f"{kind}.completed", index=i, revised_prompt=revised_prompt(item.text), created_at=now(),
                usage=usage(item.num_prompt_tokens, image_tokens, item.num_generated_tokens), **shown,
                **await encoded(images[i])))
        yield sse(None, DONE)
    except Exception:  # noqa: BLE001 - e.g. encoding an image failed: still a final error event, then [DONE]
        logger.exception("stream failed")
        err = OpenAIError(500, "internal server error", None, "internal_error")
        yield sse_event(ErrorEvent(type="error", **err.body()))
        yield sse(None, DONE)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        state.client.release([s.request.request_id for s in subs])


# ------------------------------------------------------------------------------------------------ serve
async def serve_async(args: argparse.Namespace, started: asyncio.Event | None = None) -> int:
    import uvicorn

    from diffgentor.engine.config import EngineConfig
    from diffgentor.engine.input_processor import load_processor_context
    from diffgentor.engine.model_source import is_repo_id

    try:  # a Hugging Face model id becomes its snapshot folder in the cache (downloaded unless offline)
        config = EngineConfig.from_cli_and_env(args).with_local_checkpoint()
    except FileNotFoundError as e:
        logger.error("%s", e)
        return 1
    # the name clients send: the model id as given (as vLLM serves it), else the folder's name
    names = args.served_model_name or [args.model if is_repo_id(args.model) else Path(args.model).name]
    metrics = ServerMetrics(names[0])
    holder: dict[str, Any] = {}

    def on_death() -> None:
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    try:
        slices = plan_engine_instances(config, args.data_parallel_size)
    except ValueError as e:
        logger.error("%s", e)
        return 1
    ctx = load_processor_context(config.model.checkpoint, config)
    client = EnginePool(config, slices, metrics=metrics, on_death=on_death, ctx=ctx)
    limits = config.server  # the serve flags' limits, built with the rest of the config
    state = AppState(ctx=ctx, client=client, metrics=metrics, model_names=names, model_root=config.model.checkpoint,
                     api_key=args.api_key, limits=limits, playground=getattr(args, "playground", True),
                     allowed_origins=tuple(args.allowed_origins),
                     image_store=ImageStore(args.image_url_store_bytes, args.image_url_ttl_s))
    try:
        await client.start()
    except Exception as e:  # noqa: BLE001
        logger.error("%s", e)
        await client.shutdown()
        return 1
    app = build_app(state)
    limiter = ConnectionLimiter(*fd_capped(args.max_connections, args.max_pending_connections))
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish (drain), then shut the engines down and exit 0
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           loop="none", lifespan="off",
                                           http=head_timeout_protocol(limits.head_timeout_s, limiter),
                                           timeout_graceful_shutdown=args.drain_timeout_s))
    holder["server"] = server
    logger.info("serving %s on http://%s:%d", names[0], args.host, args.port)
    try:
        await server.serve()
    finally:
        await client.shutdown()
        state.pool.shutdown(wait=False, cancel_futures=True)
    return 1 if client.dead else 0


def run_serve(args: argparse.Namespace) -> int:
    import uvloop

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return uvloop.run(serve_async(args))
