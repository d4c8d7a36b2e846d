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


def test_image_token_arithmetic_is_the_prompt_builders(ctx):
    """`image_tokens` (the one statement of pixels -> sequence tokens, read by the context checks, admission costs,
    usage and the memory plan) is what the prompt builder lays out: every bucket's generated image, and each
    condition image's VAE block, whose `prompt_tokens` lower bound never exceeds its place in a real prompt."""
    from diffgentor.engine.models.hunyuan_image_3 import cond_layout, image_tokens
    from diffgentor.engine.request_state import state_from_processed

    ds = ctx.config.latent_downsample
    for ratio, (h, w) in enumerate(ctx.builder.resolution.buckets):
        built = ctx.builder.image_prompt("a cat", ratio_index=ratio)
        gen = built.slots("gen")[0]
        assert gen.end - gen.start == image_tokens(h, w, ds)
    req = GenerationRequest(request_id="t", prompt="a cat", images=[random_png(40, 72, 1)], bot_task="image",
                            image_size=f"{h}x{w}")
    processed = process_request(ctx, req)
    (img,) = processed.images
    st = state_from_processed(ctx, processed)
    (vae_slot,) = st.cond.layout.slots("cond_vae")
    assert vae_slot.end - vae_slot.start == image_tokens(img.vae_shape[-2], img.vae_shape[-1], ds)
    layout = cond_layout(st.vae_images[0], st.vit_images[0], ds)
    in_prompt = layout.vae_grid[0] * layout.vae_grid[1] + 2 + layout.vit_tokens
    assert image_tokens(img.vae_shape[-2], img.vae_shape[-1], ds) + 2 <= img.prompt_tokens(ds) <= in_prompt
