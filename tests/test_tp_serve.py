"""Tensor parallel behind the server and the batch CLI, on CPU with gloo ranks and the tiny Distil model:
`diffgentor serve --tensor-parallel-size 2` (or DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL=2) answers like the single-process
engine, streams, refuses bad input with 4xx; a rank that raises or is killed fails the in-flight requests with its
rank and message (HTTP 500) within 10 s, /health turns unhealthy, the server exits non-zero and no rank outlives it;
`diffgentor edit` with GPUS_PER_MODEL=2 (two CPU instances of two ranks) writes the single-process images."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from diffgentor.bench.serve import scrape_metrics
from diffgentor.engine.input_processor import process_request
from diffgentor.engine.offline import Engine
from diffgentor.engine.request import GenerationRequest
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.server.cli import main as cli_main

from helpers import free_port, random_png

# slow as a whole (CI runs it: make test-slow): a two-rank server and a reference server (~25 s of setup); by default
# tests/test_tp_engine.py holds TP=2 == one process, killed and failing ranks, and plans sent to ranks
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-Distil"
ENGINE_ARGS = dict(device="cpu", dtype="float32", num_kv_blocks=1024, max_num_seqs=8, max_num_batched_tokens=16384)
GEN = {"size": "64x64", "num_inference_steps": 1, "bot_task": "image"}
MAX_PIXEL_DIFF = 1  # fp32 all-reduce sums in another order: at most one level of 8-bit rounding may flip


def _png(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    return random_png(h, w, seed)


def _pixels(img) -> np.ndarray:
    if isinstance(img, (bytes, bytearray)):
        img = Image.open(io.BytesIO(img))
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _same_image(a, b) -> None:
    pa, pb = _pixels(a), _pixels(b)
    assert pa.shape == pb.shape
    assert int(np.abs(pa - pb).max()) <= MAX_PIXEL_DIFF


def _children(pid: int) -> list[int]:
    try:
        return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return []


def _exists(pid: int) -> bool:
    """The process exists at all (running, stopped or an unreaped zombie: each is a leak)."""
    return os.path.exists(f"/proc/{pid}")


class Server:
    """`diffgentor serve` in a child process; `wait_ready()` separately, so the caller can work while it loads."""

    def __init__(self, ckpt: Path, log_dir: Path, extra: list[str] = (), env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w+")
        a = ENGINE_ARGS
        cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(ckpt), "--port", str(self.port),
               "--device", a["device"], "--dtype", a["dtype"], "--num-kv-blocks", str(a["num_kv_blocks"]),
               "--max-num-seqs", str(a["max_num_seqs"]), "--max-num-batched-tokens", str(a["max_num_batched_tokens"]),
               "--log-level", "warning", *extra]
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("DG_HUNYUAN_IMAGE_3_")}
        # default SIGINT handling in the server and its ranks even when the test run itself ignores SIGINT (a
        # background job of a non-interactive shell): the rank-exception test raises KeyboardInterrupt with it
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**base_env, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait_ready(self, timeout: float = 240) -> Server:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail("server did not start:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text()

    def core_pid(self) -> int:
        core = [p for p in _children(self.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(core) == 1, core
        return core[0]

    def rank_pids(self) -> list[int]:
        """Rank pids in rank order, as the engine core logged them; they must be its children."""
        m = re.search(r"parallel executor ready: tp2 x cfg1 x sp1 \(2 ranks\) .* rank pids \[(\d+), (\d+)\]",
                      self.log())
        assert m, self.log()
        pids = [int(m.group(1)), int(m.group(2))]
        assert sorted(pids) == _children(self.core_pid()), (pids, _children(self.core_pid()))
        return pids

    def wait_running(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if scrape_metrics(self.base).get("diffgentor:num_requests_running", 0) > 0:
                return
            time.sleep(0.05)
        raise AssertionError("no request reached the engine")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ------------------------------------------------------------------------------------------------ requests
REQUESTS = {  # name -> (endpoint fields, input images); generated with TP=2 served and TP=1 in-process
    "t2i": (dict(GEN, prompt="a lighthouse at dusk", seed=11), []),
    "edit": (dict(GEN, prompt="make the sky purple", seed=12), [_png(seed=1)]),
    "think": (dict(GEN, prompt="a red cube on a table", seed=13, bot_task="think_recaption", max_new_tokens=6), []),
}


def _post(base: str, fields: dict, images: list[bytes], timeout: float = 120, **kw) -> httpx.Response:
    if images:
        data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
        files = [("image", (f"in{i}.png", b, "image/png")) for i, b in enumerate(images)]
        return httpx.post(base + "/v1/images/edits", data=data, files=files, timeout=timeout, **kw)
    return httpx.post(base + "/v1/images/generations", json=fields, timeout=timeout, **kw)


def _sse(text: str) -> list[tuple[str | None, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        event = data = None
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((event, data))
    return out


def _offline_request(name: str) -> dict:
    fields, images = REQUESTS[name]
    return dict(request_id=name, prompt=fields["prompt"], images=images, image_size=fields["size"],
                bot_task=fields["bot_task"], num_inference_steps=fields["num_inference_steps"], seed=fields["seed"],
                **({"max_new_tokens": fields["max_new_tokens"]} if "max_new_tokens" in fields else {}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tp-serve") / MODEL, distil=True)


@pytest.fixture(scope="module")
def tp_server(ckpt, tmp_path_factory):
    """Started first, loads while the TP=1 reference runs (`reference`); its last test kills it."""
    s = Server(ckpt, tmp_path_factory.mktemp("log"), extra=["--tensor-parallel-size", "2"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(ckpt, tp_server):
    """The single-process engine (TP=1, in this process) on the same requests."""
    with Engine.from_pretrained(ckpt, environ={}, max_waiting_requests=4, **ENGINE_ARGS) as eng:
        results = {r.request_id: r for r in eng.generate([_offline_request(n) for n in REQUESTS])}
        yield eng, results


# ------------------------------------------------------------------------------------------------ the served engine
# slow (CI runs it: make test-slow): ~14 s; tests/test_tp_engine.py::test_tp_engine_matches_single_process (TP=2 ==
#   one process) runs by default
@pytest.mark.slow
def test_tp2_serve_matches_single_process(tp_server, reference):
    _, ref = reference
    tp_server.wait_ready()
    assert "parallel executor ready: tp2 x cfg1 x sp1 (2 ranks)" in tp_server.log()
    assert len(tp_server.rank_pids()) == 2
    for name in ("t2i", "edit"):
        r = _post(tp_server.base, *REQUESTS[name])
        assert r.status_code == 200, r.text
        assert ref[name].error is None and ref[name].image is not None
        _same_image(base64.b64decode(r.json()["data"][0]["b64_json"]), ref[name].image)


def test_tp2_serve_stream(tp_server, reference):
    """A streamed think_recaption request: the same think text (the same generated ids) and image as TP=1."""
    _, ref = reference
    fields, images = REQUESTS["think"]
    r = _post(tp_server.wait_ready().base, dict(fields, stream=True, stream_text_deltas=True), images)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = _sse(r.text)
    assert events[-1] == (None, "[DONE]")
    text = "".join(json.loads(d)["delta"] for e, d in events if e == "image_generation.text_delta")
    done = [json.loads(d) for e, d in events if e == "image_generation.completed"]
    assert len(done) == 1, events
    assert ref["think"].error is None and ref["think"].text and text == ref["think"].text
    _same_image(base64.b64decode(done[0]["b64_json"]), ref["think"].image)


def test_tp2_serve_bad_input_is_4xx(tp_server):
    """Refused by the API server (size, corrupt image, no prompt) or by the ranks' engine cores (a prompt longer
    than the model's context: `add_processed` on every rank, the 400 carried on rank 0's event)."""
    base = tp_server.wait_ready().base
    bad = [
        _post(base, dict(GEN, prompt="x", size="12x12"), []),
        _post(base, dict(GEN, prompt="x"), [b"\x89PNG\r\n\x1a\n" + b"\0" * 100]),
        httpx.post(base + "/v1/images/generations", json=dict(GEN), timeout=30),
    ]
    long = _post(base, dict(GEN, prompt="a very long prompt " * 1500), [])
    for r in [*bad, long]:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:300]
    assert long.status_code == 400 and "the model's context is" in long.json()["error"]["message"], long.text[:300]
    assert httpx.get(base + "/health", timeout=5).status_code == 200  # and it still serves
    assert _post(base, *REQUESTS["t2i"]).status_code == 200


def test_add_processed_refusals_carry_status(reference):
    """The engine-core interface the served loop uses: duplicate id -> 400, waiting queue full -> 429."""
    eng, _ = reference
    core = eng.core
    ps = [process_request(core.ctx, GenerationRequest(request_id=f"q{i}", prompt="a cube", image_size="64x64",
                                                      bot_task="image", num_inference_steps=1)) for i in range(5)]
    for p in ps:
        core.add_processed(p)
    core.add_processed(ps[0])  # a duplicate id
    snap = core.snapshot()
    assert (snap.num_waiting, snap.num_running) == (4, 0)
    for p in ps[:4]:
        core.abort(p.request.request_id)
    events = core.step().events  # the refusals and the aborts, in order
    assert [(e.request_id, e.kind, e.status) for e in events[:2]] == [("q4", "error", 429), ("q0", "error", 400)]
    assert "too many waiting" in events[0].error and "duplicate" in events[1].error
    assert [(e.request_id, e.finish_reason) for e in events[2:]] == [(f"q{i}", "abort") for i in range(4)]
    while core.has_unfinished_requests():
        core.step()
    assert core.snapshot().num_free_blocks == core.num_blocks


def test_tp2_rank_exception_reaches_the_client(tp_server):
    """Last user of the module's server: rank 1 raises (SIGINT -> KeyboardInterrupt) inside a step; the in-flight
    request's HTTP 500 names rank 1 and the exception; the server exits non-zero and no rank remains."""
    tp_server.wait_ready()
    ranks, core = tp_server.rank_pids(), tp_server.core_pid()
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=_post(tp_server.base, dict(GEN, prompt="slow", seed=1,
                                                                                  num_inference_steps=200), [])))
    t.start()
    tp_server.wait_running()
    t0 = time.monotonic()
    # a KeyboardInterrupt that lands inside a finaliser / __del__ is printed and ignored by Python, so repeat the
    # signal until the rank is gone (the first one almost always does it)
    while t.is_alive() and _exists(ranks[1]) and time.monotonic() - t0 < 5:
        os.kill(ranks[1], signal.SIGINT)
        t.join(0.2)
    t.join(30)
    took = time.monotonic() - t0
    r = out["r"]
    assert r.status_code == 500, r.text[:500]
    msg = r.json()["error"]["message"]
    assert "rank 1 failed: KeyboardInterrupt" in msg, msg
    assert took < 10, took
    assert tp_server.proc.wait(30) != 0
    deadline = time.monotonic() + 10
    while any(map(_exists, [core, *ranks])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_exists, [core, *ranks]))
    print(f"\nrank exception reached the client in {took:.2f} s")


