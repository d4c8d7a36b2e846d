"""`MultiprocExecutor`: the engine core's one scheduler drives one worker process per rank of the parallel layout
(tensor x CFG x sequence parallel, engine/parallel_layout.py).

Each step the executor broadcasts the plan (`engine.tp.messages.ExecuteModel`, the `SchedulerOutput`) to every rank
(`engine.tp.rank`), waits until every rank has executed it, and returns the step's `RunnerOutput`: rank 0's, merged
with the other CFG groups' leaders' reports of the requests their groups own (`RunnerOutput.merge_group`).

Failure handling: the executor waits for a step's replies in short polls, checking every rank's process liveness in
between, so a rank that dies is noticed within `poll_s`; a rank that hangs is noticed after `step_timeout_s` (and the
torch.distributed process group's own timeout, `pg_timeout_s`, ends collectives blocked on a dead peer). On a rank
failure the executor stops every rank (terminate, then kill, then join: no zombies), sets `failed` and raises
`ExecutorError` (the engine core then fails its in-flight requests), and again on any later use.
On CPU the ranks use gloo with a file:// rendezvous; on CUDA nccl, rank r on device r of the visible devices.
External ranks (torchrun, multi-node) connect to `config.parallel.rank_endpoint` instead of being spawned. Every
setting (timeouts, polling, threads, expert parallelism) is the config's `ParallelConfig`.
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
from typing import Any

from diffgentor.engine.config import EngineConfig, omp_num_threads
from diffgentor.engine.executor import Executor, ExecutorError
from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.engine.scheduler_output import RunnerOutput, SchedulerOutput
from diffgentor.engine.tp.messages import (
    ExecuteModel,
    RankFailed,
    RankHeartbeat,
    RankHello,
    RankOutput,
    RankReady,
    RankReply,
    RankSetup,
    ShutdownCmd,
    decoder,
    encoder,
)
from diffgentor.engine.tp.rank import rank_main

logger = logging.getLogger(__name__)


class MultiprocExecutor(Executor):
    """One worker process per rank of the layout, all executing the same plans."""

    def __init__(
        self,
        config: EngineConfig,
        layout: ParallelLayout | None = None,
    ) -> None:
        import torch.multiprocessing as mp
        import zmq

        self.config = config
        self.layout = layout or config.parallel_layout()
        self.world_size = self.layout.world_size
        self.leaders = self.layout.group_leaders()  # the ranks whose outputs make the step's output
        par = config.parallel  # the rank grid and this executor's settings
        self.expert_parallel = bool(par.expert_parallel)
        self.step_timeout_s = par.step_timeout_s
        self.poll_ms = max(1, int(par.poll_s * 1000))
        num_threads = par.num_threads
        if num_threads is None and not config.model.on_cuda():  # this process's thread share (OMP_NUM_THREADS), split
            num_threads = max(1, (omp_num_threads() or os.cpu_count() or 1) // self.world_size)
        self.failed: str | None = None
        self.num_blocks = 0
        self.rank_pids: list[int] = []
        self.rank_vm_hwm_kb: list[int] = [0] * self.world_size  # peak RSS per rank, as last reported
        self.rank_tokens: list[int] = [0] * self.world_size  # tokens each rank has forwarded, as last reported
        self._seq = 0
        self._closed = False

        self.endpoint = par.rank_endpoint  # external ranks (torchrun, multi-node) connect here
        self.heartbeat_timeout_s = par.heartbeat_timeout_s
        self._last_seen: dict[int, float] = {}  # external ranks: when each was last heard from
        self._setup = RankSetup(config=config, layout=self.layout, rank_threads=num_threads)
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
            raise ExecutorError(f"cannot bind the tensor-parallel endpoint {out_addr} .. {in_addrs[-1]}: {e}") from e
        self._enc = encoder()
        self._dec = decoder(RankOutput)
        spawn = mp.get_context("spawn")
        init_method = f"file://{self._dir}/rendezvous"
        self._procs = [] if self.endpoint is not None else [
            spawn.Process(
                target=rank_main, name=f"dg-tp-rank{r}", daemon=True,
                args=(r, self.layout, config, init_method, in_addrs[r], out_addr,
                      os.getpid(), num_threads),
            )
            for r in range(self.world_size)
        ]
        self._finalizer = weakref.finalize(self, MultiprocExecutor._cleanup, self._procs, self._dir)
        atexit.register(self._finalizer)
        try:
            for p in self._procs:
                p.start()
            self.rank_pids = [p.pid for p in self._procs]
            if self.endpoint is not None:
                logger.info("waiting for %d tensor-parallel ranks to connect to %s (torchrun ... -m "
                            "diffgentor.server.cli tp-worker --connect HEAD:PORT)", self.world_size, self.endpoint)
            self._wait_ready(par.ready_timeout_s)
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
            raise ExecutorError(f"tensor-parallel ranks disagree on the KV cache size: {sorted(blocks)}")
        self.num_blocks = blocks.pop()
        # rank 0 speaks for the group: every rank ran the same warm-up and memory plan on a GPU of the same kind
        self.kernel_impls = dict(ready[0].kernel_impls)
        self.vae_budget = ready[0].vae_budget
        if self.endpoint is not None:
            self.rank_pids = [ready[r].pid for r in range(self.world_size)]  # pids on their own nodes
        logger.info("parallel executor ready: %s (%s), %d KV blocks, rank pids %s", self.layout.describe(),
                    "expert parallel" if self.expert_parallel else "tensor parallel", self.num_blocks,
                    [ready[r].pid for r in range(self.world_size)])

    def _recv(self, deadline: float, timeout_msg) -> Any:
        """The next message from any rank; raises ExecutorError on a rank failure, death or timeout."""
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
                raise ExecutorError(dead)
            if time.monotonic() > deadline:
                raise ExecutorError(f"tensor-parallel executor: {timeout_msg()} (hung?)")

    def _raise_rank_failed(self, msg: RankFailed) -> None:
        time.sleep(min(0.5, self.poll_ms / 1000 * 2))  # let a peer's death (the usual cause) show
        dead = self._dead_ranks()
        raise ExecutorError(f"tensor-parallel rank {msg.rank} failed: {msg.error}" + (f" ({dead})" if dead else ""))

    def _on_hello(self, msg: RankHello) -> None:
        """An external rank connected: check it belongs to this group, then send it the config to load."""
        if msg.world_size != self.world_size or not 0 <= msg.rank < self.world_size:
            raise ExecutorError(f"a tensor-parallel rank on {msg.host} (pid {msg.pid}) says rank {msg.rank} of "
                                  f"{msg.world_size}, but this engine's layout is {self.layout.describe()}")
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
        MultiprocExecutor._stop(self._procs, grace_s=5.0 if self.failed is None else 0.0)
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
        MultiprocExecutor._stop(procs, grace_s=0.0)
        shutil.rmtree(tmpdir, ignore_errors=True)

    def __enter__(self) -> MultiprocExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self) -> None:
        if self.failed is not None:
            raise ExecutorError(self.failed)
        if self._closed:
            raise ExecutorError("the tensor-parallel executor is closed")

    # -------------------------------------------------------------- the Executor interface
    def check_health(self) -> None:
        """Between steps (the served loop calls this while idle): a rank that failed or died since the last step
        fails the executor now, not on the next request."""
        self.check()
        try:
            while self._out.poll(0):
                msg = self._dec.decode(self._out.recv())
                self._last_seen[msg.rank] = time.monotonic()
                if isinstance(msg, RankFailed):
                    self._raise_rank_failed(msg)
            dead = self._dead_ranks()
            if dead:
                raise ExecutorError(dead)
        except ExecutorError as e:
            self._fail(str(e))
            raise

    def execute_model(self, plan: SchedulerOutput) -> RunnerOutput:
        """Broadcast the plan to every rank; once every rank has executed it, rank 0's output merged with the other
        CFG groups' leaders' outputs."""
        self.check()
        self._seq += 1
        seq = self._seq
        try:
            frame = self._enc.encode(ExecuteModel(seq=seq, plan=plan))
            for s in self._ins:
                s.send(frame, copy=False)
            replies: dict[int, RankReply] = {}
            deadline = time.monotonic() + self.step_timeout_s
            while len(replies) < self.world_size:
                msg = self._recv(deadline, lambda: f"rank(s) {sorted(set(range(self.world_size)) - set(replies))} "
                                                   f"did not finish step {seq} within {self.step_timeout_s:.0f} s")
                if isinstance(msg, RankReply) and msg.seq == seq:
                    replies[msg.rank] = msg
            missing = [r for r in self.leaders if replies[r].output is None]
            if missing:
                raise ExecutorError(f"rank(s) {missing} sent no output for step {seq}")
        except ExecutorError as e:
            self._fail(str(e))
            raise
        for r, rep in replies.items():
            self.rank_vm_hwm_kb[r] = rep.vm_hwm_kb
            self.rank_tokens[r] = rep.tokens_run
        out = replies[0].output
        for r in self.leaders[1:]:
            out.merge_group(replies[r].output)
        return out

    def _fail(self, msg: str) -> None:
        """A rank failed: every rank is stopped, and every later use raises `msg`."""
        logger.error("%s; stopping all ranks", msg)
        self.failed = msg
        self.close()


__all__ = ["MultiprocExecutor"]
