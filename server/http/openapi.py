"""The OpenAPI 3.1 document served at /openapi.json.

The image handlers read raw bodies (multipart or JSON, chosen by Content-Type, validated by the pydantic models of
openai_schemas), so FastAPI cannot infer their bodies: each route declares its body and answers here, built from
those same models with the server's own limits laid over them, and FastAPI assembles the paths from the routes the
app registers. What the document says is therefore what the handlers enforce; tests/reliability/test_schemathesis.py
fuzzes the live server against it.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from diffgentor.server.http.openai_schemas import (
    DONE,
    STREAM_EVENTS,
    UNSUPPORTED_PARAMETERS,
    UNSUPPORTED_VALUES,
    ErrorResponse,
    ImageEditJSONRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    size_pattern,
)

DESCRIPTION = ("OpenAI-compatible Images API for HunyuanImage-3.0. Every non-2xx answer is OpenAI's error object "
               "`{\"error\": {message, type, param, code}}`. A parameter OpenAI does not define is refused (400 "
               "`unknown_parameter`) unless it is one of this server's extensions, each marked "
               "`x-diffgentor-extension: true` in the request schemas.")
_REF = "#/components/schemas/{model}"
_IMAGE_TYPES = "image/png, image/jpeg, image/webp, image/bmp, image/gif"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_REFUSED = "; ".join([f"`{p}`" for p in UNSUPPORTED_PARAMETERS] + [
    f"`{p}` {' / '.join(f'`{v}`' for v in values)}" for p, values in UNSUPPORTED_VALUES.items()])
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
_IMAGE_ERRORS = {
    400: _err("invalid request: a parameter of the wrong type or value (`param` names it), a bad image or content "
              f"type, or an OpenAI parameter this server does not support (`unsupported_parameter` / "
              f"`unsupported_value`: {_REFUSED})"),
    404: _err("unknown model"),
    413: _err("an image or the whole body is too large"),
    429: _err("too many requests in flight") | {"headers": _RETRY_AFTER},
    500: _err("the engine failed on this request"),
    503: _err("the engine core is not running"),
}


def _sse_schema() -> dict[str, Any]:
    """One server-sent event of an image stream: `event` is the data's `type` and `data` that event as JSON; the
    last event has no name and the data `[DONE]`."""
    names = [t for m in STREAM_EVENTS for t in m.model_fields["type"].annotation.__args__]
    json_event = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "enum": names},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [_ref(m.__name__) for m in STREAM_EVENTS]}}}}
    done = {"type": "object", "required": ["data"], "not": {"required": ["event"]},
            "properties": {"data": {"const": DONE}}}
    return {"oneOf": [json_event, done]}


_IMAGES_OK = {200: {"model": ImagesResponse, "description": "the images (`stream: true`: server-sent events: "
                    "`<kind>.text_delta`, `<kind>.partial_image`, `<kind>.completed` per image or one `error`, then "
                    "`data: [DONE]`)",
                    "content": {"text/event-stream": {"schema": _sse_schema()}}}}

HEALTH: dict[str, Any] = {"responses": {
    200: {"description": "the engine core is running",
          "content": {"application/json": {"schema": {"type": "object", "required": ["status"],
                                                      "properties": {"status": {"const": "ok"}}}}}},
    503: _err("the engine core is not running")}}
METRICS: dict[str, Any] = {"response_class": PlainTextResponse,
                           "responses": {200: {"description": "Prometheus text exposition"}}}
MODELS: dict[str, Any] = {"responses": {200: {"model": ModelList, "description": "the served model names"}}}
MODEL: dict[str, Any] = {"responses": {200: {"model": ModelCard, "description": "the model"},
                                       404: _err("not a model this server serves")}}
STORED_IMAGE: dict[str, Any] = {
    "response_class": Response, "summary": "an image of a response_format=url answer",
    "description": "the URL is the credential (no API key); it expires after the server's --image-url-ttl-s",
    "responses": {200: {"description": "the image", "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                               for t in ("image/png", "image/jpeg", "image/webp")}},
                  404: _err("unknown or expired image")}}


GENERATIONS: dict[str, Any] = {"responses": _IMAGES_OK | _IMAGE_ERRORS, "openapi_extra": {"requestBody": {
    "required": True, "content": {"application/json": {"schema": _ref("ImageGenerationRequest")}}}}}
# multipart with image files, or JSON with image URLs (http(s) or base64 data URLs)
EDITS: dict[str, Any] = {"responses": _IMAGES_OK | _IMAGE_ERRORS, "openapi_extra": {"requestBody": {
    "required": True, "content": {
        "multipart/form-data": {"schema": _ref("ImageEditForm"), "encoding": {"image": {"contentType": _IMAGE_TYPES}}},
        "application/json": {"schema": _ref("ImageEditJSONRequest")}}}}}


def _model_schema(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    s = model.model_json_schema(ref_template=_REF)
    defs.update(s.pop("$defs", {}))
    return s


def _apply_limits(s: dict[str, Any], limits) -> dict[str, Any]:
    """The limits that are server settings rather than model constants."""
    props = s["properties"]
    props["prompt"]["maxLength"] = limits.max_prompt_chars
    n = _typed(props["n"], "integer")
    n["maximum"] = min(n["maximum"], limits.max_n)
    _typed(props["size"], "string")["pattern"] = size_pattern(limits.max_output_side)
    props["size"]["description"] += f"; each side within 16..{limits.max_output_side}"
    return s


def _typed(prop: dict[str, Any], json_type: str) -> dict[str, Any]:
    """The branch of `prop` (itself, or one of its anyOf for `X | None`) of the given JSON type."""
    return next(b for b in prop.get("anyOf", [prop]) if b.get("type") == json_type)


def _form_value(prop: dict[str, Any]) -> dict[str, Any]:
    """A form field is absent rather than null: keep the non-null branch of `X | None`."""
    prop = copy.deepcopy(prop)
    branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        prop = branches[0] | prop
    if isinstance(prop.get("enum"), list):
        prop["enum"] = [v for v in prop["enum"] if v is not None]
    if prop.get("default") is None:
        prop.pop("default", None)
    return prop


def request_schemas(limits) -> dict[str, Any]:
    """Component schemas of the request bodies: the validating models, plus the multipart form built from the
    fields they share (FORM_FIELDS) and the image parts."""
    defs: dict[str, Any] = {}
    gen = _apply_limits(_model_schema(ImageGenerationRequest, defs), limits)
    edit_json = _apply_limits(_model_schema(ImageEditJSONRequest, defs), limits)
    edit_json["properties"]["images"].update(minItems=1, maxItems=limits.max_images)
    edit_json["required"] = ["prompt", "images"]
    form_props = {k: _form_value(v) for k, v in gen["properties"].items()}  # the edit's FORM_FIELDS
    form_props["image"] = {
        "type": "array", "minItems": 1, "maxItems": limits.max_images,
        "items": {"type": "string", "format": "binary"},
        "description": f"1..{limits.max_images} image files (also accepted as `image[]`), each at most "
                       f"{limits.max_upload_bytes} bytes and {limits.max_image_pixels} pixels, each side at least "
                       f"{limits.min_image_side} pixels"}
    form = {"type": "object", "title": "ImageEditForm", "properties": form_props, "required": ["prompt", "image"]}
    return defs | {"ImageGenerationRequest": gen, "ImageEditJSONRequest": edit_json, "ImageEditForm": form}


def document(app: FastAPI, limits, api_key: bool = False) -> dict[str, Any]:
    """The document (built once per app): the registered routes' paths, the request schemas, bearer auth on
    /v1/ when the server has an API key."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = doc.setdefault("components", {})
        comps.setdefault("schemas", {}).update(request_schemas(limits))
        for event in STREAM_EVENTS:  # the stream's events, referenced by the text/event-stream schema
            comps["schemas"][event.__name__] = _model_schema(event, comps["schemas"])
        if api_key:
            comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        err = {"application/json": {"schema": _ref("ErrorResponse")}}
        for path, ops in doc["paths"].items():
            for op in ops.values():  # path parameters are plain strings: FastAPI's 422 never happens
                op["responses"].pop("422", None)
            if not path.startswith("/v1/"):
                continue
            for op in ops.values():  # the guard in front of /v1/
                op["responses"].setdefault("413", {"description": "the body is too large", "content": err})
                if api_key:
                    op["security"] = [{"bearer": []}]
                    op["responses"]["401"] = {"description": "missing or wrong API key", "content": err}
        app.openapi_schema = doc
    return app.openapi_schema
