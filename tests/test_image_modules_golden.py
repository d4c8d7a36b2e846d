"""Image-side modules (VAE, SigLIP2 tower + aligner, UNet projections, timestep embedders, pre- and
post-processing) against the golden tensors of the official implementation (fp32 CPU, atol 1e-4 unless
stated)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.image_embed import (
    TimestepEmbedder,
    UNetDown,
    UNetUp,
    timestep_sinusoid,
)
from diffgentor.engine.models.hunyuan_image_3.image_processing import (
    ImageProcessor,
    VaeCondImage,
    load_image,
    resize_and_crop,
    to_pil,
    to_uint8,
)
from diffgentor.engine.models.hunyuan_image_3.vae import AutoencoderKLConv3D
from diffgentor.engine.models.hunyuan_image_3.vision import (
    VisionAligner,
    build_vision_tower,
    run_vision_tower,
)

ATOL = 1e-4


def _checkpoint_tensors(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor whose key starts with `prefix`, keyed without it (shards via the index)."""
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if key.startswith(prefix):
            by_shard.setdefault(shard, []).append(key)
    out = {}
    for shard, keys in by_shard.items():
        with safe_open(str(ckpt / shard), framework="pt") as f:
            for key in keys:
                out[key[len(prefix):]] = f.get_tensor(key)
    assert out, f"no checkpoint keys start with {prefix!r}"
    return out


