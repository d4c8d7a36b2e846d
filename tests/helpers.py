"""Helpers shared by the test modules (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A base port with `n` consecutive free ports (a tensor-parallel frontend binds its port and one per rank)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        socks = []
        try:
            for p in range(base, base + n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port block")


def random_png(h: int, w: int, seed: int = 0) -> bytes:
    """An h x w RGB PNG of seeded noise."""
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def start_server(ckpt: Path, log_path: Path, *flags: str, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`diffgentor serve CKPT` on a free loopback port with `flags`, waited for until /health answers 200; returns
    the process and its base URL (the caller stops it). Fails the test with the server's log if it never comes up."""
    import httpx
    import pytest

    port = free_port()
    log = open(log_path, "w+")  # noqa: SIM115 - the server writes it for its whole life
    cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(ckpt), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, Path(log_path).read_text()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not start:\n" + Path(log_path).read_text())
