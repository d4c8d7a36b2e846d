"""`verify-golden` over tensor-parallel rank processes (gloo on CPU): the sharded model reproduces the golden set,
and a rank that dies, hangs or errors fails the run naming the rank, with no rank process left behind."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from diffgentor.engine.models.hunyuan_image_3.golden import (
    GoldenParallelError,
    Line,
    ParallelGoldenRun,
    Report,
    agreed_report,
    verify_golden_set,
)
from diffgentor.server.cli import main


def _gone(pids: list[int]) -> bool:
    """True when no process with these ids exists any more (joined, so not even a zombie)."""
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


# slow (CI runs it: make test-slow): ~9 s; TP=2 == one process: tests/test_tp_engine.py runs by default
@pytest.mark.slow
def test_tp2_tiny_golden_set_passes(golden_tiny, capsys):
    """The whole tiny set (text logits, cached greedy decode with the single-token MoE quirk, CFG denoiser steps, a
    full generation, an edit with ViT + VAE conditions) at TP=2 through the CLI, within the 1e-4 tolerance."""
    assert main(["verify-golden", str(golden_tiny), "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "(tensor parallel 2): 40 passed, 0 failed" in out
    assert "ok   text.safetensors:logits" in out and "ok   text.safetensors:generate_step_logits" in out


def test_rank_killed_fails_naming_it_and_stops_the_others(golden_tiny):
    run = ParallelGoldenRun(golden_tiny, tensor_parallel_size=2, timeout_s=120)
    pids = run.pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(GoldenParallelError, match=r"rank 1 \(pid \d+\) was killed by signal 9"):
        run.wait()
    assert _gone(pids)


def test_hung_ranks_time_out_and_are_stopped(golden_tiny):
    run = ParallelGoldenRun(golden_tiny, tensor_parallel_size=2, timeout_s=0.5)
    pids = run.pids
    t0 = time.monotonic()
    with pytest.raises(GoldenParallelError, match=r"rank\(s\) \[0, 1\] did not finish within 0.5 s"):
        run.wait()
    assert time.monotonic() - t0 < 30
    assert _gone(pids)


# slow (CI runs it: make test-slow): ~5 s; rank errors:
#   tests/test_tp_engine.py::test_rank_startup_failure_is_reported runs by default
@pytest.mark.slow
def test_rank_error_is_reported_with_its_rank(tmp_path, golden_tiny):
    """A set whose checkpoint is missing: every rank fails while loading and says why."""
    (tmp_path / "manifest.json").write_text((golden_tiny / "manifest.json").read_text())
    run = ParallelGoldenRun(tmp_path, tensor_parallel_size=2, timeout_s=300)
    pids = run.pids
    with pytest.raises(GoldenParallelError, match=r"rank 0 failed: .*checkpoint") as e:
        run.wait()
    assert "rank 1 failed" in str(e.value)
    assert _gone(pids)


def test_cli_reports_parallel_failure_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {}}))
    assert main(["verify-golden", str(tmp_path), "--tensor-parallel-size", "2", "--timeout", "0.5"]) == 1
    assert "did not finish within 0.5 s" in capsys.readouterr().err


def test_disagreeing_rank_reports_fail():
    a = Report("g", [Line("f", "logits", True, 1e-6, 1e-4), Line("f", "ids", True, note="exact")])
    same = Report.from_json(a.to_json())
    assert agreed_report([a, same]) is a
    other = Report("g", [Line("f", "logits", True, 2e-6, 1e-4), Line("f", "ids", True, note="exact")])
    with pytest.raises(GoldenParallelError, match=r"rank 1's report differs from rank 0's: rank 0 .*1\.000e-06"):
        agreed_report([a, other])
    with pytest.raises(GoldenParallelError, match="rank 0 has 2 lines, rank 2 1"):
        agreed_report([a, same, Report("g", a.lines[:1])])


def test_bad_sizes_rejected(golden_tiny):
    with pytest.raises(ValueError):
        verify_golden_set(golden_tiny, tensor_parallel_size=0)
    with pytest.raises(FileNotFoundError):
        ParallelGoldenRun(golden_tiny / "checkpoint", tensor_parallel_size=2)
