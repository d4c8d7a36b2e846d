"""Generalised 2-D rotary position embedding (HunyuanImage-3.0 "rope_type 2d").

Every token carries two integer positions (y, x). The head_dim/2 rotary frequencies alternate between the
axes (even slot -> y, odd slot -> x); the head_dim/2 angles are duplicated ([a, a]) and applied with the
rotate-half convention. Text tokens have y == x == sequence index, which makes this exactly ordinary 1-D
RoPE, so one code path serves text, condition images and the generated image. Positions are explicit per
token (not derived from the KV index) so that chunked prefill, decode and diffusion steps all feed the same
values.

`apply_rope` is the one selection point and is torch-only on purpose: FlashInfer's RoPE kernels take one scalar
position per token (or a per-token cos/sin cache) and write bf16 in place, while the official order keeps the
rotated q/k in fp32 until after the qk-norm; an in-kernel variant would change numerics for no measurable
gain next to attention and the MoE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """The head_dim/2 inverse frequencies theta^(-2j/head_dim), fp32, in the official op order."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    return 1.0 / (float(theta) ** exponent)


def positions_2d(
    seq_len: int,
    image_blocks: Sequence[Sequence[int]] = (),
    device: torch.device | str | None = None,
) -> Tensor:
    """(y, x) positions [seq_len, 2] for one sequence whose 2-D image runs are `image_blocks`.

    Each block is (start, stop, h, w): the run occupies sequence indices [start, stop) and its first h*w
    tokens form a raster h x w grid centred in that 1-D range:
        y = start + (h*w - h)/2 + r,  x = start + (h*w - w)/2 + c,  truncated toward zero.
    Tokens of the run past h*w (padded ViT rows) and all other tokens keep y = x = sequence index.
    """
    pos = torch.arange(seq_len, dtype=torch.long).unsqueeze(1).repeat(1, 2)
    for block in image_blocks:
        start, stop, h, w = (int(v) for v in block)
        if not 0 <= start <= stop <= seq_len:
            raise ValueError(f"image block {tuple(block)} lies outside a sequence of {seq_len} tokens")
        if h * w > stop - start:
            raise ValueError(f"image block {tuple(block)}: grid {h}x{w} exceeds its {stop - start} tokens")
        r = torch.arange(h, dtype=torch.long).repeat_interleave(w)
        c = torch.arange(w, dtype=torch.long).repeat(h)
        pos[start : start + h * w, 0] = start + (h * w - h) // 2 + r
        pos[start : start + h * w, 1] = start + (h * w - w) // 2 + c
    return pos.to(device) if device is not None else pos


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [N, head_dim] (fp32) for integer positions [N, 2] = (y, x)."""
    if positions.dim() != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must be [N, 2] (y, x), got {tuple(positions.shape)}")
    inv_freq = rope_inv_freq(head_dim, theta, device=positions.device).reshape(1, head_dim // 4, 2)
    # slot j of the head_dim/2 angles uses y for even j and x for odd j
    angles = (positions.long().unsqueeze(1) * inv_freq).reshape(positions.shape[0], head_dim // 2)
    angles = angles.repeat(1, 2)
    return torch.cos(angles), torch.sin(angles)


def rotate_half(x: Tensor) -> Tensor:
    """Pair dimension i with i + D/2: [x1, x2] -> [-x2, x1]."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k [N, heads, D] by per-token cos/sin [N, D].

    cos/sin stay fp32, so with bf16 inputs the result is fp32 (the official code does the same and casts only
    after the qk-norm); callers cast when they need the model dtype.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
