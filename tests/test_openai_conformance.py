"""The OpenAI Images API as real clients use it: orientation through every entry point, every official
parameter honoured or refused by name, status codes, streamed events (text deltas that add up, progressive previews)
and our schemas against OpenAI's published one (tests/fixtures/openai_images_schema.json, an excerpt with its
source noted). The live tests drive a real `diffgentor serve` on the tiny Distil model with the official `openai`
client; 1-4 diffusion steps, a few think tokens."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from PIL import Image

from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.server.http.openai_schemas import (
    MIN_OUTPUT_SIDE,
    UNSUPPORTED_PARAMETERS,
    UNSUPPORTED_VALUES,
    ImageEditJSONRequest,
    ImageGenerationRequest,
    OpenAIError,
    check_supported,
    int_range_pattern,
    size_pattern,
    steps_for_quality,
    validation_error,
)

from helpers import random_png, start_server

API_KEY = "sk-conformance"
MODEL = "tiny-Distil"
FAST = dict(num_inference_steps=1, max_new_tokens=4, seed=3, bot_task="image")
# fields whose null we take as "absent" although OpenAI's published schema types them without null: the SDK sends
# `"user": null` for `user=None` (docs/decisions.md, "null is absent")
NULL_AS_ABSENT = {"user"}
OPENAI_SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "openai_images_schema.json").read_text())
# a prompt and seed whose think text (random tiny weights) has multi-byte characters split across tokens: the old
# decode-everything deltas stopped at the first one
MULTIBYTE = dict(prompt="a red bicycle", seed=4, bot_task="think_recaption", max_new_tokens=16, size="256x256",
                 num_inference_steps=1)


def _png(h: int = 64, w: int = 96, seed: int = 0) -> bytes:
    return random_png(h, w, seed)


def _img(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _openai_validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": OPENAI_SCHEMA["$defs"]})


# ------------------------------------------------------------------------------------------------ no server
def test_size_pattern_is_the_numeric_range():
    for lo, hi in [(MIN_OUTPUT_SIDE, 4096), (16, 16), (1, 100), (7, 1234), (16, 10000)]:
        side = re.compile(f"^{int_range_pattern(lo, hi)}$")
        assert [v for v in range(0, 12000) if bool(side.match(str(v))) != (lo <= v <= hi)] == [], (lo, hi)
    full = re.compile(size_pattern(4096))
    assert all(full.match(s) for s in ("auto", "AUTO", "", "1536x1024", " 16 X 4096 ", "0256*0256"))
    assert not any(full.match(s) for s in ("15x16", "4097x16", "1024", "x", "1024x-1", "big"))


def test_server_size_is_engine_height_by_width():
    from diffgentor.engine.config import ServerConfig
    from diffgentor.server.http.api import _parse_size

    assert _parse_size("1536x1024", ServerConfig()) == "1024x1536"  # WIDTHxHEIGHT in, the engine's HxW out
    assert _parse_size("auto", ServerConfig()) == "auto"


def test_quality_steps():
    assert [steps_for_quality(q, 8) for q in ("low", "medium", "high", "auto", None)] == [2, 4, 8, 8, 8]
    assert [steps_for_quality(q, 50) for q in ("low", "medium", "high")] == [13, 25, 50]
    assert steps_for_quality("low", 1) == 1


@pytest.mark.parametrize("body,param,code", [
    ({"n": "2"}, "n", "invalid_type"),
    ({"n": 2.5}, "n", "invalid_type"),
    ({"n": 11}, "n", "invalid_value"),
    ({"stream": 1}, "stream", "invalid_type"),
    ({"use_system_prompt": ""}, "use_system_prompt", "invalid_value"),
    ({"output_compression": 101}, "output_compression", "invalid_value"),
    ({"partial_images": 4}, "partial_images", "invalid_value"),
    ({"images": [{}]}, "images[0].image_url", "missing_required_parameter"),
    ({"images": [{"image_url": "not a url"}]}, "images[0].image_url", "invalid_value"),
    ({"prompt": None}, "prompt", "invalid_type"),
    ({"image": "https://example.com/a.png"}, "image", "invalid_value"),  # JSON edits use `images`
])
def test_bad_values_and_types_are_400_naming_the_param(body, param, code):
    with pytest.raises(Exception) as ei:
        ImageEditJSONRequest.model_validate({"prompt": "x", **body}, strict=True)
    err = validation_error(ei.value.errors())
    assert (err.status, err.param, err.code, err.type) == (400, param, code, "invalid_request_error")


def test_missing_prompt_and_integral_numbers():
    with pytest.raises(Exception) as ei:
        ImageGenerationRequest.model_validate({}, strict=True)
    assert validation_error(ei.value.errors()).code == "missing_required_parameter"
    p = ImageGenerationRequest.model_validate({"prompt": "x", "n": 5.0, "seed": 7.0, "quality": None}, strict=True)
    assert (p.n, p.seed, p.quality, p.partial_images) == (5, 7, "auto", 0)  # JSON's 5.0 is the integer 5


def test_refused_parameters_and_values_name_themselves():
    for name in UNSUPPORTED_PARAMETERS:
        with pytest.raises(OpenAIError) as ei:
            check_supported({name: "x"})
        assert (ei.value.status, ei.value.param, ei.value.code) == (400, name, "unsupported_parameter")
    for name, values in UNSUPPORTED_VALUES.items():
        for v in values:
            with pytest.raises(OpenAIError) as ei:
                check_supported({name: v})
            assert (ei.value.status, ei.value.param, ei.value.code) == (400, name, "unsupported_value")
    check_supported({"background": "opaque", "quality": "low", "style": None, "user": "u", "moderation": "low"})
    with pytest.raises(OpenAIError) as ei:
        check_supported({"images": [{"file_id": "file-1"}]})
    assert ei.value.param == "images[0].file_id"


def test_every_official_parameter_is_honoured_or_refused():
    """Each property of OpenAI's request schemas is a field of ours or refused by name."""
    ours = set(ImageEditJSONRequest.model_fields) | {"image"}
    for name in ("CreateImageRequest", "CreateImageEditRequest", "EditImageBodyJsonParam"):
        theirs = set(OPENAI_SCHEMA["$defs"][name]["properties"])
        assert theirs - ours - set(UNSUPPORTED_PARAMETERS) == set(), name


