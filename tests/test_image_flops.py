"""The FLOPs the scheduler weighs condition encodes and image decodes by (engine/models/hunyuan_image_3/image_flops.py,
counted from the config's shapes) against what torch's FLOP counter sees when the tiny checkpoint's own VAE and
vision tower run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffgentor.engine.input_processor import load_processor_context
from diffgentor.engine.models.hunyuan_image_3.image_flops import vae_decode_flops, vae_encode_flops, vit_flops
from diffgentor.engine.models.hunyuan_image_3.vae import AutoencoderKLConv3D
from diffgentor.engine.models.hunyuan_image_3.vision import build_vision_tower, run_vision_tower
from diffgentor.engine.testing.tiny_model import write_tiny_metadata


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = write_tiny_metadata(tmp_path_factory.mktemp("meta") / "tiny-distil", distil=True)
    return load_processor_context(path).config


def _counted(fn) -> int:
    # without oneDNN: its convolution op is one the counter does not know (it would count those convs as nothing)
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("hw", [(64, 64), (128, 96)])
def test_vae_flops_match_the_counted_modules(config, hw):
    h, w = hw
    vae = AutoencoderKLConv3D(config.vae).eval()
    vae.channels_last_on_cpu = False  # the plain formulas: every convolution runs as one op the counter sees
    latents = torch.zeros(1, int(config.vae["latent_channels"]), h // 16, w // 16)
    encode = _counted(lambda: vae.encode(torch.zeros(1, 3, h, w), autocast_dtype=None))
    decode = _counted(lambda: vae.decode(latents, autocast_dtype=None))
    assert vae_encode_flops(config.vae, h, w) == pytest.approx(encode, rel=0.03)
    assert vae_decode_flops(config.vae, h, w) == pytest.approx(decode, rel=0.03)


def test_vit_flops_match_the_counted_tower(config):
    tower = build_vision_tower(config.vit)
    patch, rows = int(config.vit["patch_size"]), 64
    pixels = torch.zeros(1, rows, 3 * patch * patch)
    mask = torch.ones(1, rows, dtype=torch.long)
    counted = _counted(lambda: run_vision_tower(tower, pixels, mask, torch.tensor([[8, 8]])))
    assert vit_flops(config.vit, rows) == pytest.approx(counted, rel=0.03)
