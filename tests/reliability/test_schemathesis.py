"""schemathesis against the live tiny server's /openapi.json: requests the document allows (positive) and requests it
forbids (negative: wrong types, out-of-range values, missing fields) for every operation. No answer may be a 5xx,
every answer must have a documented status, content type and body, and a request the document forbids must be
refused with a 4xx.

Cost bound, in the test only (the document keeps the real limits): a request that reaches the engine costs seconds on
these CPUs (the VAE decode of the smallest, 256x256, output dominates; each extra step, think token, image or pixel
adds), so valid expensive values are lowered before sending (sides <= 64, 1 step, n = 1, at most 4 think tokens) and
the positive image runs get 6 examples, the others 25 (the module takes about 90 s here). Values outside the
documented range are sent as generated. DG_SCHEMATHESIS_EXAMPLES sets every run's example count, for a longer run by
hand.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from diffgentor.bench.serve import run_load
from diffgentor.engine.core_proc import FinishedInfo
from diffgentor.server.api import AppState, ServerLimits, _raise_for, build_app
from diffgentor.server.openai_schemas import SIZE_RE, OpenAIError

from .conftest import bad_spec, check_outcomes

EXAMPLES = int(os.environ.get("DG_SCHEMATHESIS_EXAMPLES", "25"))
ENGINE_EXAMPLES = int(os.environ.get("DG_SCHEMATHESIS_EXAMPLES", "6"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
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
        if isinstance(v, int) and not isinstance(v, bool) and cap < v <= _maximum(documented[k]):
            body[k] = cap
    body.setdefault("max_new_tokens", CAPS["max_new_tokens"])
    body.setdefault("num_inference_steps", CAPS["num_inference_steps"])
    size = body.get("size")
    m = SIZE_RE.match(size) if isinstance(size, str) else None
    if m and m.group(2) is None:  # auto: the tiny model's 256x256 bucket
        body["size"] = f"{MAX_SIDE}x{MAX_SIDE}"
    elif m:
        w, h = int(m.group(2)), int(m.group(3))
        if 16 <= min(w, h) and max(w, h) <= ServerLimits().max_output_side:
            body["size"] = f"{min(w, MAX_SIDE)}x{min(h, MAX_SIDE)}"
    return body


OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/images/generations"),
              ("POST", "/v1/images/edits")]


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
    registered = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}
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
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(checks=CHECKS, timeout=120)
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
