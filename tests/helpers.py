"""Helpers shared by the test modules (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
import random
import socket

import numpy as np
from PIL import Image


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
