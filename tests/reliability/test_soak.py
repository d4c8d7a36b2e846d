"""Soak: requests at about twice the server's measured capacity, 10% of them malformed. The server never dies,
every good request succeeds, every bad one gets a 4xx OpenAI error, and afterwards every KV block is free and the
API server's resident memory has not grown beyond a stated bound. The default run is a short version; the large
one (>= 1,000 requests, `-m slow`, DG_SOAK_N to change) is recorded in bench/results/."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from diffgentor.bench.serve import run_load

from .conftest import NUM_KV_BLOCKS, check_outcomes, good_spec, mixed_load

RSS_BOUND_SMALL_MIB = 150  # API server growth allowed over a short soak (allocator warm-up, thread pool)
RSS_BOUND_LARGE_MIB = 200  # ... over >= 1,000 requests: a leak of ~200 KiB per request would exceed it


def _capacity(server, n: int = 4) -> float:
    """Requests/s the server sustains when given n at once (tiny requests)."""
    outs, dur = asyncio.run(run_load(server.base, [good_spec(1000 + i) for i in range(n)], max_duration_s=120))
    assert all(o.success for o in outs), [o.error for o in outs if not o.success]
    return n / dur


def _soak(server, n: int, max_duration_s: float, rss_bound_mib: float, bad_fraction: float = 0.1) -> dict:
    cap = _capacity(server)
    server.wait_idle()
    rss0, core0 = server.rss_mib(), server.rss_mib(server.core_pid())
    rate = 2 * cap
    t0 = time.time()
    outs, dur = asyncio.run(run_load(server.base, mixed_load(n, bad_fraction, seed=n), request_rate=rate,
                                     burstiness=1.0, seed=n, timeout=max_duration_s, max_duration_s=max_duration_s))
    assert server.proc.poll() is None, "the server died:\n" + server.log()[-3000:]
    counts = check_outcomes(outs)
    m = server.wait_idle()
    assert m["diffgentor:kv_cache_free_blocks"] == NUM_KV_BLOCKS and m["diffgentor:kv_cache_usage_perc"] == 0
    assert m["diffgentor:num_requests_running"] == 0 and m["diffgentor:num_requests_waiting"] == 0
    rss1, core1 = server.rss_mib(), server.rss_mib(server.core_pid())
    statuses: dict[str, int] = {}
    for o in outs:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    return {"requests": n, "capacity_rps": cap, "rate_rps": rate, "duration_s": dur, "wall_s": time.time() - t0,
            **counts, "bad_4xx": sum(1 for o in outs if not o.expect_ok and 400 <= o.status < 500),
            "crashes": 0, "lost_good": counts["good"] - counts["good_ok"], "statuses": statuses,
            "kv_free_blocks_after": m["diffgentor:kv_cache_free_blocks"], "kv_blocks": NUM_KV_BLOCKS,
            "api_rss_mib_before": rss0, "api_rss_mib_after": rss1, "core_rss_mib_before": core0,
            "core_rss_mib_after": core1, "rss_bound_mib": rss_bound_mib,
            "rss_within_bound": rss1 - rss0 < rss_bound_mib}


@pytest.mark.slow  # ~60 s; the hostile-input suite covers malformed requests, health and memory on every default run
def test_soak_small(server):
    # short: 6 good requests and 6 malformed ones (the bad ones cost the engine nothing)
    rep = _soak(server, n=12, max_duration_s=90, rss_bound_mib=RSS_BOUND_SMALL_MIB, bad_fraction=0.5)
    assert rep["bad"] == 6 and rep["good_ok"] == rep["good"] == 6
    assert rep["rss_within_bound"], rep


@pytest.mark.slow
@pytest.mark.soak  # 1000 requests, up to an hour: run by hand (bench/README.md), not by make test-slow
def test_soak_large(server):
    n = int(os.environ.get("DG_SOAK_N", "1000"))
    rep = _soak(server, n=n, max_duration_s=float(os.environ.get("DG_SOAK_MAX_S", "3600")),
                rss_bound_mib=RSS_BOUND_LARGE_MIB)
    out = os.environ.get("DG_SOAK_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(rep, f, indent=2)
    print(json.dumps(rep, indent=2))
    assert rep["rss_within_bound"], rep  # after the report is written: a failed run is still recorded