def _our_validator(doc: dict, name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                            "components": doc["components"]})


# values a client may send for the fields both schemas define; whatever ours takes, OpenAI's must take too
_CANDIDATES = [None, True, False, -1, 0, 1, 2, 3, 4, 5.0, 10, 11, 50, 100, 101, "", "x", "auto", "low", "medium",
               "high", "standard", "hd", "opaque", "transparent", "png", "jpeg", "webp", "gif", "url", "b64_json",
               "256x256", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "tiny-Distil", "vivid"]


@pytest.mark.parametrize("ours,theirs", [("ImageGenerationRequest", "CreateImageRequest"),
                                         ("ImageEditForm", "CreateImageEditRequest"),
                                         ("ImageEditJSONRequest", "EditImageBodyJsonParam")])
def test_request_fields_validate_against_openai(ours, theirs):
    from diffgentor.engine.config import ServerConfig
    from diffgentor.server.http.api import AppState, build_app
    from diffgentor.server.http.openapi import document

    app = build_app(AppState(ctx=None, client=None, metrics=None, model_names=[MODEL], model_root=MODEL))
    doc = document(app, ServerConfig())
    our_props = doc["components"]["schemas"][ours]["properties"]
    their_props = OPENAI_SCHEMA["$defs"][theirs]["properties"]
    shared = sorted(set(our_props) & set(their_props) - {"image", "images", "size"})
    assert {"n", "quality", "background", "output_format", "output_compression", "partial_images"} <= set(shared)
    v_ours, v_theirs = _our_validator(doc, ours), _openai_validator(theirs)
    for field in shared:
        for value in _CANDIDATES:
            if value is None and field in NULL_AS_ABSENT:
                continue
            if _field_ok(v_ours, field, value):
                assert _field_ok(v_theirs, field, value), (ours, field, value)
    # sizes: any WIDTHxHEIGHT we take is a `size` of OpenAI's multipart edit and generation schemas
    if ours != "ImageEditJSONRequest":  # OpenAI's JSON edit lists 3 sizes; its later reference takes any WxH
        for size in ("auto", "256x256", "1536x1024", "16x4096"):
            assert _field_ok(v_ours, "size", size) and _field_ok(v_theirs, "size", size), size


