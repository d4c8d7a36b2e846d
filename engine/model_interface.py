"""The engine/model seam: what the scheduler and the engine core ask of a model package, as typing Protocols.

The engine imports no model module for these: a model package (engine/models/hunyuan_image_3/) implements them and
the engine core receives the implementation from input processing (`ProcessorContext.request_logic`,
engine/input_processor.py). A request's life through them:

* tokens and blocks per phase: a request's rows are `SequenceLayout`s; the text phase computes the cond row's
  tokens then samples one per step, the image phase computes each row's prefix up to the generated image's
  `<timestep>` (`gen_timestep_index`), then every denoising step recomputes the image block up to the end of its
  `gen` slot; a bidirectional span (`full_attn_spans`) is never split across forwards;
* which tokens a step may sample: the request's `TextPhase.forcing` (the worker applies it);
* how the phase changes: when `TextPhase.finished`, `ModelRequestLogic.image_phase_layout` builds the image-phase
  sequence from the request and its text (raising `RequestError` when it cannot fit);
* which denoising steps run the backbone: `ModelRequestLogic.runs_backbone` (a cache may predict the others).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffgentor.engine.request_state import RequestState


class ImageSlot(Protocol):
    """One image run of a sequence: [start, end), its kind ("gen", "cond_vae", "cond_vit") and latent grid."""

    kind: str
    start: int
    end: int
    grid: tuple[int, int]
    cond_index: int | None


class SequenceLayout(Protocol):
    """One row's token sequence as the scheduler and the prefix cache read it."""

    token_ids: Sequence[int]
    full_attn_spans: list[tuple[int, int]]
    image_slots: list[ImageSlot]
    cond_timestep_indexes: list[int]
    gen_timestep_index: int | None  # the generated image's <timestep> (None: a text-phase sequence)
    gen_image_size: tuple[int, int] | None  # (height, width) in pixels of the generated image

    def slots(self, kind: str) -> list[ImageSlot]: ...

    def positions_for(self, start: int, end: int) -> Tensor:
        """RoPE positions [end - start, 2] of tokens [start, end) (generated text past the layout included)."""
        ...

    def __len__(self) -> int: ...


class StepForcing(Protocol):
    """What one sampling step may produce (`sampling.constrain_batch` applies it to the logits)."""

    forced_token: int | None  # the only token the step may produce
    ratio_ids: tuple[int, ...] | None  # else: a greedy pick among these ids
    banned_ids: tuple[int, ...] | None  # else: anything but these


class TextPhase(Protocol):
    """A request's text-phase state (HunyuanImage-3: its stage machine): what the next step may sample, when the
    phase ends, and the tokens that close it when the budget runs out."""

    stop_ids: frozenset[int]
    start_id: int | None  # the tag the text starts with (prepended when the text is decoded)

    @property
    def forcing(self) -> StepForcing: ...

    @property
    def finished(self) -> bool: ...

    @property
    def needs_close(self) -> bool: ...

    @property
    def truncated(self) -> bool: ...

    @property
    def ratio_index(self) -> int | None: ...

    def feed(self, token_id: int) -> None: ...

    def close(self) -> list[int]: ...


class ModelRequestLogic(Protocol):
    """The model's answers to the scheduler about one request."""

    def image_phase_layout(self, st: RequestState) -> SequenceLayout:
        """The image-phase sequence of a request whose text phase finished (its think / recaption text included);
        raises `RequestError` when it does not fit the model's positions."""
        ...

    def runs_backbone(self, st: RequestState, step: int) -> bool:
        """Whether denoising step `step` runs the backbone (False: the model predicts it without one)."""
        ...

    def encode_flops(self, height: int, width: int, vit_patches: int) -> float:
        """What encoding one condition image costs (its VAE pixels, its vision-tower patch rows; 0: none): the
        unit the scheduler's encode and decode admission weighs images by."""
        ...

    def decode_flops(self, height: int, width: int) -> float:
        """What decoding one generated image of this size costs, in the unit of `encode_flops`."""
        ...


class TokenDecoder(Protocol):
    """Token ids -> text (the output side's detokenizer reads no other part of a tokenizer)."""

    def decode(self, ids: Sequence[int]) -> str: ...


class BackboneShape(Protocol):
    """The sizes of a MoE decoder that the kernel warm-up and the CUDA-graph decode size their buffers by (a model
    config: HunyuanImage-3's `HunyuanImage3Config`)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    moe_intermediate_size: Sequence[int]  # per layer
    moe_topk: Sequence[int]  # per layer

    def is_moe_layer(self, layer: int) -> bool: ...


class DecoderModel(Protocol):
    """The causal model as the CUDA-graph decode path drives it: token embeddings, then its backbone (`model`,
    with this rank's head counts) over the paged KV cache."""

    config: BackboneShape
    model: Any  # the backbone: attn, num_local_heads, num_local_kv_heads, __call__(embeds, positions, metadata, kv)
    device: torch.device

    def embed_tokens(self, ids: Tensor) -> Tensor: ...
