"""Scheduler rules: chunk boundaries never split an image block; chunked prefill changes nothing."""

from __future__ import annotations

import torch

from diffgentor.engine.scheduler import chunk_end

SPANS = [(10, 20), (30, 50)]


def test_chunk_end_stops_before_a_span_that_does_not_fit():
    assert chunk_end(0, 100, 15, SPANS) == 10
    assert chunk_end(0, 100, 25, SPANS) == 25  # span (10, 20) fits whole
    assert chunk_end(20, 100, 15, SPANS) == 30


def test_chunk_end_returns_start_when_a_span_at_start_does_not_fit():
    assert chunk_end(10, 100, 5, SPANS) == 10
    assert chunk_end(30, 100, 10, SPANS) == 30


def test_chunk_end_finishes_a_span_it_is_inside():
    # prefix caching may resume inside a block: the rest of the block must run in one go
    assert chunk_end(15, 100, 2, SPANS) == 20
    assert chunk_end(35, 100, 1, SPANS) == 50


def test_chunk_end_respects_target_and_budget():
    assert chunk_end(50, 60, 100, SPANS) == 60
    assert chunk_end(0, 8, 100, SPANS) == 8
    assert chunk_end(0, 100, 0, SPANS) == 0


def test_chunked_prefill_equals_one_shot(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from diffgentor.engine.offline import Engine
    from diffgentor.engine.tiny_model import make_tiny

    ckpt = make_tiny(tmp_path / "tiny", distil=True)
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
    req = dict(request_id="a", prompt="add a moon", images=[buf.getvalue()], seed=9, max_new_tokens=6,
               image_size="256x256", num_inference_steps=2, output_type="latent")
    results = []
    for budget in (4096, 96):
        eng = Engine.from_pretrained(ckpt, environ={}, device="cpu", dtype="float32", num_kv_blocks=256,
                                     max_num_batched_tokens=budget)
        (res,) = eng.generate([dict(req)])
        assert res.error is None
        results.append((res, eng.core.stats.steps))
    (a, steps_a), (b, steps_b) = results
    assert steps_b > steps_a  # the small budget really chunked the prompt
    assert a.generated_ids == b.generated_ids
    assert torch.allclose(a.latents, b.latents, atol=1e-4)