def _field_ok(validator: jsonschema.Draft202012Validator, field: str, value) -> bool:
    """No error at `field` (others, e.g. a missing image, are not this field's business)."""
    return not any(list(e.absolute_path)[:1] == [field] for e in validator.iter_errors({"prompt": "p", field: value}))


def test_405_has_allow_header_and_429_retry_after():
    from fastapi.testclient import TestClient

    from diffgentor.server.http.api import AppState, _error_response, build_app

    app = build_app(AppState(ctx=None, client=None, metrics=None, model_names=[MODEL], model_root=MODEL))
    r = TestClient(app).get("/v1/images/generations")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == "method_not_allowed"
    r = TestClient(app).get("/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    resp = _error_response(OpenAIError(429, "busy", None, "rate_limit_exceeded"))
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 0


def _app(**kw):
    from diffgentor.server.http.api import AppState, build_app

    return build_app(AppState(ctx=None, client=None, metrics=None, model_names=[MODEL], model_root=MODEL, **kw))


def test_openapi_document_is_a_valid_openapi_document():
    """/openapi.json passes openapi-spec-validator (a `type: string` field with `default: null` did not)."""
    from openapi_spec_validator import validate

    from diffgentor.engine.config import ServerConfig
    from diffgentor.server.http.openapi import document

    for api_key in (False, True):
        validate(document(_app(api_key="k" if api_key else None), ServerConfig(), api_key=api_key))


def test_null_is_absent_where_openai_takes_it():
    """`images.generate(..., user=None)` sends `"user": null`: the default, not a 400."""
    for model in (ImageGenerationRequest, ImageEditJSONRequest):
        p = model.model_validate({"prompt": "x", "user": None, "safety_identifier": None, "size": None,
                                  "response_format": None, "stream_text_deltas": None}, strict=True)
        assert (p.user, p.size, p.response_format, p.stream_text_deltas) == (None, "auto", "b64_json", False)


@pytest.mark.parametrize("body,param", [({"qualty": "high"}, "qualty"), ({"sed": 1}, "sed"),
                                        ({"images": [{"image_url": "https://a.example/x.png", "detail": "x"}]},
                                         "images[0].detail")])
def test_unknown_parameters_are_400_unknown_parameter(body, param):
    with pytest.raises(Exception) as ei:
        ImageEditJSONRequest.model_validate({"prompt": "x", **body}, strict=True)
    err = validation_error(ei.value.errors())
    assert (err.status, err.param, err.code) == (400, param, "unknown_parameter"), err.body()
    assert param in err.message


def test_extensions_are_marked_in_the_document():
    """Every request field OpenAI does not define is marked `x-diffgentor-extension` (and only those)."""
    from diffgentor.engine.config import ServerConfig
    from diffgentor.server.http.openai_schemas import EXTENSION_FIELDS, EXTENSION_MARK
    from diffgentor.server.http.openapi import document

    doc = document(_app(), ServerConfig())
    from openai.types.image_generate_params import ImageGenerateParamsBase

    # OpenAI's parameters: the published schema's, and the SDK's (newer: safety_identifier)
    theirs = set(OPENAI_SCHEMA["$defs"]["CreateImageRequest"]["properties"]) | set(
        ImageGenerateParamsBase.__annotations__)
    props = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    marked = {k for k, v in props.items() if v.get(EXTENSION_MARK)}
    assert marked == set(EXTENSION_FIELDS) == set(props) - theirs, (marked, set(props) - theirs)
    assert "stream_text_deltas" in marked


def test_size_errors_are_plain_words():
    with pytest.raises(Exception) as ei:
        ImageGenerationRequest.model_validate({"prompt": "x", "size": "big"}, strict=True)
    err = validation_error(ei.value.errors())
    assert (err.param, err.code) == ("size", "invalid_value")
    assert "WIDTHxHEIGHT" in err.message and not any(c in err.message for c in "^\\[]{}"), err.message


def test_multipart_forms_of_official_parameters():
    """The SDK sends `svg` as `svg[model]` / `svg[reasoning][effort]`: refused by name, never ignored; an unknown
    field is unknown_parameter; a scalar parameter in pieces is refused."""
    from fastapi.testclient import TestClient

    c = TestClient(_app())
    img = {"image": ("a.png", _png(), "image/png")}
    cases = [({"svg[model]": "m"}, "svg", "unsupported_parameter"),
             ({"svg[reasoning][effort]": "low"}, "svg", "unsupported_parameter"),
             ({"qualty": "high"}, "qualty", "unknown_parameter"),
             ({"n[0]": "1"}, "n", "invalid_value")]
    for extra, param, code in cases:
        r = c.post("/v1/images/edits", data={"prompt": "x", **extra}, files=img)
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (400, param, code), (extra, err)
        assert param in err["message"]


def test_json_must_say_it_is_json():
    from fastapi.testclient import TestClient

    r = TestClient(_app()).post("/v1/images/generations", content=json.dumps({"prompt": "x"}),
                                headers={"Content-Type": "text/plain"})
    err = r.json()["error"]
    assert (r.status_code, err["code"]) == (400, "invalid_content_type") and "application/json" in err["message"]


def test_cors_preflight_and_origins():
    """Browsers on another origin can call the API (default `*`, as vLLM): the preflight carries no API key and
    is answered before the key check; `--allowed-origins` with no value sends no CORS headers."""
    from fastapi.testclient import TestClient

    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    c = TestClient(_app(api_key="k"))
    r = c.options("/v1/images/generations", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = c.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    only = TestClient(_app(api_key="k", allowed_origins=("https://ok.example",)))
    assert only.options("/v1/models", headers=pre | {"Origin": "https://ok.example"}).status_code == 200
    assert "access-control-allow-origin" not in only.options("/v1/models", headers=pre).headers
    none = TestClient(_app(api_key="k", allowed_origins=()))
    r = none.options("/v1/images/generations", headers=pre)
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers


def test_models_retrieve():
    from fastapi.testclient import TestClient

    c = TestClient(_app())
    r = c.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and (r.json()["id"], r.json()["object"]) == (MODEL, "model")
    r = c.get("/v1/models/dall-e-3")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")


def test_image_url_store_is_bounded_and_expires():
    from diffgentor.server.http.image_store import ImageStore

    t = [0.0]
    store = ImageStore(max_bytes=100, ttl_s=10.0, clock=lambda: t[0])
    a = store.put(b"a" * 40, "png")
    b = store.put(b"b" * 40, "jpeg")
    assert store.get(a).data == b"a" * 40 and store.get(b).media_type == "image/jpeg"
    c = store.put(b"c" * 40, "webp")  # 120 > 100: the oldest goes
    assert store.get(a) is None and store.get(b) is not None and store.nbytes == 80 and len(store) == 2
    t[0] = 9.0
    d = store.put(b"d" * 10, "png")
    t[0] = 10.5  # b and c expired, d (stored at 9) has not
    assert store.get(b) is None and store.get(c) is None and store.get(d).data == b"d" * 10
    assert store.nbytes == 10 and len(a) >= 32  # tokens are unguessable
    with pytest.raises(ValueError):
        store.put(b"x" * 101, "png")


# ------------------------------------------------------------------------------------------------ offline + CLI
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("conf") / MODEL, distil=True)


@pytest.fixture(scope="module")
def engine(ckpt):
    from diffgentor.engine.offline import Engine

    return Engine.from_pretrained(ckpt, environ={}, num_kv_blocks=1024, device="cpu", dtype="float32")


def _offline_text(eng) -> str:
    """The think text of MULTIBYTE from the offline engine."""
    req = {k: v for k, v in MULTIBYTE.items() if k != "size"} | {"image_size": "256x256", "output_type": "latent"}
    return eng.generate([req])[0].text


def test_engine_orientation_and_streamed_text(engine):
    """Offline `Engine`: `image_size` is HEIGHTxWIDTH; `stream` text deltas add up to the final text even where a
    multi-byte character is split across tokens."""
    eng = engine
    common = dict(prompt="a tower", seed=1, bot_task="image", num_inference_steps=1)
    land, port = eng.generate([dict(common, image_size="192x320"), dict(common, image_size="320x192")])
    assert land.image.width > land.image.height and port.image.height > port.image.width
    assert (land.image.height, land.image.width) == land.image_size
    req = {k: v for k, v in MULTIBYTE.items() if k != "size"} | {"image_size": "256x256", "output_type": "latent"}
    deltas = [ev.text for ev in eng.stream([dict(req, request_id="mb")]) if ev.kind == "text"]
    text = eng.results.pop("mb").text
    assert text == _offline_text(eng)  # deterministic: what the server test compares its stream with
    assert any(ord(c) > 127 and c != "\ufffd" for c in text), text  # the seed still makes multi-byte text
    assert "".join(deltas) == text


def test_batch_cli_orientation(ckpt, tmp_path, monkeypatch):
    """`diffgentor t2i`: --image_size is HEIGHTxWIDTH (the engine's string, passed through), --height/--width say
    it by name."""
    from diffgentor.server.cli import main

    for k in list(os.environ):
        if k.startswith("DG_HUNYUAN_IMAGE_3_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("DG_HUNYUAN_IMAGE_3_BOT_TASK", "image")
    base = ["t2i", "--model_name", str(ckpt), "--prompt", "a tower", "--num_inference_steps", "1", "--no_progress"]
    assert main([*base, "--output_dir", str(tmp_path / "land"), "--image_size", "192x320"]) == 0
    assert main([*base, "--output_dir", str(tmp_path / "port"), "--height", "320", "--width", "192"]) == 0
    land = Image.open(tmp_path / "land" / "000000.png")
    port = Image.open(tmp_path / "port" / "000000.png")
    assert land.width > land.height and port.height > port.width, (land.size, port.size)


# ------------------------------------------------------------------------------------------------ live server
@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    proc, base = start_server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--api-key", API_KEY,
                              "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "2048", "--max-num-seqs",
                              "8", "--max-num-batched-tokens", "16384", "--log-level", "warning")
    yield base
    proc.terminate()
    proc.wait(30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=300, max_retries=0)


def _post(server: str, path: str, **kw) -> httpx.Response:
    return httpx.post(server + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300, **kw)


def _events(server: str, path: str, **kw) -> list[tuple[str | None, str]]:
    out, event = [], None
    with httpx.stream("POST", server + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300, **kw) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, line[6:]))
                event = None
    return out


