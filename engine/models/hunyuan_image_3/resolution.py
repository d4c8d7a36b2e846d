"""Resolution buckets of HunyuanImage-3.0: the table behind `<img_ratio_k>` tokens.

Every generated or condition image is snapped to one bucket; the bucket's index is the ratio token the
model reads and writes, so the table must match the official one entry for entry. It is derived from
`image_base_size` (1024 for the released checkpoints, 256 for the tiny golden ones): walk from the square
bucket towards tall and towards wide in `step` increments (height and width each clamped to
[base/2, 2*base]), round each side down to `align`, sort by H/W, then append four fixed extra sizes
(3:4, 9:16, 4:3, 16:9 at 1024 scale) unless a bucket already has exactly that ratio.
Snapping picks the bucket with the smallest |H/W - ratio| (first one on ties).
"""

from __future__ import annotations

import re

# (height, width) of the extra buckets appended after the sorted table. They are absolute sizes in the
# official code, independent of base_size.
_EXTRA_BUCKETS: tuple[tuple[int, int], ...] = ((1024, 768), (1280, 720), (768, 1024), (720, 1280))

_HXW = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_W_COLON_H = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_RATIO_TOKEN = re.compile(r"^\s*<img_ratio_(\d+)>\s*$")


def latent_grid(height: int, width: int, latent_downsample: int) -> tuple[int, int]:
    """The (h, w) latent grid of a `height` x `width` image (pixels): one latent, and one token of the sequence, per
    `latent_downsample` pixels a side. The one statement of the image-token arithmetic (prompt layouts, context
    checks, admission costs, usage, the memory plan)."""
    return height // latent_downsample, width // latent_downsample


def image_tokens(height: int, width: int, latent_downsample: int) -> int:
    """Tokens of a `height` x `width` image's latent grid (`latent_grid`)."""
    h, w = latent_grid(height, width, latent_downsample)
    return h * w


class ResolutionGroup:
    """The ordered bucket table for one base size; index k is the `<img_ratio_k>` token."""

    def __init__(self, base_size: int, step: int | None = None, align: int = 16) -> None:
        if not isinstance(base_size, int) or isinstance(base_size, bool) or base_size <= 0:
            raise ValueError(f"base_size must be a positive int, got {base_size!r}")
        if not isinstance(align, int) or align <= 0:
            raise ValueError(f"align must be a positive int, got {align!r}")
        if base_size % align:
            raise ValueError(f"base_size {base_size} is not a multiple of align {align}")
        if step is None:
            step = base_size // 16
        if not isinstance(step, int) or step <= 0:
            raise ValueError(f"step must be a positive int, got {step!r}")
        if step > base_size // 2:
            raise ValueError(f"step {step} must not exceed base_size // 2 = {base_size // 2}")
        if align > step:
            raise ValueError(
                f"align {align} must not exceed step {step} (base_size {base_size} gives step base/16; "
                f"the smallest base_size usable with align 16 is 256)"
            )
        self.base_size = base_size
        self.step = step
        self.align = align
        self.buckets: list[tuple[int, int]] = self._build()
        self.ratios: list[float] = [h / w for h, w in self.buckets]

    def _build(self) -> list[tuple[int, int]]:
        base, step, align = self.base_size, self.step, self.align
        lo, hi = base // 2, base * 2
        sizes = [(base, base)]
        # towards tall: height grows, width shrinks
        h, w = base, base
        while not (h >= hi and w <= lo):
            h, w = min(h + step, hi), max(w - step, lo)
            sizes.append((h // align * align, w // align * align))
        # towards wide
        h, w = base, base
        while not (h <= lo and w >= hi):
            h, w = max(h - step, lo), min(w + step, hi)
            sizes.append((h // align * align, w // align * align))
        sizes.sort(key=lambda hw: hw[0] / hw[1])  # stable, like the official sorted()
        for eh, ew in _EXTRA_BUCKETS:
            if all(h / w != eh / ew for h, w in sizes):
                sizes.append((eh, ew))
        return sizes

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        return (
            f"ResolutionGroup(base_size={self.base_size}, step={self.step}, align={self.align}, "
            f"n={len(self)})"
        )

    def get(self, index: int) -> tuple[int, int]:
        """(height, width) of bucket `index`."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.buckets):
            raise ValueError(f"ratio index {index!r} out of range: this table has indexes 0..{len(self) - 1}")
        return self.buckets[index]

    def nearest(self, width: int, height: int) -> tuple[int, tuple[int, int]]:
        """Bucket whose H/W is closest to height/width (first on ties): (index, (height, width))."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got width={width} height={height}")
        ratio = height / width
        best, best_d = 0, abs(self.ratios[0] - ratio)
        for i in range(1, len(self.ratios)):
            d = abs(self.ratios[i] - ratio)
            if d < best_d:
                best, best_d = i, d
        return best, self.buckets[best]

    def parse_size(self, size: str | tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Snap a requested size to a bucket: (index, (height, width)).

        Accepts "HxW" (height first), "W:H" (a width:height ratio, as the Instruct code reads it),
        "<img_ratio_k>" (bucket k itself) or a (height, width) tuple. "auto" is not a size: the model
        picks the ratio, so callers handle it before calling this.
        """
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
                raise ValueError(f"image size tuple must be two ints (height, width), got {size!r}")
            h, w = size
            if h <= 0 or w <= 0:
                raise ValueError(f"image size must be positive, got height={h} width={w}")
            return self.nearest(w, h)
        if not isinstance(size, str):
            raise ValueError(
                f"image size must be a string or (height, width) tuple, got {type(size).__name__}"
            )
        if size.strip() == "auto":
            raise ValueError("image size 'auto' has no fixed bucket: the model predicts the ratio token")
        m = _RATIO_TOKEN.match(size)
        if m:
            k = int(m.group(1))
            return k, self.get(k)
        m = _HXW.match(size)
        if m:
            h, w = int(m.group(1)), int(m.group(2))
        else:
            m = _W_COLON_H.match(size)
            if not m:
                raise ValueError(
                    f"image size {size!r} is not 'HxW' (height first), 'W:H' or '<img_ratio_k>'"
                )
            w, h = int(m.group(1)), int(m.group(2))
        if h <= 0 or w <= 0:
            raise ValueError(f"image size {size!r} must have positive sides")
        return self.nearest(w, h)
