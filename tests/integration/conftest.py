"""Integration tests: a real Ray cluster, a real Prometheus server, a real headless Chromium. Every module here
sets ``pytestmark = pytest.mark.integration`` (excluded from ``make test``; run by ``make test-integration``)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the ray CLI of the environment running the tests
FAST_ENV = {"DG_HUNYUAN_IMAGE_3_MAX_NEW_TOKENS": "6"}


def pytest_sessionstart(session):
    """In CI (``DIFFGENTOR_CI_NO_SKIPS=1``, set by .ci/run) a missing tool is an error, not a skipped test."""
    if os.environ.get("DIFFGENTOR_CI_NO_SKIPS") != "1":
        return
    import importlib.util
    import shutil

    missing = [m for m in ("ray.data", "playwright.sync_api") if importlib.util.find_spec(m.split(".")[0]) is None]
    missing += [b for b in ("prometheus", "promtool", "chromium") if shutil.which(b) is None]
    if missing:
        raise pytest.UsageError(f"DIFFGENTOR_CI_NO_SKIPS=1 but these are missing: {', '.join(missing)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DG_HUNYUAN_IMAGE_3_") and k != "RAY_ADDRESS"}
    env.update(FAST_ENV)
    # the test's Ray cluster and drivers ignore any token a local ray.init() left in ~/.ray (Ray >= 2.5x turns token
    # auth on by itself when it finds one, and a driver then fails to join a cluster started without it)
    env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra)
    return env


def write_img(path: Path, size=(64, 48), color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def tiny_distil(tmp_path_factory) -> Path:
    from diffgentor.engine.testing.tiny_model import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-HunyuanImage-3.0-Instruct-Distil", distil=True)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server started by a test (kill it if it does not exit within 30 s) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