def _load_strict(module: nn.Module, ckpt: Path, prefix: str) -> nn.Module:
    result = module.load_state_dict(_checkpoint_tensors(ckpt, prefix), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return module.eval()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


class _Golden:
    def __init__(self, root: Path, tensors: str) -> None:
        self.root = root
        self.ckpt = root / "checkpoint"
        self.config = HunyuanImage3Config.from_pretrained(self.ckpt)
        self.t = load_file(str(root / tensors))
        self.processor = ImageProcessor(self.config)
        self.vae = _load_strict(AutoencoderKLConv3D(self.config.vae), self.ckpt, "vae.")
        self.tower = _load_strict(build_vision_tower(self.config.vit), self.ckpt, "vision_model.")
        self.aligner = _load_strict(VisionAligner(self.config.vit_aligner), self.ckpt, "vision_aligner.")


@pytest.fixture(scope="module")
def tiny(golden_tiny) -> _Golden:
    g = _Golden(golden_tiny, "edit_step.safetensors")
    g.t.update(load_file(str(golden_tiny / "image_gen.safetensors")))
    return g


@pytest.fixture(scope="module")
def distil(golden_distil) -> _Golden:
    return _Golden(golden_distil, "gen.safetensors")


# ----------------------------------------------------------------------------- condition-image preprocessing
def test_input_images_decode_to_golden_pixels(tiny, distil):
    img = np.asarray(load_image(tiny.root / "edit_input.png"))
    assert np.array_equal(img, tiny.t["input_image_uint8_hwc"].numpy())
    for i, name in enumerate(["cond0_64x96.png", "cond1_112x48.png"]):
        img = np.asarray(load_image(distil.root / name))
        assert np.array_equal(img, distil.t[f"cond{i}_input_uint8_hwc"].numpy())


def test_vae_pixels(tiny, distil):
    cond = tiny.processor.vae_image(load_image(tiny.root / "edit_input.png"))
    assert cond.size_hw == (208, 304) and cond.ratio_index == 13 and cond.original_size == (96, 64)
    assert _max_err(cond.pixels, tiny.t["vae_pixels"]) <= 1e-6
    for i, (name, hw, ratio) in enumerate(
        [("cond0_64x96.png", (208, 304), 13), ("cond1_112x48.png", (352, 160), 22)]
    ):
        cond = distil.processor.vae_image(load_image(distil.root / name))
        assert cond.size_hw == hw and cond.ratio_index == ratio
        assert _max_err(cond.pixels, distil.t[f"cond{i}_vae_pixels"]) <= 1e-6


def test_vit_preprocessing_exact(tiny, distil):
    vit = tiny.processor.vit_image(load_image(tiny.root / "edit_input.png"))
    assert torch.equal(vit.pixel_values, tiny.t["vit_pixel_values"])
    assert torch.equal(vit.pixel_attention_mask, tiny.t["vit_pixel_attention_mask"])
    assert torch.equal(vit.spatial_shapes, tiny.t["vit_spatial_shapes"])
    for i, name in enumerate(["cond0_64x96.png", "cond1_112x48.png"]):
        vit = distil.processor.vit_image(load_image(distil.root / name))
        assert torch.equal(vit.pixel_values, distil.t["vit_pixel_values"][i])
        assert torch.equal(vit.pixel_attention_mask, distil.t[f"cond{i}_vit_pixel_attention_mask"])
        assert torch.equal(vit.spatial_shapes, distil.t[f"cond{i}_vit_spatial_shapes"])


@pytest.mark.parametrize("hw", [(64, 96), (3, 40), (1, 40), (3, 3), (1, 1)])
def test_vit_preprocessing_thin_images_are_channels_last(tiny, hw):
    """A 1- or 3-pixel-high RGB image is still read as HWC (transformers would guess channels-first from the shape:
    a crash for 1 px, a transposed image for 3 px): the output is the plain NaFlex arithmetic done by hand, and its
    patch grid is the transpose of the (unambiguous) transposed image's."""
    vit = tiny.processor.vit
    h, w = hw
    arr = (np.random.RandomState(h * 100 + w).rand(h, w, 3) * 255).astype(np.uint8)
    out = tiny.processor.vit_image(Image.fromarray(arr))
    rows, cols = out.spatial_shapes.tolist()
    p = vit.patch_size
    assert 0 < rows * cols <= vit.max_num_patches and out.original_size == (w, h)
    assert int(out.pixel_attention_mask.sum()) == rows * cols
    tall = tiny.processor.vit_image(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))))
    assert tall.spatial_shapes.tolist() == [cols, rows]
    resized = Image.fromarray(arr).resize((cols * p, rows * p), resample=vit.processor.resample)
    x = torch.from_numpy(np.asarray(resized).copy()).reshape(rows, p, cols, p, 3)
    patches = x.permute(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    assert torch.equal(out.pixel_values[: rows * cols], (patches.float() - vit.mean) / vit.std)
    assert not out.pixel_values[rows * cols:].any()


# ----------------------------------------------------------------------------- VAE
def test_vae_encode_posterior(tiny):
    post = tiny.vae.encode(tiny.t["vae_pixels"][None])
    assert _max_err(post.mean, tiny.t["vae_posterior_mean"]) < ATOL
    assert _max_err(post.logvar, tiny.t["vae_posterior_logvar"]) < ATOL
    assert torch.equal(post.mode(), post.mean)


def test_cond_latent_sample_tiny_cfg_rows(tiny):
    # The official code draws ONE sample per condition image and repeats it for the CFG rows.
    golden = tiny.t["cond_vae_latents_sampled_scaled"]
    assert torch.equal(golden[0], golden[1])
    post = tiny.vae.encode(tiny.t["vae_pixels"][None])
    z = post.sample(torch.Generator().manual_seed(42)) * tiny.config.vae_scaling_factor
    assert z.shape == (1, 16, 1, 13, 19)
    assert _max_err(z.squeeze(2).repeat(2, 1, 1, 1), golden) < ATOL


def test_cond_latent_samples_distil_share_one_generator(distil):
    gen = torch.Generator().manual_seed(42)
    for i in range(2):  # cond0 draws first, then cond1, from the same generator
        post = distil.vae.encode(distil.t[f"cond{i}_vae_pixels"][None])
        z = post.sample([gen]) * distil.config.vae_scaling_factor
        assert _max_err(z[0, :, 0], distil.t[f"cond{i}_vae_latents_sampled_scaled"]) < ATOL


def test_vae_decode_all_frames_and_uint8_tiny(tiny):
    frames = tiny.vae.decode(tiny.t["vae_decoder_input"])
    assert frames.shape == (1, 3, 4, 256, 256)
    assert _max_err(frames, tiny.t["vae_decoder_output"]) < ATOL
    _assert_uint8_close(to_uint8(frames[:, :, -1])[0], tiny.t["image_uint8_hwc"].numpy())
    golden_last = tiny.t["vae_decoder_output"][:, :, -1]
    _assert_uint8_close(to_uint8(golden_last)[0], tiny.t["image_uint8_hwc"].numpy())


def test_vae_decode_last_frame_and_uint8_distil(distil):
    last = distil.vae.decode_image(distil.t["vae_decoder_input"])
    assert last.shape == (1, 3, 256, 256)
    assert _max_err(last, distil.t["vae_decoder_output_lastframe"]) < ATOL
    image = to_pil(last)[0]
    assert image.size == (256, 256) and image.mode == "RGB"
    _assert_uint8_close(np.asarray(image), distil.t["image_uint8_hwc"].numpy())


def _assert_uint8_close(ours: np.ndarray, golden: np.ndarray) -> None:
    assert ours.shape == golden.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - golden.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).sum() <= 16, (diff.max(), (diff > 0).sum())


