"""One tensor-parallel rank: a `Worker` over its shard of the model, executing the plans the executor broadcasts.

The rank loop is "receive a plan, execute it, reply": the one scheduler lives in the engine core
(`engine.core.EngineCore`), and `engine.tp.executor.MultiprocExecutor` sends every rank the same `SchedulerOutput`
(`engine.tp.messages`); the model's collectives keep the shards in lockstep, and rank 0's `RunnerOutput` is the
step's. A rank never sees a request's text or images as the user sent them.

Two ways to start: spawned by the executor (`rank_main`, ipc:// sockets, file:// rendezvous, exits with its parent)
or by torchrun on any node (`run_external_rank`, tcp:// sockets, env:// rendezvous, heartbeats, exits when the
executor's connection drops). A rank exits 0 after a `ShutdownCmd` and 1 on any failure.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback

import msgspec

from diffgentor.engine.allocator import IdleRelease
from diffgentor.engine.config import EngineConfig
from diffgentor.engine.os_process import exit_with_parent, vm_hwm_kb
from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.engine.tp.messages import (
    HEARTBEAT_S,
    ExecuteModel,
    RankFailed,
    RankHeartbeat,
    RankHello,
    RankInput,
    RankReady,
    RankReply,
    RankSetup,
    ShutdownCmd,
    decoder,
    encoder,
)

logger = logging.getLogger(__name__)

# After the executor's connection drops, how long a rank waits for the main loop to take an already delivered
# `ShutdownCmd` (a clean shutdown: exit 0) before it exits 1 (the executor is gone).
DISCONNECT_GRACE_S = 10.0


def rank_main(rank: int, layout: ParallelLayout, config: EngineConfig, init_method: str, in_addr: str,
              out_addr: str, parent_pid: int, num_threads: int | None) -> None:
    """Entry of one spawned rank: join the group, load the shard, announce readiness, then step on command."""
    import zmq

    # A served engine core ignores SIGINT, and a spawned child inherits that; a rank keeps Python's default (a
    # signal is a KeyboardInterrupt that fails the step and reaches the client, like any rank error).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    exit_with_parent(parent_pid)  # also while loading or blocked in a collective
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    zctx = zmq.Context()
    out, inp = _rank_sockets(zctx, in_addr, out_addr)
    _serve_rank(rank, layout, config, init_method, out, inp, num_threads, device_index=rank, parent_pid=parent_pid)


def _rank_sockets(zctx, in_addr: str, out_addr: str):
    import zmq

    out = zctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(out_addr)
    inp = zctx.socket(zmq.PULL)
    inp.setsockopt(zmq.LINGER, 0)
    inp.connect(in_addr)
    return out, inp


def _serve_rank(rank: int, layout: ParallelLayout, config: EngineConfig, init_method: str, out, inp,
                num_threads: int | None, device_index: int,
                parent_pid: int | None, shutdown: threading.Event | None = None) -> None:
    """The rank's life after its sockets exist: join the group, load its shard, then execute plans until a
    shutdown (exit 0) or an error (reported as `RankFailed`, exit 1). Never returns."""
    import zmq

    enc = encoder()
    dec = decoder(RankInput)
    try:
        import torch

        from diffgentor.engine.parallel import init_distributed
        from diffgentor.engine.worker import Worker

        if num_threads:
            torch.set_num_threads(num_threads)
        cuda = config.model.on_cuda()
        if cuda:
            torch.cuda.set_device(device_index)
        ctx = init_distributed("nccl" if cuda else "gloo", init_method, rank, layout,
                               expert_parallel=bool(config.parallel.expert_parallel),
                               timeout_s=config.parallel.pg_timeout_s)
        worker = Worker.load(config, parallel=ctx)
        # only the CFG groups' leaders' outputs reach the core: no device-to-host copy of latents elsewhere
        worker.reports_latents = reports = ctx.is_group_leader
        out.send(enc.encode(RankReady(rank=rank, pid=os.getpid(), num_blocks=worker.num_blocks,
                                     kernel_impls=worker.kernel_impls, vae_budget=worker.vae_budget)))
        poller = zmq.Poller()
        poller.register(inp, zmq.POLLIN)
        idle = IdleRelease.from_config(config)
        while True:
            idle.poll()  # no step for a while: hand the freed heap back
            if not poller.poll(1000):
                if parent_pid is not None and os.getppid() != parent_pid:
                    logger.warning("the executor's process (pid %d) is gone; exiting", parent_pid)
                    break
                continue
            msg = dec.decode(inp.recv(copy=False).buffer)
            if isinstance(msg, ShutdownCmd):
                if shutdown is not None:
                    shutdown.set()
                break
            if not isinstance(msg, ExecuteModel):
                continue
            output = worker.execute_model(msg.plan)
            idle.busy()
            out.send(enc.encode(RankReply(rank=rank, seq=msg.seq, output=output if reports else None,
                                          vm_hwm_kb=vm_hwm_kb(), tokens_run=worker.runner.tokens_run)))
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


def _exit_when_disconnected(sock, what: str, shutdown: threading.Event) -> None:
    """Watch `sock`'s connection from a thread: once the executor's end goes away (its process died, its node is
    unreachable), this rank exits instead of waiting forever for a step that will never come.

    A clean shutdown also drops the connection: the executor sends `ShutdownCmd`, then closes its sockets, and the
    disconnect can be seen before the main loop has read the command. So the watcher waits up to
    `DISCONNECT_GRACE_S` for the main loop to take it (`shutdown` set: the main loop exits 0) before exiting 1."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # fires only after a connection was up, never while
    # the executor is still starting (those are connect retries)

    def watch() -> None:
        while recv_monitor_message(mon)["event"] != zmq.EVENT_DISCONNECTED:
            pass
        if shutdown.wait(DISCONNECT_GRACE_S):
            return
        logger.warning("lost the connection to the executor (%s); exiting", what)
        os._exit(1)

    threading.Thread(target=watch, name="executor-watch", daemon=True).start()


