"""Hostile clients against `diffgentor serve` and hostile data against `diffgentor edit`: every case of
a hostile-client probe as a test.

One server for the module (URL fetching on, small capacity, short deadlines); the SIGTERM case has
its own. Every URL target is on loopback: local HTTP servers in this process that redirect, trickle, or serve
huge bodies. The SSRF cases assert the URL is refused BEFORE any connection (the resolved address is checked first;
addresses such as 169.254.169.254 are never connected to).

Bounds (stated here, asserted at the end of the module's server run): the API process grows by less than
API_RSS_BOUND_MIB and the engine core by less than CORE_RSS_BOUND_MIB over all cases, and every KV block is free."""

from __future__ import annotations

import asyncio
import http.server
import io
import ipaddress
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest
import torch
from PIL import Image

from diffgentor.server.batch import data as D
from diffgentor.server.url_fetch import FetchError, FetchPolicy, UrlFetcher, fetch_sync, is_internal

from .conftest import NUM_KV_BLOCKS, Server, png

API_RSS_BOUND_MIB = 150.0
CORE_RSS_BOUND_MIB = 100.0
MAX_REQUEST_BYTES = 4 << 20
FETCH_DEADLINE_S = 4.0
HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
GEN = {"size": "64x64", "num_inference_steps": 1, "bot_task": "image"}


