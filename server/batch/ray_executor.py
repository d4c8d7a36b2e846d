"""``diffgentor edit|t2i --executor ray``: the batch job's pending rows as a Ray Dataset, mapped through a pool
of engine replicas (Ray actors) that may span many nodes.

Everything but the executor is the batch job's (`server/batch/job.py`, which calls `run_ray`): the same rows,
resume rules, per-row error texts (each replica runs `rows.Worker.run_batch`, retries included), results-CSV merge,
progress bar, summary and exit codes. What differs from the local launcher:

- a replica is a Ray actor holding ``DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL`` GPUs (0: all GPUs of the largest node; an
  actor cannot span nodes), or one CPU on a cluster without GPUs; the pool has ``--num_instances`` replicas, else
  as many as the cluster's resources hold;
- rows are streamed to whichever replica is free, ``--batch_size`` rows per call (not split into fixed shares up
  front), and each finished batch streams back to the driver, which merges it into the results CSV;
- a replica that dies (node lost, OOM, killed) is restarted by Ray and its batch is run again on a live one, up to
  ``max(1, --max_retries)`` times per batch;
- the images are written by the replicas, so ``--output_dir`` (and the input images, the model and the log folder)
  must be a path every node sees (shared storage); the driver only writes the results CSV.

A driver killed mid-run takes its replicas with it (Ray ends a job's actors when its driver exits); every image
already written is atomic and carries its own CSV row (PNG text chunks), so a rerun skips it and loses nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import pickle
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from diffgentor.server.batch import rows as R

logger = logging.getLogger("diffgentor.batch.ray")

ENV_PREFIX = "DG_HUNYUAN_IMAGE_3_"


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
        raise R.FatalError("--executor ray needs Ray Data: pip install -e '.[ray]' in the checkout (or 'ray[data]')")


# ---------------------------------------------------------------------------------------------------- pool size
def replica_resources(gpus_per_model: int, node_gpus: Sequence[float]) -> dict[str, float]:
    """Resources of one replica: ``gpus_per_model`` GPUs (0 = every GPU of the largest node), or one CPU when the
    cluster has no GPU."""
    most = int(max(node_gpus, default=0))
    if most == 0:
        return {"num_cpus": 1}
    k = gpus_per_model or most
    if k > most:
        raise R.FatalError(f"DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL={k} but the largest Ray node has {most} GPU(s); a "
                           "replica cannot span nodes")
    return {"num_gpus": k}


def pool_size(resources: dict[str, float], node_cpus: Sequence[float], node_gpus: Sequence[float],
              num_instances: int | None, num_batches: int) -> int:
    """Replicas: ``--num_instances`` when given, else how many fit on the nodes; never more than the batches."""
    if num_instances is not None:
        if num_instances < 1:
            raise R.FatalError(f"--num_instances must be >= 1, got {num_instances}")
        n = num_instances
    elif "num_gpus" in resources:
        n = sum(int(g) // int(resources["num_gpus"]) for g in node_gpus)
    else:
        n = sum(int(c) for c in node_cpus)
    return max(1, min(n, num_batches))


# ---------------------------------------------------------------------------------------------------- messages
class RowOutcome(msgspec.Struct, frozen=True):
    """One finished row, replica -> driver (msgpack in the dataset's ``outcome`` column). The rows themselves go
    driver -> replica pickled: an `EditRow`'s images mix paths (str) and embedded bytes, which msgpack cannot type."""

    index: int
    sub: int
    ok: bool
    record: dict[str, str]


class ReplicaBatch(msgspec.Struct, frozen=True):
    """The answer to one batch: its rows' outcomes, or the fatal error that stopped the replica (no model)."""

    outcomes: list[RowOutcome] = []
    fatal: str | None = None


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(ReplicaBatch)


# ---------------------------------------------------------------------------------------------------- replica
class Replica:
    """One engine replica (a Ray actor): runs a batch of pickled `rows.Task`s through `rows.Worker`."""

    def __init__(self, args: dict[str, Any], environ: dict[str, str], cwd: str, base_dir: str, cache_dir: str,
                 log_dir: str) -> None:
        # relative paths (model, inputs, outputs) mean what they mean to the driver: its folder must be shared too
        os.chdir(cwd)
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        R.setup_logging(Path(log_dir) / f"ray-replica-{socket.gethostname()}-{os.getpid()}.log",
                         console_level=logging.ERROR)
        ns = argparse.Namespace(**args)
        # the driver's DG_HUNYUAN_IMAGE_3_* variables (a Ray worker has the raylet's environment, not the driver's)
        config = R.resolve_kernels(R.engine_config(ns, {**os.environ, **environ}))
        self.worker = R.Worker(ns, config, Path(base_dir), Path(cache_dir))
        logger.info("replica %s ready (CUDA_VISIBLE_DEVICES=%s)", self.where, os.environ.get("CUDA_VISIBLE_DEVICES"))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        tasks = [pickle.loads(b) for b in batch["task"]]
        try:
            outcomes = self.worker.run_batch(tasks)
        except R.FatalError as e:  # the model did not load: the driver stops the run (exit code 2)
            answer = ReplicaBatch(fatal=str(e))
        else:
            logger.info("replica %s: rows %s done", self.where, ",".join(str(t.row.index) for t in tasks))
            answer = ReplicaBatch([RowOutcome(o.key[0], o.key[1], o.ok, o.record) for o in outcomes])
        return {"answer": [_ENCODER.encode(answer)]}  # one row per batch (map_batches may change the row count)

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()


# ---------------------------------------------------------------------------------------------------- driver
def run_ray(args: argparse.Namespace, pending: Sequence[R.Task], base: Path, cache_dir: Path, log_dir: Path,
            on_outcomes: Callable[[list[R.Outcome]], None], progress: R.Progress) -> None:
    """Run ``pending`` on a Ray cluster (``--ray-address``, else ``RAY_ADDRESS``, else a local one started here);
    ``on_outcomes`` gets every finished batch (the caller merges and rewrites the results CSV)."""
    require_ray()
    import ray
    import ray.data

    init: dict[str, Any] = {"address": args.ray_address} if args.ray_address else {}
    if not args.ray_address and not os.environ.get("RAY_ADDRESS"):
        # a new cluster of this machine alone ("local": not whatever cluster /tmp/ray last recorded), on loopback
        # (the default, the address of the default route, may be one this machine cannot reach itself on: the run
        # then hangs waiting for its own GCS)
        init = {"address": "local", "_node_ip_address": "127.0.0.1"}
    try:
        ray.init(**init, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True,
                 include_dashboard=False)
    except Exception as e:  # noqa: BLE001 - no cluster at that address, bad address, ...
        raise R.FatalError(f"could not connect to Ray ({args.ray_address or 'a new local cluster'}): "
                           f"{type(e).__name__}: {e}") from e
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = [n["Resources"].get("CPU", 0) for n in nodes]
        node_gpus = [n["Resources"].get("GPU", 0) for n in nodes]
        gpus_per_model = R.engine_config(args).ranks_per_instance or 0
        resources = replica_resources(gpus_per_model, node_gpus)
        n = pool_size(resources, node_cpus, node_gpus, args.num_instances, math.ceil(len(pending) / args.batch_size))
        where = f"{resources['num_gpus']} GPU(s)" if "num_gpus" in resources else "1 CPU"
        progress.write(f"Ray: {n} replica(s) of {where} each on {len(nodes)} node(s) "
                       f"({sum(node_cpus):g} CPUs, {sum(node_gpus):g} GPUs); logs in {log_dir}")

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        # the rows go to the replicas in file order, one --batch_size batch per call
        num_batches = math.ceil(len(pending) / args.batch_size)
        ds = ray.data.from_items([{"task": pickle.dumps(t)} for t in pending], override_num_blocks=num_batches)
        environ = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        worker_args = {k: v for k, v in vars(args).items() if k not in ("func", "worker_spec")}
        out = ds.map_batches(
            Replica, batch_size=args.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n),  # `concurrency=n` is deprecated since Ray 2.51
            fn_constructor_kwargs={"args": worker_args, "environ": environ, "cwd": os.getcwd(), "base_dir": str(base),
                                   "cache_dir": str(cache_dir), "log_dir": str(log_dir)},
            max_restarts=-1, max_task_retries=max(1, args.max_retries), **resources)
        for batch in out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for raw in batch["answer"]:
                answer = _DECODER.decode(raw)
                if answer.fatal:
                    raise R.FatalError(answer.fatal)
                on_outcomes([R.Outcome((o.index, o.sub), o.ok, dict(o.record)) for o in answer.outcomes])
    except R.FatalError:
        raise
    except Exception as e:  # noqa: BLE001 - a batch whose replica died more than the retries allow, ...
        logger.exception("the Ray job failed")
        raise R.FatalError(f"the Ray job failed: {type(e).__name__}: {_first_line(e)}; finished rows are kept "
                           "(rerun to resume)") from e
    finally:
        ray.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
