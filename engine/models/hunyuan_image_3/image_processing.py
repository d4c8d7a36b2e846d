"""Pixel-side pre- and post-processing of HunyuanImage-3.0 images.

A condition image feeds two encoders:
* VAE branch: snap to the resolution bucket with the nearest aspect ratio, LANCZOS-resize ("center": cover
  the bucket keeping the aspect ratio, then centre-crop; "resize": stretch, used with
  `infer_align_image_size`), then map to [-1, 1].
* ViT branch: transformers' SigLIP2 NaFlex processor (aspect-preserving resize to at most `max_num_patches`
  patches, patchify, pad). The official code uses the torchvision-backed Fast processor; torchvision is not a
  dependency here, so we run the slow (PIL) processor for the resize and patchify and apply the Fast
  processor's fused rescale+normalise ourselves, which gives the Fast values bit for bit (the slow processor's
  own two-step normalisation is 6e-8 away).
After generation, `align_output_size` optionally resizes the output towards a condition image's aspect
ratio, and `to_pil` converts decoded pixels exactly as the official pipeline (diffusers' VaeImageProcessor)
does.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import HunyuanImage3Config
from .resolution import ResolutionGroup

CropMode = Literal["center", "resize"]


def load_image(src: Image.Image | str | Path | bytes) -> Image.Image:
    """An RGB PIL image from a PIL image, a path or encoded bytes; EXIF orientation applied (as transformers'
    `load_image`, which the official code calls, does)."""
    if isinstance(src, (bytes, bytearray)):
        image = Image.open(io.BytesIO(src))
    elif isinstance(src, (str, Path)):
        image = Image.open(src)
    elif isinstance(src, Image.Image):
        image = src
    else:
        raise TypeError(f"cannot read an image from {type(src).__name__}")
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


MAX_COVER_FACTOR = 4  # the covering resize may hold at most this many times the target's pixels


def resize_and_crop(image: Image.Image, size_hw: tuple[int, int], mode: CropMode = "center") -> Image.Image:
    """LANCZOS-fit `image` to (height, width): stretch ("resize") or cover, then centre-crop ("center").

    The official cover-then-crop resizes the whole image first; for an aspect ratio far beyond the bucket's (a
    65536x4 image covering a 128x512 bucket would be resized to 8 million by 128 pixels) that intermediate image is
    unbounded. Past `MAX_COVER_FACTOR` times the target's pixels only the part that survives the crop is resampled
    (PIL's `box`: the same sampling grid, close to the official values, not identical; docs/decisions.md,
    "Extreme aspect ratios are cropped before the resize")."""
    th, tw = size_hw
    if mode == "resize":
        return image.resize((tw, th), resample=Image.Resampling.LANCZOS)
    if mode != "center":
        raise ValueError(f"crop mode must be 'center' or 'resize', got {mode!r}")
    w, h = image.size
    if h / w < th / tw:  # wider than the target: match heights
        rh, rw = th, int(round(th / h * w))
    else:
        rh, rw = int(round(tw / w * h)), tw
    top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
    if rh * rw > MAX_COVER_FACTOR * th * tw:
        sx, sy = w / rw, h / rh
        box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
        return image.resize((tw, th), resample=Image.Resampling.LANCZOS, box=box)
    image = image.resize((rw, rh), resample=Image.Resampling.LANCZOS)
    return image.crop((left, top, left + tw, top + th))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]: x/255, then (x - 0.5)/0.5, the official op order."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)


@dataclass(frozen=True)
class VaeCondImage:
    """A condition image ready for the VAE: pixels [3, H, W] in [-1, 1] at bucket `ratio_index`."""

    pixels: torch.Tensor
    ratio_index: int
    original_size: tuple[int, int]  # (width, height) of the input image

    @property
    def size_hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])


@dataclass(frozen=True)
class VitCondImage:
    """A condition image ready for the SigLIP2 tower (one image, no batch axis)."""

    pixel_values: torch.Tensor  # [max_num_patches, 3*p*p] float32, zero rows after the real patches
    pixel_attention_mask: torch.Tensor  # [max_num_patches] int64, 1 = real patch
    spatial_shapes: torch.Tensor  # [2] int64: patch rows, patch columns
    original_size: tuple[int, int]  # (width, height)


def _slow_siglip2_processor_class() -> Any:
    """The PIL-backed SigLIP2 processor: `Siglip2ImageProcessor` in 4.x, `Siglip2ImageProcessorPil` in 5.x."""
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        return Siglip2ImageProcessorPil
    except ImportError:
        pass
    try:
        from transformers.models.siglip2.image_processing_siglip2 import Siglip2ImageProcessor

        return Siglip2ImageProcessor
    except ImportError as e:
        raise RuntimeError(
            "this transformers has no PIL SigLIP2 image processor; install transformers 4.57.x"
        ) from e


class SiglipPreprocessor:
    """SigLIP2 NaFlex preprocessing from the checkpoint's `vit_processor` dict, Fast-processor arithmetic."""

    def __init__(self, processor_cfg: dict[str, Any]) -> None:
        cfg = dict(processor_cfg)
        cfg.pop("image_processor_type", None)
        self.fuse = bool(cfg.get("do_rescale", True)) and bool(cfg.get("do_normalize", True))
        cls = _slow_siglip2_processor_class()
        if self.fuse:
            self.processor = cls.from_dict({**cfg, "do_rescale": False, "do_normalize": False})
            scale = float(cfg.get("rescale_factor", 1 / 255))
            channels = int(cfg.get("num_channels", 3))
            mean = cfg.get("image_mean", [0.5] * channels)
            std = cfg.get("image_std", [0.5] * channels)
            mean = [mean] * channels if isinstance(mean, (int, float)) else list(mean)
            std = [std] * channels if isinstance(std, (int, float)) else list(std)
            # Fast processor: fold the rescale into mean/std, then (x - mean') / std' in fp32.
            # Patch rows are (py, px, channel) flattened, channel fastest.
            pixels = int(self.processor.patch_size) ** 2
            self.mean = torch.tensor([m * (1.0 / scale) for m in mean], dtype=torch.float32).repeat(pixels)
            self.std = torch.tensor([s * (1.0 / scale) for s in std], dtype=torch.float32).repeat(pixels)
        else:
            self.processor = cls.from_dict(cfg)

    @property
    def max_num_patches(self) -> int:
        return int(self.processor.max_num_patches)

    @property
    def patch_size(self) -> int:
        return int(self.processor.patch_size)

    def __call__(self, image: Image.Image) -> VitCondImage:
        # PIL images become HWC arrays; say so, or transformers guesses the channel axis from the shape and takes
        # a 1- or 3-pixel-high image for channels-first (a crash, or a silently transposed image).
        out = self.processor(image, return_tensors="pt", input_data_format="channels_last")
        mask = out["pixel_attention_mask"][0].long()
        values = out["pixel_values"][0]
        if self.fuse:
            real = mask.bool()
            normed = torch.zeros(values.shape, dtype=torch.float32)
            normed[real] = (values[real].float() - self.mean) / self.std
            values = normed
        return VitCondImage(
            pixel_values=values.float(),
            pixel_attention_mask=mask,
            spatial_shapes=out["spatial_shapes"][0].long(),
            original_size=image.size,
        )


