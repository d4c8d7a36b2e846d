"""`diffgentor serve` end to end: the real server (API process + engine-core process over ZeroMQ) on loopback with
the tiny Distil model, driven by the official `openai` client. 1 diffusion step, 256x256, short think budgets."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from diffgentor.engine.testing.tiny_model import make_tiny

from helpers import free_port, random_png, start_server

API_KEY = "sk-test-key"
FAST = dict(num_inference_steps=1, max_new_tokens=6, seed=3)
MODEL = "tiny-Distil"


def _png(h: int = 64, w: int = 96, seed: int = 0) -> bytes:
    return random_png(h, w, seed)


def _huge_png(w: int = 30000, h: int = 30000) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb as far as the header says)."""
    data = bytearray(_png(4, 4))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny(tmp_path_factory.mktemp("serve") / MODEL, distil=True)
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, base = start_server(ckpt, log, "--api-key", API_KEY, "--device", "cpu", "--dtype", "float32",
                              "--num-kv-blocks", "4096", "--max-num-seqs", "32", "--max-num-batched-tokens", "16384",
                              "--log-level", "warning", timeout_s=120)
    yield {"base": base, "proc": proc, "log": str(log)}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(20)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, timeout=300, max_retries=0)


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server["base"] + "/metrics").text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + s.labels["finished_reason"] + "}" if "finished_reason" in s.labels else "")
            out[key] = s.value
    return out


def _img_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_and_health(server, client):
    assert httpx.get(server["base"] + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_edit_with_images(client, n_images):
    files = [(f"in{i}.png", _png(64 + 16 * i, 96, i), "image/png") for i in range(n_images)]
    r = client.images.edit(image=files if n_images > 1 else files[0], prompt="make the sky purple", size="256x256",
                           model=MODEL, extra_body=FAST)
    assert len(r.data) == 1 and r.created > 0
    assert _img_of(r.data[0].b64_json).size == (256, 256)
    assert isinstance(r.data[0].revised_prompt, str)
    assert r.usage.input_tokens > 0 and r.usage.input_tokens_details.image_tokens > 0


def test_generate_n2_jpeg(client):
    r = client.images.generate(prompt="a red bicycle", size="256x256", n=2, output_format="jpeg",
                               extra_body=dict(FAST, bot_task="image"))
    assert len(r.data) == 2
    assert [_img_of(d.b64_json).format for d in r.data] == ["JPEG", "JPEG"]


def test_edit_json_data_url(server):
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    body = dict(FAST, prompt="add a moon", images=[{"image_url": url}], size="256x256", bot_task="image")
    r = httpx.post(server["base"] + "/v1/images/edits", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=300)
    assert r.status_code == 200, r.text
    assert _img_of(r.json()["data"][0]["b64_json"]).size == (256, 256)


def test_fetch_url_http(tmp_path):
    """http(s) image URLs go through `httpx` (a declared dependency); every failure is a 4xx OpenAI error."""
    import functools
    import http.server
    import threading

    from diffgentor.engine.config import ServerConfig
    from diffgentor.server.http.api import _fetch_url
    from diffgentor.server.http.openai_schemas import OpenAIError
    from diffgentor.server.url_fetch import FetchPolicy, UrlFetcher

    def fetch(url: str, limits: ServerConfig) -> bytes:  # loopback is refused unless allowed
        policy = FetchPolicy.build(limits.max_upload_bytes, ["127.0.0.1"])
        return asyncio.run(_fetch_url(url, 0, limits, UrlFetcher(policy)))

    (tmp_path / "a.png").write_bytes(_png())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert fetch(base + "/a.png", ServerConfig()) == _png()
        cases = [(base + "/missing.png", ServerConfig(), 400, "invalid_image_url"),
                 (base + "/a.png", ServerConfig(max_upload_bytes=100), 413, "file_too_large"),
                 (f"http://127.0.0.1:{free_port()}/a.png", ServerConfig(), 400, "invalid_image_url")]
        for url, limits, status, code in cases:
            with pytest.raises(OpenAIError) as e:
                fetch(url, limits)
            assert (e.value.status, e.value.code) == (status, code), url
    finally:
        srv.shutdown()
        srv.server_close()


def test_stream_text_then_image(client):
    stream = client.images.edit(image=("in.png", _png(), "image/png"), prompt="make it snowy", size="256x256",
                                stream=True, extra_body=dict(FAST, max_new_tokens=12, bot_task="think_recaption",
                                                                        stream_text_deltas=True))
    kinds = [ev.type for ev in stream]
    assert kinds[-1] == "image_edit.completed", kinds
    assert "image_edit.text_delta" in kinds and kinds.index("image_edit.text_delta") < kinds.index(
        "image_edit.completed")


@pytest.mark.parametrize("case", ["no_image", "four_images", "corrupt", "huge", "too_small", "bad_size",
                                  "unknown_model", "wrong_key", "prompt_too_long", "bad_n"])
def test_bad_inputs(server, client, case):
    img = ("in.png", _png(), "image/png")
    kw = dict(prompt="x", size="256x256", extra_body=FAST)
    c = client
    if case == "no_image":
        # the openai client needs an image argument: send a multipart body without one
        r = httpx.post(server["base"] + "/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m.png", b"x")},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        status, err = r.status_code, r.json()["error"]
        assert (status, err["param"]) == (400, "image")
        assert set(err) == {"message", "type", "param", "code"}
        return
    expected = {"four_images": (400, "image"), "corrupt": (400, "image"), "huge": (400, "image"),
                "too_small": (400, "image"),
                "bad_size": (400, "size"), "unknown_model": (404, "model"), "wrong_key": (401, None),
                "prompt_too_long": (400, "prompt"), "bad_n": (400, "n")}[case]
    if case == "four_images":
        kw["image"] = [img] * 4
    elif case == "corrupt":
        kw["image"] = ("bad.png", b"\x89PNG\r\n\x1a\nnot really a png", "image/png")
    elif case == "huge":
        kw["image"] = ("huge.png", _huge_png(), "image/png")
    elif case == "too_small":  # each side must be at least the server's minimum (4 pixels)
        kw["image"] = [img, ("small.png", _png(2, 3), "image/png")]
    elif case == "bad_size":
        kw.update(image=img, size="big")
    elif case == "unknown_model":
        kw.update(image=img, model="dall-e-9")
    elif case == "wrong_key":
        kw["image"] = img
        c = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    elif case == "prompt_too_long":
        kw.update(image=img, prompt="x" * 40000)
    elif case == "bad_n":
        kw.update(image=img, n=50)
    with pytest.raises(openai.APIStatusError) as ei:
        c.images.edit(**kw)
    e = ei.value
    assert e.status_code == expected[0], e.body
    assert set(e.body) == {"message", "type", "param", "code"} and e.body["param"] == expected[1], e.body
    if case == "too_small":
        assert "input image 1 is 3x2 pixels" in e.body["message"], e.body