def test_server_orientation(client):
    """`size` is WIDTHxHEIGHT through generations (landscape) and edits (portrait); the response's `size` is the
    PNG's."""
    gen = client.images.generate(prompt="a tower", size="1536x1024", extra_body=FAST)
    edit = client.images.edit(image=("in.png", _png(), "image/png"), prompt="a tower", size="1024x1536",
                              extra_body=FAST)
    for r, landscape in ((gen, True), (edit, False)):
        img = _img(r.data[0].b64_json)
        assert (img.width > img.height) == landscape, img.size
        assert r.size == f"{img.width}x{img.height}"
        _openai_validator("ImagesResponse").validate(r.model_dump(exclude_none=True))


def test_official_parameters_honoured(server, client):
    """Every parameter OpenAI defines, with a value the server honours, through the official client: 200, and
    `quality` sets the diffusion steps (low 2, medium 4 of the tiny Distil checkpoint's 8)."""
    def steps() -> float:
        text = httpx.get(server + "/metrics").text
        return float(re.search(r"^diffgentor:diffusion_step_latency_seconds_count\{[^}]*\} (\S+)$", text, re.M)[1])

    body = {k: v for k, v in FAST.items() if k != "num_inference_steps"}
    before = steps()
    r = client.images.generate(prompt="a tower", size="256x256", n=1, quality="low", background="opaque",
                               moderation="low", output_format="webp", output_compression=80, user="u-1",
                               response_format="b64_json", partial_images=0, model=MODEL, stream=False,
                               extra_body=body)
    assert steps() - before == 2
    assert _img(r.data[0].b64_json).format == "WEBP" and r.background == "opaque" and r.quality == "low"
    before = steps()
    r = client.images.edit(image=[("a.png", _png(), "image/png")], prompt="a tower", size="256x256", n=1,
                           quality="medium", background="auto", output_format="jpeg", output_compression=100,
                           user="u-2", response_format="b64_json", partial_images=0, model=MODEL, extra_body=body)
    assert steps() - before == 4
    assert _img(r.data[0].b64_json).format == "JPEG" and r.quality == "medium"