class BucketedImage(Protocol):
    """What aligning the output reads of a condition image (a `VaeCondImage`, or the frontend's record of one)."""

    ratio_index: int
    original_size: tuple[int, int]  # (width, height)


class ImageProcessor:
    """Condition-image preprocessing and output post-processing for one checkpoint config."""

    def __init__(self, config: HunyuanImage3Config) -> None:
        self.resolutions = ResolutionGroup(config.image_base_size)
        self.vae_factor = config.latent_downsample * config.patch_size
        self.vit = SiglipPreprocessor(config.vit_processor)

    def vae_image(self, image: Image.Image, align_image_size: bool = False) -> VaeCondImage:
        """VAE input for a condition image; `align_image_size` (infer_align_image_size) stretches it."""
        image = image.convert("RGB")
        _, (bh, bw) = self.resolutions.nearest(*image.size)
        if bh % self.vae_factor or bw % self.vae_factor:
            raise ValueError(f"bucket {bh}x{bw} is not a multiple of the latent factor {self.vae_factor}")
        fitted = resize_and_crop(image, (bh, bw), "resize" if align_image_size else "center")
        ratio_index, _ = self.resolutions.nearest(bw, bh)  # the official code re-snaps the fitted size
        return VaeCondImage(pixels=pil_to_tensor(fitted), ratio_index=ratio_index, original_size=image.size)

    def vit_image(self, image: Image.Image) -> VitCondImage:
        """SigLIP2 inputs for a condition image (from the original image, not the VAE crop)."""
        return self.vit(image.convert("RGB"))

    def align_output_size(self, image: Image.Image, conds: Sequence[BucketedImage]) -> Image.Image:
        """infer_align_image_size post-step.

        The first condition image (input order) whose bucket equals the output's bucket decides: if its
        true H/W is at least 0.01 away from the bucket's ratio, the output is LANCZOS-resized to that image's
        aspect ratio with area base_size^2; otherwise, or when no bucket matches, it is returned unchanged.
        """
        out_index, (bh, bw) = self.resolutions.nearest(image.width, image.height)
        for cond in conds:
            if cond.ratio_index != out_index:
                continue
            w0, h0 = cond.original_size
            if abs(h0 / w0 - bh / bw) >= 0.01:
                scale = math.sqrt(self.resolutions.base_size**2 / (w0 * h0))
                return image.resize((round(w0 * scale), round(h0 * scale)), resample=Image.Resampling.LANCZOS)
            break
        return image


def to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """Decoded pixels [B, 3, H, W] (or [3, H, W]) in about [-1, 1] -> uint8 [B, H, W, 3].

    Same arithmetic as the official pipeline: (x/2 + 0.5).clamp(0, 1) in the tensor's dtype, then fp32 numpy,
    *255 and round half to even.
    """
    x = decoded if decoded.dim() == 4 else decoded.unsqueeze(0)
    x = (x / 2 + 0.5).clamp(0, 1)
    arr = x.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return (arr * 255).round().astype(np.uint8)


def to_pil(decoded: torch.Tensor) -> list[Image.Image]:
    """Decoded pixels [B, 3, H, W] (or [3, H, W]) -> one RGB PIL image per batch row."""
    return [Image.fromarray(a) for a in to_uint8(decoded)]