def test_metrics_parse_and_move(server, client):
    before = _metrics(server)
    client.images.generate(prompt="a blue house", size="256x256", extra_body=dict(FAST, bot_task="image"))
    after = _metrics(server)
    assert after["diffgentor:request_success_total{image}"] == before["diffgentor:request_success_total{image}"] + 1
    assert after["diffgentor:images_generated_total"] == before["diffgentor:images_generated_total"] + 1
    e2e = "diffgentor:e2e_request_latency_seconds_count"
    assert after[e2e] > before[e2e]
    assert after["diffgentor:prefix_cache_queries_total"] > 0
    assert after["diffgentor:diffusion_step_latency_seconds_count"] > 0
    assert after["diffgentor:time_to_first_token_seconds_count"] > 0  # from the earlier think requests
    for name in ("diffgentor:num_requests_running", "diffgentor:num_requests_waiting", "diffgentor:kv_cache_usage_perc",
                 "diffgentor:num_preemptions_total", "diffgentor:request_queue_time_seconds_count",
                 "diffgentor:inter_token_latency_seconds_count", "diffgentor:generation_tokens_total",
                 "diffgentor:kernel_impl", "diffgentor:encode_queue_images", "diffgentor:decode_queue_images"):
        assert name in after, name


def _wait_idle(server, timeout: float = 60) -> dict[str, float]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = _metrics(server)
        if m["diffgentor:num_requests_running"] == 0 and m["diffgentor:num_requests_waiting"] == 0 \
                and m["diffgentor:kv_cache_usage_perc"] == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"the engine did not go idle: {m}")


def test_disconnect_during_think_frees_blocks(server):
    before = _metrics(server)["diffgentor:request_success_total{abort}"]
    body = {"prompt": "describe every detail, then make it night", "size": "256x256", "stream": "true",
            "stream_text_deltas": "true", "bot_task": "think_recaption", "max_new_tokens": "4000",
            "num_inference_steps": "1", "seed": "0"}
    with httpx.stream("POST", server["base"] + "/v1/images/edits", data=body, files={"image": ("a.png", _png())},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and "text_delta" in line:
                break  # the request is in its think phase: hang up
    during = _metrics(server)
    m = _wait_idle(server)
    assert m["diffgentor:request_success_total{abort}"] == before + 1, (during, m)
    assert m["diffgentor:kv_cache_free_blocks"] == 4096


# slow (CI runs it: make test-slow): ~19 s; batching: tests/test_engine.py::test_batch_invariance and the served
#   conformance tests run by default
@pytest.mark.slow
def test_32_concurrent_requests_batched(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, timeout=600, max_retries=0)
        return await asyncio.gather(*[
            c.images.generate(prompt=f"a lighthouse {i}", size="256x256",
                              extra_body=dict(num_inference_steps=1, bot_task="image", seed=i)) for i in range(32)])

    before = _metrics(server)
    results = asyncio.run(run())
    assert len(results) == 32 and all(len(r.data) == 1 for r in results)
    m = _metrics(server)
    assert m["diffgentor:request_success_total{image}"] - before["diffgentor:request_success_total{image}"] == 32
    assert m["diffgentor:max_iteration_num_requests"] >= 16  # many requests shared engine steps


def test_engine_death_is_detected(server):
    """Last: kill the engine core; /health turns 503, new requests fail, the server exits non-zero."""
    proc = server["proc"]
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    core = [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(core) == 1, children
    os.kill(core[0], 9)
    saw_503 = False
    deadline = time.time() + 30
    while proc.poll() is None and time.time() < deadline:
        try:
            r = httpx.get(server["base"] + "/health", timeout=2)
            if r.status_code == 503:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                saw_503 = True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    assert proc.wait(30) != 0
    assert saw_503 or "engine core died" in Path(server["log"]).read_text()
