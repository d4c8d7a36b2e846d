"""What a request will cost in memory, computed from its parameters and its images' headers before anything is
decoded, and the server-wide budget that queued and running requests are admitted against.

Uploaded bytes are bounded elsewhere (`limits.ByteBudget`); they say little about memory: a 5 KB PNG decodes to
megapixels and a two-image edit holds float32 copies of each bucket-sized image in the API, in the message to the
engine core and in the core, plus its encoder outputs, until it finishes. `request_cost` adds those up (upper
bounds, float32 everywhere):
* per condition image (width x height from its header): the decoded image (its own bands) and its RGB copy; the
  VAE bucket's pixels and the SigLIP2 patches, three times each (the API's arrays, the message, the core's arrays);
  the encoder outputs (the VAE posterior's mean and log-variance, the ViT tokens at the model's width);
* per output image (its bucket; the largest bucket for `auto` size): the decoded float32 pixels, the uint8 copy and
  the PNG (bounded by the raw pixels).
A request over the per-request limit is refused (400); one that does not fit what the running and queued requests
left of the server's budget is answered 429 with Retry-After at once (a `limits.ByteBudget` of cost)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from diffgentor.engine.input_processor import ALLOWED_IMAGE_FORMATS, ProcessorContext
from diffgentor.engine.models.hunyuan_image_3 import image_tokens

MiB = 1 << 20
F32 = 4
PIPELINE_COPIES = 3  # the API's arrays, the ZeroMQ message, the engine core's arrays


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image's header says: its size and its decoded bytes per pixel."""

    width: int
    height: int
    bands: int


def read_header(data: bytes) -> ImageHeader | None:
    """The header of an encoded image (no pixel is decoded); None when it is not an image this server reads (the
    decoder reports that later with the request's other checks)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS) as img:
            return ImageHeader(int(img.width), int(img.height), len(img.getbands()))
    except Exception:  # noqa: BLE001 - not an image: `process_request` gives the error
        return None


@dataclass(frozen=True)
class RequestCost:
    """Bytes one request will hold, by component (see the module docstring)."""

    decoded: int = 0
    processed: int = 0
    encoder_outputs: int = 0
    outputs: int = 0

    @property
    def total(self) -> int:
        return self.decoded + self.processed + self.encoder_outputs + self.outputs

    def describe(self) -> str:
        return (f"{self.total / MiB:.0f} MiB (decoded images {self.decoded / MiB:.0f}, preprocessed "
                f"{self.processed / MiB:.0f}, encoder outputs {self.encoder_outputs / MiB:.0f}, output images "
                f"{self.outputs / MiB:.0f})")


def request_cost(ctx: ProcessorContext, headers: Sequence[ImageHeader | None], image_size: str, n: int) -> RequestCost:
    """The cost of a request with these condition images and ``n`` outputs of ``image_size`` (the engine's
    HEIGHTxWIDTH or ``auto``)."""
    cfg = ctx.config
    res = ctx.builder.resolution
    ds = cfg.latent_downsample
    decoded = processed = encoded = 0
    vit = ctx.images.vit if cfg.has_vision else None  # the processor the engine runs: its patch count and size
    patches, patch = (vit.max_num_patches, vit.patch_size) if vit is not None else (0, 0)
    for h in headers:
        if h is None:
            continue
        decoded += h.width * h.height * (h.bands + 3)
        _, (bh, bw) = res.nearest(h.width, h.height)
        processed += PIPELINE_COPIES * (3 * bh * bw * F32 + patches * (3 * patch * patch * F32 + 8))
        encoded += 2 * cfg.latent_channels * image_tokens(bh, bw, ds) * F32 + patches * cfg.hidden_size * F32
    if image_size == "auto":
        out_pixels = max(bh * bw for bh, bw in res.buckets)
    else:
        _, (oh, ow) = res.parse_size(image_size)
        out_pixels = oh * ow
    outputs = n * out_pixels * 3 * (F32 + 1 + 1)
    return RequestCost(decoded=decoded, processed=processed, encoder_outputs=encoded, outputs=outputs)


__all__ = ["ImageHeader", "RequestCost", "read_header", "request_cost"]