def _heartbeat(zctx, out_addr: str, rank: int) -> None:
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
    rendezvous is torchrun's (env://: MASTER_ADDR / MASTER_PORT). The rank connects to the executor (`diffgentor
    serve|edit ... --tensor-parallel-size N --rank-endpoint HOST:PORT`), says hello, receives the engine config
    from it (one config, no flags to keep in sync across nodes; the checkpoint path must exist on every node),
    then loads its shard and steps like a spawned rank. It exits when the executor shuts it down (0), fails (1),
    or disappears (1)."""
    import zmq

    from diffgentor.engine.config import TorchrunRank, parse_endpoint

    coords = TorchrunRank.from_environ(environ)
    rank, world_size, local_rank = coords.rank, coords.world_size, coords.local_rank
    host, port = parse_endpoint(connect)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    zctx = zmq.Context()
    in_addr, out_addr = f"tcp://{host}:{port + 1 + rank}", f"tcp://{host}:{port}"
    out, inp = _rank_sockets(zctx, in_addr, out_addr)
    shutdown = threading.Event()
    _exit_when_disconnected(inp, in_addr, shutdown)
    import socket

    out.send(msgspec.msgpack.encode(RankHello(rank=rank, world_size=world_size, pid=os.getpid(),
                                              host=socket.gethostname())))
    if not inp.poll(int(setup_timeout_s * 1000)):
        logger.error("no setup from the executor at %s within %.0f s", connect, setup_timeout_s)
        return 1
    setup = decoder(RankInput).decode(inp.recv())
    if isinstance(setup, ShutdownCmd):
        return 1
    if not isinstance(setup, RankSetup):
        logger.error("expected the setup message first, got %s", type(setup).__name__)
        return 1
    _heartbeat(zctx, out_addr, rank)
    logger.info("rank %d/%d (local %d) connected to %s; loading %s", rank, world_size, local_rank, connect,
                setup.config.model.checkpoint)
    if setup.layout.world_size != world_size:
        logger.error("torchrun started %d ranks, but the executor's layout is %s", world_size,
                     setup.layout.describe())
        return 1
    _serve_rank(rank, setup.layout, setup.config, "env://", out, inp, setup.rank_threads, device_index=local_rank,
                parent_pid=None, shutdown=shutdown)
    return 0  # not reached: _serve_rank exits the process


__all__ = ["rank_main", "run_external_rank"]
