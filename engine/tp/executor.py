"""The tensor-parallel frontend: `TPExecutor` runs one engine-core replica per rank (`engine.tp.rank`) and drives
them in lockstep (SGLang-style) behind the `EngineCoreClient` interface.

Each step the executor broadcasts the queued inputs (`engine.tp.messages.StepCmd`) to every rank and collects
their replies; rank 0's events and results are the step's outputs, and every rank's event digest must agree.

Failure handling: the frontend waits for a step's replies in short polls, checking every rank's process liveness in
between, so a rank that dies is noticed within `poll_s`; a rank that hangs is noticed after `step_timeout_s` (and the
torch.distributed process group's own timeout, `pg_timeout_s`, ends collectives blocked on a dead peer). On a rank
failure the executor fails every in-flight request with a clear error (error events + error results), stops every
rank (terminate, then kill, then join: no zombies), sets `failed` and raises `TPExecutorError` on any later use.
On CPU the ranks use gloo with a file:// rendezvous; on CUDA nccl, rank r on device r of the visible devices.
External ranks (torchrun, multi-node) connect to `config.rank_endpoint` instead of being spawned.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections import Counter
from typing import Any

import msgspec

from diffgentor.engine.config import EngineConfig, omp_num_threads
from diffgentor.engine.request import CoreSnapshot, EngineEvent, FinishReason, GenerationRequest, RequestResult
from diffgentor.engine.request_state import ProcessedRequest
from diffgentor.engine.tp.messages import (
    RankFailed,
    RankHeartbeat,
    RankHello,
    RankOutput,
    RankReady,
    RankReply,
    RankSetup,
    ShutdownCmd,
    StepCmd,
    result_from_wire,
)
from diffgentor.engine.tp.rank import rank_main

logger = logging.getLogger(__name__)


class TPExecutorError(RuntimeError):
    """A tensor-parallel rank failed to start, died, hung, or the replicas diverged."""


class TPExecutor:
    """Runs `world_size` engine-core replicas, one per tensor-parallel rank, behind the `EngineCore` interface."""

    def __init__(
        self,
        config: EngineConfig,
        world_size: int | None = None,
        expert_parallel: bool | None = None,
        ready_timeout_s: float = 600.0,
        step_timeout_s: float = 600.0,
        pg_timeout_s: float = 120.0,
        poll_s: float = 0.2,
        num_threads: int | None = None,
        heartbeat_timeout_s: float = 5.0,
    ) -> None:
        import torch.multiprocessing as mp
        import zmq

        self.config = config
        self.world_size = world_size or config.resolve_tensor_parallel_size()
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        self.expert_parallel = config.env.expert_parallel if expert_parallel is None else bool(expert_parallel)
        self.step_timeout_s = step_timeout_s
        self.poll_ms = max(1, int(poll_s * 1000))
        if num_threads is None and not config.on_cuda():  # this process's thread share (OMP_NUM_THREADS), split
            num_threads = max(1, (omp_num_threads() or os.cpu_count() or 1) // self.world_size)
        self.results: dict[str, RequestResult] = {}
        self.failed: str | None = None
        self.num_blocks = 0
        self._snapshot = CoreSnapshot()
        self.rank_pids: list[int] = []
        self.rank_vm_hwm_kb: list[int] = [0] * self.world_size  # peak RSS per rank, as last reported
        self._seq = 0
        self._adds: list[GenerationRequest] = []
        self._processed: list[ProcessedRequest] = []
        self._aborts: list[str] = []
        self._in_flight: Counter[str] = Counter()  # a counter: refusing a duplicate id must not forget the first
        self._unfinished = False
        self._needs_release = False
        self._closed = False

        self.endpoint = config.rank_endpoint  # external ranks (torchrun, multi-node) connect here
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._last_seen: dict[int, float] = {}  # external ranks: when each was last heard from
        self._setup = RankSetup(config=config, expert_parallel=self.expert_parallel, pg_timeout_s=pg_timeout_s,
                                num_threads=num_threads)
        self._dir = tempfile.mkdtemp(prefix="dg-tp-")
        self._zctx = zmq.Context()
        if self.endpoint is None:
            out_addr, in_addrs = f"ipc://{self._dir}/out", [f"ipc://{self._dir}/in{r}" for r in range(self.world_size)]
        else:
            from diffgentor.engine.config import parse_endpoint

            host, port = parse_endpoint(self.endpoint)
            host = f"[{host}]" if ":" in host else host
            out_addr = f"tcp://{host}:{port}"
            in_addrs = [f"tcp://{host}:{port + 1 + r}" for r in range(self.world_size)]
        self._out = self._zctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.LINGER, 0)
        self._ins = []
        try:
            self._out.bind(out_addr)
            for addr in in_addrs:
                sock = self._zctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                self._ins.append(sock)
                sock.bind(addr)
        except zmq.ZMQError as e:
            self._zctx.destroy(linger=0)
            shutil.rmtree(self._dir, ignore_errors=True)
            raise TPExecutorError(f"cannot bind the tensor-parallel endpoint {out_addr} .. {in_addrs[-1]}: {e}") from e
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(RankOutput)
        spawn = mp.get_context("spawn")
        init_method = f"file://{self._dir}/rendezvous"
        self._procs = [] if self.endpoint is not None else [
            spawn.Process(
                target=rank_main, name=f"dg-tp-rank{r}", daemon=True,
                args=(r, self.world_size, config, init_method, in_addrs[r], out_addr,
                      self.expert_parallel, pg_timeout_s, os.getpid(), num_threads),
            )
            for r in range(self.world_size)
        ]
        self._finalizer = weakref.finalize(self, TPExecutor._cleanup, self._procs, self._dir)
        atexit.register(self._finalizer)
        try:
            for p in self._procs:
                p.start()
            self.rank_pids = [p.pid for p in self._procs]
            if self.endpoint is not None:
                logger.info("waiting for %d tensor-parallel ranks to connect to %s (torchrun ... -m "
                            "diffgentor.server.cli tp-worker --connect HEAD:PORT)", self.world_size, self.endpoint)
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- lifecycle
    def _wait_ready(self, timeout_s: float) -> None:
        ready: dict[int, RankReady] = {}
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.world_size:
            msg = self._recv(deadline, lambda: f"rank(s) {sorted(set(range(self.world_size)) - set(ready))} did not "
                                               f"load and report ready within {timeout_s:.0f} s")
            if isinstance(msg, RankHello):
                self._on_hello(msg)
            elif isinstance(msg, RankReady):
                ready[msg.rank] = msg
        blocks = {m.num_blocks for m in ready.values()}
        if len(blocks) != 1:
            raise TPExecutorError(f"tensor-parallel ranks disagree on the KV cache size: {sorted(blocks)}")
        self.num_blocks = blocks.pop()
        self._snapshot = ready[0].snapshot
        if self.endpoint is not None:
            self.rank_pids = [ready[r].pid for r in range(self.world_size)]  # pids on their own nodes
        logger.info("tensor-parallel executor ready: %d ranks (%s), %d KV blocks, rank pids %s", self.world_size,
                    "expert parallel" if self.expert_parallel else "tensor parallel", self.num_blocks,
                    [ready[r].pid for r in range(self.world_size)])

    def _recv(self, deadline: float, timeout_msg) -> Any:
        """The next message from any rank; raises TPExecutorError on a rank failure, death or timeout."""
        while True:
            if self._out.poll(self.poll_ms):
                msg = self._dec.decode(self._out.recv())
                self._last_seen[msg.rank] = time.monotonic()
                if isinstance(msg, RankFailed):
                    self._raise_rank_failed(msg)
                if isinstance(msg, RankHeartbeat):
                    continue
                return msg
            dead = self._dead_ranks()
            if dead:
                raise TPExecutorError(dead)
            if time.monotonic() > deadline:
                raise TPExecutorError(f"tensor-parallel executor: {timeout_msg()} (hung?)")

    def _raise_rank_failed(self, msg: RankFailed) -> None:
        time.sleep(min(0.5, self.poll_ms / 1000 * 2))  # let a peer's death (the usual cause) show
        dead = self._dead_ranks()
        raise TPExecutorError(f"tensor-parallel rank {msg.rank} failed: {msg.error}" + (f" ({dead})" if dead else ""))

    def _on_hello(self, msg: RankHello) -> None:
        """An external rank connected: check it belongs to this group, then send it the config to load."""
        if msg.world_size != self.world_size or not 0 <= msg.rank < self.world_size:
            raise TPExecutorError(f"a tensor-parallel rank on {msg.host} (pid {msg.pid}) says rank {msg.rank} of "
                                  f"{msg.world_size}, but this engine has --tensor-parallel-size {self.world_size}")
        logger.info("tensor-parallel rank %d connected from %s (pid %d)", msg.rank, msg.host, msg.pid)
        self._ins[msg.rank].send(self._enc.encode(self._setup))

    def _dead_ranks(self) -> str:
        if self.endpoint is not None:  # remote ranks: silence is the only sign
            now = time.monotonic()
            silent = [f"rank {r} silent for {now - t:.1f} s" for r, t in sorted(self._last_seen.items())
                      if now - t > self.heartbeat_timeout_s]
            return "tensor-parallel " + "; ".join(silent) + " (dead or hung)" if silent else ""
        dead = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in enumerate(self._procs)
                if not p.is_alive()]
        return "tensor-parallel " + "; ".join(dead) if dead else ""

    def close(self) -> None:
        """Stop every rank (shutdown message, then terminate / kill) and join them all."""
        if self._closed:
            return
        self._closed = True
        # after a failure no clean shutdown: the surviving ranks must exit non-zero (spawned ones are terminated,
        # external ones see the connection drop), or torchrun would wait at its exit barrier for the dead peer
        for s in self._ins if self.failed is None else ():
            try:
                s.send(self._enc.encode(ShutdownCmd()), flags=1)  # zmq.NOBLOCK
            except Exception:  # noqa: BLE001
                pass
        TPExecutor._stop(self._procs, grace_s=5.0 if self.failed is None else 0.0)
        for s in self._ins:  # external ranks: give the shutdown a moment to leave (they also exit on disconnect)
            s.close(linger=2000 if self.endpoint is not None and self.failed is None else 0)
        self._out.close(linger=0)
        self._zctx.term()
        self._finalizer()
        atexit.unregister(self._finalizer)

    @staticmethod
    def _stop(procs, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for p in procs:
            if p.pid is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(3.0)
                if p.is_alive():
                    p.kill()
                    p.join(3.0)

    def kill(self) -> None:
        """SIGKILL every rank and remove the temp dir: the last resort of a process that must exit at once (its
        parent died). Safe from another thread; the ranks would also exit by themselves, this is only faster."""
        for pid in self.rank_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def _cleanup(procs, tmpdir: str) -> None:
        TPExecutor._stop(procs, grace_s=0.0)
        shutil.rmtree(tmpdir, ignore_errors=True)

    def __enter__(self) -> TPExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self) -> None:
        if self.failed is not None:
            raise TPExecutorError(self.failed)
        if self._closed:
            raise TPExecutorError("the tensor-parallel executor is closed")

    # -------------------------------------------------------------- the EngineCore interface
    def add_request(self, req: GenerationRequest) -> list[EngineEvent]:
        """Queue for the next step (validation errors come back as that step's events)."""
        self.check()
        self._adds.append(req)
        self._in_flight[req.request_id] += 1
        return []

    def add_processed(self, p: ProcessedRequest) -> list[EngineEvent]:
        """Queue a preprocessed request (the served path) for the next step; refusals (with their HTTP status)
        come back as that step's events."""
        self.check()
        self._processed.append(p)
        self._in_flight[p.request.request_id] += 1
        return []

    def abort(self, request_id: str) -> list[EngineEvent]:
        self.check()
        self._aborts.append(request_id)
        return []

    def has_unfinished(self) -> bool:
        return self.failed is None and not self._closed and bool(
            self._adds or self._processed or self._aborts or self._unfinished)

    def needs_release(self) -> bool:
        return self._needs_release and self.failed is None and not self._closed

    def snapshot(self) -> CoreSnapshot:
        """Rank 0's counters after the last step; requests queued for the next step count as waiting."""
        s = self._snapshot
        return msgspec.structs.replace(s, num_waiting=s.num_waiting + len(self._adds) + len(self._processed))

    def poll_failures(self) -> list[EngineEvent]:
        """Between steps (the served loop calls this while idle): a rank that failed or died since the last step
        fails the executor now, not on the next request."""
        if self.failed is not None or self._closed:
            return []
        try:
            while self._out.poll(0):
                msg = self._dec.decode(self._out.recv())
                self._last_seen[msg.rank] = time.monotonic()
                if isinstance(msg, RankFailed):
                    self._raise_rank_failed(msg)
            dead = self._dead_ranks()
            if dead:
                raise TPExecutorError(dead)
        except TPExecutorError as e:
            return self._fail(str(e))
        return []

    def step(self, release: bool = False) -> list[EngineEvent]:
        """Broadcast the queued inputs and one step to every rank; rank 0's events (all ranks agreeing)."""
        self.check()
        self._seq += 1
        cmd = StepCmd(seq=self._seq, adds=self._adds, processed=self._processed, aborts=self._aborts, release=release)
        self._adds, self._processed, self._aborts = [], [], []
        try:
            frame = self._enc.encode(cmd)
            for s in self._ins:
                s.send(frame)
            replies: dict[int, RankReply] = {}
            deadline = time.monotonic() + self.step_timeout_s
            while len(replies) < self.world_size:
                msg = self._recv(deadline, lambda: f"rank(s) {sorted(set(range(self.world_size)) - set(replies))} "
                                                   f"did not finish step {cmd.seq} within {self.step_timeout_s:.0f} s")
                if isinstance(msg, RankReply) and msg.seq == cmd.seq:
                    replies[msg.rank] = msg
            lead = replies[0]
            for r, rep in replies.items():
                self.rank_vm_hwm_kb[r] = rep.vm_hwm_kb
                if rep.digest != lead.digest or rep.unfinished != lead.unfinished:
                    raise TPExecutorError(
                        f"tensor-parallel ranks diverged at step {cmd.seq}: rank 0 {lead.digest}"
                        + (f" (errors {lead.errors})" if lead.errors else "")
                        + f" vs rank {r} {rep.digest}" + (f" (errors {rep.errors})" if rep.errors else ""))
        except TPExecutorError as e:
            return self._fail(str(e))
        self._unfinished = lead.unfinished
        if lead.snapshot is not None:
            self._snapshot = lead.snapshot
        for w in lead.results:
            res = result_from_wire(w)
            self.results[res.request_id] = res
        for ev in lead.events:
            if ev.kind in ("finished", "error"):
                self._in_flight[ev.request_id] -= 1
                if self._in_flight[ev.request_id] <= 0:
                    del self._in_flight[ev.request_id]
                self._needs_release = True
                if ev.request_id not in self.results:  # rejected before a state existed (duplicate id, full queue)
                    self.results[ev.request_id] = RequestResult(
                        request_id=ev.request_id, finish_reason=FinishReason(ev.finish_reason or "error"),
                        error=ev.error)
        return lead.events

    def _fail(self, msg: str) -> list[EngineEvent]:
        """A rank failed: every in-flight request ends with `msg`, every rank is stopped."""
        logger.error("%s; failing %d in-flight request(s) and stopping all ranks", msg, len(self._in_flight))
        self.failed = msg
        events = []
        for rid in sorted(self._in_flight):
            self.results[rid] = RequestResult(request_id=rid, finish_reason=FinishReason.ERROR, error=msg)
            events.append(EngineEvent(request_id=rid, kind="error", error=msg, finish_reason=FinishReason.ERROR.value))
        self._in_flight.clear()
        self._adds, self._processed, self._aborts = [], [], []
        self._unfinished = self._needs_release = False
        self.close()
        return events

    def run_until_done(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        while self.has_unfinished():
            events += self.step()
        if self._needs_release and self.failed is None and not self._closed:
            self._needs_release = False
            events += self.step(release=True)
        return events

    @property
    def in_flight(self) -> set[str]:
        return set(self._in_flight)


__all__ = ["TPExecutor", "TPExecutorError"]
