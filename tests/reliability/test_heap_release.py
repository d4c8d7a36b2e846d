"""A served engine core gives a burst's memory back once idle: its resident set after a burst of edits and an idle
period is within a small margin of what it was before (engine/allocator.py: freed heap is kept for reuse while the
engine is busy and handed back `heap_idle_release_s` after its last step)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import GEN, png

MARGIN_MIB = 96  # the encoder cache's new entries, allocator bookkeeping (measured: +60 MiB after 8 edits)
BURST = 4  # concurrent edits, each with its own condition image: one batched VAE encode of 4 images


def _edit(server, i: int) -> int:
    data = {k: str(v) for k, v in GEN.items()} | {"prompt": f"make it blue {i}", "seed": str(i)}
    with httpx.Client(trust_env=False, timeout=300) as c:
        r = c.post(server.base + "/v1/images/edits", data=data,
                   files={"image": ("in.png", png(96, 96, seed=100 + i), "image/png")})
    return r.status_code


def _settled_rss(server, pid: int, below: float, timeout_s: float) -> float:
    """The core's RSS once it drops to `below` MiB, or its last reading after `timeout_s`."""
    deadline = time.time() + timeout_s
    rss = server.rss_mib(pid)
    while rss > below and time.time() < deadline:
        time.sleep(0.25)
        rss = server.rss_mib(pid)
    return rss


# slow (CI runs it: make test-slow): ~26 s; heap reuse and release: tests/test_allocator.py runs by default
@pytest.mark.slow
def test_engine_core_returns_a_bursts_memory_when_idle(make_server):
    server = make_server(max_num_seqs=BURST)
    core = server.core_pid()
    assert _edit(server, BURST) == 200  # the first edit's one-off allocations (preprocessors) are not the burst
    server.wait_idle()
    time.sleep(2.0)  # past the idle release of the warm-up
    before = server.rss_mib(core)
    with ThreadPoolExecutor(BURST) as pool:
        assert list(pool.map(lambda i: _edit(server, i), range(BURST))) == [200] * BURST
    server.wait_idle()
    just_after = server.rss_mib(core)
    after = _settled_rss(server, core, before + MARGIN_MIB, timeout_s=10.0)
    print(f"engine core RSS: {before:.0f} MiB before the burst, {just_after:.0f} MiB as it went idle, "
          f"{after:.0f} MiB after the idle release")
    assert after <= before + MARGIN_MIB, (before, just_after, after)