def test_output_compression_is_jpeg_and_webp_quality():
    """OpenAI's `output_compression`: 0-100, default 100 (the least compression); png ignores it."""
    from diffgentor.server.http.api import _encode_output

    image = Image.open(io.BytesIO(_png(128, 128)))
    image.load()
    for fmt in ("jpeg", "webp"):
        default, top, low = (len(_encode_output(image, fmt, c)) for c in (None, 100, 5))
        assert default == top > 2 * low, (fmt, default, top, low)
    png = _encode_output(image, "png", 5)
    assert png == _encode_output(image, "png", None) and np.array_equal(np.asarray(Image.open(io.BytesIO(png))),
                                                                          np.asarray(image))  # lossless


@pytest.mark.parametrize("call,param,code", [
    ("edit_mask", "mask", "unsupported_parameter"),
    ("json_mask", "mask", "unsupported_parameter"),
    ("transparent", "background", "unsupported_value"),
    ("style", "style", "unsupported_parameter"),
    ("input_fidelity", "input_fidelity", "unsupported_parameter"),
    ("quality_hd", "quality", "unsupported_value"),
    ("file_id", "images[0].file_id", "unsupported_parameter"),
])
def test_official_parameters_refused_by_name(server, client, call, param, code):
    img = ("in.png", _png(), "image/png")
    if call == "json_mask" or call == "file_id":
        url = "data:image/png;base64," + base64.b64encode(_png()).decode()
        body = dict(FAST, prompt="x", images=[{"file_id": "file-1"} if call == "file_id" else {"image_url": url}])
        if call == "json_mask":
            body["mask"] = {"image_url": url}
        r = _post(server, "/v1/images/edits", json=body)
        status, err = r.status_code, r.json()["error"]
    else:
        with pytest.raises(openai.BadRequestError) as ei:
            if call == "edit_mask":
                client.images.edit(image=img, mask=("m.png", _png(), "image/png"), prompt="x", extra_body=FAST)
            elif call == "transparent":
                client.images.generate(prompt="x", background="transparent", extra_body=FAST)
            elif call == "style":
                client.images.generate(prompt="x", style="vivid", extra_body=FAST)
            elif call == "input_fidelity":
                client.images.edit(image=img, prompt="x", input_fidelity="high", extra_body=FAST)
            else:
                client.images.generate(prompt="x", quality="hd", extra_body=FAST)
        status, err = ei.value.status_code, ei.value.body
    assert (status, err["param"], err["code"], err["type"]) == (400, param, code, "invalid_request_error"), err
    assert param.split("[")[0] in err["message"]


