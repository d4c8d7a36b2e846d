"""FLOPs of HunyuanImage-3's image work outside the backbone, counted from the config's shapes: the VAE encode of a
condition image, the SigLIP2 tower over its patch rows, and the VAE decode of a generated image.

Why: the scheduler weighs encodes and decodes by what they cost (engine/scheduler.py), and pixels are a poor proxy
for it: every condition image also runs the whole vision tower over its padded patch rows (as much at 256x256 as at
1024x1024), and the VAE's mid attention grows with the square of its latent cells. Counted as 2 x the
multiply-adds of the convolutions, attention and linear layers, the way vae.py and vision.py run them; norms,
activations and the DC-AE shortcuts are left out (a few percent).
"""

from __future__ import annotations

import math
from typing import Any


def _conv(cin: int, cout: int, kernel: int, positions: float) -> float:
    """A Conv3d with a cubic kernel over `positions` output positions (frames x height x width)."""
    return 2.0 * cin * cout * kernel ** 3 * positions


def _resnet(cin: int, cout: int, positions: float) -> float:
    shortcut = _conv(cin, cout, 1, positions) if cin != cout else 0.0
    return _conv(cin, cout, 3, positions) + _conv(cout, cout, 3, positions) + shortcut


def _mid(channels: int, positions: float) -> float:
    """Two resnet blocks around single-head attention over every position (q, k, v, out projections; QK^T, AV)."""
    attn = 4 * _conv(channels, channels, 1, positions) + 4.0 * positions * positions * channels
    return 2 * _resnet(channels, channels, positions) + attn


def vae_encode_flops(vae: dict[str, Any], height: int, width: int) -> float:
    """One image of `height` x `width` pixels through the encoder (repeated to `ffactor_temporal` frames)."""
    channels = [int(c) for c in vae["block_out_channels"]]
    layers = int(vae["layers_per_block"])
    fs, ft = int(vae.get("ffactor_spatial", 16)), int(vae.get("ffactor_temporal", 4))
    n_spatial, first_temporal = int(math.log2(fs)), int(math.log2(fs // ft))
    match = bool(vae.get("downsample_match_channel", True))
    positions = float(ft * height * width)
    cin = channels[0]
    flops = _conv(int(vae.get("in_channels", 3)), cin, 3, positions)
    for i, cout in enumerate(channels):
        for _ in range(layers):
            flops += _resnet(cin, cout, positions)
            cin = cout
        if i < n_spatial and i < len(channels) - 1:
            factor = 8 if i >= first_temporal else 4
            nxt = channels[i + 1] if match else cin
            flops += _conv(cin, nxt // factor, 3, positions)
            positions /= factor
            cin = nxt
    return flops + _mid(cin, positions) + _conv(cin, 2 * int(vae["latent_channels"]), 3, positions)


def vae_decode_flops(vae: dict[str, Any], height: int, width: int) -> float:
    """The latents of one `height` x `width` image through the decoder (every decoded frame)."""
    channels = [int(c) for c in reversed(vae["block_out_channels"])]
    layers = int(vae["layers_per_block"])
    fs, ft = int(vae.get("ffactor_spatial", 16)), int(vae.get("ffactor_temporal", 4))
    n_spatial, n_temporal = int(math.log2(fs)), int(math.log2(ft))
    match = bool(vae.get("upsample_match_channel", True))
    positions = float((height // fs) * (width // fs))
    cin = channels[0]
    flops = _conv(int(vae["latent_channels"]), cin, 3, positions) + _mid(cin, positions)
    for i, cout in enumerate(channels):
        for _ in range(layers + 1):
            flops += _resnet(cin, cout, positions)
            cin = cout
        if (i < n_spatial or i < n_temporal) and i < len(channels) - 1:
            factor = 8 if i < n_temporal else 4
            nxt = channels[i + 1] if match else cin
            flops += _conv(cin, nxt * factor, 3, positions)
            positions *= factor
            cin = nxt
    return flops + _conv(cin, int(vae.get("out_channels", 3)), 3, positions)


def vit_flops(vit: dict[str, Any], num_patches: int) -> float:
    """The SigLIP2 tower over `num_patches` patch rows (padding rows included: the tower runs them all)."""
    d, ff, layers = int(vit["hidden_size"]), int(vit["intermediate_size"]), int(vit["num_hidden_layers"])
    patch, n = int(vit.get("patch_size", 16)), float(num_patches)
    embed = 2.0 * n * int(vit.get("num_channels", 3)) * patch * patch * d
    per_layer = 2.0 * n * (4 * d * d + 2 * d * ff) + 4.0 * n * n * d  # q, k, v, out; the MLP; QK^T and AV
    return embed + layers * per_layer


__all__ = ["vae_decode_flops", "vae_encode_flops", "vit_flops"]