def test_vae_rejects_explicit_four_frame_clip(tiny):
    with pytest.raises(ValueError):
        tiny.vae.encode(torch.zeros(1, 3, 4, 32, 32))


# ----------------------------------------------------------------------------- ViT tower + aligner
def test_vit_tower_and_aligner_tiny(tiny):
    t = tiny.t
    with torch.no_grad():
        hidden = run_vision_tower(
            tiny.tower,
            t["vit_pixel_values"][None],
            t["vit_pixel_attention_mask"][None],
            t["vit_spatial_shapes"][None],
        )
        aligned = tiny.aligner(hidden)
    assert _max_err(hidden, t["vit_last_hidden_state"]) < ATOL  # all 64 rows, padding included
    assert _max_err(aligned, t["vit_aligned"]) < ATOL


def test_vit_tower_and_aligner_distil_batch(distil):
    t = distil.t
    mask = torch.stack([t["cond0_vit_pixel_attention_mask"], t["cond1_vit_pixel_attention_mask"]])
    shapes = torch.stack([t["cond0_vit_spatial_shapes"], t["cond1_vit_spatial_shapes"]])
    with torch.no_grad():
        hidden = run_vision_tower(distil.tower, t["vit_pixel_values"], mask, shapes)
        aligned = distil.aligner(hidden)
    assert _max_err(hidden, t["vit_last_hidden_state"]) < ATOL
    assert _max_err(aligned, t["vit_aligned"]) < ATOL


# ----------------------------------------------------------------------------- UNet projections, embedders
def test_image_embed_modules_load_strict_and_shapes(distil):
    cfg, ckpt = distil.config, distil.ckpt
    for name in ("timestep_emb", "time_embed", "time_embed_2", "guidance_emb", "timestep_r_emb"):
        emb = _load_strict(TimestepEmbedder(cfg.hidden_size), ckpt, f"{name}.")
        assert emb(torch.tensor([0.0, 2496.0])).shape == (2, cfg.hidden_size)
    patch_embed = _load_strict(UNetDown.from_config(cfg), ckpt, "patch_embed.")
    final_layer = _load_strict(UNetUp.from_config(cfg), ckpt, "final_layer.")
    t_emb = torch.randn(2, cfg.hidden_size)
    with torch.no_grad():
        tokens = patch_embed(distil.t["cond1_vae_latents_sampled_scaled"][None].repeat(2, 1, 1, 1), t_emb)
        assert tokens.shape == (2, 22 * 10, cfg.hidden_size)
        vel = final_layer(tokens, (22, 10), t_emb)
    assert vel.shape == (2, cfg.latent_channels, 22, 10)


def test_timestep_sinusoid_formula():
    t = torch.tensor([0.0, 1.0, 500.0, 2496.0])
    half = 128
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = timestep_sinusoid(t, 256)
    assert got.dtype == torch.float32 and got.shape == (4, 256)
    assert np.abs(got.numpy() - expected).max() < 1e-3  # fp32 args at t=2496 vs fp64 reference
    assert torch.equal(got[0, :half], torch.ones(half)) and torch.equal(got[0, half:], torch.zeros(half))
    assert timestep_sinusoid(t, 7)[:, -1].abs().max() == 0


# ----------------------------------------------------------------------------- align mode + output alignment
def test_resize_mode_stretches_to_bucket(tiny):
    img = load_image(tiny.root / "edit_input.png")
    cond = tiny.processor.vae_image(img, align_image_size=True)
    assert cond.size_hw == (208, 304)
    stretched = resize_and_crop(img, (208, 304), "resize")
    assert stretched.size == (304, 208)
    assert cond.pixels.min() >= -1 and cond.pixels.max() <= 1


def test_align_output_size(tiny):
    proc = tiny.processor  # base size 256
    out = Image.new("RGB", (304, 208))
    idx, _ = proc.resolutions.nearest(304, 208)
    far = VaeCondImage(pixels=torch.zeros(3, 208, 304), ratio_index=idx, original_size=(150, 100))
    near = VaeCondImage(pixels=torch.zeros(3, 208, 304), ratio_index=idx, original_size=(304, 208))
    other = VaeCondImage(pixels=torch.zeros(3, 256, 256), ratio_index=16, original_size=(97, 13))
    # H/W 0.6667 vs bucket 0.6842: resize to area 256^2 at 3:2
    resized = proc.align_output_size(out, [other, far])
    assert resized.size == (round(150 * (256**2 / 15000) ** 0.5), round(100 * (256**2 / 15000) ** 0.5))
    assert proc.align_output_size(out, [near, far]).size == (304, 208)  # first match decides: no change
    assert proc.align_output_size(out, [other]).size == (304, 208)
