"""bench/gpu_check.sh is valid bash, runs its CPU sections on a machine without CUDA (skipping every GPU section
loudly), keeps to its time budget, and writes its result file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
GPU_SECTIONS = ("install_gpu_extra", "test_gpu_torch", "test_gpu_cuda_graph", "bench_decode", "engine_real",
                "bench_kernels", "test_gpu_flashinfer_attention", "engine_real_fp8", "test_gpu_flashinfer_moe")


def _run(tmp_path: Path, budget: int, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, FORCE_CPU="1", OUT_DIR=str(tmp_path / "out"), RESULT_JSON=str(tmp_path / "result.json"),
               BUDGET_S=str(budget))
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, json.loads((tmp_path / "result.json").read_text())


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cpu_run_skips_gpu_sections_loudly_and_runs_the_rest(tmp_path):
    proc, result = _run(tmp_path, budget=500, timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {s["name"]: s["status"] for s in result["sections"]}
    for name in GPU_SECTIONS:
        assert status[name] == "skipped-no-gpu", (name, status)
        assert f"[{name}] SKIPPED" in proc.stdout
    assert status["env"] == status["plan_memory"] == status["engine_smoke"] == "ok", status
    assert result["card"] == "cpu" and result["failed_sections"] == 0 and not result["have_gpu"]
    assert result["engine_smoke"]["seconds_per_image"] > 0
    plans = (tmp_path / "out" / "plan_memory.log").read_text()
    assert plans.count("fits:") == 4 and "tensor parallel 4 + expert parallel" in plans


def test_budget_is_never_exceeded(tmp_path):
    proc, result = _run(tmp_path, budget=20, timeout=60)  # nothing fits in 20 s: every section is skipped, loudly
    assert proc.returncode == 0
    assert {s["status"] for s in result["sections"]} <= {"skipped-budget", "skipped-no-gpu", "skipped-by-request"}
    assert "budget is spent" in proc.stdout and result["total_s"] < 20
