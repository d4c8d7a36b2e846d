"""Typed messages at the engine boundary: what a user asks for and what the engine reports back.

These are `msgspec.Struct`s so the API server, the CLI and the engine-core processes exchange them
as msgpack frames. A `GenerationRequest` carries its images as encoded files (bytes; input processing decodes
them in the frontend, engine/input_processor.py); the engine core reports token ids and uint8 pixels
(`EngineCoreEvent`), which the frontend turns into text and images (`EngineEvent`, engine/output_processor.py).
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec
import numpy as np


class GenerationRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One edit / fusion / text-to-image request. None = the engine's (env / checkpoint) default."""

    request_id: str
    prompt: str
    images: list[bytes] = msgspec.field(default_factory=list)
    image_size: str = "auto"
    bot_task: str | None = None
    use_system_prompt: str | None = None
    system_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    use_taylor_cache: bool | None = None
    infer_align_image_size: bool | None = None
    output_type: str = "pil"  # "pil": decode to an image; "latent": stop after diffusion (no VAE decode)
    partial_images: int = 0  # 0-3 progressive previews (decoded x0 predictions at evenly spaced diffusion steps)


class RequestStatus(enum.Enum):
    """Where a request is in its life: the one record of it inside the engine core. Only the scheduler moves it,
    through its transition table (engine/scheduler.py, `TRANSITIONS`). Whether a request runs or waits is the
    queue it sits in: a preempted request keeps its status and waits with its KV dropped."""

    WAITING = "waiting"  # queued; its condition images not looked up yet
    ENCODING = "encoding"  # queued; its condition images pinned in the encoder cache, some still being encoded
    PREFILL = "prefill"  # admitted (the worker holds its state); text phase, the prompt is being computed
    THINK = "think"  # text phase: one sampled token per step (think, recaption, ratio pick or answer)
    IMAGE_PREFILL = "image_prefill"  # image phase: its rows up to the image's <timestep>; no noise drawn yet
    DIFFUSE = "diffuse"  # denoising steps (the worker holds its latents)
    VAE_DECODE = "vae_decode"  # denoised; waits for a step with VAE budget to decode it
    FINISHED = "finished"

    @property
    def is_finished(self) -> bool:
        return self is RequestStatus.FINISHED

    @property
    def admitted(self) -> bool:
        """The worker holds the request's state (its generators, condition embeddings, latents)."""
        return self in _ADMITTED

    @property
    def phase(self) -> str | None:
        """"text" or "image" once admitted; None before (the request's first phase is its own business)."""
        return _PHASE.get(self)


_PHASE = {RequestStatus.PREFILL: "text", RequestStatus.THINK: "text", RequestStatus.IMAGE_PREFILL: "image",
          RequestStatus.DIFFUSE: "image", RequestStatus.VAE_DECODE: "image"}
_ADMITTED = frozenset(_PHASE)


class FinishReason(str, enum.Enum):
    IMAGE = "image"  # an image was generated
    TEXT = "text"  # bot_task auto: a text answer (eos)
    LENGTH = "length"  # bot_task auto: max_new_tokens reached
    ABORT = "abort"
    ERROR = "error"


class ImagePixels(msgspec.Struct, kw_only=True, array_like=True):
    """A decoded image as the engine core reports it: uint8 RGB, row-major [height, width, 3], not encoded (the
    frontend aligns and encodes it, off the core's step)."""

    height: int
    width: int
    data: bytes

    @classmethod
    def from_array(cls, array: Any) -> ImagePixels:
        a = np.ascontiguousarray(array, dtype=np.uint8)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"pixels must be [height, width, 3], got {a.shape}")
        return cls(height=int(a.shape[0]), width=int(a.shape[1]), data=a.tobytes())

    def to_array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.height, self.width, 3)


class EngineCoreEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the engine core reports of one request in a step, before output processing: new token ids, decoded
    pixels, or the end."""

    request_id: str
    kind: str  # "tokens" | "partial_image" | "image" | "finished" | "error"
    token_ids: list[int] = msgspec.field(default_factory=list)  # kind "tokens": ids sampled (or forced) this step
    prefix_ids: list[int] = msgspec.field(default_factory=list)  # the request's first "tokens": ids its text opens with
    final: bool = False  # kind "tokens": the request ended; the text held back for a later token is due now
    pixels: ImagePixels | None = None  # kinds "partial_image", "image"
    partial_image_index: int | None = None  # kind "partial_image": 0-based index of the preview
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None  # an error's HTTP status where the engine knows it (400 bad input, 429 queue full)
    param: str | None = None  # a refused request's field at fault (RequestError.param)


class EngineEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A streamed event of one request after output processing: a think/recaption text delta, a preview or the
    finished image, or the end."""

    request_id: str
    kind: str  # "text" | "partial_image" | "image" | "finished" | "error"
    text: str = ""
    image: Any = None  # kinds "partial_image", "image": a PIL image (in process; never serialised)
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None  # an error's HTTP status where the engine knows it (400 bad input, 429 queue full)
    param: str | None = None  # a refused request's field at fault (RequestError.param)
    partial_image_index: int | None = None  # kind "partial_image": 0-based index of the preview


class CoreSnapshot(msgspec.Struct, kw_only=True, array_like=True):
    """The scheduler / KV / prefix-cache counters of an engine core after a step (counters cumulative since it
    started): what the engine-core process reports, and what a tensor-parallel rank 0 sends to its frontend."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    diffusion_steps: int = 0
    encoder_cache_hits: int = 0  # condition images found encoded (or shared with a request encoding them)
    encoder_cache_misses: int = 0  # condition images that had to be encoded
    encoder_cache_bytes: int = 0  # bytes the encoder cache holds now
    num_encoding: int = 0  # condition images the worker is encoding (the encode queue)
    num_decoding: int = 0  # final images and previews the worker is decoding (the decode queue)


class RequestResult(msgspec.Struct, kw_only=True):
    """The final outcome of a request (offline API). The engine core reports the ids and counters; the frontend's
    output processing fills in `text` and `image`."""

    request_id: str
    finish_reason: str
    text: str = ""  # the decoded generated text (prefixed by the tag the stage machine opened it with)
    generated_ids: list[int] = msgspec.field(default_factory=list)
    image: Any = None  # PIL.Image in process; never serialised
    latents: Any = None  # final latents (torch, in process) for checks and benchmarks
    image_size: tuple[int, int] | None = None
    ratio_index: int | None = None
    truncated: bool = False
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    timings: dict[str, float] = msgspec.field(default_factory=dict)
    error: str | None = None
