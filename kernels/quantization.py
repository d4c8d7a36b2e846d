"""FP8 (float8_e4m3fn) weight quantisation for the MoE experts: quantise once at load, dequantise in torch.

Why: the routed + shared experts are ~97% of HunyuanImage-3.0's 83 B parameters; at one byte each instead of two
the backbone fits one 141 GB H200 (see `engine.memory_plan`). Only expert weights are quantised (attention,
router, embeddings, ViT and VAE keep their dtype), and after quantising no high-precision copy is kept.

Two scale layouts (both symmetric, amax / 448 per group, fp32 scales):
* ``channel`` - one scale per output channel (row of the [N, K] Linear weight): scale [..., N];
* ``block``   - one scale per 128x128 tile (DeepSeek-V3 style, what FlashInfer's block-scale MoE reads):
  scale [..., ceil(N/128), ceil(K/128)].

`Fp8Weight` holds the fp8 tensor and its scales; `dequantize()` is the reference (used by the CPU path and the
tests) and the fast paths in `kernels.moe` read `qweight` / `scale` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .impl_names import QUANTIZATIONS

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_SCALE_LAYOUTS = ("channel", "block")
FP8_BLOCK = (128, 128)
_MIN_SCALE = 1e-12  # an all-zero row / block gets this scale instead of 0 (no division by zero)


@dataclass(frozen=True)
class Fp8Weight:
    """An fp8 weight [..., N, K] and its fp32 scales (per output channel [..., N] or per block [..., N/b, K/b])."""

    qweight: Tensor
    scale: Tensor
    block: tuple[int, int] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dim(self) -> int:
        return self.qweight.dim()

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, index: int | slice) -> Fp8Weight:
        """One expert (or a range) of a stacked [E, N, K] weight."""
        return Fp8Weight(self.qweight[index], self.scale[index], self.block)

    def __len__(self) -> int:
        return int(self.qweight.shape[0])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_fp8(self.qweight, self.scale, dtype, self.block)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def quantize_fp8(w: Tensor, layout: str = "channel", block: tuple[int, int] = FP8_BLOCK) -> Fp8Weight:
    """[..., N, K] float weight -> `Fp8Weight` (amax per output channel or per block, computed in fp32)."""
    if layout not in FP8_SCALE_LAYOUTS:
        raise ValueError(f"unknown FP8 scale layout {layout!r}; allowed: {', '.join(FP8_SCALE_LAYOUTS)}")
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"quantize_fp8 needs a floating [..., N, K] weight, got {w.dtype} {tuple(w.shape)}")
    wf = w.to(torch.float32)
    if layout == "channel":
        scale = (wf.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
        q = (wf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return Fp8Weight(q, scale, None)
    bn, bk = block
    n, k = wf.shape[-2:]
    pn, pk = _ceil_div(n, bn) * bn - n, _ceil_div(k, bk) * bk - k
    padded = torch.nn.functional.pad(wf, (0, pk, 0, pn)) if (pn or pk) else wf
    lead = padded.shape[:-2]
    tiles = padded.reshape(*lead, _ceil_div(n, bn), bn, _ceil_div(k, bk), bk)
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=_MIN_SCALE)  # [..., N/bn, K/bk]
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(padded.shape)[..., :n, :k].to(FP8_DTYPE).contiguous()
    return Fp8Weight(q, scale, (bn, bk))


def dequantize_fp8(
    qweight: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32, block: tuple[int, int] | None = None
) -> Tensor:
    """The reference dequantisation: fp8 value * its scale, computed in fp32, returned in `dtype`."""
    q = qweight.to(torch.float32)
    if block is None:
        return (q * scale.unsqueeze(-1)).to(dtype)
    bn, bk = block
    n, k = q.shape[-2:]
    full = scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return (q * full).to(dtype)


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-row (per-token) activation quantisation for the scaled-GEMM fast paths: (x_fp8, scale [M, 1])."""
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def parse_quantization(name: str | None) -> str | None:
    """``None`` / ``"none"`` -> None; ``"fp8"`` / ``"fp8_block"`` (any case, ``-`` for ``_``) -> that name; anything
    else a clear ValueError."""
    if name is None:
        return None
    key = str(name).strip().lower().replace("-", "_")
    if key in ("", "none"):
        return None
    if key not in QUANTIZATIONS:
        raise ValueError(f"quantization={name!r} is invalid; allowed: {', '.join(QUANTIZATIONS)}")
    return key


def fp8_layout(quantization: str | None) -> str | None:
    """The scale layout a quantization name asks for ("channel" / "block"), None when unquantised."""
    q = parse_quantization(quantization)
    return None if q is None else ("block" if q == "fp8_block" else "channel")


# ------------------------------------------------------------------------------ quantised Linear weights in modules
SCALE_SUFFIX = "_scale"
"""A quantised nn.Linear keeps its fp8 `weight` and registers `weight_scale` (fp32) beside it; a block-scaled one
also carries the plain attribute `fp8_block`."""


def attach_fp8(linear: nn.Module, q: Fp8Weight) -> None:
    """Make `linear` hold `q`: fp8 `weight`, fp32 `weight_scale` (no high-precision copy remains referenced)."""
    linear.weight = nn.Parameter(q.qweight, requires_grad=False)
    linear.register_parameter("weight" + SCALE_SUFFIX, nn.Parameter(q.scale, requires_grad=False))
    linear.fp8_block = q.block


def linear_weight(linear: nn.Module) -> Tensor | Fp8Weight:
    """A Linear's weight as the MoE kernels take it: the plain tensor, or `Fp8Weight` when quantised."""
    scale = getattr(linear, "weight" + SCALE_SUFFIX, None)
    if scale is None:
        return linear.weight
    return Fp8Weight(linear.weight, scale, getattr(linear, "fp8_block", None))


def stack_linear_weights(linears: list[nn.Module]) -> Tensor | Fp8Weight:
    """Stack the Linears' weights (and fp8 scales) into [E, ...] tensors and re-point every Linear at its slice, so
    the stack is the only copy (parameter names and `state_dict` keys unchanged)."""
    with torch.no_grad():
        w = torch.stack([lin.weight.detach() for lin in linears])
        for i, lin in enumerate(linears):
            lin.weight.data = w[i]
        scales = [getattr(lin, "weight" + SCALE_SUFFIX, None) for lin in linears]
        if scales[0] is None:
            return w
        s = torch.stack([t.detach() for t in scales])
        for i, lin in enumerate(linears):
            getattr(lin, "weight" + SCALE_SUFFIX).data = s[i]
    return Fp8Weight(w, s, getattr(linears[0], "fp8_block", None))


def storage_ptr(w: Tensor | Fp8Weight) -> int:
    return (w.qweight if isinstance(w, Fp8Weight) else w).data_ptr()
