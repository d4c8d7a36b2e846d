"""How an engine process's host heap serves large CPU tensors: freed memory is reused, within a ceiling.

glibc gives every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) a fresh ``mmap`` and unmaps
it on free, so each large CPU tensor (a VAE activation, a MoE buffer, a KV gather) is page-faulted in, zeroed by the
kernel, again on every call. `configure_heap` tells glibc to serve every allocation from its heap instead
(``mallopt(M_MMAP_MAX, 0)``, one arena for all threads), so a freed block is handed to the next allocation of that
size already resident; the results are bit-identical (docs/decisions.md: Host heap reuse).

Memory kept for reuse is bounded twice: after an engine step that leaves more than the ceiling of freed memory
resident (`trim_if_over`, called by the worker), and once a driver has been idle for a while (`IdleRelease`, in
the engine-core loop, the tensor-parallel ranks and after each offline batch), ``malloc_trim(0)`` hands every free
page back to the OS; glibc also returns the heap's top automatically above the ceiling (``M_TRIM_THRESHOLD``).

Everything here is a no-op off Linux glibc (the calls are looked up at run time).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from diffgentor.engine.os_process import release_host_memory

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_C_INT_MAX = 2**31 - 1  # mallopt takes a C int


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl ships no libc.so.6 anyway)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_ceiling: int | None = None
"""The ceiling `configure_heap` set in this process (None: glibc's defaults are in force); process-wide because the
allocator is."""
_baseline = 0
"""Resident bytes beyond the live heap right after the last release (code, interpreter, mapped files): what
`held_free_bytes` does not count."""


def configure_heap(reuse_bytes: int) -> bool:
    """Serve large allocations from the heap and keep up to ``reuse_bytes`` of freed memory for reuse (0: leave
    glibc's defaults alone). Applies to every later allocation of the process, also after torch is loaded; calling
    it again changes the ceiling. Returns whether the setting is in force."""
    global _ceiling
    if reuse_bytes <= 0 or _LIBC is None:
        return _ceiling is not None
    # one arena for every thread: a thread's own arena grows in 64 MiB heaps, and an allocation larger than that (a VAE
    # activation made on the encode thread, engine/encode_stage.py) falls back to a fresh mmap whatever M_MMAP_MAX
    # says, so it would be faulted in on every call again
    ok = _LIBC.mallopt(M_MMAP_MAX, 0) == 1 and _LIBC.mallopt(M_TRIM_THRESHOLD, min(reuse_bytes, _C_INT_MAX)) == 1 \
        and _LIBC.mallopt(M_ARENA_MAX, 1) == 1
    if not ok:
        logger.warning("mallopt refused the heap-reuse settings; large allocations keep glibc's defaults")
        return False
    if _ceiling is None:
        logger.info("host heap: large allocations reuse freed memory, up to %d MiB kept", reuse_bytes >> 20)
        release_free_heap()  # sets the baseline `held_free_bytes` counts from
    _ceiling = reuse_bytes
    return True


def heap_reuse_ceiling() -> int | None:
    """The ceiling in force in this process, or None when the heap keeps glibc's defaults."""
    return _ceiling


def _live_heap_bytes() -> int | None:
    """Bytes allocated and not freed (glibc ``mallinfo2``: heap chunks in use in every arena plus mapped chunks)."""
    fn = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33
    if fn is None:
        return None
    fn.restype = _MallInfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)


def resident_bytes() -> int:
    """This process's resident set (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_free_bytes() -> int | None:
    """Freed memory the process keeps resident for reuse: resident bytes beyond the live heap, less what was beyond
    it right after the last release (glibc's own free count would also count pages already handed back). None where
    glibc cannot say."""
    live = _live_heap_bytes()
    if live is None:
        return None
    return max(0, resident_bytes() - live - _baseline)


def release_free_heap() -> None:
    """Hand every free heap page back to the OS now (``malloc_trim(0)``) and take the new baseline."""
    global _baseline
    release_host_memory()
    live = _live_heap_bytes()
    if live is not None:
        _baseline = resident_bytes() - live


def trim_if_over(ceiling: int) -> bool:
    """After an engine step: hand the freed heap back when more than ``ceiling`` bytes of it are resident and heap
    reuse is on (with glibc's defaults large blocks are unmapped on free already). Returns whether it trimmed."""
    if _ceiling is None or ceiling <= 0:
        return False
    held = held_free_bytes()
    if held is None or held <= ceiling:
        return False
    release_free_heap()
    return True


class IdleRelease:
    """A driver's idle timer: `busy()` after each step; `poll()` while idle hands the freed heap back to the OS
    once, ``idle_s`` after the last busy step, so an idle engine returns to its idle footprint. A driver without a
    loop of its own (the offline `Engine` between calls) uses `release_after_idle()`, a timer thread."""

    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self.clock = clock
        self._since: float | None = None  # when the last busy step ended; None once released
        self._timer: threading.Timer | None = None
        self.releases = 0

    @classmethod
    def from_config(cls, config: Any) -> IdleRelease:
        return cls(config.cache.heap_idle_release_s)

    def busy(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._since = self.clock()

    def release_after_idle(self) -> None:
        """Release ``idle_s`` from now on a daemon thread, unless `busy()` comes first (malloc_trim is
        thread-safe)."""
        self.busy()
        self._timer = threading.Timer(self.idle_s, self.poll)
        self._timer.daemon = True
        self._timer.start()

    def poll(self) -> bool:
        if self._since is None or self.clock() - self._since < self.idle_s:
            return False
        self.release()
        return True

    def release(self) -> None:
        """Now, whatever the timer says (the end of an offline batch)."""
        self._since = None
        self.releases += 1
        release_free_heap()


__all__ = ["IdleRelease", "configure_heap", "heap_reuse_ceiling", "held_free_bytes", "release_free_heap",
           "resident_bytes", "trim_if_over"]
