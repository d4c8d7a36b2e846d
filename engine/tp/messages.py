"""The frontend <-> rank protocol of tensor-parallel execution: one msgspec msgpack frame per message.

* input (frontend PUSH -> rank PULL, one socket per rank): `StepCmd` (new `GenerationRequest`s and
  `ProcessedRequest`s, aborts, then one core step), `ShutdownCmd`, or (external ranks only, first) `RankSetup`;
* output (every rank PUSH -> frontend PULL, one socket): `RankHello` (external ranks, before loading), `RankReady`
  once the shard is loaded, `RankReply` per step (rank 0 carries the events, finished results and its scheduler
  snapshot; every rank a digest of its events, so diverging replicas are caught, and its error messages, so the
  report says what each rank saw), `RankHeartbeat` (external ranks), or `RankFailed` before a rank exits on a
  fatal error.
"""

from __future__ import annotations

import msgspec

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.request import CoreSnapshot, EngineEvent, FinishReason, GenerationRequest, RequestResult
from diffgentor.engine.request_state import ProcessedRequest


class StepCmd(msgspec.Struct, tag="step", kw_only=True):
    seq: int
    adds: list[GenerationRequest] = msgspec.field(default_factory=list)
    processed: list[ProcessedRequest] = msgspec.field(default_factory=list)  # added after `adds`
    aborts: list[str] = msgspec.field(default_factory=list)
    release: bool = False  # when idle: free the worker-side state of finished requests (`run_until_done`)


class ShutdownCmd(msgspec.Struct, tag="shutdown"):
    pass


class RankSetup(msgspec.Struct, tag="setup", kw_only=True):
    """What an external rank (started by torchrun) learns from the frontend after its hello: the one config."""

    config: EngineConfig
    expert_parallel: bool
    pg_timeout_s: float
    num_threads: int | None = None


RankInput = StepCmd | ShutdownCmd | RankSetup


class WireTensor(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]
    data: bytes


class WireResult(msgspec.Struct, kw_only=True):
    result: RequestResult  # image / latents stripped
    latents: WireTensor | None = None
    image_png: bytes = b""


class RankReady(msgspec.Struct, tag="ready", kw_only=True):
    rank: int
    pid: int
    num_blocks: int
    snapshot: CoreSnapshot


class RankReply(msgspec.Struct, tag="reply", kw_only=True):
    rank: int
    seq: int
    unfinished: bool
    digest: list[str]  # "request_id:kind:finish_reason" per event, compared across ranks
    errors: dict[str, str] = msgspec.field(default_factory=dict)  # request id -> this rank's error message
    events: list[EngineEvent] = msgspec.field(default_factory=list)  # rank 0 only
    results: list[WireResult] = msgspec.field(default_factory=list)  # rank 0 only
    snapshot: CoreSnapshot | None = None  # rank 0 only
    vm_hwm_kb: int = 0


class RankFailed(msgspec.Struct, tag="failed", kw_only=True):
    rank: int
    error: str


class RankHello(msgspec.Struct, tag="hello", kw_only=True):
    """An external rank has connected (before it loads anything)."""

    rank: int
    world_size: int
    pid: int
    host: str


class RankHeartbeat(msgspec.Struct, tag="heartbeat"):
    """Sent every `HEARTBEAT_S` by an external rank's own thread: the frontend cannot see remote processes, so
    silence longer than `heartbeat_timeout_s` (a dead node, a SIGSTOPped rank) is how it notices them."""

    rank: int


RankOutput = RankReady | RankReply | RankFailed | RankHello | RankHeartbeat
HEARTBEAT_S = 1.0


def to_wire(t) -> WireTensor:
    import torch

    t = t.detach().cpu().contiguous()
    return WireTensor(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                      data=t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def from_wire(w: WireTensor):
    import torch

    dtype = getattr(torch, w.dtype)
    if not w.data:
        return torch.empty(w.shape, dtype=dtype)
    return torch.frombuffer(bytearray(w.data), dtype=torch.uint8).view(dtype).reshape(w.shape)


def result_to_wire(res: RequestResult) -> WireResult:
    import io

    png = b""
    if res.image is not None:
        buf = io.BytesIO()
        res.image.save(buf, format="PNG")
        png = buf.getvalue()
    lat = to_wire(res.latents) if res.latents is not None else None
    stripped = msgspec.structs.replace(res, image=None, latents=None,
                                       finish_reason=getattr(res.finish_reason, "value", res.finish_reason))
    return WireResult(result=stripped, latents=lat, image_png=png)


def result_from_wire(w: WireResult) -> RequestResult:
    import io

    res = w.result
    try:
        res.finish_reason = FinishReason(res.finish_reason)
    except ValueError:
        pass
    if res.image_size is not None:
        res.image_size = tuple(res.image_size)
    if w.latents is not None:
        res.latents = from_wire(w.latents)
    if w.image_png:
        from PIL import Image

        res.image = Image.open(io.BytesIO(w.image_png))
        res.image.load()
    return res


__all__ = [
    "HEARTBEAT_S", "RankFailed", "RankHeartbeat", "RankHello", "RankInput", "RankOutput", "RankReady", "RankReply",
    "RankSetup", "ShutdownCmd", "StepCmd", "WireResult", "WireTensor", "from_wire", "result_from_wire",
    "result_to_wire", "to_wire",
]
