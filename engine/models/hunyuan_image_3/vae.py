"""The HunyuanImage-3.0 VAE: a 3-D conv KL autoencoder (16x spatial, 4x temporal) with DC-AE resampling.

Why our own module and not a diffusers class (measured against the golden tensors): no diffusers release up
to 0.42.1 computes this network. `AutoencoderKLHunyuanVideo15` / `AutoencoderKLHunyuanImageRefiner` share
the module tree, but use RMS norms without bias (42 GroupNorm biases of the tiny checkpoint have no slot),
causal replicate padding and a first-frame special case; as shipped they miss the golden tensors by 8.1
(posterior mean), 9.9 (logvar) and 4.2 (decoder output). Patching four private behaviours brings them to
~6e-6, which is not a dependency worth keeping. This file implements the official behaviour directly and
keeps the official parameter names (checkpoint keys minus `vae.`), so the weights load strictly, no renames.

Behaviour, all of it official:
* every norm is GroupNorm(32, eps 1e-6) with weight and bias; activation x*sigmoid(x) (F.silu); every 3x3x3 conv
  uses symmetric zero padding (not causal);
* DC-AE downsample = conv to C_out/f channels then space(-time)-to-depth, plus the input's space-to-depth
  averaged over channel groups; upsample = conv to f*C_out then depth-to-space, plus the input repeated
  along channels and rearranged the same way (f = 8 with time, 4 without); channel order (r_t, r_h, r_w, c),
  outermost first;
* an image is a clip of 4 identical frames; its latent has T = 1; decoding T = 1 gives 4 frames and the
  pipeline keeps the last one;
* the VAE never scales: callers multiply samples by `scaling_factor` and divide before decoding.
Tiling and slicing (off by default officially) are left out: an untiled pass is the official result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_GN_GROUPS = 32
_GN_EPS = 1e-6


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GN_GROUPS, channels, eps=_GN_EPS, affine=True)


def _is_channels_last(x: torch.Tensor) -> bool:
    """Stored channels-last (and not also plain contiguous, as a 1-channel or 1-pixel tensor is)."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


# elements of the [N, C] channels-last matrix summed per chunk (4 MiB of fp32): a chunk's square stays in cache
_STATS_CHUNK_ELEMS = 1 << 20


