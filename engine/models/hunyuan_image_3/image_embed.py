"""Latent <-> token projections and scalar embedders of the HunyuanImage-3.0 image path.

* `TimestepEmbedder`: t (and guidance, MeanFlow r) -> a hidden-size vector; the model has several independent
  ones (`timestep_emb`, `time_embed`, `time_embed_2`, Distil: `guidance_emb`, `timestep_r_emb`).
* `UNetDown` (`patch_embed`): VAE latents -> one LLM token per latent pixel (patch size 1).
* `UNetUp` (`final_layer`): the image tokens' last hidden states -> predicted velocity in latent space.
Both UNet modules are conditioned on a timestep embedding through an adaptive GroupNorm ResBlock.
Parameter names equal the checkpoint keys minus the module prefix (`patch_embed.`, `final_layer.`, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import HunyuanImage3Config

# The official normalization helper is GroupNorm with 32 groups and PyTorch's default eps, at every width.
_GN_GROUPS = 32


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[N] scalars -> [N, dim] fp32 features [cos(t*f), sin(t*f)] (cos first), f_i = max_period^(-i/half).

    The frequencies are computed on the CPU in fp32 and then moved, as officially, so every device sees the
    same table; an odd `dim` gets one trailing zero.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid (256-d) -> Linear -> GELU (exact) -> Linear. Keys `mlp.0.*`, `mlp.2.*`."""

    def __init__(
        self,
        hidden_size: int,
        frequency_embedding_size: int = 256,
        max_period: float = 10000.0,
        out_size: int | None = None,
    ) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, out_size or hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] (any float dtype; upcast to fp32 for the sinusoid) -> [N, out_size] in the weights' dtype."""
        feats = timestep_sinusoid(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """Timestep-conditioned residual block (adaptive GroupNorm), 2-D, no up/down sampling.

    h = conv(SiLU(GN(x))); scale, shift = Linear(SiLU(emb)).chunk(2); h = GN(h)*(1+scale)+shift;
    h = conv(SiLU(h)); out = skip(x) + h. Index 2 of `out_layers` is the official (p=0) dropout slot.
    """

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(_GN_GROUPS, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(_GN_GROUPS, out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1.0 + scale) + shift
        h = self.out_layers[1:](h)
        return self.skip_connection(x) + h


class UNetDown(nn.Module):
    """`patch_embed`: latents [B, C, h, w] -> tokens [B, h*w, hidden] in raster order (patch size 1).

    `model.0` = Conv3x3 C -> patch_embed_hidden_dim; `model.1` = ResBlock(-> hidden, emb = time_embed(t)).
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, emb_channels: int) -> None:
        super().__init__()
        self.model = nn.ModuleList(
            [
                nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
                ResBlock(hidden_channels, emb_channels, out_channels),
            ]
        )

    @classmethod
    def from_config(cls, config: HunyuanImage3Config) -> UNetDown:
        _check_patch_size(config)
        hidden = config.hidden_size
        return cls(config.latent_channels, config.patch_embed_hidden_dim, hidden, hidden)

    def forward(self, latents: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.model[1](self.model[0](latents), t_emb)
        return x.flatten(2).transpose(1, 2)


class UNetUp(nn.Module):
    """`final_layer`: image-token hidden states [B, h*w, hidden] -> velocity [B, C, h, w] (patch size 1).

    `model.0` = ResBlock(hidden -> patch_embed_hidden_dim, emb = time_embed_2(t)), `model.1` = GN, SiLU,
    Conv3x3 -> C. It reads the backbone's last hidden state before `ln_f`.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, emb_channels: int) -> None:
        super().__init__()
        self.model = nn.ModuleList(
            [
                ResBlock(in_channels, emb_channels, hidden_channels),
                nn.Sequential(
                    nn.GroupNorm(_GN_GROUPS, hidden_channels),
                    nn.SiLU(),
                    nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
                ),
            ]
        )

    @classmethod
    def from_config(cls, config: HunyuanImage3Config) -> UNetUp:
        _check_patch_size(config)
        hidden = config.hidden_size
        return cls(hidden, config.patch_embed_hidden_dim, config.latent_channels, hidden)

    def forward(self, hidden: torch.Tensor, grid_hw: tuple[int, int], t_emb: torch.Tensor) -> torch.Tensor:
        h, w = grid_hw
        b, n, c = hidden.shape
        if n != h * w:
            raise ValueError(f"{n} image tokens do not form a {h}x{w} grid")
        x = hidden.transpose(1, 2).reshape(b, c, h, w)
        return self.model[1](self.model[0](x, t_emb))


def _check_patch_size(config: HunyuanImage3Config) -> None:
    if config.patch_size != 1:
        raise ValueError(f"patch_size {config.patch_size} is not supported (released checkpoints use 1)")
