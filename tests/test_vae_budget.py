"""VAE work sized by the memory plan's budget (`engine.vae_budget`): the worker splits one step's decodes and condition
encodes into calls that fit, and the images and posteriors are those of one call per size; square and non-square
sizes in both orientations. "The same" is to float rounding: the CPU VAE (oneDNN convolutions) is not bitwise batch
invariant (3e-6 between a batch of 3 and three single calls), exactly as images batched by size today differ from the
same images decoded alone (docs/decisions.md, "VAE calls sized by the memory plan")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffgentor.engine.decode_stage import DecodeJob
from diffgentor.engine.model_runner import ModelRunner
from diffgentor.engine.models.hunyuan_image_3.image_processing import ImageProcessor
from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
from diffgentor.engine.scheduler_output import FINAL_IMAGE, EncoderInput, RunnerOutput
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.engine.vae_budget import VaeBudget, chunks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return HunyuanImage3ForCausalMM.from_pretrained(make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", distil=True))


def test_budget_arithmetic():
    b = VaeBudget(budget_bytes=100, bytes_per_pixel=1, decode_fixed_bytes=20)
    assert b.decode_images(4, 5) == 4 and b.encode_images(4, 5) == 5
    assert b.decode_images(100, 100) == 1 and b.encode_images(100, 100) == 1  # one image always gets through
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]] and chunks([1, 2], 9) == [[1, 2]]


def _runner(model, budget):
    return ModelRunner(model, num_blocks=4, block_size=16, enforce_eager=True, vae_budget=budget)


def _recording_decode(model, monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = model.decode_latents

    def decode(latents):
        sizes.append(latents.shape[0])
        return real(latents)

    monkeypatch.setattr(model, "decode_latents", decode)
    return sizes


GRIDS = [(4, 4), (3, 5), (5, 3)]  # latent grids: square, landscape, portrait


def test_decode_chunks_give_the_images_of_one_call(tiny_model, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    latents = {f"r{g}{i}": torch.randn(tiny_model.config.latent_channels, *g, generator=gen)
               for g in GRIDS for i in range(3)}
    f = tiny_model.config.latent_downsample
    one_image = 4 * 4 * f * f  # budget bytes of the largest image (16 latent cells) at 1 byte per pixel
    results = {}
    for name, budget in (("one call", None), ("one image per call", VaeBudget(one_image, 1)),
                         ("two images per call", VaeBudget(2 * one_image, 1))):
        runner = _runner(tiny_model, budget)  # inline decode stage: submit decodes, collect reports them
        sizes = _recording_decode(tiny_model, monkeypatch)
        out = RunnerOutput()
        runner.decodes.submit([DecodeJob((rid, FINAL_IMAGE), lat) for rid, lat in latents.items()])
        runner.decodes.collect(out, alive=set(latents))
        monkeypatch.undo()
        results[name] = out.images
        assert not out.failed and set(out.images) == set(latents)
        if budget is None:
            assert sizes == [3, 3, 3]  # one call per output size
        else:
            assert sizes == ([1] * 9 if name == "one image per call" else [2, 1] * 3), (name, sizes)
            for rid, img in out.images.items():
                diff = np.abs(img.astype(int) - results["one call"][rid].astype(int))
                assert diff.max() <= 1 and diff.mean() < 0.01, (name, rid, diff.max(), diff.mean())


def _cond_inputs(model, sizes):
    proc = ImageProcessor(model.config)
    rng = np.random.RandomState(0)
    out = []
    for i, (w, h) in enumerate(sizes):
        pil = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
        vae, vit = proc.vae_image(pil), proc.vit_image(pil)
        out.append(EncoderInput(("img", i), vae, vit))
    return out


def test_encode_chunks_give_the_posteriors_of_one_call(tiny_model):
    # two images per orientation, each pair in one bucket: square, landscape, portrait
    inputs = _cond_inputs(tiny_model, [(256, 256), (250, 260), (384, 192), (380, 190), (192, 384), (190, 380)])
    shapes = {tuple(e.vae.pixels.shape) for e in inputs}
    assert len(shapes) == 3, shapes
    h, w = min(shapes)[-2:]
    encoded = {}
    for name, budget in (("one call", None), ("one image per call", VaeBudget(h * w, 1))):
        runner = _runner(tiny_model, budget)
        calls = []
        real = runner.model.encode_condition_vae

        def count(pixels, real=real, calls=calls):
            calls.append(pixels.shape[0])
            return real(pixels)

        runner.model.encode_condition_vae = count
        try:
            out = RunnerOutput()
            runner.encodes.submit(inputs)
            runner.encodes.collect(runner.encoder_cache, out)
        finally:
            del runner.model.encode_condition_vae
        assert not out.encode_failed and len(out.encoded) == len(inputs)
        assert calls == ([2, 2, 2] if budget is None else [1] * 6), (name, calls)
        encoded[name] = runner.encoder_cache
    for key, enc in encoded["one call"].items():
        other = encoded["one image per call"][key]
        assert torch.allclose(enc.posterior, other.posterior, rtol=0, atol=1e-5), key
        assert torch.allclose(enc.vit_tokens, other.vit_tokens, rtol=0, atol=1e-5), key


@pytest.mark.parametrize("latent_factor", [8, 16])
def test_decode_calls_and_scheduler_admission_share_one_latent_factor(latent_factor):
    """The decode stage sizes its calls from the latent grid with the budget's own latent factor, the one the
    scheduler admits decodes by (`grid_bytes`): as many latents per call as the budget's per-image part holds."""
    from diffgentor.engine.decode_stage import DecodeJob, decode_groups

    grid = (4, 6)
    b = VaeBudget(budget_bytes=5 * 24 * 64 + 7, bytes_per_pixel=1, decode_fixed_bytes=7, latent_factor=latent_factor)
    calls: list[int] = []

    def decode(latents):
        calls.append(latents.shape[0])
        return [np.zeros((1, 1, 3), np.uint8)] * latents.shape[0]

    jobs = [DecodeJob((f"r{i}", -1), torch.zeros(2, *grid)) for i in range(11)]
    done = decode_groups(decode, jobs, b)
    per_call = b.decode_bytes_left() // b.grid_bytes(*grid)
    assert per_call == (5 if latent_factor == 8 else 1)
    assert calls == [per_call] * (11 // per_call) + ([11 % per_call] if 11 % per_call else [])
    assert [d.key for d in done] == [j.key for j in jobs] and all(d.error is None for d in done)