def _group_norm_channels_last(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of a channels-last tensor, as accurate as the contiguous kernel, and kept channels-last.

    Why not `norm(x)`: PyTorch's channels-last CPU GroupNorm kernel is off by up to 3e-3 (a one-pass fp32
    variance; measured against fp64 on a 1x32x4x768x1024 activation, where the contiguous kernel is off by 6e-7),
    and converting the layout costs two copies of the VAE's largest tensors. Here each channel's sum and sum of
    squares are cascade sums in fp32 over cache-sized chunks (the squares written into one reused buffer),
    added up in fp64; the normalisation is one multiply-add per element with per-channel scale and shift
    (docs/decisions.md, "VAE: channels-last on CPU").
    """
    b, c = x.shape[:2]
    g = norm.num_groups
    rows = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # a view: channels-last storage is [B, T*H*W, C]
    n = rows.shape[1]
    step = max(1, _STATS_CHUNK_ELEMS // c)
    work = torch.float32 if x.dtype == torch.float32 else torch.float64
    square = torch.empty(min(step, n), c, dtype=work, device=x.device)
    s1 = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s1)
    for i in range(b):
        for start in range(0, n, step):
            part = rows[i, start:start + step].to(work)
            m = part.shape[0]
            s1[i] += part.sum(dim=0).double()
            torch.mul(part, part, out=square[:m])
            s2[i] += square[:m].sum(dim=0).double()
    count = n * (c // g)
    mean = s1.view(b, g, c // g).sum(-1) / count
    var = (s2.view(b, g, c // g).sum(-1) / count - mean * mean).clamp_min(0.0)
    rstd = (var + norm.eps).rsqrt()
    scale = norm.weight.double().view(1, g, c // g) * rstd[..., None]  # the VAE's norms are all affine (`_norm`)
    shift = norm.bias.double().view(1, g, c // g) - mean[..., None] * scale
    shape = (b, c, 1, 1, 1)
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """The chunked channels-last statistics on CPU (inference only); elsewhere torch's GroupNorm on a contiguous
    tensor, which CUDA autocast runs in fp32 as officially (the DC-AE resamples leave channels-last storage on any
    device, and the chunked loop would run fp16 statistics with thousands of small kernels on a GPU)."""
    if x.device.type == "cpu" and _is_channels_last(x) and not x.requires_grad:
        return _group_norm_channels_last(norm, x)
    return norm(x.contiguous())


def _norm_swish(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """swish(GroupNorm(x)): x * sigmoid(x) as ONE fused op, in place on the fresh normalised tensor (the official
    code multiplies; same values within float rounding, docs/decisions.md, "VAE: F.silu, oneDNN conv3d")."""
    return F.silu(_group_norm(norm, x), inplace=True)


# below about this many input elements PyTorch's own choice is as fast (measured: a 32x1x64x48 input)
ONEDNN_MIN_NUMEL = 1 << 20


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters, same result within float rounding) that always takes oneDNN on CPU.

    PyTorch's CPU heuristic sends a batch-1 conv3d whose B*C*T*H is small (the 3-channel first conv, every
    level after the first downsample) to `slow_conv3d`, an im2col GEMM that materialises a 27x input copy:
    up to 10x slower here than the oneDNN kernel it uses for larger batches (bench/vae_speed.py;
    docs/decisions.md, "VAE: F.silu, oneDNN conv3d").
    """

    def conv(self, x: torch.Tensor, padding: tuple[int, int, int] | None = None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self.padding if padding is None else padding)
        weight = self.weight if weight is None else weight
        channels_last = _is_channels_last(x)
        if x.device.type == "cpu" and x.dtype == torch.float32 and \
                (channels_last or x.numel() >= ONEDNN_MIN_NUMEL) and \
                torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and \
                weight.dtype == x.dtype:
            # oneDNN keeps a channels-last input channels-last (its fastest layout here, ~1.4x on the
            # full-resolution 32-channel convs; docs/decisions.md, "VAE: channels-last on CPU")
            return torch.ops.aten.mkldnn_convolution(
                x if channels_last else x.contiguous(), weight, self.bias, pad, list(self.stride),
                list(self.dilation), self.groups
            )
        return F.conv3d(x, weight, self.bias, self.stride, pad, self.dilation, self.groups)

    def can_fold_pointwise(self, x: torch.Tensor) -> bool:
        """Whether `conv_plus_pointwise` applies: a centred odd kernel (the centre tap reads the output's own
        position), and an fp32 channels-last CPU input (the fast path, where it was measured; a fp16/bf16 weight
        would round the sum)."""
        return x.device.type == "cpu" and x.dtype == torch.float32 and _is_channels_last(x) and self.groups == 1 and \
            all(k % 2 == 1 and p == k // 2 and s == 1 and d == 1 for k, p, s, d in
                zip(self.kernel_size, self.padding, self.stride, self.dilation))

    def conv_plus_pointwise(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """conv(x) + mix applied to each position's channels ([C_out, C_in]), as ONE conv: mix is added to the
        centre tap of the kernel. The DC-AE shortcuts are such maps (a channel-group mean, a channel repeat);
        folding them saves a full-size rearranged copy, a reduction and an add per resample
        (docs/decisions.md, "VAE: DC-AE shortcuts folded into the conv")."""
        weight = self.weight.clone()
        kt, kh, kw = self.kernel_size
        weight[:, :, kt // 2, kh // 2, kw // 2] += mix.to(weight.dtype)
        return self.conv(x, weight=weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_repeated_frame(self, frame: torch.Tensor, frames: int) -> torch.Tensor:
        """The conv of `frame` [B, C, 1, H, W] repeated `frames` times, computing each distinct output frame once.

        With symmetric zero padding of 1 in time (kernel 3), output frame t of identical inputs depends only on
        whether t is the first or the last frame: the conv of the explicitly zero-padded clip
        [0, f, ..., f, 0] (at most 3 copies of f) without temporal padding gives exactly those distinct
        frames (first, middle, last), and the middle one is repeated.
        """
        if self.kernel_size[0] != 3 or self.padding[0] != 1 or self.stride[0] != 1 or frames < 1:
            return self.conv(frame.expand(-1, -1, frames, -1, -1))
        distinct = min(frames, 3)
        zero = torch.zeros_like(frame)
        clip = torch.cat([zero, *([frame] * distinct), zero], dim=2)
        out = self.conv(clip, (0, self.padding[1], self.padding[2]))  # [B, C', distinct, H, W]
        if frames <= 3:
            return out
        # one copy into a tensor of the input's layout (a cat with an expanded middle would come out plain
        # contiguous, and slowly, for a channels-last input)
        b, c, _, h, w = out.shape
        fmt = torch.channels_last_3d if _is_channels_last(out) else torch.contiguous_format
        full = torch.empty((b, c, frames, h, w), dtype=out.dtype, device=out.device, memory_format=fmt)
        full[:, :, :1] = out[:, :, :1]
        full[:, :, 1:-1] = out[:, :, 1:2]
        full[:, :, -1:] = out[:, :, 2:]
        return full


def _conv(cin: int, cout: int, kernel: int = 3) -> Conv3d:
    return Conv3d(cin, cout, kernel_size=kernel, stride=1, padding=kernel // 2)


def _space_to_depth(x: torch.Tensor, rt: int) -> torch.Tensor:
    """[B, C, T*rt, H*2, W*2] -> [B, rt*2*2*C, T, H, W], channel order (rt, rh, rw, c), stored channels-last.

    Built on the [B, T, H, W, C] view, one copy whichever layout x has: channels-last input is that view's
    storage, and the result's (rt, rh, rw, c) channels come out innermost, which is channels-last storage.
    """
    b, c, t, h, w = x.shape
    y = x.permute(0, 2, 3, 4, 1).reshape(b, t // rt, rt, h // 2, 2, w // 2, 2, c)
    y = y.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, t // rt, h // 2, w // 2, rt * 4 * c)
    return y.permute(0, 4, 1, 2, 3)


def _depth_to_space(x: torch.Tensor, rt: int) -> torch.Tensor:
    """[B, rt*2*2*C, T, H, W] -> [B, C, T*rt, H*2, W*2], the inverse of `_space_to_depth`, stored channels-last."""
    b, c4, t, h, w = x.shape
    c = c4 // (rt * 4)
    y = x.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, rt, 2, 2, c)
    y = y.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t * rt, h * 2, w * 2, c)
    return y.permute(0, 4, 1, 2, 3)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-conv, plus the input (through a 1x1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = _conv(cin, cout)
        self.norm2 = _norm(cout)
        self.conv2 = _conv(cout, cout)
        if cin != cout:
            self.nin_shortcut = _conv(cin, cout, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_norm_swish(self.norm1, x))
        h = self.conv2(_norm_swish(self.norm2, h))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x)  # h is this block's own fresh tensor; x + h, same values


class AttnBlock(nn.Module):
    """Single-head self-attention over all T*H*W positions (head dim = C, no mask), with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = _conv(channels, channels, kernel=1)
        self.k = _conv(channels, channels, kernel=1)
        self.v = _conv(channels, channels, kernel=1)
        self.proj_out = _conv(channels, channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = _group_norm(self.norm, x)

        def tokens(m: nn.Module) -> torch.Tensor:  # [B, C, T, H, W] -> [B, 1, T*H*W, C]
            return m(y).reshape(b, 1, c, t * h * w).transpose(-1, -2).contiguous()

        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.transpose(-1, -2).reshape(b, c, t, h, w)
        return x + self.proj_out(out)


class DownsampleDCAE(nn.Module):
    """2x spatial (optionally 2x temporal) downsample: conv + space-to-depth, plus an averaged shortcut."""

    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        self.rt = 2 if temporal else 1
        factor = self.rt * 4
        if cout % factor or (factor * cin) % cout:
            raise ValueError(f"DC-AE downsample {cin}->{cout} with factor {factor} does not divide evenly")
        self.conv = _conv(cin, cout // factor)
        self.group = factor * cin // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin = x.shape[1]
        if cin % self.group == 0 and self.conv.can_fold_pointwise(x):
            # Each shortcut group is `group` channels of ONE input position (cin % group == 0), so the shortcut
            # is space-to-depth of a per-position mean of channel groups: output channel o of the conv takes the
            # mean of input channels o*group .. o*group+group-1 (see Conv3d.conv_plus_pointwise)
            mix = torch.zeros(cin // self.group, cin, dtype=torch.float64)
            mix[torch.arange(cin) // self.group, torch.arange(cin)] = 1.0 / self.group
            return _space_to_depth(self.conv.conv_plus_pointwise(x, mix), self.rt)
        h = _space_to_depth(self.conv(x), self.rt)
        s = _space_to_depth(x, self.rt)
        b, _, t, hh, ww = s.shape
        return h + s.reshape(b, h.shape[1], self.group, t, hh, ww).mean(dim=2)


def _repeat_map(cin: int, repeats: int) -> torch.Tensor:
    """The [cin*repeats, cin] 0/1 map of `repeat_interleave(repeats, dim=1)` on one position's channels."""
    mix = torch.zeros(cin * repeats, cin, dtype=torch.float64)
    mix[torch.arange(cin * repeats), torch.arange(cin * repeats) // repeats] = 1.0
    return mix


class UpsampleDCAE(nn.Module):
    """2x spatial (and optionally 2x temporal) upsample: conv + depth-to-space, plus a repeated shortcut."""

    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        self.rt = 2 if temporal else 1
        factor = self.rt * 4
        if (factor * cout) % cin:
            raise ValueError(f"DC-AE upsample {cin}->{cout} with factor {factor} does not divide evenly")
        self.conv = _conv(cin, cout * factor)
        self.repeats = factor * cout // cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.can_fold_pointwise(x):  # the shortcut repeats each channel: a 0/1 map, folded
            return _depth_to_space(self.conv.conv_plus_pointwise(x, _repeat_map(x.shape[1], self.repeats)), self.rt)
        h = _depth_to_space(self.conv(x), self.rt)
        s = _depth_to_space(x.repeat_interleave(self.repeats, dim=1), self.rt)
        return h + s


def _stage(blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> nn.Module:
    """A level container with the official attribute names (`block`, `downsample`/`upsample`)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Pixels [B, 3, T, H, W] -> posterior parameters [B, 2z, T/ft, H/fs, W/fs]."""

    def __init__(
        self,
        in_channels: int,
        z_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        ffactor_spatial: int,
        ffactor_temporal: int,
        match_channel: bool = True,
    ) -> None:
        super().__init__()
        if channels[-1] % (2 * z_channels):
            raise ValueError(f"last encoder width {channels[-1]} is not a multiple of 2*latent_channels")
        n_spatial = int(math.log2(ffactor_spatial))
        first_temporal = int(math.log2(ffactor_spatial // ffactor_temporal))
        self.z_channels = z_channels
        self.conv_in = _conv(in_channels, channels[0])
        self.down = nn.ModuleList()
        cin = channels[0]
        for i, cout in enumerate(channels):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
            resample = None
            if i < n_spatial:
                if i == len(channels) - 1:
                    raise ValueError("not enough encoder levels for the spatial downsampling factor")
                nxt = channels[i + 1] if match_channel else cin
                resample = DownsampleDCAE(cin, nxt, temporal=i >= first_temporal)
                cin = nxt
            self.down.append(_stage(blocks, resample, "downsample"))
        self.mid = _mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = _conv(cin, 2 * z_channels)

    def forward(self, x: torch.Tensor, repeat_frames: int = 1) -> torch.Tensor:
        """repeat_frames > 1: x is ONE frame [B, C, 1, H, W] standing for that many identical frames (an image:
        the first conv runs on its distinct output frames only, `Conv3d.forward_repeated_frame`)."""
        if repeat_frames > 1:
            if x.shape[2] != 1:
                raise ValueError(f"repeat_frames needs a single frame, got {x.shape[2]}")
            h = self.conv_in.forward_repeated_frame(x, repeat_frames)
        else:
            h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        b, c, t, hh, ww = h.shape
        shortcut = h.reshape(b, 2 * self.z_channels, c // (2 * self.z_channels), t, hh, ww).mean(dim=2)
        # the posterior leaves the VAE plain contiguous (callers chunk and view it)
        return (self.conv_out(_norm_swish(self.norm_out, h)) + shortcut).contiguous()


class Decoder(nn.Module):
    """Latents [B, z, T, h, w] -> pixels [B, 3, T*ft, h*fs, w*fs]."""

    def __init__(
        self,
        z_channels: int,
        out_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        ffactor_spatial: int,
        ffactor_temporal: int,
        match_channel: bool = True,
    ) -> None:
        super().__init__()
        if channels[0] % z_channels:
            raise ValueError(f"first decoder width {channels[0]} is not a multiple of latent_channels")
        n_spatial = int(math.log2(ffactor_spatial))
        n_temporal = int(math.log2(ffactor_temporal))
        self.z_repeats = channels[0] // z_channels
        cin = channels[0]
        self.conv_in = _conv(z_channels, cin)
        self.mid = _mid(cin)
        self.up = nn.ModuleList()
        for i, cout in enumerate(channels):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
            resample = None
            if i < n_spatial or i < n_temporal:
                if i == len(channels) - 1:
                    raise ValueError("not enough decoder levels for the upsampling factors")
                nxt = channels[i + 1] if match_channel else cin
                resample = UpsampleDCAE(cin, nxt, temporal=i < n_temporal)
                cin = nxt
            self.up.append(_stage(blocks, resample, "upsample"))
        self.norm_out = _norm(cin)
        self.conv_out = _conv(cin, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.conv_in.can_fold_pointwise(z):
            h = self.conv_in.conv_plus_pointwise(z, _repeat_map(z.shape[1], self.z_repeats))
        else:
            h = self.conv_in(z) + z.repeat_interleave(self.z_repeats, dim=1)
        h = _run_mid(self.mid, h)
        for level in self.up:
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_norm_swish(self.norm_out, h)).contiguous()


class DiagonalGaussian:
    """The encoder's posterior: mean and log-variance (clamped to [-30, 20]) along the channel axis."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn like diffusers' `randn_tensor` (what the official code calls).

        eps has the posterior's dtype and is drawn on the generator's device (CPU generator -> CPU draw, then
        moved), one draw for the whole batch; a list of generators draws one row per generator, except a list
        of one, which counts as a single generator.
        """
        shape, dtype, device = self.mean.shape, self.mean.dtype, self.mean.device
        if isinstance(generator, (list, tuple)):
            if len(generator) == 1:
                generator = generator[0]
            else:
                if len(generator) != shape[0]:
                    raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
                eps = torch.cat(
                    [
                        torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
                        for g in generator
                    ]
                )
                return self.mean + self.std * eps
        rand_device = device if generator is None else generator.device
        if rand_device.type != device.type and rand_device.type != "cpu":
            raise ValueError(f"generator on {rand_device} cannot draw noise for tensors on {device}")
        eps = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
        return self.mean + self.std * eps




def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """The official CUDA autocast; it is a no-op off CUDA (the official CPU run is plain fp32)."""
    if device.type != "cuda" or dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


class AutoencoderKLConv3D(nn.Module):
    """The VAE, built from the config's `vae` dict; parameter names = checkpoint keys minus `vae.`."""

    def __init__(self, vae_cfg: dict[str, Any]) -> None:
        super().__init__()
        channels = [int(c) for c in vae_cfg["block_out_channels"]]
        self.latent_channels = int(vae_cfg["latent_channels"])
        self.ffactor_spatial = int(vae_cfg.get("ffactor_spatial", 16))
        self.ffactor_temporal = int(vae_cfg.get("ffactor_temporal", 4))
        # On CPU the VAE runs channels-last (oneDNN's fast layout), which also enables the folded DC-AE shortcuts
        # (docs/decisions.md, "VAE: channels-last on CPU"). Elsewhere tensors stay as given: the GPU paths have not
        # been measured in that layout. False = the plain formulas everywhere (tests compare the two).
        self.channels_last_on_cpu = True
        self.scaling_factor = vae_cfg.get("scaling_factor")
        self.shift_factor = vae_cfg.get("shift_factor")
        layers = int(vae_cfg["layers_per_block"])
        self.encoder = Encoder(
            int(vae_cfg.get("in_channels", 3)),
            self.latent_channels,
            channels,
            layers,
            self.ffactor_spatial,
            self.ffactor_temporal,
            bool(vae_cfg.get("downsample_match_channel", True)),
        )
        self.decoder = Decoder(
            self.latent_channels,
            int(vae_cfg.get("out_channels", 3)),
            list(reversed(channels)),
            layers,
            self.ffactor_spatial,
            self.ffactor_temporal,
            bool(vae_cfg.get("upsample_match_channel", True)),
        )

    def _preferred_layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_on_cpu and x.device.type == "cpu":
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, autocast_dtype: torch.dtype | None = torch.float16
    ) -> DiagonalGaussian:
        """Images [B, 3, H, W] (or clips [B, 3, T, H, W]) in [-1, 1] -> posterior over [B, z, T', H/16, W/16].

        A single frame is repeated to `ffactor_temporal` frames (latent T' = 1), as officially. Clips must
        have a multiple of `ffactor_temporal` frames, but not exactly that many (the official encoder's rule).
        `autocast_dtype` is applied on CUDA only (official: config `vae_autocast_dtype`, fp16).
        """
        x = images if images.dim() == 5 else images.unsqueeze(2)
        if x.dim() != 5:
            raise ValueError(f"expected [B,3,H,W] or [B,3,T,H,W], got shape {tuple(images.shape)}")
        ft = self.ffactor_temporal
        repeat = ft if x.shape[2] == 1 else 1  # the encoder repeats the frame itself (no 4x copy)
        if repeat == 1 and (x.shape[2] == ft or x.shape[2] % ft):
            raise ValueError(f"clip length {x.shape[2]} must be 1 or a multiple of {ft} other than {ft}")
        fs = self.ffactor_spatial
        if x.shape[-1] % fs or x.shape[-2] % fs:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {fs}")
        with _autocast(x.device, autocast_dtype):
            return DiagonalGaussian(self.encoder(self._preferred_layout(x), repeat_frames=repeat))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, autocast_dtype: torch.dtype | None = torch.float16) -> torch.Tensor:
        """Unscaled latents [B, z, h, w] or [B, z, T, h, w] -> every decoded frame [B, 3, T*4, 16h, 16w].

        `autocast_dtype` is applied on CUDA only (the official pipeline decodes under fp16 autocast).
        """
        if z.dim() == 4:
            z = z.unsqueeze(2)
        with _autocast(z.device, autocast_dtype):
            return self.decoder(self._preferred_layout(z))

    def decode_image(
        self, z: torch.Tensor, autocast_dtype: torch.dtype | None = torch.float16
    ) -> torch.Tensor:
        """Unscaled image latents [B, z, h, w] or [B, z, 1, h, w] -> the last decoded frame [B, 3, H, W].

        The official pipeline keeps the last of the 4 frames; they differ, so the choice matters.
        """
        return self.decode(z, autocast_dtype)[:, :, -1]
