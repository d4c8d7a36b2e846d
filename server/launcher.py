"""Model instances for the batch CLI: how many, on which GPUs, and running them as child processes.

``DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL=k`` with N visible GPUs gives N // k instances; instance i runs on the i-th
contiguous slice of the visible list (``CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7`` and k=4: instance 0 on ``0,1,2,3``,
instance 1 on ``4,5,6,7``); GPUs past the last whole slice are left idle (with a warning). k=0 (the default)
means one instance on all visible GPUs. An instance with k > 1 is tensor parallel: rank r runs on the r-th GPU
of its slice. Without GPUs the same launcher runs ``--num_instances`` CPU instances (default 1), each still with
k tensor-parallel ranks (gloo) when k > 1, sharing the CPU threads. Visible GPUs come from
``CUDA_VISIBLE_DEVICES`` when it is set, else ``torch.cuda.device_count()``.

Each child is the same CLI (``python -m diffgentor.server.cli <edit|t2i> --_worker_spec FILE``) with its slice in
``CUDA_VISIBLE_DEVICES``; it writes its own images, part-results CSV and progress file, and the parent merges.
Children get SIGTERM if the parent dies (Linux), and the parent terminates and reaps every child when it is
interrupted, so no instance outlives the run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


def visible_gpus(environ: Mapping[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """Device ids of the GPUs this process can use: the first ``torch.cuda.device_count()`` entries of
    ``CUDA_VISIBLE_DEVICES`` when it is set, else ``0..device_count-1``. Without CUDA the list is empty (a
    ``CUDA_VISIBLE_DEVICES`` naming GPUs on a machine without them gives CPU instances, with a warning)."""
    env = os.environ if environ is None else environ
    if device_count is None:
        device_count = _cuda_device_count()
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return [str(i) for i in range(device_count)]
    ids = []
    for d in (d.strip() for d in cvd.split(",")):
        if not d or d.startswith("-"):  # "-1" hides this and every later device
            break
        ids.append(d)
    if len(ids) > device_count:
        logger.warning("CUDA_VISIBLE_DEVICES=%s but %s; using %s", cvd,
                       f"only {device_count} CUDA device(s) are usable" if device_count else "CUDA is not available",
                       ",".join(ids[:device_count]) if device_count else "the CPU")
    return ids[:device_count]


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch is a dependency
        return 0


def plan_instances(gpus_per_model: int, gpus: Sequence[str], num_instances: int | None = None) -> list[list[str]]:
    """Device slices, one per instance; an empty slice is a CPU instance.

    With GPUs: k = gpus_per_model (0 = all) GPUs per instance, len(gpus) // k instances, capped by
    ``num_instances`` when given. Without GPUs: ``num_instances`` (default 1) CPU instances; k still sets each
    instance's tensor-parallel ranks (the engine's ``tensor_parallel_size``), as gloo processes on the CPU."""
    if num_instances is not None and num_instances < 1:
        raise ValueError(f"--num_instances must be >= 1, got {num_instances}")
    gpus = list(gpus)
    if not gpus:
        n = num_instances or 1
        if gpus_per_model > 1:
            logger.info("no GPU is visible: %d CPU instance(s) of %d tensor-parallel (gloo) ranks each", n,
                        gpus_per_model)
        return [[] for _ in range(n)]
    k = gpus_per_model or len(gpus)
    if k > len(gpus):
        raise ValueError(
            f"DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL={k} but only {len(gpus)} GPU(s) are visible ({','.join(gpus)})"
        )
    n = len(gpus) // k
    if num_instances is not None:
        n = min(n, num_instances)
    if n * k < len(gpus):
        logger.warning("GPUs %s are left idle: %d GPU(s) per instance x %d instance(s)", ",".join(gpus[n * k:]), k, n)
    return [gpus[i * k:(i + 1) * k] for i in range(n)]


def split_contiguous(items: Sequence, n: int) -> list[list]:
    """``items`` in n contiguous chunks whose sizes differ by at most one (earlier chunks get the extra)."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class Instance:
    rank: int
    devices: list[str]
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"GPU {','.join(self.devices)}" if self.devices else "CPU"


def instance_env(base: Mapping[str, str], devices: Sequence[str], num_instances: int) -> dict[str, str]:
    """The child's environment: its GPU slice, or (CPU instances) an equal share of the CPU threads."""
    env = dict(base)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_instances))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_instances(instances: Sequence[Instance], poll: Callable[[], None] | None = None, interval: float = 0.5) -> None:
    """Start every instance, call ``poll`` every ``interval`` seconds until all have exited, record return codes.

    On KeyboardInterrupt or SIGTERM every child is terminated (then killed after 10 s) and reaped before the
    exception propagates."""
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    try:
        for inst in instances:
            inst.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(inst.log_path, "ab") as log:
                inst.proc = subprocess.Popen(
                    inst.cmd, env=inst.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            logger.info("instance %d on %s: pid %d, log %s", inst.rank, inst.where, inst.proc.pid, inst.log_path)
        while True:
            alive = False
            for inst in instances:
                if inst.returncode is None:
                    rc = inst.proc.poll()
                    if rc is None:
                        alive = True
                    else:
                        inst.returncode = rc
            if poll is not None:
                poll()
            if not alive:
                break
            time.sleep(interval)
    except BaseException:
        stop_instances(instances)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)


def stop_instances(instances: Sequence[Instance], grace: float = 10.0) -> None:
    """Terminate the children still running, kill those that do not exit within ``grace`` seconds, reap all."""
    for inst in instances:
        if inst.proc is not None and inst.proc.poll() is None:
            inst.proc.terminate()
    deadline = time.monotonic() + grace
    for inst in instances:
        if inst.proc is None:
            continue
        try:
            inst.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            inst.proc.kill()
            inst.proc.wait()
        inst.returncode = inst.proc.returncode


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
