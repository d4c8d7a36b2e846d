"""Input embeddings of a token range: token embeddings with image, timestep and guidance slots filled.

Shared by the reference pipeline and the engine's worker, so both place condition-image features,
`<timestep>` / `<guidance>` / `<timestep_r>` embeddings and the generated image's latent tokens exactly
alike. Only the slots that fall inside [start, end) are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .image_processing import VaeCondImage, VitCondImage
from .model import HunyuanImage3ForCausalMM
from .prompt import BuiltPrompt, CondImageLayout, cond_layout
from .vae import DiagonalGaussian


@dataclass
class CondImage:
    """A condition image after preprocessing and encoding: everything its token block needs."""

    layout: CondImageLayout
    vae: VaeCondImage
    vit: VitCondImage | None
    latents: Tensor  # [C, h, w] scaled posterior sample
    vae_tokens: Tensor  # [h*w, H]
    vit_tokens: Tensor | None  # [P, H]


@dataclass
class EncodedImage:
    """The request-independent encoder outputs of one condition image (what the encoder cache holds)."""

    posterior: Tensor  # [1, 2C, T, h, w]: the VAE posterior's mean and clamped log-variance
    vit_tokens: Tensor | None  # [P, H] aligned SigLIP2 embeddings (padding kept)

    @property
    def nbytes(self) -> int:
        n = self.posterior.numel() * self.posterior.element_size()
        if self.vit_tokens is not None:
            n += self.vit_tokens.numel() * self.vit_tokens.element_size()
        return n


@torch.no_grad()
def encode_images(
    model: HunyuanImage3ForCausalMM, vaes: Sequence[VaeCondImage], vits: Sequence[VitCondImage | None]
) -> list[EncodedImage]:
    """Encode condition images of ONE bucket in one VAE call and one ViT call (the batch is the unit the encoder
    stage schedules); no random draw happens here."""
    if not vaes:
        return []
    dev = model.device
    post = model.encode_condition_vae(torch.stack([v.pixels for v in vaes]).to(dev))
    params = torch.cat([post.mean, post.logvar], dim=1)
    vit_tokens: list[Tensor | None] = [None] * len(vaes)
    if all(t is not None for t in vits):
        toks = model.condition_vit_tokens(
            torch.stack([t.pixel_values for t in vits]).to(dev),
            torch.stack([t.pixel_attention_mask for t in vits]).to(dev),
            torch.stack([t.spatial_shapes for t in vits]).to(dev),
        )
        vit_tokens = list(toks.unbind(0))
    elif any(t is not None for t in vits):
        raise ValueError("encode_images: a batch mixes images with and without ViT inputs")
    return [EncodedImage(params[i : i + 1], vit_tokens[i]) for i in range(len(vaes))]


@torch.no_grad()
def condition_from_encoded(
    model: HunyuanImage3ForCausalMM, encoded: EncodedImage, vae: VaeCondImage, vit: VitCondImage | None,
    generator: torch.Generator,
) -> CondImage:
    """A request's condition image: its own posterior sample (from its seeded generator, in input order, as
    officially) scaled to the model's latent space, and both token runs."""
    dev = model.device
    post = DiagonalGaussian(encoded.posterior)
    latents = model.scale_latents(post.sample(generator))[:, :, 0].float()  # [1, C, h, w]
    vae_tokens = model.image_tokens(latents, torch.zeros(1, device=dev))[0]
    layout = cond_layout(vae, vit, model.config.latent_downsample)
    return CondImage(layout, vae, vit, latents[0], vae_tokens, encoded.vit_tokens)


@torch.no_grad()
def encode_condition(
    model: HunyuanImage3ForCausalMM, vae: VaeCondImage, vit: VitCondImage | None, generator: torch.Generator
) -> CondImage:
    """VAE-encode (posterior sample from `generator`, consumed in input order) and embed both token runs."""
    (encoded,) = encode_images(model, [vae], [vit])
    return condition_from_encoded(model, encoded, vae, vit, generator)


@dataclass
class GenInputs:
    """The generated image's inputs at one denoising step."""

    latents: Tensor  # [C, h, w]
    t: float  # 1000 * sigma
    r: float | None = None  # meanflow interval end (Distil)
    guidance: float | None = None  # embedded guidance (Distil), already bf16-rounded


@torch.no_grad()
def assemble_embeddings(
    model: HunyuanImage3ForCausalMM,
    layout: BuiltPrompt,
    ids: Sequence[int],
    conds: Sequence[CondImage],
    start: int,
    end: int,
    gen: GenInputs | None = None,
) -> Tensor:
    """Embeddings [end - start, H] of tokens [start, end) of a sequence laid out as `layout`.

    `ids` may extend past the layout (decoded text tokens) and may be the CFG unconditional row.
    """
    dev = model.device
    emb = model.embed_tokens(torch.tensor(list(ids[start:end]), device=dev)).clone()

    def put(at: int, values: Tensor) -> None:
        lo, hi = max(at, start), min(at + values.shape[0], end)
        if lo < hi:
            emb[lo - start : hi - start] = values[lo - at : hi - at]

    for slot in layout.image_slots:
        if slot.end <= start or slot.start >= end:
            continue
        if slot.kind == "cond_vae":
            put(slot.start, conds[slot.cond_index].vae_tokens)
        elif slot.kind == "cond_vit":
            put(slot.start, conds[slot.cond_index].vit_tokens)
        elif slot.kind == "gen" and gen is not None:
            tt = torch.tensor([gen.t], device=dev, dtype=torch.float32)
            put(slot.start, model.image_tokens(gen.latents[None].to(dev), tt)[0])
    cond_ts = [at for at in layout.cond_timestep_indexes if start <= at < end]
    if cond_ts:  # clean condition images: their `<timestep>` carries t = 0
        t0 = model.timestep_tokens(torch.zeros(1, device=dev))
        for at in cond_ts:
            put(at, t0)
    if gen is not None:
        if layout.gen_timestep_index is not None:
            put(layout.gen_timestep_index, model.timestep_tokens(torch.tensor([gen.t], device=dev)))
        if layout.guidance_index is not None and gen.guidance is not None:
            put(layout.guidance_index, model.guidance_tokens(torch.tensor([gen.guidance], device=dev)))
        if layout.timestep_r_index is not None and gen.r is not None:
            put(layout.timestep_r_index, model.timestep_r_tokens(torch.tensor([gen.r], device=dev)))
    return emb

