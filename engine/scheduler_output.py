"""What the scheduler hands the worker each step, and what the worker answers.

The scheduler decides *what* runs (which condition images are encoded, which token ranges of which sequences,
which requests sample a token, take a diffusion step or get decoded); the worker owns the model, the KV pages,
the encoder cache's tensors and each request's device-side state (condition embeddings, generators, latents) and
does it in one step. With tensor parallelism the one scheduler's plan is broadcast to every rank's worker and rank
0's output comes back, as msgpack frames (engine/tp/messages.py): every field's type must stay msgspec-decodable
(tensors and arrays travel as extension types).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffgentor.engine.encoder_cache import EncoderKey
from diffgentor.engine.models.hunyuan_image_3 import BuiltPrompt, SamplingParams, VaeCondImage, VitCondImage


@dataclass
class EncoderInput:
    """One condition image to encode: its encoder-cache key and the preprocessed pixels the worker runs."""

    key: EncoderKey
    vae: VaeCondImage
    vit: VitCondImage | None

    @property
    def vit_patches(self) -> int:
        """Patch rows the vision tower runs on it, padding rows included (0: no ViT branch): with its VAE pixels,
        what its encode costs (the scheduler asks the model: `ModelRequestLogic.encode_flops`)."""
        return 0 if self.vit is None else int(self.vit.pixel_values.shape[0])


DecodeKey = tuple[str, int]
"""One VAE decode: (request id, progressive preview index, or FINAL_IMAGE for the request's image)."""

FINAL_IMAGE = -1


@dataclass
class NewRequestData:
    """Sent once when a request is admitted: its condition images are in the encoder cache (`cond_keys`); the
    worker draws their posterior samples, then later the initial noise, from the request's seeded generator."""

    request_id: str
    seed: int
    vae_images: list[VaeCondImage]
    vit_images: list[VitCondImage | None]
    sampling: SamplingParams
    cond_keys: list[EncoderKey] = field(default_factory=list)


@dataclass
class SampleSpec:
    """Sample the next token from the logits of a chunk's last token, under the stage machine's forcing."""

    params: SamplingParams
    forced_token: int | None = None
    ratio_ids: tuple[int, ...] | None = None  # greedy pick restricted to these ids (the ratio step)
    banned_ids: tuple[int, ...] | None = None  # never sampled (ratio tokens whose image phase would not fit)


@dataclass
class Chunk:
    """Tokens [start, end) of one sequence (a request's cond or uncond row) computed this step."""

    request_id: str
    seq_id: str
    token_ids: list[int]
    layout: BuiltPrompt
    start: int
    end: int
    block_table: list[int]
    sample: SampleSpec | None = None
    diffusion: bool = False  # the chunk is this step's image block of a diffusion row
    group: int = 0  # the CFG group that runs it (engine/cfg_groups.py); the others skip it


@dataclass
class DiffusionStart:
    """Begin the image phase of a request: draw the initial noise after the condition posteriors."""

    request_id: str
    grid: tuple[int, int]
    num_steps: int
    flow_shift: float
    guidance_scale: float
    use_cfg: bool
    use_taylor_cache: bool
    row_groups: tuple[int, int] | None = None  # CFG groups of the cond (owner) and uncond rows; None: one group


@dataclass
class DiffusionStep:
    """One denoising step of a request; its rows' chunks (cond first) are in the same forward."""

    request_id: str
    step: int
    chunk_indexes: list[int]  # into SchedulerOutput.chunks; empty when the Taylor cache predicts this step
    preview_index: int | None = None  # decode this step's predicted clean image as progressive preview N


@dataclass
class SchedulerOutput:
    encoder_inputs: list[EncoderInput] = field(default_factory=list)  # start these encodes (reported when done)
    encoder_evictions: list[EncoderKey] = field(default_factory=list)  # drop these cached encodes first
    new_requests: list[NewRequestData] = field(default_factory=list)
    diffusion_starts: list[DiffusionStart] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    diffusion_steps: list[DiffusionStep] = field(default_factory=list)
    vae_decodes: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    # nothing else to run while encodes or decodes are in flight: the worker blocks until one has finished (no busy
    # loop)
    wait_for_vae: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not (self.new_requests or self.chunks or self.diffusion_steps or self.vae_decodes
                    or self.finished_request_ids or self.diffusion_starts or self.encoder_inputs
                    or self.encoder_evictions or self.wait_for_vae)

    @property
    def has_model_work(self) -> bool:
        """Anything beyond freeing state: a step that counts."""
        return bool(self.new_requests or self.chunks or self.diffusion_steps or self.vae_decodes
                    or self.diffusion_starts or self.encoder_inputs or self.wait_for_vae)


@dataclass
class RunnerOutput:
    sampled_tokens: dict[str, int] = field(default_factory=dict)
    diffusion_steps_done: dict[str, int] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)  # request id -> uint8 [H, W, 3] numpy
    partial_images: dict[str, tuple[int, Any]] = field(default_factory=dict)  # request id -> (index, uint8 image)
    encoded: dict[EncoderKey, int] = field(default_factory=dict)  # encoder-cache key -> bytes held by the worker
    encode_failed: dict[EncoderKey, str] = field(default_factory=dict)  # key -> error message
    # every decode that ended this step (image, preview, failure, or a finished request's dropped image): the VAE
    # budget it held is free again
    decoded: list[DecodeKey] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> error message
    final_latents: dict[str, Any] = field(default_factory=dict)  # request id -> CPU latents of a finished diffusion
    timings: dict[str, float] = field(default_factory=dict)

    def merge_group(self, other: RunnerOutput) -> None:
        """Add another CFG group's report (engine/parallel_layout.py): each group's leader reports the requests its
        group owns (their tokens, steps, images, failures); encodes are rank 0's to report (every rank encodes every
        condition image, and a rank behind rank 0 waits for its own copy when it needs it)."""
        for name in ("sampled_tokens", "diffusion_steps_done", "images", "partial_images", "failed", "final_latents"):
            getattr(self, name).update(getattr(other, name))
        self.decoded += other.decoded  # the owner group decodes (and reports) a request's images
