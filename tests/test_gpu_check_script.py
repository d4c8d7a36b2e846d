"""bench/gpu_check.sh: valid bash, lists its 9 sections, and its CPU mode (--dry-run) runs each section's CPU-provable
part and writes every section's JSON and the result file. The full dry run is `slow`; the fast test runs two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffgentor.bench.gpu_check import SECTION_NAMES, project

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _dry_run(tmp_path: Path, sections: str | None, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, OUT_DIR=str(tmp_path / "out"), RESULT_JSON=str(tmp_path / "result.json"), BUDGET_S="900")
    if sections:
        env["GPU_CHECK_SECTIONS"] = sections
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, json.loads((tmp_path / "result.json").read_text())


def test_script_is_valid_bash_and_lists_the_nine_sections():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert SECTION_NAMES == ("env_sdpa", "attention", "moe", "fp8_stack", "cuda_graphs", "e2e_edit", "vae",
                             "projection", "parallel_layouts")
    listed = subprocess.run([sys.executable, "-m", "diffgentor.bench.gpu_check", "--list"], capture_output=True,
                            text=True, cwd=REPO, check=True).stdout.splitlines()
    assert [line.split(":")[0] for line in listed] == [f"{i} {n}" for i, n in enumerate(SECTION_NAMES, 1)]
    header = SCRIPT.read_text()
    for i, name in enumerate(SECTION_NAMES, 1):
        assert f"#   {i} {name}" in header


# slow (CI runs it: make test-slow): ~9 s; test_script_is_valid_bash_and_lists_the_nine_sections runs by default
@pytest.mark.slow
def test_dry_run_of_two_sections(tmp_path):
    proc, result = _dry_run(tmp_path, "env_sdpa moe", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["dry_run"] and result["card"] == "cpu" and result["failed_sections"] == 0
    for name in ("env_sdpa", "moe"):
        sec = result["sections"][name]
        assert sec["ok"] and sec["checks"] and all(c["ok"] for c in sec["checks"]), name
    # the SDPA rules at the real shapes: the engine's calls keep a fused kernel, the old masked GQA call did not
    sdpa = result["sections"]["env_sdpa"]["sdpa"]
    assert "efficient" in sdpa["diffusion_step_expanded"]["rules"]
    assert not {"flash", "efficient"} & set(sdpa["legacy_masked_gqa"]["rules"])
    assert result["sections"]["fp8_stack"].get("missing")  # not asked for: reported missing, not passed
    assert "ok   tp4 shard sum equals the unsharded MoE" in proc.stdout


def test_projection_against_the_roofline():
    e2e = {"seconds": 20.0, "per_layer_s": 0.5, "layers": 2, "steps": 8, "think_tokens": 64}
    p = project(e2e, "h100")
    assert p["extrapolated_seconds"] == pytest.approx(20.0 + 30 * 0.5)
    assert p["images_per_min"] == pytest.approx(60 / 35.0)
    assert 0 < p["fraction_of_roofline"] < 1 and p["card"] == "h100"


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    proc, result = _dry_run(tmp_path, None, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(result["sections"]) == set(SECTION_NAMES)
    assert all(s["ok"] for s in result["sections"].values()), {n: s.get("checks") for n, s in
                                                               result["sections"].items() if not s["ok"]}
