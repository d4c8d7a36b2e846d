"""Reliability suite fixtures: the real server (API process + engine-core process) on loopback with the tiny Distil
model, the malformed-request catalogue and the probes (/metrics, /proc RSS) the soak and fault tests share.

Requests are tiny on purpose (64x64 or 256x256 output, 1 diffusion step, a few think tokens); every load loop is
bounded in count and in time. The large runs are marked `slow` (excluded from the default run)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from diffgentor.bench.serve import RequestSpec, scrape_metrics
from diffgentor.engine.testing.tiny_model import make_tiny

from helpers import free_port, random_png

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-Distil"
NUM_KV_BLOCKS = 2048
GEN = {"size": "64x64", "num_inference_steps": 1, "bot_task": "image"}


def png(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    return random_png(h, w, seed)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("rel") / MODEL, distil=True)


class Server:
    def __init__(self, ckpt: Path, log_dir: Path, max_num_seqs: int = 8, extra: list[str] | None = None,
                 preexec_fn=None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w+")
        cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(ckpt), "--port", str(self.port),
               "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs",
               str(max_num_seqs), "--max-num-batched-tokens", "16384", "--log-level", "warning",
               "--max-upload-bytes", str(1 << 20), *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail("server did not start:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text()

    def core_pid(self) -> int:
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        core = [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(core) == 1, children
        return core[0]

    def rss_mib(self, pid: int | None = None) -> float:
        for line in Path(f"/proc/{pid or self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.base)

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        deadline = time.time() + timeout
        m: dict[str, float] = {}
        while time.time() < deadline:
            m = self.metrics()
            if m.get("diffgentor:num_requests_running") == 0 and m.get("diffgentor:num_requests_waiting") == 0 \
                    and m.get("diffgentor:kv_cache_usage_perc") == 0:
                return m
            time.sleep(0.2)
        raise AssertionError(f"the engine did not go idle: {m}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    s = Server(tiny_ckpt, tmp_path_factory.mktemp("log"))
    yield s
    s.stop()


@pytest.fixture()
def make_server(tiny_ckpt, tmp_path):
    """A fresh server per test (for the fault tests that kill or stop it)."""
    made: list[Server] = []

    def make(**kw) -> Server:
        made.append(Server(tiny_ckpt, tmp_path, **kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


# ------------------------------------------------------------------------------------------------ the load
def good_spec(i: int, stream: bool = False) -> RequestSpec:
    """A valid request: an edit (multipart, one image) on even i, a generation (JSON) on odd i."""
    if i % 2:
        body = dict(GEN, prompt=f"a lighthouse {i}", seed=i, stream=stream)
        return RequestSpec("/v1/images/generations", json=body, stream=stream, tag="good")
    data = {k: str(v) for k, v in GEN.items()} | {"prompt": f"make it blue {i}", "seed": str(i),
                                                  "stream": str(stream).lower()}
    return RequestSpec("/v1/images/edits", data=data, files=[("image", ("in.png", png(seed=i % 4), "image/png"))],
                       stream=stream, tag="good")


BAD_KINDS = ("corrupt_bytes", "oversized_file", "four_images", "bad_size", "bad_steps", "bad_n", "unknown_field_type",
             "wrong_content_type", "bad_json", "no_prompt", "unknown_model", "bad_bot_task",
             # 5xx that schemathesis found (tests/reliability/test_schemathesis.py)
             "one_pixel_high", "huge_seed", "text_only_bot_task")


def bad_spec(kind: str, i: int = 0) -> RequestSpec:
    """A malformed request that must be answered with a 4xx OpenAI error (never a 5xx, never a crash)."""
    img = ("image", ("in.png", png(seed=1), "image/png"))
    form = {k: str(v) for k, v in GEN.items()} | {"prompt": "x"}
    edits, gens = "/v1/images/edits", "/v1/images/generations"
    if kind == "corrupt_bytes":
        return RequestSpec(edits, data=form, files=[("image", ("b.png", b"\x89PNG\r\n\x1a\n" + os.urandom(200),
                                                               "image/png"))], expect_ok=False, tag=kind)
    if kind == "oversized_file":  # the fixture's server takes at most 1 MiB per file
        return RequestSpec(edits, data=form, files=[("image", ("big.png", b"\x89PNG" + b"\0" * (1 << 20) + b"1",
                                                               "image/png"))], expect_ok=False, tag=kind)
    if kind == "four_images":
        return RequestSpec(edits, data=form, files=[img] * 4, expect_ok=False, tag=kind)
    if kind == "bad_size":
        return RequestSpec(gens, json=dict(GEN, prompt="x", size=["huge", "0x0", "99999x2", "12x12"][i % 4]),
                           expect_ok=False, tag=kind)
    if kind == "bad_steps":
        return RequestSpec(gens, json=dict(GEN, prompt="x", num_inference_steps=-3), expect_ok=False, tag=kind)
    if kind == "bad_n":
        return RequestSpec(gens, json=dict(GEN, prompt="x", n="many"), expect_ok=False, tag=kind)
    if kind == "unknown_field_type":  # an unknown field (unknown_parameter) and a known one of the wrong type
        return RequestSpec(gens, json=dict(GEN, prompt="x", frobnicate={"a": 1}, seed=[1, 2]), expect_ok=False,
                           tag=kind)
    if kind == "wrong_content_type":
        return RequestSpec(edits, content=b"prompt=x", headers={"content-type": "text/plain"}, expect_ok=False,
                           tag=kind)
    if kind == "bad_json":
        return RequestSpec(gens, content=b'{"prompt": "x", ', headers={"content-type": "application/json"},
                           expect_ok=False, tag=kind)
    if kind == "no_prompt":
        return RequestSpec(edits, data={"size": "64x64"}, files=[img], expect_ok=False, tag=kind)
    if kind == "unknown_model":
        return RequestSpec(gens, json=dict(GEN, prompt="x", model="dall-e-9"), expect_ok=False, tag=kind)
    if kind == "bad_bot_task":
        return RequestSpec(gens, json=dict(GEN, prompt="x", bot_task="sing"), expect_ok=False, tag=kind)
    if kind == "one_pixel_high":  # SigLIP2 preprocessing failed on it (a RuntimeError, answered 500)
        return RequestSpec(edits, data=form, files=[("image", ("thin.png", png(h=1, w=200), "image/png"))],
                           expect_ok=False, tag=kind)
    if kind == "huge_seed":  # past the engine's 64-bit seeds: the request could not be encoded for the engine core
        return RequestSpec(gens, json=dict(GEN, prompt="x", seed=2**64), expect_ok=False, tag=kind)
    if kind == "text_only_bot_task":  # `auto` answers in text: the engine finished with no image, answered 500
        return RequestSpec(gens, json=dict(GEN, prompt="x", bot_task="auto", max_new_tokens=1), expect_ok=False,
                           tag=kind)
    raise ValueError(kind)


def mixed_load(n: int, bad_fraction: float = 0.1, seed: int = 0) -> list[RequestSpec]:
    """n requests, about bad_fraction of them malformed (cycling through every kind), shuffled."""
    import random

    rng = random.Random(seed)
    n_bad = max(1, round(n * bad_fraction))
    specs = [bad_spec(BAD_KINDS[j % len(BAD_KINDS)], j) for j in range(n_bad)]
    specs += [good_spec(i) for i in range(n - n_bad)]
    rng.shuffle(specs)
    return specs


def check_outcomes(outcomes) -> dict[str, int]:
    """Every good request succeeded; every bad one got a 4xx OpenAI error object. Returns counts."""
    lost = [(o.tag, o.status, o.error[:200]) for o in outcomes if o.expect_ok and not o.success]
    assert not lost, f"{len(lost)} good requests failed: {lost[:5]}"
    for o in outcomes:
        if o.expect_ok:
            continue
        assert 400 <= o.status < 500, (o.tag, o.status, o.error[:300])
        err = (o.error_body or {}).get("error") if isinstance(o.error_body, dict) else None
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, (o.tag, o.error_body)
    return {"good": sum(o.expect_ok for o in outcomes), "bad": sum(not o.expect_ok for o in outcomes),
            "good_ok": sum(o.success for o in outcomes if o.expect_ok)}
