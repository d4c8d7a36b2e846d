"""Returning freed heap memory to the OS.

glibc keeps freed chunks in its arenas, so a process's resident set stays at its high-water mark after a burst
(a load spike of queued requests in the API server, the loader's temporaries in a rank). `malloc_trim(0)` hands
the free pages back; it is cheap when there is little to return and a no-op off glibc."""

from __future__ import annotations

import ctypes
import sys


def release_host_memory() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