def test_status_codes(server):
    gen = "/v1/images/generations"
    cases = [
        (_post(server, gen, json={"prompt": "x", "n": "2"}), 400, "n", "invalid_type"),
        (_post(server, gen, json={"size": "256x256"}), 400, "prompt", "missing_required_parameter"),
        (_post(server, "/v1/images/edits", data={"size": "256x256"}, files={"image": ("a.png", _png())}), 400,
         "prompt", "missing_required_parameter"),
        (_post(server, gen, json={"prompt": "x", "output_compression": 101}), 400, "output_compression",
         "invalid_value"),
        (httpx.post(server + gen, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401, None,
         "invalid_api_key"),
        (_post(server, gen, json={"prompt": "x", "model": "dall-e-3"}), 404, "model", "model_not_found"),
    ]
    for r, status, param, code in cases:
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (status, param, code), err
    r = _post(server, gen, json=dict(FAST, prompt="x", n=1.0, size="256x256"))  # JSON's 1.0 is the integer 1
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    r = httpx.get(server + gen, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_stream_events_match_the_schemas(server):
    """Every event of a stream is one the document defines (its `type` as the event name, the data its
    component schema), the image events validate against OpenAI's, and `[DONE]` ends it."""
    doc = httpx.get(server + "/openapi.json").json()
    events = _events(server, "/v1/images/edits", data={**{k: str(v) for k, v in MULTIBYTE.items()},
                                                       "stream": "true", "output_format": "jpeg",
                                                       "stream_text_deltas": "true"},
                     files={"image": ("a.png", _png())})
    assert events[-1] == (None, "[DONE]")
    by_type = {"text_delta": "TextDeltaEvent", "completed": "CompletedEvent", "partial_image": "PartialImageEvent"}
    for name, data in events[:-1]:
        ev = json.loads(data)
        assert name == ev["type"], (name, ev)
        _our_validator(doc, by_type[name.split(".")[1]]).validate(ev)
    completed = json.loads(events[-2][1])
    assert completed["type"] == "image_edit.completed" and _img(completed["b64_json"]).format == "JPEG"
    _openai_validator("ImageEditCompletedEvent").validate(completed)
    img = _img(completed["b64_json"])
    assert completed["size"] == f"{img.width}x{img.height}"


def test_streamed_text_deltas_add_up(server, engine):
    """SSE: the concatenated deltas are the model's text (the offline engine's, same request and seed), even with
    multi-byte characters split across tokens (needs EngineCore to use engine/detokenizer.py)."""
    events = _events(server, "/v1/images/generations", json=dict(MULTIBYTE, stream=True, stream_text_deltas=True))
    deltas = [json.loads(d)["delta"] for e, d in events if e == "image_generation.text_delta"]
    text = _offline_text(engine)
    assert any(ord(c) > 127 and c != "\ufffd" for c in text), text
    assert "".join(deltas) == text


def test_partial_images_stream(server):
    """partial_images=2: two `partial_image` events (indexes 0, 1) before the completed image, which is the image
    the same request makes without previews."""
    body = dict(FAST, prompt="a tower", size="256x256", num_inference_steps=4, stream=True)
    events = _events(server, "/v1/images/generations", json=dict(body, partial_images=2))
    kinds = [e for e, _ in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed", None], kinds
    partial = [json.loads(d) for _, d in events[:2]]
    assert [p["partial_image_index"] for p in partial] == [0, 1]
    for p in partial:
        _openai_validator("ImageGenPartialImageEvent").validate(p)
        assert _img(p["b64_json"]).size == _img(json.loads(events[2][1])["b64_json"]).size
    plain = _events(server, "/v1/images/generations", json=body)
    assert json.loads(plain[-2][1])["b64_json"] == json.loads(events[2][1])["b64_json"]


def test_sdk_typed_streams_carry_only_openai_events(client):
    """The official SDK's typed streams: every event of a default stream is one of OpenAI's event classes with its
    image (the think text is only sent with `stream_text_deltas`, which the SDK would misparse as a preview)."""
    from openai.types import (
        ImageEditCompletedEvent,
        ImageEditPartialImageEvent,
        ImageGenCompletedEvent,
        ImageGenPartialImageEvent,
    )

    body = dict(MULTIBYTE, num_inference_steps=2)
    kw = {k: body.pop(k) for k in ("prompt", "size")}
    gen = list(client.images.generate(**kw, stream=True, partial_images=1, extra_body=body))
    edit = list(client.images.edit(image=("in.png", _png(), "image/png"), **kw, stream=True, partial_images=1,
                                   extra_body=body))
    for events, partial, completed in ((gen, ImageGenPartialImageEvent, ImageGenCompletedEvent),
                                       (edit, ImageEditPartialImageEvent, ImageEditCompletedEvent)):
        assert [type(e) for e in events] == [partial, completed], [e.type for e in events]
        for e in events:
            assert isinstance(e, (partial, completed)) and _img(e.b64_json).size == _img(events[-1].b64_json).size


def test_url_responses_user_null_and_models_retrieve(server, client):
    """`response_format=url`: a URL on this server that URL-reading clients GET without the API key; `user=None`
    as the SDK sends it; `models.retrieve`."""
    r = client.images.generate(prompt="a tower", size="256x256", response_format="url", user=None, extra_body=FAST)
    (d,) = r.data
    assert d.b64_json is None and d.url.startswith(server + "/images/")
    got = httpx.get(d.url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == tuple(map(int, r.size.split("x")))
    _openai_validator("ImagesResponse").validate(r.model_dump(exclude_none=True))
    assert httpx.get(server + "/images/not-a-token").status_code == 404
    assert client.models.retrieve(MODEL).id == MODEL


def test_aligned_edit_sizes_are_what_the_readme_says(engine):
    """The README's `size` row: with infer_align_image_size an edit may come back at no bucket size (the tiny model:
    a 384x256 input with size 1536x1024, the engine's 1024x1536, gives 314x209); without it, the bucket."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "a 384x256 input with `size=1536x1024` comes back 314x209" in readme
    common = dict(prompt="a tower", seed=1, bot_task="image", num_inference_steps=1, image_size="1024x1536",
                  images=[random_png(256, 384, 3)])
    aligned, bucket = engine.generate([dict(common, infer_align_image_size=True),
                                       dict(common, infer_align_image_size=False)])
    assert aligned.image.size == (314, 209)
    assert bucket.image.size != aligned.image.size and bucket.image.width > bucket.image.height
