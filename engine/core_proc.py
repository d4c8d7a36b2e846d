"""The engine-core process: a busy loop around `EngineCore`, linked to the API server by ZeroMQ.

Transport: two one-way ipc:// sockets in a temp dir, both bound by the API server.
* input  (API server PUSH -> core PULL): `AddRequest` (a `ProcessedRequest`: images already decoded and
  preprocessed by the API server), `AbortRequests`, `Shutdown`;
* output (core PUSH -> API server PULL): `CoreReady` once the model is loaded, then `CoreOutputs` (the token-id /
  pixel events of the step, one `FinishedInfo` per finished request, and the scheduler stats of the step), or
  `CoreFailed` before the process exits on a fatal error.
Every message is one msgspec msgpack frame of a tagged union, so one decoder reads every kind.

The loop: drain the input socket (blocking with a short timeout only when idle), step the core while it has
work, push the step's outputs. Per request, the API server sees its token / image events then exactly one
`FinishedInfo` (success, error with an HTTP status, or abort); its output processing turns them into text and
images (engine/output_processor.py), never this process. This process owns the engine's one scheduler; with a
resolved tensor-parallel size > 1 the core's executor runs the model in one child process per rank, which receive
plans only. A rank failure fails the in-flight requests (HTTP 500), then the process reports `CoreFailed` and exits
1. The process exits when its parent dies (a watchdog thread, so also
while loading or inside a long step), and its ranks exit with it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from typing import TYPE_CHECKING

import msgspec

from diffgentor.engine.allocator import IdleRelease
from diffgentor.engine.config import EngineConfig
from diffgentor.engine.executor import ExecutorError
from diffgentor.engine.input_processor import ProcessedRequest
from diffgentor.engine.os_process import exit_with_parent
from diffgentor.engine.request import EngineCoreEvent, FinishReason, GenerationRequest, RequestResult

if TYPE_CHECKING:
    from diffgentor.engine.core import EngineCore, EngineCoreOutputs

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ messages in
class AddRequest(msgspec.Struct, tag="add", kw_only=True):
    processed: ProcessedRequest


class AbortRequests(msgspec.Struct, tag="abort", kw_only=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


CoreInput = AddRequest | AbortRequests | Shutdown


# ------------------------------------------------------------------------------------------------ messages out
class SchedulerStats(msgspec.Struct, kw_only=True, array_like=True):
    """The scheduler's state after a loop iteration; counters are cumulative since the core started."""

    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use, 0..1
    num_free_blocks: int
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    num_steps: int  # engine steps in this message
    step_batch_sizes: list[int] = msgspec.field(default_factory=list)  # requests in flight during each step
    diffusion_step_s: list[float] = msgspec.field(default_factory=list)  # durations of steps that diffused
    encoder_cache_hits: int = 0  # condition images found encoded (cumulative)
    encoder_cache_misses: int = 0  # condition images encoded (cumulative)
    encoder_cache_bytes: int = 0  # bytes the encoder cache holds now
    step_s: list[float] = msgspec.field(default_factory=list)  # durations of every step in this message
    num_encoding: int = 0  # condition images being encoded now (the encode queue)
    num_decoding: int = 0  # final images and previews being decoded now (the decode queue)


class FinishedInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The end of one request: its outcome, what the response needs (text, usage) and what metrics need."""

    request_id: str
    finish_reason: str  # image | text | length | abort | error
    status: int = 200  # HTTP status the API server answers an error with
    error: str | None = None
    param: str | None = None  # a refused request's field at fault (RequestError.param)
    text: str = ""  # filled in by the API server's output processing
    image_size: tuple[int, int] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    timings: dict[str, float] = msgspec.field(default_factory=dict)


class CoreReady(msgspec.Struct, tag="ready", kw_only=True):
    num_blocks: int
    block_size: int
    max_num_seqs: int
    pid: int
    kernels: dict[str, str] = msgspec.field(default_factory=dict)  # op -> implementation that runs (attention, moe)
    layout: dict[str, int] = msgspec.field(default_factory=dict)  # tp / cfg / sp sizes and world (the rank count)


class CoreOutputs(msgspec.Struct, tag="outputs", kw_only=True):
    events: list[EngineCoreEvent] = msgspec.field(default_factory=list)  # kinds "tokens", "partial_image", "image"
    finished: list[FinishedInfo] = msgspec.field(default_factory=list)
    stats: SchedulerStats | None = None


class CoreFailed(msgspec.Struct, tag="failed", kw_only=True):
    error: str


CoreOutput = CoreReady | CoreOutputs | CoreFailed


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def input_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(CoreInput)


def output_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(CoreOutput)


# ------------------------------------------------------------------------------------------------ the loop
class EngineCoreProc:
    """Owns an `EngineCore` and the two sockets; `run()` is the process's main loop."""

    IDLE_POLL_MS = 50
    PARENT_CHECK_S = 1.0

    def __init__(self, core: EngineCore, input_addr: str, output_addr: str,
                 parent_pid: int | None = None) -> None:
        import zmq

        self.core = core
        self.idle_release = IdleRelease.from_config(core.config)  # hands a burst's freed heap back once idle
        self.ctx = zmq.Context()
        self.inp = self.ctx.socket(zmq.PULL)
        self.inp.connect(input_addr)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.connect(output_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.inp, zmq.POLLIN)
        self.enc = encoder()
        self.dec = input_decoder()
        self.parent_pid = parent_pid
        self.running = True
        self._events: list[EngineCoreEvent] = []
        self._finished: list[FinishedInfo] = []
        self._batch_sizes: list[int] = []
        self._diff_steps: list[float] = []
        self._step_s: list[float] = []
        self._num_steps = 0
        self._dirty = False

    def send(self, msg) -> None:
        self.out.send(self.enc.encode(msg), copy=False)

    # -------------------------------------------------------------- inputs
    def _poll_inputs(self, timeout_ms: int) -> None:
        import zmq

        while self.poller.poll(timeout_ms):
            while True:
                try:
                    frame = self.inp.recv(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(self.dec.decode(frame.buffer))
            timeout_ms = 0

    def _handle(self, msg) -> None:
        self._dirty = True
        if isinstance(msg, AddRequest):
            self.core.add_processed(msg.processed)
        elif isinstance(msg, AbortRequests):
            for rid in msg.request_ids:
                self.core.abort(rid)
        elif isinstance(msg, Shutdown):
            self.running = False

    # -------------------------------------------------------------- outputs
    def _collect(self, outputs: EngineCoreOutputs) -> None:
        for ev in outputs.events:
            if ev.kind in ("tokens", "partial_image", "image"):  # streamed as they come
                self._events.append(ev)
                continue
            res: RequestResult | None = outputs.finished.get(ev.request_id)
            reason = ev.finish_reason or (FinishReason.ERROR.value if ev.kind == "error" else "image")
            info = FinishedInfo(request_id=ev.request_id, finish_reason=reason, error=ev.error, param=ev.param)
            if ev.kind == "error":
                info.status = ev.status or (499 if reason == FinishReason.ABORT.value else 500)
            if res is not None:
                info.image_size = tuple(res.image_size) if res.image_size else None
                info.num_prompt_tokens = res.num_prompt_tokens
                info.num_generated_tokens = res.num_generated_tokens
                info.timings = dict(res.timings)
            self._finished.append(info)

    def _stats(self) -> SchedulerStats:
        s = self.core.snapshot()
        stats = SchedulerStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
            num_free_blocks=s.num_free_blocks, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions,
            num_steps=self._num_steps, step_batch_sizes=self._batch_sizes, diffusion_step_s=self._diff_steps,
            encoder_cache_hits=s.encoder_cache_hits, encoder_cache_misses=s.encoder_cache_misses,
            encoder_cache_bytes=s.encoder_cache_bytes, step_s=self._step_s, num_encoding=s.num_encoding,
            num_decoding=s.num_decoding,
        )
        self._batch_sizes, self._diff_steps, self._step_s, self._num_steps = [], [], [], 0
        return stats

    def _flush(self) -> None:
        if not (self._events or self._finished or self._dirty):
            return
        msg = CoreOutputs(events=self._events, finished=self._finished, stats=self._stats())
        self._events, self._finished, self._dirty = [], [], False
        self.send(msg)

    # -------------------------------------------------------------- main loop
    def step_once(self) -> None:
        core = self.core
        stats, sched = core.stats, core.scheduler  # counters only: a full snapshot per step is not needed
        steps, diffusion_steps, batch = stats.steps, stats.diffusion_steps, len(sched.running) + len(sched.waiting)
        t0 = time.perf_counter()
        outputs = core.step()
        dt = time.perf_counter() - t0
        if stats.steps > steps:  # the model ran (not only a release or a refusal)
            self._num_steps += 1
            self._batch_sizes.append(batch)
            self._step_s.append(dt)
            if stats.diffusion_steps > diffusion_steps:
                self._diff_steps.append(dt)
        self._collect(outputs)
        self._dirty = True

    def run(self) -> None:
        """Until Shutdown or the parent's death; raises `EngineCoreFatal` once the core failed for good (its
        in-flight requests' errors already sent)."""
        core = self.core
        last_parent_check = time.monotonic()
        while self.running:
            self._poll_inputs(0 if core.has_unfinished_requests() else self.IDLE_POLL_MS)
            if core.has_unfinished_requests():
                self.step_once()
                self.idle_release.busy()
            else:
                try:
                    core.check_health()  # a rank lost while idle fails the process now, not at the next request
                except ExecutorError:
                    pass  # core.failed is set
                self.idle_release.poll()
            self._flush()
            if core.failed is not None:
                raise EngineCoreFatal(core.failed)
            now = time.monotonic()
            if self.parent_pid is not None and now - last_parent_check > self.PARENT_CHECK_S:
                last_parent_check = now
                if os.getppid() != self.parent_pid:
                    logger.warning("engine core: the API server (pid %d) is gone; exiting", self.parent_pid)
                    break

    def close(self) -> None:
        self.inp.close(linger=0)
        self.out.close()
        self.ctx.term()


