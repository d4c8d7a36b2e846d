"""Tensor-parallel execution of the engine core: one process per rank, all stepping in lockstep (SGLang-style).

Every rank process runs its own `EngineCore` replica over its shard of the model (`EngineCore.from_config(config,
parallel=ctx)`). The core is deterministic, so replicas given the same request arrivals / aborts in the same order
(and, thanks to the model's collectives, identical logits and hidden states) schedule, sample and diffuse alike.
The frontend, `TPExecutor`, therefore only broadcasts each step's inputs and collects the outputs:

* input (frontend PUSH -> rank PULL, one ipc:// socket per rank): `StepCmd` (new `GenerationRequest`s and
  `ProcessedRequest`s, aborts, then one core step) or `ShutdownCmd`;
* output (every rank PUSH -> frontend PULL, one ipc:// socket): `RankReady` once the shard is loaded, `RankReply` per
  step (rank 0 carries the events, finished results and its scheduler snapshot; every rank a digest of its events,
  so diverging replicas are caught, and its error messages, so the report says what each rank saw), or `RankFailed`
  (the rank's number and exception) before a rank exits on a fatal error.

Failure handling: the frontend waits for a step's replies in short polls, checking every rank's process liveness in
between, so a rank that dies is noticed within `poll_s`; a rank that hangs is noticed after `step_timeout_s` (and the
torch.distributed process group's own timeout, `pg_timeout_s`, ends collectives blocked on a dead peer). On a rank
failure the executor fails every in-flight request with a clear error (error events + error results), stops every
rank (terminate, then kill, then join: no zombies), sets `failed` and raises `TPExecutorError` on any later use.
A rank exits by itself when its parent (the frontend's process) is gone.

`TPExecutor` implements `EngineCore`'s public interface (add_request, add_processed, abort, step, has_unfinished,
needs_release, run_until_done, poll_failures, snapshot, results, failed, num_blocks), so both the offline `Engine`
(``tensor_parallel_size > 1``) and the served engine-core process (`engine.core_proc`) drive it unchanged. On CPU
the ranks use gloo with a file:// rendezvous; on CUDA nccl, rank r on device r of the visible devices.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import time
import traceback
import weakref
from collections import Counter
from typing import Any

import msgspec

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.request import CoreSnapshot, EngineEvent, FinishReason, GenerationRequest, RequestResult
from diffgentor.engine.request_state import ProcessedRequest

logger = logging.getLogger(__name__)


class TPExecutorError(RuntimeError):
    """A tensor-parallel rank failed to start, died, hung, or the replicas diverged."""


# ------------------------------------------------------------------------------------------------ messages
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


def _to_wire(t) -> WireTensor:
    import torch

    t = t.detach().cpu().contiguous()
    return WireTensor(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                      data=t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _from_wire(w: WireTensor):
    import torch

    dtype = getattr(torch, w.dtype)
    if not w.data:
        return torch.empty(w.shape, dtype=dtype)
    return torch.frombuffer(bytearray(w.data), dtype=torch.uint8).view(dtype).reshape(w.shape)


def _result_to_wire(res: RequestResult) -> WireResult:
    import io

    png = b""
    if res.image is not None:
        buf = io.BytesIO()
        res.image.save(buf, format="PNG")
        png = buf.getvalue()
    lat = _to_wire(res.latents) if res.latents is not None else None
    stripped = msgspec.structs.replace(res, image=None, latents=None,
                                       finish_reason=getattr(res.finish_reason, "value", res.finish_reason))
    return WireResult(result=stripped, latents=lat, image_png=png)


def _result_from_wire(w: WireResult) -> RequestResult:
    import io

    res = w.result
    try:
        res.finish_reason = FinishReason(res.finish_reason)
    except ValueError:
        pass
    if res.image_size is not None:
        res.image_size = tuple(res.image_size)
    if w.latents is not None:
        res.latents = _from_wire(w.latents)
    if w.image_png:
        from PIL import Image

        res.image = Image.open(io.BytesIO(w.image_png))
        res.image.load()
    return res


def _int_env(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name) or default))
    except ValueError:
        return default


def vm_hwm_kb(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM, kB) of a process from /proc; 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------------------ the rank process
def _rank_main(rank: int, world_size: int, config: EngineConfig, init_method: str, in_addr: str, out_addr: str,
               expert_parallel: bool, pg_timeout_s: float, parent_pid: int, num_threads: int | None) -> None:
    """Entry of one spawned rank: join the group, load the shard, announce readiness, then step on command."""
    import zmq

    from diffgentor.engine.core_proc import exit_with_parent

    exit_with_parent(parent_pid)  # also while loading or blocked in a collective
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    zctx = zmq.Context()
    out, inp = _rank_sockets(zctx, in_addr, out_addr)
    _serve_rank(rank, world_size, config, init_method, out, inp, expert_parallel, pg_timeout_s, num_threads,
                device_index=rank, parent_pid=parent_pid)


def _rank_sockets(zctx, in_addr: str, out_addr: str):
    import zmq

    out = zctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(out_addr)
    inp = zctx.socket(zmq.PULL)
    inp.setsockopt(zmq.LINGER, 0)
    inp.connect(in_addr)
    return out, inp


def _serve_rank(rank: int, world_size: int, config: EngineConfig, init_method: str, out, inp, expert_parallel: bool,
                pg_timeout_s: float, num_threads: int | None, device_index: int, parent_pid: int | None) -> None:
    """The rank's life after its sockets exist: join the group, load its shard, then step on command until a
    shutdown (exit 0) or an error (reported as `RankFailed`, exit 1). Never returns."""
    import zmq

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(RankInput)
    try:
        import torch

        from diffgentor.engine.core import EngineCore
        from diffgentor.engine.parallel import init_distributed

        if num_threads:
            torch.set_num_threads(num_threads)
        cuda = config.on_cuda()
        if cuda:
            torch.cuda.set_device(device_index)
        ctx = init_distributed("nccl" if cuda else "gloo", init_method, rank, world_size,
                               expert_parallel=expert_parallel, timeout_s=pg_timeout_s)
        core = EngineCore.from_config(config, parallel=ctx)
        out.send(enc.encode(RankReady(rank=rank, pid=os.getpid(), num_blocks=core.num_blocks,
                                      snapshot=core.snapshot())))
        poller = zmq.Poller()
        poller.register(inp, zmq.POLLIN)
        while True:
            if not poller.poll(1000):
                if parent_pid is not None and os.getppid() != parent_pid:
                    logger.warning("the frontend (pid %d) is gone; exiting", parent_pid)
                    break
                continue
            msg = dec.decode(inp.recv())
            if isinstance(msg, ShutdownCmd):
                break
            if not isinstance(msg, StepCmd):
                continue
            events: list[EngineEvent] = []
            for req in msg.adds:
                events += core.add_request(req)
            for p in msg.processed:
                events += core.add_processed(p)
            for rid in msg.aborts:
                events += core.abort(rid)
            if core.has_unfinished():
                events += core.step()
            elif msg.release or core.needs_release():
                events += core.run_until_done()
            reply = RankReply(rank=rank, seq=msg.seq, unfinished=core.has_unfinished(),
                              digest=[f"{e.request_id}:{e.kind}:{e.finish_reason}" for e in events],
                              errors={e.request_id: e.error or "" for e in events if e.kind == "error"},
                              vm_hwm_kb=vm_hwm_kb())
            done = [e.request_id for e in events if e.kind in ("finished", "error")]
            results = [core.results.pop(rid) for rid in done if rid in core.results]
            if rank == 0:
                reply.events = events
                reply.results = [_result_to_wire(r) for r in results]
                reply.snapshot = core.snapshot()
            out.send(enc.encode(reply))
    except BaseException as e:  # noqa: BLE001 - report, then die with a non-zero status
        msg = f"{type(e).__name__}: {e}"
        logger.error("rank %d failed: %s\n%s", rank, msg, traceback.format_exc())
        try:
            out.send(enc.encode(RankFailed(rank=rank, error=msg)))
            time.sleep(0.1)
        except Exception:  # noqa: BLE001
            pass
        os._exit(1)
    inp.close(linger=0)
    out.close()
    os._exit(0)  # skip interpreter teardown (process-group destructors may block on departed peers)


def _exit_when_disconnected(zctx, sock, what: str) -> None:
    """Watch `sock`'s connection from a thread: once the frontend's end goes away (its process died, its node is
    unreachable), this rank exits at once instead of waiting forever for a step that will never come."""
    import threading

    import zmq
    from zmq.utils.monitor import recv_monitor_message

    mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # fires only after a connection was up, never while
    # the frontend is still starting (those are connect retries)

    def watch() -> None:
        while True:
            if recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                logger.warning("lost the connection to the frontend (%s); exiting", what)
                os._exit(1)

    threading.Thread(target=watch, name="frontend-watch", daemon=True).start()


def _heartbeat(zctx, out_addr: str, rank: int) -> None:
    import threading

    import zmq

    def beat() -> None:
        s = zctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 4)
        s.connect(out_addr)
        frame = msgspec.msgpack.encode(RankHeartbeat(rank))
        while True:
            try:
                s.send(frame, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def run_external_rank(connect: str, setup_timeout_s: float = 600.0, environ: dict[str, str] | None = None) -> int:
    """Entry of a rank started by torchrun (`diffgentor tp-worker --connect HEAD:PORT`), on any node.

    Rank, world size and the local GPU come from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; the process group
    rendezvous is torchrun's (env://: MASTER_ADDR / MASTER_PORT). The rank connects to the frontend (`diffgentor
    serve|edit ... --tensor-parallel-size N --rank-endpoint HOST:PORT`), says hello, receives the engine config
    from it (one config, no flags to keep in sync across nodes; the checkpoint path must exist on every node),
    then loads its shard and steps like a spawned rank. It exits when the frontend shuts it down (0), fails (1),
    or disappears (1)."""
    import zmq

    from diffgentor.engine.config import parse_endpoint

    env = os.environ if environ is None else environ
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"tp-worker runs under torchrun (missing {', '.join(missing)}); e.g. torchrun --nnodes 2 "
                           "--node-rank R --nproc-per-node K --master-addr HEAD --master-port 29500 -m "
                           "diffgentor.server.cli tp-worker --connect HEAD:29600")
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    host, port = parse_endpoint(connect)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    zctx = zmq.Context()
    in_addr, out_addr = f"tcp://{host}:{port + 1 + rank}", f"tcp://{host}:{port}"
    out, inp = _rank_sockets(zctx, in_addr, out_addr)
    _exit_when_disconnected(zctx, inp, in_addr)
    import socket

    out.send(msgspec.msgpack.encode(RankHello(rank=rank, world_size=world_size, pid=os.getpid(),
                                              host=socket.gethostname())))
    if not inp.poll(int(setup_timeout_s * 1000)):
        logger.error("no setup from the frontend at %s within %.0f s", connect, setup_timeout_s)
        return 1
    setup = msgspec.msgpack.Decoder(RankInput).decode(inp.recv())
    if isinstance(setup, ShutdownCmd):
        return 1
    if not isinstance(setup, RankSetup):
        logger.error("expected the setup message first, got %s", type(setup).__name__)
        return 1
    _heartbeat(zctx, out_addr, rank)
    logger.info("rank %d/%d (local %d) connected to %s; loading %s", rank, world_size, local_rank, connect,
                setup.config.model)
    _serve_rank(rank, world_size, setup.config, "env://", out, inp, setup.expert_parallel, setup.pg_timeout_s,
                setup.num_threads, device_index=local_rank, parent_pid=None)
    return 0  # not reached: _serve_rank exits the process


# ------------------------------------------------------------------------------------------------ the frontend
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

        from diffgentor.engine.parallel import expert_parallel_from_env

        self.config = config
        self.world_size = world_size or config.resolve_tensor_parallel_size()
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        self.expert_parallel = expert_parallel_from_env() if expert_parallel is None else bool(expert_parallel)
        self.step_timeout_s = step_timeout_s
        self.poll_ms = max(1, int(poll_s * 1000))
        if num_threads is None and not config.on_cuda():  # this process's thread share (OMP_NUM_THREADS), split
            num_threads = max(1, _int_env("OMP_NUM_THREADS", os.cpu_count() or 1) // self.world_size)
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
                target=_rank_main, name=f"dg-tp-rank{r}", daemon=True,
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
            res = _result_from_wire(w)
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


__all__ = ["TPExecutor", "TPExecutorError", "vm_hwm_kb"]
