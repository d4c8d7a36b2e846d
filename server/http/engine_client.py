"""The API server's side of the ZeroMQ link to the engine-core process (see `engine/core_proc.py`).

`EngineClient.start()` binds two ipc:// sockets in a temp dir, spawns the engine-core process and waits for
its `CoreReady`. An output task receives each `CoreOutputs` message, has it decoded and run through output
processing on the client's output thread (token ids -> text deltas and the final text, pixels -> PIL images:
engine/output_processor.py; never on the event loop, never in the engine core) and routes it: text / image events
to the queue of their request, a `FinishedInfo` closes a request, scheduler stats go to the metrics. A watchdog
notices a dead engine core: every in-flight request gets an error, `healthy` turns False and `on_death` runs (the
server then exits non-zero). Several clients side by side are the data-parallel instances of
`engine_pool.EnginePool`, which the API server talks to (it admits requests against their capacity: one instance is
a pool of one).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.core_proc import (
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    FinishedInfo,
    SchedulerStats,
    Shutdown,
    encoder,
    output_decoder,
    run_engine_core,
)
from diffgentor.engine.input_processor import ProcessedRequest, ProcessorContext, load_processor_context
from diffgentor.engine.os_process import release_host_memory
from diffgentor.engine.output_processor import OutputProcessor
from diffgentor.engine.request import EngineEvent
from diffgentor.server.http.aio import unless

logger = logging.getLogger(__name__)
_ENV_LOCK = threading.Lock()  # os.environ is process-wide: one spawn at a time sees its overlay


class EngineDeadError(RuntimeError):
    """The engine-core process is gone."""


@dataclass
class RoutedOutputs:
    """A `CoreOutputs` message after output processing: what `_route` hands out."""

    events: list[EngineEvent] = field(default_factory=list)  # kinds "text", "partial_image", "image"
    finished: list[FinishedInfo] = field(default_factory=list)  # their text filled in
    stats: SchedulerStats | None = None


@dataclass
class _Pending:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    last_text: float | None = None


class EngineClient:
    TRIM_INTERVAL_S = 5.0
    WATCHDOG_S = 0.5

    def __init__(self, config: EngineConfig, metrics=None, on_death: Callable[[], None] | None = None,
                 startup_timeout_s: float = 600.0, env: dict[str, str] | None = None, index: int = 0,
                 ctx: ProcessorContext | None = None) -> None:
        self.config = config
        self.env = dict(env or {})  # overlaid on the engine-core process's environment (its GPU slice)
        self.index = index  # the data-parallel instance, for metrics and logs
        self.metrics = metrics
        self.on_death = on_death
        self.startup_timeout_s = startup_timeout_s
        self.pending: dict[str, _Pending] = {}
        self.ready: CoreReady | None = None
        self.dead = False
        self.death_reason = ""
        self._died = asyncio.Event()  # set with `dead`: wakes sends that wait for a peer that is gone
        self.proc: multiprocessing.Process | None = None
        self._tmp = tempfile.mkdtemp(prefix="diffgentor-zmq-")
        self.input_addr = f"ipc://{self._tmp}/input"
        self.output_addr = f"ipc://{self._tmp}/output"
        self._ctx = zmq.asyncio.Context()
        self._enc = encoder()
        self._dec = output_decoder()
        self._tasks: list[asyncio.Task] = []
        self.num_in_flight = 0
        # output processing (None ctx: read from the checkpoint at start), on one thread: the messages in order
        self.outputs = OutputProcessor(ctx)
        self._output_thread = ThreadPoolExecutor(1, thread_name_prefix=f"diffgentor-outputs-{index}")
        self._last_trim = 0.0

    @property
    def healthy(self) -> bool:
        return self.ready is not None and not self.dead

    @property
    def capacity(self) -> int:
        """Requests this instance is sure to take at once: its engine core's waiting-queue limit. Not running plus
        waiting: the core refuses an add while its waiting queue is full, and a burst arrives all waiting before
        the next step moves any to running, so more in flight could be refused by the core after the API admitted
        them (docs/decisions.md)."""
        return self.config.scheduler.max_waiting_requests

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.outputs.ctx is None:
            self.outputs.ctx = await asyncio.get_running_loop().run_in_executor(
                self._output_thread, load_processor_context, self.config.model.checkpoint, self.config)
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(self.input_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.bind(self.output_addr)
        mp = multiprocessing.get_context("spawn")
        # Not daemonic: a tensor-parallel engine core starts one process per rank, and daemonic processes may not
        # have children. It still cannot outlive this process: it exits by itself once its parent is gone (a
        # watchdog thread, `engine.os_process.exit_with_parent`; its ranks likewise), and on a normal exit `_reap` stops
        # it before multiprocessing's exit hook would wait for it.
        self.proc = mp.Process(target=run_engine_core, name="diffgentor-engine-core", daemon=False,
                               args=(self.config, self.input_addr, self.output_addr, os.getpid()))
        self._spawn()
        atexit.register(self._reap)
        deadline = time.monotonic() + self.startup_timeout_s
        while self.ready is None:
            if not self.proc.is_alive():
                raise EngineDeadError(f"the engine core exited with status {self.proc.exitcode} while starting")
            if time.monotonic() > deadline:
                raise EngineDeadError("the engine core did not become ready in time")
            if await self._out.poll(200):
                msg = self._dec.decode(await self._out.recv())
                if isinstance(msg, CoreFailed):
                    raise EngineDeadError(f"the engine core failed to start: {msg.error}")
                if isinstance(msg, CoreReady):
                    self.ready = msg
        if self.metrics is not None:
            self.metrics.on_engine_ready(self.index, self.ready.num_blocks, self.ready.kernels, self.ready.layout)
        kernels = "".join(f", {op}={impl}" for op, impl in self.ready.kernels.items())
        logger.info("engine instance %d ready: pid %d, %d KV blocks%s%s", self.index, self.ready.pid,
                    self.ready.num_blocks, kernels, f", CUDA_VISIBLE_DEVICES={self.env['CUDA_VISIBLE_DEVICES']}"
                    if self.env.get("CUDA_VISIBLE_DEVICES") else "")
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watchdog())]

    def _spawn(self) -> None:
        """Start the process with `env` overlaid: spawn copies os.environ at start, so set it just around that and
        put back what was there (also on failure)."""
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
            try:
                self.proc.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        # a core still loading does not read its input yet: `_reap` terminates it instead of waiting
        if self.proc is not None and self.proc.is_alive() and self.ready is not None:
            await self._send(self._enc.encode(Shutdown()))
            await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 10.0)
        self._reap()
        atexit.unregister(self._reap)
        self._ctx.destroy(linger=0)
        self._output_thread.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _reap(self, grace_s: float = 3.0) -> None:
        """Terminate (then kill) and join the engine-core process if it is still running."""
        p = self.proc
        if p is None or p.pid is None:
            return
        if p.is_alive():
            p.terminate()
            p.join(grace_s)
        if p.is_alive():
            p.kill()
        p.join(grace_s)

    def _die(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.death_reason = reason
        self._died.set()
        logger.error("engine core died (instance %d): %s", self.index, reason)
        for rid, p in list(self.pending.items()):
            p.queue.put_nowait(FinishedInfo(request_id=rid, finish_reason="error", status=500,
                                            error=f"the engine core died: {reason}"))
            self.outputs.abort(rid)
        self.pending.clear()
        if self.on_death is not None:
            self.on_death()

    async def _watchdog(self) -> None:
        while not self.dead:
            await asyncio.sleep(self.WATCHDOG_S)
            if self.proc is not None and not self.proc.is_alive():
                self._die(f"process exited with status {self.proc.exitcode}")

    async def _output_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self._out.recv(copy=False)
                msg = await loop.run_in_executor(self._output_thread, self._receive, frame)
                if isinstance(msg, RoutedOutputs):
                    self._route(msg)
                elif isinstance(msg, CoreFailed):
                    self._die(msg.error)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken link is a dead engine
            self._die(f"output link failed: {type(e).__name__}: {e}")

    def _receive(self, frame) -> RoutedOutputs | CoreReady | CoreFailed:
        """On the output thread: decode one message; outputs go through output processing."""
        msg = self._dec.decode(frame.buffer)
        return self.process_outputs(msg) if isinstance(msg, CoreOutputs) else msg

    def process_outputs(self, msg: CoreOutputs) -> RoutedOutputs:
        """Token ids -> text deltas, pixels -> images, and each finished request's whole text."""
        events = [e for e in map(self.outputs.process, msg.events) if e is not None]
        for info in msg.finished:
            info.text = self.outputs.finish(info.request_id).text
        return RoutedOutputs(events, msg.finished, msg.stats)

    def _route(self, msg: RoutedOutputs) -> None:
        now = time.perf_counter()
        m = self.metrics
        for ev in msg.events:
            p = self.pending.get(ev.request_id)
            if p is None:
                continue
            if ev.kind == "text" and m is not None:
                if p.last_text is None:
                    m.on_first_token(now - p.arrival)
                else:
                    m.on_inter_token(now - p.last_text)
                p.last_text = now
            p.queue.put_nowait(ev)
        for info in msg.finished:
            p = self.pending.pop(info.request_id, None)
            if p is None:
                continue
            if m is not None:
                m.on_finished(info, now - p.arrival)
            p.queue.put_nowait(info)
        if msg.finished and not self.pending and now - self._last_trim > self.TRIM_INTERVAL_S:
            # idle again: hand the heap that queued requests' uploads and tensors used back to the OS, so the
            # resident set follows the load instead of staying at its high-water mark (measured in the soak)
            self._last_trim = now
            asyncio.get_running_loop().run_in_executor(None, release_host_memory)
        if msg.stats is not None and m is not None:
            m.on_stats(msg.stats, engine=self.index, num_blocks=self.ready.num_blocks)

    # ------------------------------------------------------------------ requests
    async def _send(self, frame: bytes | memoryview, copy: bool = True) -> bool:
        """Send one message to the engine core; False when the core died first (or the link failed).

        The core connects to our PUSH socket; once it is gone (killed) the socket has no peer and a send waits
        for one forever. The watchdog marks the death within `WATCHDOG_S`, so the send races that mark: a request
        that arrives in between gets its error event instead of hanging (and so does the server's shutdown).
        """
        if self.dead:
            return False
        try:
            sent, _ = await unless(self._in.send(frame, copy=copy), self._died.wait())
        except zmq.ZMQError as e:
            self._die(f"input link failed: {e}")
            return False
        return sent

    async def generate(self, processed: ProcessedRequest) -> AsyncIterator[EngineEvent | FinishedInfo]:
        """Events of one request, ending with its `FinishedInfo`. Closing the iterator early (a client that
        went away, a cancelled task) aborts the request in the engine core, which frees its KV blocks."""
        rid = processed.request.request_id
        if self.dead:
            raise EngineDeadError(self.death_reason or "the engine core is not running")
        if rid in self.pending:
            raise ValueError(f"duplicate request id {rid!r}")
        p = _Pending()
        self.pending[rid] = p
        self.outputs.add_request(processed)
        self.num_in_flight += 1
        done = sent = False
        try:
            # not sent = the core died meanwhile: `_die` has queued this request's error (it was pending)
            sent = await self._send(self._enc.encode(AddRequest(processed=processed)), copy=False)
            if sent and self.metrics is not None:
                self.metrics.on_routed(self.index)
            while True:
                item = await p.queue.get()
                yield item
                if isinstance(item, FinishedInfo):
                    done = True
                    return
        finally:
            self.num_in_flight -= 1
            if not done:
                self.pending.pop(rid, None)
                self.outputs.abort(rid)
                # only a request the engine core received is aborted (and counted as an abort in the metrics)
                if sent and not self.dead:  # no await here: this also runs when the consumer was cancelled
                    asyncio.get_running_loop().create_task(self.abort([rid]))

    async def abort(self, request_ids: list[str]) -> None:
        if self.metrics is not None:
            for _ in request_ids:
                self.metrics._success.labels(self.metrics.model_name, "abort").inc()
        await self._send(msgspec.msgpack.encode(AbortRequests(request_ids=list(request_ids))))