# ------------------------------------------------------------------------------------------------ loopback targets
class _Targets(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: dict[str, int] = {}
        self.closed_at: dict[str, float] = {}
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def hit(self, path: str) -> None:
        with self.lock:
            self.hits[path] = self.hits.get(path, 0) + 1


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Targets

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv, path = self.server, self.path.split("?")[0]
        srv.hit(path)
        if path == "/ok.png":
            body = png(seed=3)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path.startswith("/redirect/"):
            targets = {"loopback": f"http://127.0.0.1:{srv.port}/ok.png",
                       "metadata": "http://169.254.169.254/latest/meta-data/",
                       "decimal": f"http://2130706433:{srv.port}/ok.png",
                       "allowed": f"http://localhost:{srv.port}/ok.png"}
            self.send_response(302)
            self.send_header("Location", targets[path.rsplit("/", 1)[1]])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path in ("/huge", "/trickle"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if path == "/trickle":
                self.send_header("Content-Length", "100000")
            self.end_headers()
            sent = 0
            try:
                while sent < (300 << 20):
                    if path == "/huge":
                        self.wfile.write(b"\0" * (1 << 16))
                        sent += 1 << 16
                    else:
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        sent += 1
                        time.sleep(0.2)
            except OSError:
                pass
            with srv.lock:
                srv.closed_at[self.path] = time.monotonic()
                srv.sent[self.path] = sent
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def targets():
    t = _Targets()
    threading.Thread(target=t.serve_forever, daemon=True).start()
    yield t
    t.shutdown()
    t.server_close()


@pytest.fixture(scope="module")
def proxy():
    """A 'proxy' from the environment: the server must never send anything to it."""
    p = _Targets()
    threading.Thread(target=p.serve_forever, daemon=True).start()
    yield p
    p.shutdown()
    p.server_close()


@pytest.fixture(scope="module")
def hserver(tiny_ckpt, tmp_path_factory, proxy):
    extra = ["--allowed-url-fetch", "--allowed-url-hosts", "localhost", "--url-fetch-timeout-s", str(FETCH_DEADLINE_S),
             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-inflight-bytes", str(6 << 20),
             "--header-timeout-s", str(HEAD_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S),
             "--max-waiting-requests", "3", "--max-prompt-chars", "32000"]
    tmpdir = tmp_path_factory.mktemp("tmpdir")  # the server's TMPDIR: its ZeroMQ dir must be gone after SIGTERM
    env = {"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}", "http_proxy": f"http://127.0.0.1:{proxy.port}",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "TMPDIR": str(tmpdir)}
    with mock.patch.dict(os.environ, env):
        s = Server(tiny_ckpt, tmp_path_factory.mktemp("hostile"), max_num_seqs=2, extra=extra)
    s.tmpdir = tmpdir
    # warm up (first edit loads the image preprocessors) so the memory bounds measure the hostile cases only
    r = _post(s, "/v1/images/edits", data={"prompt": "warm up", **{k: str(v) for k, v in GEN.items()}},
              files={"image": ("a.png", png(), "image/png")})
    assert r.status_code == 200, r.text[:300]
    s.rss0 = (s.rss_mib(), s.rss_mib(s.core_pid()))
    yield s
    s.stop()


def _post(server, path: str, timeout: float = 300, **kw) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=timeout) as c:
        return c.post(server.base + path, **kw)


def _edit_urls(server, urls: list[str], **extra) -> httpx.Response:
    body = dict(GEN, prompt="make it blue", images=[{"image_url": u} for u in urls], **extra)
    return _post(server, "/v1/images/edits", json=body)


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def _raw(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head + body)
    return s


def _read_status(s: socket.socket, timeout: float = 15) -> tuple[int, bytes]:
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    if not data:
        return 0, b""
    return int(data.split(b" ", 2)[1]), data


# ------------------------------------------------------------------------------------------------ 1. text bounds
def test_huge_system_prompt_refused_in_the_api(hserver):
    core_rss = hserver.rss_mib(hserver.core_pid())
    r = _post(hserver, "/v1/images/generations", json=dict(GEN, prompt="x", system_prompt="y" * (1 << 20)))
    assert r.status_code == 400 and _error(r)["param"] == "system_prompt", r.text
    # under the character limit but over the model's context (8192 tokens): counted in the API's worker pool
    r = _post(hserver, "/v1/images/generations",
              json=dict(GEN, prompt="x", use_system_prompt="custom", system_prompt="lorem ipsum dolor " * 1700))
    assert r.status_code == 400 and "context" in _error(r)["message"], r.text
    assert hserver.rss_mib(hserver.core_pid()) - core_rss < 20
    r = _post(hserver, "/v1/images/generations", json=dict(GEN, prompt="x", max_new_tokens=10**9))
    assert r.status_code == 400 and _error(r)["param"] == "max_new_tokens", r.text


@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_is_a_400(hserver, stream):
    for field in ("prompt", "system_prompt"):
        body = json.dumps(dict(GEN, prompt="ok", stream=stream)).encode()
        body = body[:-1] + b', "' + field.encode() + b'": "a\\ud800b"}'
        r = _post(hserver, "/v1/images/generations", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert _error(r)["param"] == field, r.text


@pytest.mark.parametrize("value", ["Infinity", "1e308", "NaN", "-Infinity"])
def test_non_finite_numbers_are_a_400(hserver, value):
    body = json.dumps(dict(GEN, prompt="x"))[:-1] + f', "guidance_scale": {value}}}'
    r = _post(hserver, "/v1/images/generations", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert _error(r)["param"] == "guidance_scale", r.text


# ------------------------------------------------------------------------------------------------ 2. bodies
def _chunks(total: int, size: int = 1 << 16):
    yield b'{"prompt": "' + b"a" * (size - 12)
    sent = size
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}'


def test_chunked_json_over_the_cap_is_a_413(hserver):
    rss = hserver.rss_mib()
    r = _post(hserver, "/v1/images/generations", content=_chunks(64 << 20),
              headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert _error(r)["code"] == "request_too_large"
    assert hserver.rss_mib() - rss < 4 * MAX_REQUEST_BYTES / (1 << 20) + 30


def test_chunked_multipart_over_the_cap_is_a_413(hserver):
    rss = hserver.rss_mib()
    boundary = "dgboundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--{boundary}\r\n"
               "Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
               ).encode()
        for _ in range(1024):  # 64 MiB
            yield b"\0" * (1 << 16)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = _post(hserver, "/v1/images/edits", content=body(),
              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text[:300]
    assert hserver.rss_mib() - rss < 4 * MAX_REQUEST_BYTES / (1 << 20) + 30


def test_global_inflight_budget_answers_429(hserver):
    """Two bodies held at once are more than the 6 MiB in-flight budget: the second is refused from its declared
    length, before it sends a byte, with Retry-After."""
    first = _raw(hserver.port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(3):  # 3.75 MiB held, the body unfinished
            chunk = b"a" * (1250 << 10)
            first.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        time.sleep(0.5)
        r = _post(hserver, "/v1/images/generations", content=b"{" + b" " * (3 << 20) + b"}",
                  headers={"content-type": "application/json"})
        assert r.status_code == 429, r.text[:300]
        assert r.headers.get("retry-after") == "1"
    finally:
        first.close()
    time.sleep(0.5)  # the held bytes go back once that request ends
    r = _post(hserver, "/v1/images/generations", content=b"{" + b" " * (3 << 20) + b"}",
              headers={"content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["code"] != "rate_limit_exceeded", r.text[:300]


# ------------------------------------------------------------------------------------------------ 3. URL fetching
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/ok.png",  # loopback (the server's own /metrics would be next)
    "http://2130706433:{port}/ok.png",  # decimal IP for 127.0.0.1
    "http://user:pw@localhost:{port}/ok.png",  # credentials
    "http://[::1]:{port}/ok.png",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata: refused before any connection
    "http://10.0.0.1/x.png", "http://192.168.1.1/x.png", "http://224.0.0.1/x.png", "http://0.0.0.0:{port}/ok.png",
    "ftp://localhost:{port}/ok.png", "file:///etc/passwd",
])
def test_internal_urls_are_refused(hserver, targets, url):
    before = dict(targets.hits)
    r = _edit_urls(hserver, [url.format(port=targets.port)])
    assert r.status_code == 400, r.text
    err = _error(r)  # the schema refuses other schemes; the fetcher refuses the rest with a generic text
    assert err["code"] in ("invalid_image_url", "invalid_value") and str(targets.port) not in err["message"], err
    assert targets.hits == before  # nothing reached the loopback target


@pytest.mark.parametrize("hop", ["loopback", "metadata", "decimal"])
def test_redirects_to_internal_hosts_are_refused(hserver, targets, hop):
    before = targets.hits.get("/ok.png", 0)
    r = _edit_urls(hserver, [f"http://localhost:{targets.port}/redirect/{hop}"])
    assert r.status_code == 400 and "not allowed" in _error(r)["message"], r.text
    assert targets.hits.get("/ok.png", 0) == before  # the hop was refused before connecting


def test_allowed_host_is_fetched_without_env_proxy(hserver, targets, proxy):
    r = _edit_urls(hserver, [f"http://localhost:{targets.port}/redirect/allowed"], seed=1)
    assert r.status_code == 200, r.text[:300]
    assert proxy.hits == {}, proxy.hits  # HTTP_PROXY of the server's environment was not used


def test_fetch_errors_are_generic(hserver, targets):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    msgs = set()
    for url in (f"http://localhost:{port}/a.png", f"http://localhost:{targets.port}/missing.png"):
        r = _edit_urls(hserver, [url])
        assert r.status_code == 400, r.text
        msgs.add(_error(r)["message"])
    assert len(msgs) == 1, msgs  # a closed port and a 404 read the same: no port-scan oracle
    assert not any(c in next(iter(msgs)) for c in ("404", "refused", "Connect", str(port)))


def test_huge_download_stops_at_the_cap(hserver, targets):
    rss = hserver.rss_mib()
    r = _edit_urls(hserver, [f"http://localhost:{targets.port}/huge?api"])
    assert r.status_code == 413 and _error(r)["code"] == "file_too_large", r.text
    deadline = time.time() + 10
    while "/huge?api" not in targets.closed_at and time.time() < deadline:
        time.sleep(0.1)
    assert targets.sent.get("/huge?api", 1 << 40) < 64 << 20  # the server stopped reading (1 MiB cap + socket buffers)
    assert hserver.rss_mib() - rss < 40


def test_trickling_download_hits_the_total_deadline(hserver, targets):
    t0 = time.monotonic()
    r = _edit_urls(hserver, [f"http://localhost:{targets.port}/trickle"])
    took = time.monotonic() - t0
    assert r.status_code == 400 and _error(r)["code"] == "invalid_image_url", r.text
    assert took < FETCH_DEADLINE_S + 10, took  # a byte every 0.2 s never resets it (the body would take 5 h)


def test_download_is_cancelled_when_the_client_leaves(hserver, targets):
    aborts = hserver.metrics()["diffgentor:request_success_total{abort}"]
    body = json.dumps(dict(GEN, prompt="x", images=[{"image_url": f"http://localhost:{targets.port}/trickle?left"}]))
    s = _raw(hserver.port, f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\n\r\n".encode(), body.encode())
    time.sleep(0.6)
    left = time.monotonic()
    s.close()
    deadline = left + FETCH_DEADLINE_S
    while "/trickle?left" not in targets.closed_at and time.monotonic() < deadline + 2:
        time.sleep(0.05)
    gone = targets.closed_at.get("/trickle?left", 1e18) - left
    assert gone < FETCH_DEADLINE_S - 1, "the download outlived its client"  # not cut by its deadline
    # it never reached the engine: not an abort
    assert hserver.metrics()["diffgentor:request_success_total{abort}"] == aborts


def test_cheap_checks_come_before_any_fetch(hserver, targets):
    before = targets.hits.get("/ok.png", 0)
    for bad in ({"size": "huge"}, {"model": "dall-e-9"}, {"n": 50}, {"qualty": "high"},
                {"guidance_scale": 1000.0}, {"max_new_tokens": 10**9}, {"system_prompt": "y" * 40000},
                {"bot_task": "sing"}, {"num_inference_steps": 5000}):
        r = _edit_urls(hserver, [f"http://localhost:{targets.port}/ok.png"], **bad)
        assert 400 <= r.status_code < 500, r.text
    assert targets.hits.get("/ok.png", 0) == before


# ------------------------------------------------------------------------------------------------ 6. capacity
def test_n_beyond_capacity_is_refused_at_once(hserver):
    t0 = time.monotonic()
    r = _post(hserver, "/v1/images/generations", json=dict(GEN, prompt="x", n=4))  # capacity: 3 waiting
    assert r.status_code == 400 and _error(r)["param"] == "n", r.text
    assert time.monotonic() - t0 < 5


def test_admission_reserves_slots_without_a_race(hserver):
    errors = hserver.metrics()["diffgentor:request_success_total{error}"]

    async def burst():
        async with httpx.AsyncClient(trust_env=False, timeout=120) as c:
            return await asyncio.gather(*(c.post(hserver.base + "/v1/images/generations",
                                                 json=dict(GEN, prompt=f"x {i}", n=2, seed=i)) for i in range(2)))

    rs = asyncio.run(burst())
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 429], [r.text[:200] for r in rs]  # 2 + 2 slots > 3: exactly one is admitted
    for r in rs:
        if r.status_code == 429:
            assert r.headers.get("retry-after") == "1"
    # the API refused them itself: the engine's own queue limit never answered
    assert hserver.metrics()["diffgentor:request_success_total{error}"] == errors


# ------------------------------------------------------------------------------------------------ 10. messages, slow
def test_errors_show_no_object_reprs(hserver):
    r = _post(hserver, "/v1/images/edits", data={"prompt": "x", **{k: str(v) for k, v in GEN.items()}},
              files={"image": ("a.png", b"not an image at all" * 10, "image/png")})
    assert r.status_code == 400, r.text
    assert " at 0x" not in r.text and "object" not in r.text, r.text


def test_slow_request_heads_are_closed(hserver):
    socks = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", hserver.port), timeout=10)
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")  # never finished
            socks.append(s)
        idle = socket.create_connection(("127.0.0.1", hserver.port), timeout=10)  # sends nothing at all
        socks.append(idle)
        time.sleep(HEAD_TIMEOUT_S + 1.5)
        closed = 0
        for s in socks:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(socks), f"{len(socks) - closed} slow connections still open"
        assert httpx.get(hserver.base + "/health", timeout=5, trust_env=False).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_stalled_body_is_a_408(hserver):
    s = _raw(hserver.port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n", b'{"prompt": "')
    try:
        t0 = time.monotonic()
        status, _ = _read_status(s, timeout=BODY_TIMEOUT_S + 10)
        assert status == 408, status
        assert time.monotonic() - t0 < BODY_TIMEOUT_S + 5
    finally:
        s.close()


def test_url_fetching_is_off_by_default():
    from diffgentor.engine.config import ServerConfig
    from diffgentor.server.cli import build_parser
    from diffgentor.server.http.api import _fetch_url
    from diffgentor.server.http.openai_schemas import OpenAIError

    args = build_parser().parse_args(["serve", "some-model"])
    assert args.allowed_url_fetch is False and ServerConfig().allow_url_fetch is False
    with pytest.raises(OpenAIError) as e:
        asyncio.run(_fetch_url("http://example.com/a.png", 0, ServerConfig(), fetcher=None))
    assert e.value.status == 400 and "--allowed-url-fetch" in e.value.message


def test_resolver_refuses_names_pointing_inside():
    """The address check runs on what the NAME resolves to (the resolver hook points a public-looking name at
    loopback or the metadata address): refused before any connection."""

    async def resolver(host: str, port: int) -> list[str]:
        return {"images.example": ["127.0.0.1"], "mixed.example": ["93.184.216.34", "169.254.169.254"],
                "v6.example": ["::ffff:10.0.0.1"]}[host]

    f = UrlFetcher(FetchPolicy.build(1 << 20), resolver)
    for host in ("images.example", "mixed.example", "v6.example"):
        with pytest.raises(FetchError) as e:
            asyncio.run(f.check(f"http://{host}/a.png"))
        assert "not allowed" in str(e.value)
    allowed = UrlFetcher(FetchPolicy.build(1 << 20, ["10.0.0.0/8"]), resolver)
    assert [ipaddress.ip_address(a) for a in asyncio.run(allowed.check("http://v6.example/a.png")).ips] == [
        ipaddress.ip_address("::ffff:10.0.0.1")]
    assert is_internal(ipaddress.ip_address("100.64.0.1"))  # shared address space (CGNAT)


# ------------------------------------------------------------------------------------------------ 4. streams
def test_stream_pump_failure_still_ends_the_stream(tmp_path):
    """Not an engine death: the link to an engine core that never started fails with an ordinary exception. The
    stream still ends with an error event and [DONE] (it used to hang the client)."""
    from diffgentor.engine.config import EngineConfig, ModelConfig
    from diffgentor.engine.core_proc import CoreReady
    from diffgentor.engine.input_processor import ProcessedRequest
    from diffgentor.engine.request import GenerationRequest
    from diffgentor.server.http.api import AppState, _stream
    from diffgentor.server.http.engine_pool import EnginePool
    from diffgentor.server.http.openai_schemas import ImageGenerationRequest

    pool = EnginePool(EngineConfig(model=ModelConfig(device="cpu")), [[]])
    client = pool.clients[0]
    client.ready = CoreReady(num_blocks=10, block_size=16, max_num_seqs=2, pid=0)  # "ready", but never started
    state = AppState(ctx=None, client=pool, metrics=None, model_names=["m"], model_root="m")
    subs = [ProcessedRequest(request=GenerationRequest(request_id="r-0", prompt="x"))]

    async def go() -> list[str]:
        params = ImageGenerationRequest(prompt="x", stream=True)
        out = [chunk async for chunk in _stream(state, "image_generation", subs, "png", params, 0)]
        client.ready = None  # no process to stop
        await client.shutdown()
        return out

    try:
        events = asyncio.run(asyncio.wait_for(go(), 20))
    finally:
        state.pool.shutdown(wait=False)
    text = "".join(e if isinstance(e, str) else e.decode() for e in events)
    assert "event: error" in text and text.rstrip().endswith("data: [DONE]"), text[-300:]


def test_a_failed_sub_request_cancels_its_siblings():
    """n=2: sub-request 0 fails in the engine (here the core's answer is routed by hand: an engine client linked to
    a socket instead of a core process, as tests/test_dp_serve.py does); sub-request 1 is aborted at once instead of
    running to its end, and the failure is the answer."""
    import zmq

    from diffgentor.engine.config import EngineConfig, ModelConfig
    from diffgentor.engine.core_proc import (
        AbortRequests,
        AddRequest,
        CoreOutputs,
        CoreReady,
        FinishedInfo,
        input_decoder,
    )
    from diffgentor.engine.input_processor import ProcessedRequest
    from diffgentor.engine.request import GenerationRequest
    from diffgentor.server.http.api import _collect_all
    from diffgentor.server.http.engine_client import EngineClient
    from diffgentor.server.http.openai_schemas import OpenAIError

    async def run() -> list:
        client = EngineClient(EngineConfig(model=ModelConfig(device="cpu")))
        client._in = client._ctx.socket(zmq.PUSH)
        client._in.setsockopt(zmq.LINGER, 0)
        client._in.bind(client.input_addr)
        client.ready = CoreReady(num_blocks=10, block_size=16, max_num_seqs=2, pid=0)
        core_side = zmq.Context().socket(zmq.PULL)
        core_side.connect(client.input_addr)
        subs = [ProcessedRequest(request=GenerationRequest(request_id=f"r-{i}", prompt="x")) for i in range(2)]
        work = asyncio.ensure_future(_collect_all(client, subs))
        await asyncio.sleep(0.2)
        client._route(client.process_outputs(CoreOutputs(finished=[FinishedInfo(
            request_id="r-0", finish_reason="error", status=400, error="bad input")])))
        with pytest.raises(OpenAIError) as e:
            await asyncio.wait_for(work, 5)
        assert e.value.status == 400
        await asyncio.sleep(0.2)  # the abort is sent from a task of its own
        dec, got = input_decoder(), []
        while core_side.poll(300):
            got.append(dec.decode(core_side.recv()))
        core_side.close(linger=0)
        client.ready = None  # no process to stop
        await client.shutdown()
        return got

    got = asyncio.run(run())
    assert [m.processed.request.request_id for m in got if isinstance(m, AddRequest)] == ["r-0", "r-1"]
    assert [m.request_ids for m in got if isinstance(m, AbortRequests)] == [["r-1"]]


# ------------------------------------------------------------------------------------------------ 9. batch CLI
def _edit_args(tiny_ckpt, tmp_path, csv_text: str, out: Path) -> list[str]:
    (tmp_path / "in.csv").write_text(csv_text)
    return ["edit", "--model_name", str(tiny_ckpt), "--input", str(tmp_path / "in.csv"), "--output_dir", str(out),
            "--no_progress", "--device", "cpu", "--num_inference_steps", "1"]


def test_batch_unwritable_output_dir_is_exit_2_before_any_generation(tiny_ckpt, tmp_path, capsys):
    from diffgentor.server.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    rc = main(_edit_args(tiny_ckpt, tmp_path, "index,instruction,input_images\n0,make it blue,\n", blocker / "out"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "cannot write to" in err and "Traceback" not in err


def test_batch_duplicate_column_names_are_refused(tiny_ckpt, tmp_path, capsys):
    from diffgentor.server.cli import main

    rc = main(_edit_args(tiny_ckpt, tmp_path, "index,instruction,index\n0,make it blue,7\n", tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and "'index' appear more than once" in err, err


def test_batch_resume_counts_only_decodable_pngs(tmp_path):
    from PIL import Image

    from diffgentor.server.batch.job import is_done_png

    good, empty, cut, jpeg = (tmp_path / n for n in ("g.png", "e.png", "c.png", "j.png"))
    Image.new("RGB", (8, 8), "red").save(good)
    empty.write_bytes(b"")
    cut.write_bytes(good.read_bytes()[:-20])
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    jpeg.write_bytes(buf.getvalue())
    assert [is_done_png(p) for p in (good, empty, cut, jpeg, tmp_path / "missing.png")] == [True] + [False] * 4


def test_batch_url_downloads_are_capped(targets, tmp_path):
    with pytest.raises(D.RowError, match="larger than"):
        D.download(f"http://127.0.0.1:{targets.port}/huge", tmp_path, timeout=10, max_bytes=1 << 20)
    t0 = time.monotonic()
    with pytest.raises(D.RowError, match="in time"):
        D.download(f"http://127.0.0.1:{targets.port}/trickle", tmp_path, timeout=1.5)
    assert time.monotonic() - t0 < 5
    assert D.download(f"http://127.0.0.1:{targets.port}/ok.png", tmp_path) == png(seed=3)  # the user's own hosts
    assert fetch_sync(f"http://127.0.0.1:{targets.port}/ok.png",
                      FetchPolicy(max_bytes=1 << 20, allow_private=True)) == png(seed=3)


# ------------------------------------------------------------------------------------------------ 11. prefix cache
# A cached block may be reused only by a request whose KV for it would be the same: the keys name every position's
# embedding source (token, condition-image timestep, VAE latents, ViT tokens) with its inputs, and every
# bidirectional span. The two poisonings a hostile probe found, then the property itself.
ODD_PHOTO = png(h=70, w=100, seed=5)  # not a bucket's aspect ratio: a centre crop and a stretch differ
EDIT = dict(bot_task="image", image_size="256x256", num_inference_steps=1, output_type="latent", seed=7,
            use_system_prompt="custom")


def _engine(tiny_ckpt, **kw):
    from diffgentor.engine.offline import Engine

    return Engine.from_pretrained(tiny_ckpt, environ={}, num_kv_blocks=256, device="cpu", dtype="float32",
                                  max_num_seqs=4, max_num_batched_tokens=4096, **kw)


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    """(cold, warm): a cold engine never reuses a block; the warm one's prefix cache is emptied by each test."""
    cold, warm = _engine(tiny_ckpt, enable_prefix_caching=False), _engine(tiny_ckpt)
    yield cold, warm


def _latents(eng, req: dict):
    (res,) = eng.generate([req])
    assert res.error is None, res.error
    return res.latents


def test_prefix_cache_separates_crop_and_stretch_of_one_image(engines):
    """The same image, seed and system prompt with the other infer_align_image_size: its VAE blocks hold another
    crop's KV and must not be reused (they were keyed by the file's digest and the seed only)."""
    system = "You are a careful photo editor."
    crop = dict(EDIT, request_id="crop", prompt="make it blue", images=[ODD_PHOTO], system_prompt=system,
                infer_align_image_size=False)
    stretch = dict(crop, request_id="stretch", prompt="make it red", infer_align_image_size=True)
    cold_eng, eng = engines
    cold = _latents(cold_eng, stretch)
    eng.core.kv.reset_prefix_cache()
    _latents(eng, crop)
    hits = eng.core.kv.stats.hits
    warm = _latents(eng, stretch)
    assert eng.core.kv.stats.hits > hits  # the system prompt's blocks are still shared
    assert torch.allclose(warm, cold, atol=1e-4), (warm - cold).abs().max()
    again = eng.core.kv.stats.hits
    assert torch.allclose(_latents(eng, dict(stretch, request_id="again")), cold, atol=1e-4)
    st = eng.core.kv.stats
    assert st.hits - again >= 10 * 16  # an identical request reuses the image's blocks too


def _aligned_system_prompt(tiny_ckpt, block_size: int = 16) -> str:
    """A system prompt after which a condition image's `<timestep>` is the last token of a block (so the block
    holds `<boi><img_size_N><img_ratio_k><timestep>` and no `<img>` token)."""
    from diffgentor.engine.input_processor import load_processor_context
    from diffgentor.engine.request import GenerationRequest
    from diffgentor.engine.request_state import build_request_state

    ctx = load_processor_context(tiny_ckpt)
    for k in range(64):
        system = "Edit the photo. " + "word " * k
        st = build_request_state(ctx, GenerationRequest(request_id="probe", prompt="x", images=[ODD_PHOTO],
                                                        bot_task="image", image_size="256x256",
                                                        use_system_prompt="custom", system_prompt=system))
        (t,) = st.cond.layout.cond_timestep_indexes
        if (t + 1) % block_size == 0:
            ratio = st.cond.token_ids[t - 1]
            return system, ctx.tokenizer.decode([ctx.tokenizer.special.boi, ctx.builder.size_id, ratio,
                                                 ctx.tokenizer.special.timestep])
    raise AssertionError("no system prompt aligns the timestep with a block end")


def test_prefix_cache_control_tokens_typed_as_text_never_hit_an_image_block(tiny_ckpt, engines):
    """A text prompt typing a condition image's opening control tokens (tokenised as control ids, as the official
    code does) has the same ids as the edit's image block up to its `<timestep>`, but that slot is embedded as a
    timestep in the edit and as a token in the text: the blocks must not be shared, in either order."""
    system, typed = _aligned_system_prompt(tiny_ckpt)
    edit = dict(EDIT, request_id="edit", prompt="make it blue", images=[ODD_PHOTO], system_prompt=system)
    text = dict(EDIT, request_id="typed", prompt=typed + " a lighthouse at night", system_prompt=system)
    cold_eng, eng = engines
    cold_edit, cold_text = _latents(cold_eng, edit), _latents(cold_eng, text)
    eng.core.kv.reset_prefix_cache()
    _latents(eng, text)
    warm_edit = _latents(eng, edit)
    assert torch.allclose(warm_edit, cold_edit, atol=1e-4), (warm_edit - cold_edit).abs().max()
    eng.core.kv.reset_prefix_cache()
    _latents(eng, dict(edit, request_id="edit-2"))
    warm_text = _latents(eng, dict(text, request_id="typed-2"))
    assert torch.allclose(warm_text, cold_text, atol=1e-4), (warm_text - cold_text).abs().max()


_PHOTOS = (ODD_PHOTO, png(h=64, w=64, seed=6))


@pytest.fixture(scope="module")
def kv_states(tiny_ckpt):
    """Request states (no model run) for a small space of inputs, memoised: (image, align, seed, system, prompt)."""
    import functools

    from diffgentor.engine.input_processor import load_processor_context
    from diffgentor.engine.request import GenerationRequest
    from diffgentor.engine.request_state import build_request_state

    ctx = load_processor_context(tiny_ckpt)
    system, typed = _aligned_system_prompt(tiny_ckpt)
    systems, prompts = (system, system + "Be brief. "), ("make it blue", typed + " make it blue")

    @functools.cache
    def state(image: int | None, align: bool, seed: int, sys_i: int, prompt_i: int, rid: str = "r"):
        return build_request_state(ctx, GenerationRequest(
            request_id=rid, prompt=prompts[prompt_i], images=[] if image is None else [_PHOTOS[image]],
            bot_task="image", image_size="256x256", use_system_prompt="custom", system_prompt=systems[sys_i],
            infer_align_image_size=align, seed=seed))

    return state


def _position_facts(st) -> list[tuple]:
    """What the model reads at each position of the cond row, written out independently of the cache keys: token
    id, embedding source with its inputs (for an image slot also the offset in it), RoPE position, and the
    bidirectional span holding it."""
    lay = st.cond.layout
    facts = []
    for p, tok in enumerate(st.cond.token_ids):
        src: tuple = ("token",)
        if p in lay.cond_timestep_indexes:
            src = ("timestep", 0)
        for s in lay.image_slots:
            if s.start <= p < s.end:
                i = s.cond_index
                src = {"cond_vae": ("vae", st.image_digests[i] if i is not None else None, st.align_image_size,
                                    st.seed, p - s.start),
                       "cond_vit": ("vit", st.image_digests[i] if i is not None else None, p - s.start),
                       "gen": ("gen", st.request_id, p - s.start)}[s.kind]
        span = next(((a, b) for a, b in lay.full_attn_spans if a <= p < b), None)
        facts.append((tok, src, tuple(lay.positions[p].tolist()), span))
    return facts


def _block_reads(st, b: int, bs: int) -> int:
    """Positions whose facts block b's KV depends on: its own and earlier ones, and the rest of any span it
    touches (bidirectional attention sees later positions)."""
    end = (b + 1) * bs
    for a, e in st.cond.layout.full_attn_spans:
        if a < end and e > end:
            end = e
    return end


def _cacheable_hashes(st, bs: int = 16):
    from diffgentor.engine.kv_cache_manager import compute_block_hashes
    from diffgentor.engine.request_state import block_extra_keys

    n = st.cond.cacheable // bs * bs
    return compute_block_hashes(st.cond.token_ids[:n], bs, block_extra_keys(st, st.cond, bs, n))



def test_prefix_cache_keys_name_everything_that_shapes_the_kv(kv_states):
    """Property: two requests share a block exactly when everything the model reads for it is the same (tokens,
    embedding sources and their inputs, positions, spans); identical inputs under another request id share all."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    inputs = hs.tuples(hs.sampled_from([None, 0, 1]), hs.booleans(), hs.sampled_from([1, 2]),
                       hs.sampled_from([0, 1]), hs.sampled_from([0, 1]))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(inputs, inputs)
    def check(a, b):
        sa, sb = kv_states(*a), kv_states(*b)
        ha, hb = _cacheable_hashes(sa), _cacheable_hashes(sb)
        fa, fb = _position_facts(sa), _position_facts(sb)
        for i in range(min(len(ha), len(hb))):
            same = fa[:_block_reads(sa, i, 16)] == fb[:_block_reads(sb, i, 16)]
            assert (ha[i] == hb[i]) == same, (a, b, i)
        twin = kv_states(*a, rid="other")
        assert _cacheable_hashes(twin) == ha

    check()


# ------------------------------------------------------------------------------------------------ 12. request cost
def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss(pid: int) -> float:
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5); returns it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _peak_rss_mib(pid)


def _wide_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (65536, 4), (200, 30, 30)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_an_860_byte_png_of_extreme_aspect_costs_little(hserver):
    """65536x4 pixels pass the pixel limit; covering the 128x512 bucket before the crop resized it to 2 million by
    128 pixels (+1 GB in the API). Only the part the crop keeps is resampled now."""
    data = _wide_png()
    assert len(data) < 1000
    base = _reset_peak_rss(hserver.proc.pid)
    r = _post(hserver, "/v1/images/edits", files={"image": ("wide.png", data, "image/png")},
              data={"prompt": "make it blue", "infer_align_image_size": "false", **{k: str(v) for k, v in GEN.items()}})
    assert r.status_code == 200, r.text[:300]
    growth = _peak_rss_mib(hserver.proc.pid) - base
    assert growth < 100, growth


# slow (CI runs it: make test-slow): ~26 s; cost-based admission: tests/test_scheduler.py (encode budget tests) runs
#   by default
@pytest.mark.slow
def test_queued_edits_are_admitted_by_their_memory_cost(tiny_ckpt, make_server):
    """60 two-image edits of tiny PNGs at once: the queue has room for all of them, the memory budget for six. The
    rest are answered 429 with Retry-After at once, and the API's peak memory grows by less than the budget."""
    from diffgentor.engine.input_processor import load_processor_context
    from diffgentor.server.http.request_cost import read_header, request_cost

    photos = [png(seed=1), png(seed=2)]
    cost = request_cost(load_processor_context(tiny_ckpt), [read_header(p) for p in photos], "64x64", 1).total
    budget_mib = -(-6 * cost // (1 << 20))
    s = make_server(max_num_seqs=2, extra=["--max-waiting-requests", "64", "--max-queued-cost-mib", str(budget_mib)])
    base = _reset_peak_rss(s.proc.pid)
    form = {"prompt": "make it blue", **{k: str(v) for k, v in GEN.items()}}

    async def burst():
        async with httpx.AsyncClient(trust_env=False, timeout=300) as c:
            return await asyncio.gather(*(c.post(s.base + "/v1/images/edits", data=dict(form, seed=str(i)),
                                                 files=[("image[]", ("a.png", p, "image/png")) for p in photos])
                                          for i in range(60)))

    rs = asyncio.run(burst())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429}, [r.text[:200] for r in rs if r.status_code not in (200, 429)]
    assert 1 <= codes.count(200) and codes.count(429) >= 30, codes
    assert all(r.headers.get("retry-after") == "1" for r in rs if r.status_code == 429)
    growth = _peak_rss_mib(s.proc.pid) - base
    assert growth < budget_mib + 60, (growth, budget_mib)
    r = httpx.post(s.base + "/v1/images/edits", data=form, files=[("image[]", ("a.png", p, "image/png"))
                                                                 for p in photos], timeout=300, trust_env=False)
    assert r.status_code == 200, r.text[:300]  # the budget came back


def test_postscript_never_reaches_a_decoder():
    """EPS would be handed to Ghostscript wherever it is installed: condition images are opened with the decoders
    the model needs only (PNG, JPEG, WebP, GIF, BMP); an EPS upload is refused without its plugin being asked."""
    from PIL import EpsImagePlugin

    from diffgentor.engine.input_processor import decode_image
    from diffgentor.engine.request_contract import RequestError
    from diffgentor.server.http.request_cost import read_header

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    with mock.patch.object(EpsImagePlugin.EpsImageFile, "_open", side_effect=AssertionError("EPS opened")) as opened:
        with pytest.raises(RequestError, match="is not a PNG"):
            decode_image(eps, 0)
        assert read_header(eps) is None
    assert not opened.called


# ------------------------------------------------------------------------------------------------ 13. connections
def _fd_limit_1024() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # a common default: the flood can exhaust it


# slow (CI runs it: make test-slow): ~12 s; test_slow_request_heads_are_closed runs by default
@pytest.mark.slow
def test_health_answers_under_a_flood_of_half_open_connections(make_server):
    """1,100 connections that each sent half a request head (no API key needed), held open, against a server whose
    descriptor limit is 1024: the oldest headless ones are closed to make room, /health still answers."""
    s = make_server(max_num_seqs=1, preexec_fn=_fd_limit_1024)
    socks = []
    try:
        for _ in range(1100):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
            socks.append(c)
        r = httpx.get(s.base + "/health", timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        r = httpx.get(s.base + "/v1/models", timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        open_fds = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
        assert open_fds < 1024 - 64, open_fds
    finally:
        for c in socks:
            c.close()


# slow (CI runs it: make test-slow): ~14 s; body limits: test_stalled_body_is_a_408 and the schemathesis suite run
#   by default
@pytest.mark.slow
def test_a_63_mb_json_body_does_not_stall_other_clients(make_server):
    """5.2 million keys in 63 MB: parsed on the event loop, it froze every client for seconds. The body is parsed in
    the worker pool, and refused from a count of its marks before that; /health answers all along."""
    s = make_server(max_num_seqs=1)
    body = b"{" + b",".join(b'"%07x":0' % i for i in range(5_200_000)) + b"}"
    assert len(body) > 60_000_000
    res: dict = {}

    def big() -> None:
        res["r"] = httpx.post(s.base + "/v1/images/generations", content=body, timeout=120, trust_env=False,
                              headers={"content-type": "application/json"})

    t = threading.Thread(target=big)
    t.start()
    worst = 0.0
    while t.is_alive():
        t0 = time.monotonic()
        assert httpx.get(s.base + "/health", timeout=30, trust_env=False).status_code == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    assert res["r"].status_code == 400 and _error(res["r"])["code"] == "invalid_json", res["r"].text[:300]
    assert worst < 1.5, worst


def test_fetch_errors_do_not_tell_which_internal_names_resolve():
    """A name that resolves to an internal address and a name that does not resolve at all read the same."""

    async def resolver(host: str, port: int) -> list[str]:
        if host == "db.internal.example":
            return ["10.1.2.3"]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    f = UrlFetcher(FetchPolicy.build(1 << 20), resolver)
    msgs = set()
    for host in ("db.internal.example", "nothing.internal.example"):
        with pytest.raises(FetchError) as e:
            asyncio.run(f.fetch(f"http://{host}/a.png"))
        msgs.add(str(e.value))
    assert len(msgs) == 1, msgs


def test_trailing_slash_redirects_ignore_the_host_header(hserver):
    r = httpx.get(hserver.base + "/health/", headers={"Host": "evil.example"}, trust_env=False,
                  follow_redirects=False, timeout=10)
    assert r.status_code in (307, 308), r.text
    assert r.headers["location"] == "/health", r.headers["location"]
    r = httpx.get(hserver.base + "/health/", trust_env=False, follow_redirects=True, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


# ------------------------------------------------------------------------------------------------ 14. batch rows
def test_batch_row_io_errors_are_that_rows_error(tiny_ckpt, tmp_path, capsys):
    """Each bad row fails alone, with its reason in the results CSV: a path too long for the OS (it aborted the job
    with exit 2, and every rerun the same), indexes `inf` / `1e400` (a traceback) and `1e300` (generated, then not
    writable), a sparse 30 MB file (read whole: the server caps uploads at 20 MiB), a device and a FIFO."""
    import csv as csv_mod

    from diffgentor.server.batch.job import EXIT_ROWS_FAILED
    from diffgentor.server.cli import main

    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(30 << 20)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rows = [("0", "a" * 5000 + ".png"), ("inf", "x.png"), ("1e400", "x.png"), ("1e300", "x.png"), ("4", str(big)),
            ("5", "/dev/zero"), ("6", str(fifo))]
    text = "index,instruction,input_images\n" + "".join(f"{i},make it blue,{p}\n" for i, p in rows)
    rc = main(_edit_args(tiny_ckpt, tmp_path, text, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == EXIT_ROWS_FAILED, err
    assert "Traceback" not in err
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        got = list(csv_mod.DictReader(f))
    assert len(got) == len(rows), got
    errors = [r["error"] for r in got]
    assert all(errors), errors
    joined = "\n".join(errors)
    for reason in ("name too long", "'inf' is not an integer", "'1e400' is not an integer", "'1e300' is not in",
                   "is 31457280 bytes; the limit is", "/dev/zero is not a regular file", "pipe.png is not a regular"):
        assert reason in joined, (reason, errors)


def test_batch_prompt_file_index_inf_is_that_rows_error(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "a cat", "index": Infinity}\n{"prompt": "a dog", "index": 3}\n')
    rows, _ = D.load_prompts(None, p)
    assert "not an integer" in rows[0].error and rows[1].error is None and rows[1].index == 3


def test_batch_unterminated_quote_is_exit_2_naming_the_line(tiny_ckpt, tmp_path, capsys):
    """The lenient CSV reader took everything after an unclosed quote as one cell: rows silently lost, exit 0."""
    from diffgentor.server.cli import main

    text = 'index,instruction,input_images\n0,make it blue,\n1,"make it red,\n2,make it green,\n3,make it gold,\n'
    rc = main(_edit_args(tiny_ckpt, tmp_path, text, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "line 3" in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------ health afterwards
def test_zz_health_memory_and_kv_after_the_hostile_cases(hserver):
    assert httpx.get(hserver.base + "/health", timeout=5, trust_env=False).status_code == 200
    m = hserver.wait_idle(timeout=60)
    assert m["diffgentor:kv_cache_free_blocks"] == NUM_KV_BLOCKS, m
    api0, core0 = hserver.rss0
    core, deadline = hserver.core_pid(), time.time() + 10  # an idle core hands its freed heap back after 1 s
    while hserver.rss_mib(core) - core0 >= CORE_RSS_BOUND_MIB and time.time() < deadline:
        time.sleep(0.25)
    api_growth, core_growth = hserver.rss_mib() - api0, hserver.rss_mib(core) - core0
    print(f"RSS growth over the hostile cases: API {api_growth:.0f} MiB, engine core {core_growth:.0f} MiB")
    assert api_growth < API_RSS_BOUND_MIB, api_growth
    assert core_growth < CORE_RSS_BOUND_MIB, core_growth


# ------------------------------------------------------------------------------------------------ 7. SIGTERM (last)
def test_zzz_sigterm_drains_shuts_the_engine_down_and_exits_0(hserver):
    server = hserver
    core = server.core_pid()
    assert list(server.tmpdir.glob("diffgentor-zmq-*")), "the ZeroMQ temp dir is expected under TMPDIR"
    res: dict = {}

    def go():
        res["r"] = _post(server, "/v1/images/generations", json=dict(
            GEN, prompt="a lighthouse", seed=1, bot_task="think_recaption", max_new_tokens=16, num_inference_steps=2))

    t = threading.Thread(target=go)
    t.start()
    deadline = time.time() + 60
    while server.metrics().get("diffgentor:num_requests_running", 0) == 0 and time.time() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    t.join(300)
    assert res["r"].status_code == 200, res["r"].text[:300]  # drained
    assert server.proc.wait(60) == 0, server.log()[-2000:]
    assert not Path(f"/proc/{core}").exists()  # the engine core exited and was reaped
    assert "engine core failed" not in server.log()  # it got Shutdown, it was not killed
    assert not list(server.tmpdir.glob("diffgentor-zmq-*")), list(server.tmpdir.iterdir())
