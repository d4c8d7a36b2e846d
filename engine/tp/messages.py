"""The executor <-> rank protocol of tensor-parallel execution: one msgspec msgpack frame per message.

* input (executor PUSH -> rank PULL, one socket per rank): `ExecuteModel` (one step's `SchedulerOutput`, the same
  plan for every rank), `ShutdownCmd`, or (external ranks only, first) `RankSetup`;
* output (every rank PUSH -> executor PULL, one socket): `RankHello` (external ranks, before loading), `RankReady`
  once the shard is loaded, `RankReply` per plan (each CFG group's leader carries its `RunnerOutput`; the others
  only say they are done), `RankHeartbeat` (external ranks), or `RankFailed` before a rank exits on a fatal error.

Ranks never see a request as the user wrote it (text, encoded images): only plans. Tensors and numpy arrays inside
plans and outputs travel as msgpack extension types (`encoder` / `decoder`).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import torch

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.engine.scheduler_output import RunnerOutput, SchedulerOutput
from diffgentor.engine.vae_budget import VaeBudget


class ExecuteModel(msgspec.Struct, tag="execute", kw_only=True):
    seq: int
    plan: SchedulerOutput


class ShutdownCmd(msgspec.Struct, tag="shutdown"):
    pass


class RankSetup(msgspec.Struct, tag="setup", kw_only=True):
    """What an external rank (started by torchrun) learns from the executor after its hello: the one config."""

    config: EngineConfig
    layout: ParallelLayout
    rank_threads: int | None = None
    """This rank's torch threads as the executor split them (`ParallelConfig.num_threads` or a share)."""


RankInput = ExecuteModel | ShutdownCmd | RankSetup


class RankReady(msgspec.Struct, tag="ready", kw_only=True):
    rank: int
    pid: int
    num_blocks: int
    kernel_impls: dict[str, str] = {}  # op -> the implementation this rank runs (what the start-up warm-up chose)
    vae_budget: VaeBudget | None = None  # the VAE work one step may carry on this rank's GPU (memory plan); None: CPU


class RankReply(msgspec.Struct, tag="reply", kw_only=True):
    rank: int
    seq: int
    output: RunnerOutput | None = None  # each CFG group's leader only (rank 0 is the first)
    vm_hwm_kb: int = 0
    tokens_run: int = 0  # tokens this rank has forwarded so far (its CFG group's share of the plans)


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
    """Sent every `HEARTBEAT_S` by an external rank's own thread: the executor cannot see remote processes, so
    silence longer than `heartbeat_timeout_s` (a dead node, a SIGSTOPped rank) is how it notices them."""

    rank: int


RankOutput = RankReady | RankReply | RankFailed | RankHello | RankHeartbeat
HEARTBEAT_S = 1.0

_TENSOR, _NDARRAY = 1, 2


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return msgspec.msgpack.Ext(_TENSOR, msgspec.msgpack.encode((str(t.dtype).removeprefix("torch."),
                                                                    list(t.shape), data)))
    if isinstance(obj, np.ndarray):
        return msgspec.msgpack.Ext(_NDARRAY, msgspec.msgpack.encode((obj.dtype.str, list(obj.shape),
                                                                     np.ascontiguousarray(obj).tobytes())))
    raise NotImplementedError(f"cannot send a {type(obj).__name__} to a tensor-parallel rank")


def _ext_hook(code: int, data: memoryview) -> Any:
    dtype, shape, raw = msgspec.msgpack.decode(data)
    if code == _TENSOR:
        dt = getattr(torch, dtype)
        if not raw:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape)
    if code == _NDARRAY:
        return np.frombuffer(bytearray(raw), dtype=np.dtype(dtype)).reshape(shape)
    raise ValueError(f"unknown msgpack extension type {code}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if isinstance(obj, typ):  # a tensor field: the extension hook already built it
        return obj
    raise TypeError(f"expected {typ.__name__}, got {type(obj).__name__}")


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def decoder(typ: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(typ, ext_hook=_ext_hook, dec_hook=_dec_hook)


__all__ = [
    "HEARTBEAT_S", "ExecuteModel", "RankFailed", "RankHeartbeat", "RankHello", "RankInput", "RankOutput",
    "RankReady", "RankReply", "RankSetup", "ShutdownCmd", "decoder", "encoder",
]
