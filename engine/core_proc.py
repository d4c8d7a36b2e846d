"""The engine-core process: a busy loop around `EngineCore`, linked to the API server by ZeroMQ.

Transport: two one-way ipc:// sockets in a temp dir, both bound by the API server.
* input  (API server PUSH -> core PULL): `AddRequest` (a `ProcessedRequest`: images already decoded and
  preprocessed by the API server), `AbortRequests`, `Shutdown`;
* output (core PUSH -> API server PULL): `CoreReady` once the model is loaded, then `CoreOutputs` (the text /
  image events of the step, one `FinishedInfo` per finished request, and the scheduler stats of the step), or
  `CoreFailed` before the process exits on a fatal error.
Every message is one msgspec msgpack frame of a tagged union, so one decoder reads every kind.

The loop: drain the input socket (blocking with a short timeout only when idle), step the core while it has
work, push the step's outputs. Per request, the API server sees its text/image events then exactly one
`FinishedInfo` (success, error with an HTTP status, or abort). The loop exits when its parent dies.
"""

from __future__ import annotations

import logging
import os
import time
import traceback

import msgspec

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.request import EngineEvent, FinishReason, GenerationRequest, RequestResult
from diffgentor.engine.request_state import ProcessedRequest, RequestError, state_from_processed

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


class FinishedInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The end of one request: its outcome, what the response needs (text, usage) and what metrics need."""

    request_id: str
    finish_reason: str  # image | text | length | abort | error
    status: int = 200  # HTTP status the API server answers an error with
    error: str | None = None
    text: str = ""
    image_size: tuple[int, int] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    timings: dict[str, float] = msgspec.field(default_factory=dict)


class CoreReady(msgspec.Struct, tag="ready", kw_only=True):
    num_blocks: int
    block_size: int
    max_num_seqs: int
    pid: int


class CoreOutputs(msgspec.Struct, tag="outputs", kw_only=True):
    events: list[EngineEvent] = msgspec.field(default_factory=list)  # kinds "text" and "image" only
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

    def __init__(self, core, input_addr: str, output_addr: str, parent_pid: int | None = None) -> None:
        import zmq

        self.core = core
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
        self._events: list[EngineEvent] = []
        self._finished: list[FinishedInfo] = []
        self._batch_sizes: list[int] = []
        self._diff_steps: list[float] = []
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
            self._add(msg.processed)
        elif isinstance(msg, AbortRequests):
            for rid in msg.request_ids:
                self._collect(self.core.abort(rid))
        elif isinstance(msg, Shutdown):
            self.running = False

    def _reject(self, rid: str, status: int, error: str) -> None:
        self._finished.append(FinishedInfo(request_id=rid, finish_reason=FinishReason.ERROR.value, status=status,
                                           error=error))

    def _add(self, p: ProcessedRequest) -> None:
        core, rid = self.core, p.request.request_id
        if rid in core.requests:
            return self._reject(rid, 400, f"duplicate request id {rid!r}")
        if len(core.scheduler.waiting) >= core.config.max_waiting_requests:
            return self._reject(rid, 429, "too many waiting requests; retry later")
        try:
            st = state_from_processed(core.ctx, p)
        except RequestError as e:
            return self._reject(rid, 400, str(e))
        core.requests[rid] = st
        core.scheduler.add(st)

    # -------------------------------------------------------------- outputs
    def _collect(self, events: list[EngineEvent]) -> None:
        for ev in events:
            if ev.kind in ("text", "image"):
                self._events.append(ev)
                continue
            res: RequestResult | None = self.core.results.pop(ev.request_id, None)
            reason = ev.finish_reason or (FinishReason.ERROR.value if ev.kind == "error" else "image")
            info = FinishedInfo(request_id=ev.request_id, finish_reason=reason, error=ev.error)
            if ev.kind == "error":
                info.status = 499 if reason == FinishReason.ABORT.value else 500
                if ev.error and "does not fit" in ev.error:
                    info.status = 400
            if res is not None:
                info.text = res.text
                info.image_size = tuple(res.image_size) if res.image_size else None
                info.num_prompt_tokens = res.num_prompt_tokens
                info.num_generated_tokens = res.num_generated_tokens
                info.timings = dict(res.timings)
            self._finished.append(info)

    def _stats(self) -> SchedulerStats:
        core = self.core
        kv = core.kv
        st = kv.stats
        stats = SchedulerStats(
            num_running=len(core.scheduler.running), num_waiting=len(core.scheduler.waiting), kv_usage=float(kv.usage),
            num_free_blocks=int(kv.num_free_blocks), prefix_cache_queries=int(st.queries),
            prefix_cache_hits=int(st.hits), num_preemptions=int(core.scheduler.num_preemptions),
            num_steps=self._num_steps, step_batch_sizes=self._batch_sizes, diffusion_step_s=self._diff_steps,
        )
        self._batch_sizes, self._diff_steps, self._num_steps = [], [], 0
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
        in_flight = len(core.scheduler.running) + len(core.scheduler.waiting)
        diff_before = core.stats.diffusion_steps
        t0 = time.perf_counter()
        events = core.step()
        dt = time.perf_counter() - t0
        self._num_steps += 1
        self._batch_sizes.append(in_flight)
        if core.stats.diffusion_steps > diff_before:
            self._diff_steps.append(dt)
        self._collect(events)
        self._dirty = True

    def run(self) -> None:
        core = self.core
        last_parent_check = time.monotonic()
        while self.running:
            busy = core.has_unfinished()
            self._poll_inputs(0 if busy else self.IDLE_POLL_MS)
            if core.has_unfinished():
                self.step_once()
            elif core._to_free:  # release the worker-side state of finished requests while idle
                core.run_until_done()
            self._flush()
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


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int | None = None) -> None:
    """Process entry point: load the model, announce readiness, run the loop. Fatal errors are reported on
    the output socket (best effort) and end the process with exit status 1."""
    import zmq

    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s")
    proc = None
    try:
        from diffgentor.engine.core import EngineCore

        core = EngineCore.from_config(config)
        proc = EngineCoreProc(core, input_addr, output_addr, parent_pid)
        proc.send(CoreReady(num_blocks=core.kv.num_blocks, block_size=config.block_size,
                            max_num_seqs=config.max_num_seqs, pid=os.getpid()))
        logger.info("engine core ready: %d KV blocks of %d tokens", core.kv.num_blocks, config.block_size)
        proc.run()
    except BaseException as e:  # noqa: BLE001 - report, then die with a non-zero status
        msg = f"{type(e).__name__}: {e}"
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
        os._exit(1)
    if proc is not None:
        proc.close()


__all__ = [
    "AbortRequests", "AddRequest", "CoreFailed", "CoreOutputs", "CoreReady", "EngineCoreProc", "FinishedInfo",
    "GenerationRequest", "SchedulerStats", "Shutdown", "run_engine_core",
]
