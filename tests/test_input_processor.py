"""Input processing (engine/input_processor.py) names the field at fault: every refusal is a `RequestError` whose
`param` is the HTTP API's name of the field and whose `code` says what is wrong; the API server answers with them
as they are (it used to guess the field by searching the message's English words)."""

from __future__ import annotations

import pytest

from diffgentor.engine.input_processor import check_request, load_processor_context, process_request
from diffgentor.engine.request import GenerationRequest
from diffgentor.engine.request_contract import RequestError
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.server.http.api import _request_error

from helpers import random_png


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return load_processor_context(make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt"))


@pytest.mark.parametrize("fields,param,code", [
    (dict(prompt="  "), "prompt", "invalid_value"),
    (dict(system_prompt="a\ud800b"), "system_prompt", "invalid_value"),
    (dict(bot_task="paint"), "bot_task", "invalid_value"),
    (dict(max_new_tokens=10**9), "max_new_tokens", "invalid_value"),
    (dict(num_inference_steps=0), "num_inference_steps", "invalid_value"),
    (dict(guidance_scale=float("inf")), "guidance_scale", "invalid_value"),
    (dict(flow_shift=0.0), "flow_shift", "invalid_value"),
    (dict(top_k=-1), "top_k", "invalid_value"),
    (dict(image_size="huge"), "size", "invalid_size"),
    (dict(image_size="9" * 2000), "size", "invalid_value"),
    # its message says "system prompt" and "prompt", never the field's name: the substring search answered "prompt"
    (dict(use_system_prompt="no_such_kind_of_prompt"), "use_system_prompt", "invalid_value"),
    (dict(output_type="tensor"), "output_type", "invalid_value"),
])
def test_refusals_name_their_field(ctx, fields, param, code):
    req = GenerationRequest(request_id="r", **{"prompt": "a cube", **fields})
    with pytest.raises(RequestError) as e:
        check_request(ctx, req, 0)
    assert (e.value.param, e.value.code) == (param, code), str(e.value)
    err = _request_error(e.value)
    assert (err.status, err.param, err.code, err.message) == (400, param, code, str(e.value))


def test_image_refusals_name_the_image(ctx):
    with pytest.raises(RequestError) as e:
        check_request(ctx, GenerationRequest(request_id="r", prompt="x"), 9)
    assert (e.value.param, e.value.code) == ("image", "too_many_images")
    with pytest.raises(RequestError) as e:
        process_request(ctx, GenerationRequest(request_id="r", prompt="x", images=[b"not an image"]))
    assert (e.value.param, e.value.code) == ("image", "invalid_image")
    with pytest.raises(RequestError) as e:
        process_request(ctx, GenerationRequest(request_id="r", prompt="x", images=[random_png(64, 64)]),
                        max_image_pixels=100)
    assert (e.value.param, e.value.code) == ("image", "invalid_image")


def test_a_request_too_long_for_the_context_names_the_prompt(ctx):
    with pytest.raises(RequestError) as e:
        process_request(ctx, GenerationRequest(request_id="r", prompt="lorem ipsum dolor " * 3000))
    assert e.value.param == "prompt" and "context" in str(e.value)
