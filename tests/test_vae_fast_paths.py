"""The VAE's CPU fast paths against the official formulas (docs/decisions.md, "VAE: channels-last on CPU" and
"VAE: DC-AE shortcuts folded into the conv"): the channels-last GroupNorm, the shortcut folded into the resample
conv, and the whole encoder and decoder in fp32 against the same module run in fp64 (the plain path: no oneDNN,
no folding), on non-square inputs in both orientations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffgentor.engine.models.hunyuan_image_3.vae import (
    AutoencoderKLConv3D,
    DownsampleDCAE,
    UpsampleDCAE,
    _depth_to_space,
    _group_norm_channels_last,
    _space_to_depth,
)

CL = torch.channels_last_3d


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@pytest.mark.parametrize("channels, shape", [(32, (2, 32, 4, 24, 40)), (64, (1, 64, 2, 16, 8))])
def test_channels_last_group_norm_is_as_accurate_as_the_contiguous_kernel(channels, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1.5  # an offset mean: a one-pass fp32 variance loses digits here
    norm = _randomise(nn.GroupNorm(32, channels, eps=1e-6), 1)
    with torch.no_grad():
        ref = nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6)
        plain = norm(x)
        fast = _group_norm_channels_last(norm, x.contiguous(memory_format=CL))
    assert fast.is_contiguous(memory_format=CL)
    plain_err = (plain.double() - ref).abs().max().item()
    fast_err = (fast.double() - ref).abs().max().item()
    assert fast_err <= max(2 * plain_err, 1e-6), (fast_err, plain_err)


@pytest.mark.parametrize("cin, cout, temporal", [(32, 32, False), (32, 32, True), (16, 32, False), (32, 64, True)])
def test_downsample_with_its_shortcut_folded_equals_the_official_formula(cin, cout, temporal):
    down = _randomise(DownsampleDCAE(cin, cout, temporal), 2)
    x = torch.randn(1, cin, 4 if temporal else 2, 12, 20, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        assert down.conv.can_fold_pointwise(x)
        folded = down(x)
        h = _space_to_depth(down.conv(x), down.rt)  # the official order: conv, rearrange, mean, add
        s = _space_to_depth(x, down.rt)
        b, _, t, hh, ww = s.shape
        official = h + s.reshape(b, h.shape[1], down.group, t, hh, ww).mean(dim=2)
    assert folded.shape == official.shape
    torch.testing.assert_close(folded, official, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin, cout, temporal", [(32, 32, False), (32, 32, True), (64, 32, True)])
def test_upsample_with_its_shortcut_folded_equals_the_official_formula(cin, cout, temporal):
    up = _randomise(UpsampleDCAE(cin, cout, temporal), 4)
    x = torch.randn(2, cin, 1, 10, 6, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=CL)
    with torch.no_grad():
        folded = up(x)
        official = _depth_to_space(up.conv(x), up.rt) + _depth_to_space(x.repeat_interleave(up.repeats, dim=1), up.rt)
    torch.testing.assert_close(folded, official, rtol=1e-5, atol=1e-5)


def test_no_fold_off_the_fast_path():
    """Only an fp32 channels-last CPU input folds (a bf16 weight would round the sum; fp64 and contiguous inputs
    are the plain path)."""
    down = DownsampleDCAE(32, 32, False)
    x = torch.zeros(1, 32, 2, 4, 4)
    assert down.conv.can_fold_pointwise(x.contiguous(memory_format=CL))
    assert not down.conv.can_fold_pointwise(x)
    assert not down.conv.can_fold_pointwise(x.bfloat16().contiguous(memory_format=CL))
    assert not down.conv.can_fold_pointwise(x.double().contiguous(memory_format=CL))


@pytest.mark.parametrize("hw", [(48, 80), (80, 48)])  # landscape and portrait
def test_fp32_fast_paths_are_as_close_to_fp64_as_the_plain_formulas(hw):
    """Whole encoder and decoder: the fp32 fast path's distance from an fp64 run is within twice the plain fp32
    path's (the same formulas in the official order: contiguous layout, no folding)."""
    cfg = {"block_out_channels": [32, 32, 64, 64, 64], "latent_channels": 16, "layers_per_block": 1,
           "ffactor_spatial": 16, "ffactor_temporal": 4}
    fast = _randomise(AutoencoderKLConv3D(cfg), 6)
    plain = _randomise(AutoencoderKLConv3D(cfg), 6)
    plain.channels_last_on_cpu = False
    ref = _randomise(AutoencoderKLConv3D(cfg), 6).double()
    img = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(7)) * 2 - 1

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b).abs().max().item()

    post_ref = ref.encode(img.double())
    post_fast, post_plain = fast.encode(img), plain.encode(img)
    assert post_fast.mean.shape == (2, 16, 1, hw[0] // 16, hw[1] // 16)
    for name in ("mean", "logvar"):
        e_fast = err(getattr(post_fast, name), getattr(post_ref, name))
        e_plain = err(getattr(post_plain, name), getattr(post_ref, name))
        assert e_fast <= 2 * e_plain + 1e-6, (name, e_fast, e_plain)
    z = post_plain.mean
    out_ref = ref.decode(z.double())
    out_fast, out_plain = fast.decode(z), plain.decode(z)
    assert out_fast.is_contiguous() and out_fast.shape == (2, 3, 4, *hw)
    e_fast, e_plain = err(out_fast, out_ref), err(out_plain, out_ref)
    assert e_fast <= 2 * e_plain + 1e-6, (e_fast, e_plain)


def test_channels_last_input_with_autograd_takes_the_plain_group_norm():
    """The chunked statistics are inference-only: with gradients on, a channels-last input still normalises (the
    contiguous kernel) and gradients flow."""
    norm = _randomise(nn.GroupNorm(32, 32, eps=1e-6), 8)
    x = torch.randn(1, 32, 2, 6, 10).contiguous(memory_format=CL).requires_grad_()
    from diffgentor.engine.models.hunyuan_image_3.vae import _norm_swish

    y = _norm_swish(norm, x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(y, nn.functional.silu(norm(x.contiguous())))
