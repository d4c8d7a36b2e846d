"""How much VAE work one call and one engine step may carry on this GPU.

Why: one 1024x1024 decode peaks at ~6 GiB (the decoder runs 4 frames at full size, fp16 convs and fp32 GroupNorm
under CUDA autocast) plus autocast's fp16 copy of the decoder weights, an encode at ~6 GiB; a batch grows linearly.
Stacking every finished image of a step into one decode would run out of memory on the GPU, so the memory plan
(`engine.memory_plan`) reserves a budget and this object turns it into image counts: the worker splits its VAE calls
into chunks that fit, and the scheduler admits no more VAE work per step than the budget. None (CPU, or no plan)
means unbounded: one call per size, as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VaeBudget:
    budget_bytes: int
    """The transient bytes the plan reserves for one VAE phase of a step."""
    bytes_per_pixel: int
    """Peak bytes one image adds per pixel of its size (decode and encode alike: `memory_plan.vae_image_bytes`)."""
    decode_fixed_bytes: int = 0
    """What a decode holds whatever its batch: autocast's fp16 copy of the decoder weights."""
    latent_factor: int = 16
    """Pixels per latent cell along each side (the scheduler sizes decodes from latent grids)."""

    def image_bytes(self, height: int, width: int) -> int:
        return self.bytes_per_pixel * int(height) * int(width)

    def grid_bytes(self, grid_h: int, grid_w: int) -> int:
        """`image_bytes` of the image a latent grid decodes to."""
        return self.image_bytes(grid_h * self.latent_factor, grid_w * self.latent_factor)

    def decode_call_bytes(self, height: int, width: int, images: int = 1) -> int:
        """Peak bytes of one decode call of `images` images of this size: the weight cache plus each image."""
        return self.decode_fixed_bytes + images * self.image_bytes(height, width)

    def encode_call_bytes(self, height: int, width: int, images: int = 1) -> int:
        """Peak bytes of one encode call (the encoder peaks at its first level, before autocast has cast the deeper
        levels' weights: no fixed part)."""
        return images * self.image_bytes(height, width)

    def decode_bytes_left(self) -> int:
        """The per-image part of the budget of one decode call (or step)."""
        return self.budget_bytes - self.decode_fixed_bytes

    def decode_images(self, height: int, width: int) -> int:
        """Images of this size one decode call may carry (at least one: any single image gets through)."""
        return max(1, self.decode_bytes_left() // self.image_bytes(height, width))

    def grid_decode_images(self, grid_h: int, grid_w: int) -> int:
        """`decode_images` of the image a latent grid decodes to (the worker's decode stage sizes its calls so; the
        scheduler admits by `grid_bytes`: one latent factor for both)."""
        return self.decode_images(grid_h * self.latent_factor, grid_w * self.latent_factor)

    def encode_images(self, height: int, width: int) -> int:
        """Images of this size one encode call may carry (at least one)."""
        return max(1, self.budget_bytes // self.image_bytes(height, width))


def chunks(items: list, size: int) -> list[list]:
    """`items` in consecutive runs of at most `size` (one run when size covers them all)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]
