"""OS-process helpers every engine process (API server, engine core, rank) needs: exit with its parent, return freed
heap to the OS, read its peak memory."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def exit_with_parent(parent_pid: int, on_exit: Callable[[], None] | None = None, interval_s: float = 0.5) -> None:
    """Start a daemon thread that ends this process (after ``on_exit``) once ``parent_pid`` is no longer its
    parent. A thread, not the main loop's own check, so that loading a checkpoint or a long step, or a rank blocked
    in a collective, cannot keep an orphan alive."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        logger.warning("the parent process (pid %d) is gone; exiting", parent_pid)
        try:
            if on_exit is not None:
                on_exit()
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS.

    glibc keeps freed chunks in its arenas, so a process's resident set stays at its high-water mark after a burst
    (a load spike of queued requests in the API server, the loader's temporaries in a rank). `malloc_trim(0)` is
    cheap when there is little to return and a no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


__all__ = ["exit_with_parent", "release_host_memory", "vm_hwm_kb"]
