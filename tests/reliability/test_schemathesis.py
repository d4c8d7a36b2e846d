"""schemathesis against the live tiny server's /openapi.json: requests the document allows (positive) and requests it
forbids (negative: wrong types, out-of-range values, missing fields) for every operation, under every check
schemathesis has (none excluded): no answer may be a 5xx, every answer must have a documented status, content type,
headers and body, a request the document forbids must be refused with a 4xx, and a request it allows must be
accepted.

Images: a generated "binary" or URL is no image, so positive cases carry a real PNG (a data URL in JSON) where the
document asks for one, and at most 2 of them with a prompt of at most 500 characters: the tiny model's context (8192
tokens) holds no more (3 condition images need 9514; the engine answers 400 `param: prompt` for a request beyond
its context, which no JSON Schema of the body can state). Negative cases are sent as generated.

Cost bound, in the test only (the document keeps the real limits): a request that reaches the engine costs seconds on
these CPUs (the VAE decode of the smallest, 256x256, output dominates; each extra step, think token, image or pixel
adds), so valid expensive values are lowered before sending (sides <= 64, 1 step, n = 1, at most 4 think tokens) and
the positive image runs get 6 examples, the others 25 (the module takes about 90 s here). Values outside the
documented range are sent as generated. DG_SCHEMATHESIS_EXAMPLES sets every run's example count, for a longer run by
hand.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
from collections import Counter

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from diffgentor.bench.serve import run_load
from diffgentor.engine.config import ServerConfig
from diffgentor.engine.core_proc import FinishedInfo
from diffgentor.server.http.api import AppState, _raise_for, build_app
from diffgentor.server.http.openai_schemas import IMAGE_URL_PATTERN, SIZE_RE, OpenAIError

from .conftest import bad_spec, check_outcomes, png

EXAMPLES = int(os.environ.get("DG_SCHEMATHESIS_EXAMPLES", "15"))
ENGINE_EXAMPLES = int(os.environ.get("DG_SCHEMATHESIS_EXAMPLES", "6"))
CAPS = {"num_inference_steps": 1, "n": 1, "max_new_tokens": 4}  # the values that make a valid request expensive
MAX_SIDE = 64


def _maximum(prop: dict) -> float:
    for branch in [prop, *prop.get("anyOf", [])]:
        if "maximum" in branch:
            return branch["maximum"]
    return math.inf


def cap_body(body, documented: dict):
    """Lowers the expensive values that the document allows; a value outside the documented range (a negative
    case) is sent as generated."""
    if not isinstance(body, dict):
        return body
    for k, cap in CAPS.items():
        v = body.get(k)
        integral = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
        if integral and cap < v <= _maximum(documented[k]):
            body[k] = cap
    body.setdefault("max_new_tokens", CAPS["max_new_tokens"])
    body.setdefault("num_inference_steps", CAPS["num_inference_steps"])
    size = body.get("size")
    m = SIZE_RE.match(size) if isinstance(size, str) else None
    if m and m.group(2) is None:  # auto: the tiny model's 256x256 bucket
        body["size"] = f"{MAX_SIDE}x{MAX_SIDE}"
    elif m:
        w, h = int(m.group(2)), int(m.group(3))
        if 16 <= min(w, h) and max(w, h) <= ServerConfig().max_output_side:
            body["size"] = f"{min(w, MAX_SIDE)}x{min(h, MAX_SIDE)}"
    return body


_PNG = png()
_DATA_URL = "data:image/png;base64," + base64.b64encode(_PNG).decode()
_URL_RE = re.compile(IMAGE_URL_PATTERN)


def real_images(body):
    """A positive case's images as a real PNG: multipart `image` parts and JSON `image_url`s that the document
    allows (anything else is left as generated); at most 2 images and 500 prompt characters (the tiny model's
    context)."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("prompt"), str) and len(body["prompt"]) > 500:
        body["prompt"] = body["prompt"][:499] + "x"  # ends in a non-space: still a valid prompt

    def url(v):
        return _DATA_URL if isinstance(v, str) and _URL_RE.match(v) else v

    def ref(v):
        if isinstance(v, dict) and "image_url" in v:
            return {**v, "image_url": url(v["image_url"])}
        return url(v)

    for key in ("image", "images"):
        v = body.get(key)
        if isinstance(v, list):
            body[key] = [_PNG if isinstance(x, (bytes, bytearray)) else ref(x) for x in v[:2]]
        elif isinstance(v, (bytes, bytearray)):
            body[key] = _PNG
        elif v is not None:
            body[key] = ref(v)
    return body


OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
              ("GET", "/images/{token}"), ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits")]


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    documented = schema.raw_schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]

    @schema.hook
    def map_body(ctx, body):
        return cap_body(body, documented)

    return schema


def test_openapi_covers_every_route(api_schema):
    """The document served by the live server has exactly the routes the app registers (bar its own), and the
    schemathesis runs below cover all of them."""
    app = build_app(AppState(ctx=None, client=None, metrics=None, model_names=["m"], model_root="m"))
    registered = {(m, r.path_format) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
                  for m in r.methods}  # (the playground page at / is not part of the API)
    assert registered - {("GET", "/openapi.json")} == set(OPERATIONS)
    documented = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert documented == set(OPERATIONS)
    for method, path in OPERATIONS:
        if method == "POST":
            assert api_schema[path][method].body, (method, path)


# negative cases need something to break: the GETs take no parameters or body
RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {g.value}" for m, p, g in RUNS])
def test_openapi_no_server_error(api_schema, method, path, mode):
    op = api_schema[path][method]
    calls = []
    engine = method == "POST" and mode == GenerationMode.POSITIVE  # these mostly reach the engine

    @given(op.as_strategy(generation_mode=mode))
    @settings(max_examples=ENGINE_EXAMPLES if engine else EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])  # no shrinking:
    # each example costs seconds, and the failing case is printed as a curl command
    def run(case):
        if mode == GenerationMode.POSITIVE:
            case.body = real_images(case.body)
        response = case.call_and_validate(timeout=120)  # every check
        calls.append(response.status_code)

    run()
    print(f"{method} {path} {mode.value}: {len(calls)} requests, statuses {dict(Counter(calls))}")
    assert calls


@pytest.mark.parametrize("kind", ["one_pixel_high", "huge_seed", "text_only_bot_task"])
def test_found_5xx_are_4xx(server, kind):
    """The requests schemathesis answered with a 5xx (before their fixes) now get a 4xx OpenAI error."""
    outs, _ = asyncio.run(run_load(server.base, [bad_spec(kind)], timeout=60, max_duration_s=60))
    check_outcomes(outs)


@pytest.mark.parametrize("reason,param", [("length", "max_new_tokens"), ("text", "bot_task")])
def test_no_image_outcome_is_4xx(reason, param):
    """An engine outcome without an image comes from the request's own bot_task / budget (e.g. the server's default
    bot_task `auto`, which the explicit check cannot refuse): a 400, not the 500 it was."""
    with pytest.raises(OpenAIError) as ei:
        _raise_for(FinishedInfo(request_id="r", finish_reason=reason))
    assert (ei.value.status, ei.value.param, ei.value.code) == (400, param, "no_image")