# slow (CI runs it: make test-slow): ~19 s; tests/test_tp_engine.py::test_killed_rank_fails_in_flight_requests runs
#   by default
@pytest.mark.slow
def test_tp2_killed_rank_fails_in_flight_and_server_exits(ckpt, tmp_path):
    """GPUS_PER_MODEL=2 (no flag): SIGKILL rank 1 with a streamed and a plain request in flight: both fail within
    10 s naming the dead rank (500 / an SSE error event), /health turns 503, the server exits non-zero, and neither
    the engine core nor any rank remains."""
    s = Server(ckpt, tmp_path, env={"DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL": "2"})
    try:
        s.wait_ready()
        ranks, core = s.rank_pids(), s.core_pid()
        out: dict = {}
        slow = dict(GEN, prompt="slow", num_inference_steps=200)
        threads = [threading.Thread(target=lambda k=k, seed=seed: out.update(
            {k: (_post(s.base, dict(slow, seed=seed, stream=k == "stream"), []), time.monotonic())})) for k, seed in
            (("plain", 1), ("stream", 2))]
        for t in threads:
            t.start()
        s.wait_running()
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        saw_503 = False
        while s.proc.poll() is None and time.monotonic() - killed < 30:
            try:
                saw_503 |= httpx.get(s.base + "/health", timeout=2).status_code == 503
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        for t in threads:
            t.join(30)
        want = f"rank 1 (pid {ranks[1]}) exited with code -9"
        plain, t_plain = out["plain"]
        assert plain.status_code == 500, plain.text[:500]
        assert set(plain.json()["error"]) == {"message", "type", "param", "code"}
        assert want in plain.json()["error"]["message"], plain.text[:500]
        stream, t_stream = out["stream"]
        errors = [json.loads(d) for e, d in _sse(stream.text) if e == "error"]
        assert errors and want in errors[0]["error"]["message"], stream.text[:500]
        assert max(t_plain, t_stream) - killed < 10, (t_plain - killed, t_stream - killed)
        assert s.proc.wait(30) != 0
        assert saw_503 or "engine core died" in s.log()
        deadline = time.monotonic() + 10
        while any(map(_exists, [core, *ranks])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_exists, [core, *ranks]))
        print(f"\nkilled rank: requests failed {t_plain - killed:.2f} s / {t_stream - killed:.2f} s after the kill")
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ the batch CLI
@pytest.mark.slow  # ~30 s; keeps the default run under 10 min (run: pytest -m slow tests/test_tp_serve.py)
def test_edit_cli_two_tp2_cpu_instances_match_single_process(ckpt, tmp_path, monkeypatch):
    """`diffgentor edit` with GPUS_PER_MODEL=2 and --num_instances 2 on CPU: two instances of two gloo ranks each
    write the images (and think text) of a single-process run. Rows without input images: the tiny VAE's CPU
    encode of a condition image is the slow part and is covered by the served edit above."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "instruction"])
        w.writeheader()
        w.writerows([{"index": str(i), "instruction": f"a blue cube number {i}"} for i in range(2)])
    common = ["edit", "--backend", "hunyuan_image_3", "--model_name", str(ckpt), "--input", str(data / "d.csv"),
              "--num_inference_steps", "1", "--image_size", "64x64", "--seed", "5", "--device", "cpu", "--dtype",
              "float32", "--num-kv-blocks", "512", "--no_progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DG_HUNYUAN_IMAGE_3_")}
    env["DG_HUNYUAN_IMAGE_3_MAX_NEW_TOKENS"] = "6"  # think_recaption (the default task), briefly
    tp = subprocess.Popen([sys.executable, "-m", "diffgentor.server.cli", *common, "--output_dir",
                           str(tmp_path / "tp"), "--num_instances", "2", "--log_dir", str(tmp_path / "logs")],
                          env={**env, "DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL": "2"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    for k in [k for k in os.environ if k.startswith("DG_HUNYUAN_IMAGE_3_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("DG_HUNYUAN_IMAGE_3_MAX_NEW_TOKENS", "6")
    assert cli_main([*common, "--output_dir", str(tmp_path / "single")]) == 0  # meanwhile, in this process
    _, err = tp.communicate(timeout=300)
    assert tp.returncode == 0, err[-3000:]
    assert "2 instances: 0 on CPU (1 rows" in err and "1 on CPU (1 rows" in err, err[-2000:]
    for i in range(2):
        log = (tmp_path / "logs" / f"instance{i}.log").read_text()
        assert "parallel executor ready: tp2 x cfg1 x sp1 (2 ranks)" in log
    rows = {}
    for name in ("single", "tp"):
        with open(tmp_path / name / "results.csv", newline="") as f:
            rows[name] = {r["index"]: r for r in csv.DictReader(f)}
    assert sorted(rows["tp"]) == sorted(rows["single"]) == ["0", "1"]
    for i in ("0", "1"):
        a, b = rows["single"][i], rows["tp"][i]
        assert a["error"] == b["error"] == ""
        assert a["instruction_enhanced"] and a["instruction_enhanced"] == b["instruction_enhanced"]
        _same_image(Image.open(a["output_image"]), Image.open(b["output_image"]))