class EngineCoreFatal(RuntimeError):
    """The core cannot go on (a tensor-parallel rank died, failed or hung); the process exits non-zero."""


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int | None = None) -> None:
    """Process entry point: load the model, announce readiness, run the loop. Fatal errors are reported on
    the output socket (best effort) and end the process with exit status 1 (stopping any tensor-parallel ranks)."""
    import zmq

    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s")
    proc = None
    core = None

    def kill_ranks() -> None:
        if core is not None:
            core.executor.kill()

    if parent_pid is not None:
        exit_with_parent(parent_pid, on_exit=kill_ranks)
        # The API server owns this process's lifetime: a Ctrl-C in a terminal (SIGINT to the whole process group)
        # must not kill it while the server drains; the server sends `Shutdown` once drained (docs/decisions.md).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from diffgentor.engine.core import EngineCore

        core = EngineCore.from_config(config)
        proc = EngineCoreProc(core, input_addr, output_addr, parent_pid)
        kernels = dict(core.kernel_impls)  # empty when the executor's ranks keep it (they log it)
        layout = config.parallel_layout()
        proc.send(CoreReady(num_blocks=core.num_blocks, block_size=config.cache.block_size,
                            max_num_seqs=config.scheduler.max_num_seqs, pid=os.getpid(), kernels=kernels,
                            layout=layout.as_dict()))
        logger.info("engine core ready: %d KV blocks of %d tokens, layout %s", core.num_blocks, config.cache.block_size,
                    layout.describe())
        proc.run()
    except BaseException as e:  # noqa: BLE001 - report, then die with a non-zero status
        msg = str(e) if isinstance(e, EngineCoreFatal) else f"{type(e).__name__}: {e}"
        logger.error("engine core failed: %s\n%s", msg, traceback.format_exc())
        try:
            ctx = zmq.Context.instance()
            s = proc.out if proc is not None else ctx.socket(zmq.PUSH)
            if proc is None:
                s.setsockopt(zmq.LINGER, 1000)
                s.connect(output_addr)
            s.send(encoder().encode(CoreFailed(error=msg)))
            time.sleep(0.1)
        except Exception:  # noqa: BLE001
            pass
        try:  # stop the ranks before exiting (a failed executor has already stopped them)
            if core is not None:
                core.close()
        except BaseException:  # noqa: BLE001
            kill_ranks()
        os._exit(1)
    core.close()
    proc.close()


__all__ = [
    "AbortRequests", "AddRequest", "CoreFailed", "CoreOutputs", "CoreReady", "EngineCoreFatal", "EngineCoreProc",
    "FinishedInfo", "GenerationRequest", "ProcessedRequest", "SchedulerStats", "Shutdown",
    "run_engine_core",
]
