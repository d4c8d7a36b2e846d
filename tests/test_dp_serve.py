"""Data-parallel serving (`diffgentor serve --data-parallel-size N`, `server/http/engine_pool.py`): instance planning
over GPU lists, /metrics summed over instances, balancing and abort routing in the pool (in-process, no engine), and two
CPU instances of the tiny Distil model behind one live server: concurrent requests spread over both and answer like a
single-instance server; killing one instance's engine core fails its requests, the server exits non-zero and no
engine core outlives it."""

from __future__ import annotations

import asyncio
import base64
import io
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
import zmq
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from diffgentor.engine.config import EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from diffgentor.engine.core_proc import (
    AbortRequests,
    AddRequest,
    CoreOutputs,
    CoreReady,
    FinishedInfo,
    SchedulerStats,
    input_decoder,
)
from diffgentor.engine.input_processor import ProcessedRequest
from diffgentor.engine.request import GenerationRequest
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.server.http.engine_client import EngineDeadError
from diffgentor.server.http.engine_pool import EnginePool, instance_env, plan_engine_instances
from diffgentor.server.http.metrics import ServerMetrics

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
GEN = {"size": "64x64", "num_inference_steps": 1, "bot_task": "image"}
NUM_KV_BLOCKS = 512
MAX_PIXEL_DIFF = 1  # another batch composition may round one 8-bit level differently


# ------------------------------------------------------------------------------------------------ planning
def test_plan_splits_gpus_into_instances():
    gpus = [str(i) for i in range(8)]
    tp4 = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=4), model=ModelConfig(device="cuda"))
    assert plan_engine_instances(tp4, gpus=gpus) == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert plan_engine_instances(tp4, 1, gpus=gpus) == [["0", "1", "2", "3"]]  # the flag caps the count
    cuda = ModelConfig(device="cuda")
    assert plan_engine_instances(EngineConfig(model=cuda, parallel=ParallelConfig(tensor_parallel_size=0)),
                                 gpus=gpus) == [gpus]
    assert plan_engine_instances(EngineConfig(model=cuda, parallel=ParallelConfig(tensor_parallel_size=3)),
                                 gpus=gpus) == [
        ["0", "1", "2"], ["3", "4", "5"]]  # 6, 7 idle
    cpu = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2), model=ModelConfig(device="cpu"))
    assert plan_engine_instances(cpu) == [[]]
    assert plan_engine_instances(cpu, 3) == [[], [], []]
    with pytest.raises(ValueError, match="4 but only 2"):
        plan_engine_instances(tp4, gpus=["0", "1"])
    with pytest.raises(ValueError, match="data-parallel-size"):
        plan_engine_instances(EngineConfig(model=ModelConfig(device="cuda:1")), 2, gpus=gpus)


def test_instance_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert instance_env(["4", "5", "6", "7"], 2) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert instance_env([], 1) is None  # the one CPU instance: the server's own environment
    assert instance_env([], 2) == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert instance_env([], 2) == {"CUDA_VISIBLE_DEVICES": ""}
    pool = EnginePool(EngineConfig(model=ModelConfig(device="cuda"), parallel=ParallelConfig(tensor_parallel_size=4)),
                      [["0", "1", "2", "3"], ["4", "5", "6", "7"]])
    assert [(c.index, c.env) for c in pool.clients] == [(0, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}),
                                                         (1, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})]
    asyncio.run(pool.shutdown())


# ------------------------------------------------------------------------------------------------ metrics
def _stats(**kw) -> SchedulerStats:
    base = dict(num_running=0, num_waiting=0, kv_usage=0.0, num_free_blocks=0, prefix_cache_queries=0,
                prefix_cache_hits=0, num_preemptions=0, num_steps=0)
    return SchedulerStats(**(base | kw))


def test_metrics_sum_gauges_and_keep_counters_per_instance():
    m = ServerMetrics("m")

    def val(name: str, **labels) -> float:
        return m.registry.get_sample_value(name, {"model_name": "m", **labels})

    m.on_engine_ready(0, 100)
    m.on_engine_ready(1, 300)
    assert val("diffgentor:kv_cache_free_blocks") == 400 and val("diffgentor:kv_cache_usage_perc") == 0
    m.on_stats(_stats(num_running=2, num_waiting=1, kv_usage=0.5, num_free_blocks=50, prefix_cache_queries=10,
                      prefix_cache_hits=4, num_steps=3, step_s=[0.02, 0.03, 2.0], num_encoding=2,
                      num_decoding=3),
               engine=0, num_blocks=100)
    m.on_stats(_stats(num_running=1, kv_usage=0.0, num_free_blocks=300, prefix_cache_queries=5, prefix_cache_hits=5,
                      num_preemptions=1, num_steps=2), engine=1, num_blocks=300)
    # engine 0 again: its cumulative counters moved by 2 / 1; engine 1's larger earlier value is not subtracted
    m.on_stats(_stats(num_running=2, kv_usage=0.5, num_free_blocks=50, prefix_cache_queries=12, prefix_cache_hits=5,
                      num_steps=1), engine=0, num_blocks=100)
    assert val("diffgentor:num_requests_running") == 3 and val("diffgentor:num_requests_waiting") == 0
    assert val("diffgentor:kv_cache_free_blocks") == 350
    assert val("diffgentor:kv_cache_usage_perc") == pytest.approx(50 / 400)  # used blocks / all blocks
    assert val("diffgentor:prefix_cache_queries_total") == 17 and val("diffgentor:prefix_cache_hits_total") == 10
    assert val("diffgentor:num_preemptions_total") == 1 and val("diffgentor:engine_steps_total") == 6
    # every step's duration, and the encode and decode queues summed over instances (engine 0's latest says none now)
    assert val("diffgentor:engine_step_latency_seconds_count") == 3
    assert val("diffgentor:engine_step_latency_seconds_bucket", le="0.05") == 2
    assert val("diffgentor:encode_queue_images") == 0 and val("diffgentor:decode_queue_images") == 0
    m.on_stats(_stats(num_encoding=1, num_decoding=2, num_free_blocks=300), engine=1, num_blocks=300)
    assert val("diffgentor:encode_queue_images") == 1 and val("diffgentor:decode_queue_images") == 2
    m.on_routed(1)
    assert (val("diffgentor:engine_requests_total", engine="0"), val("diffgentor:engine_requests_total",
                                                                     engine="1")) == (0, 1)
    one = ServerMetrics("m")
    one.on_stats(_stats(kv_usage=0.3, num_free_blocks=7), num_blocks=10)
    assert one.registry.get_sample_value("diffgentor:kv_cache_usage_perc", {"model_name": "m"}) == 0.3


# ------------------------------------------------------------------------------------------------ the pool, no engine
def _processed(rid: str) -> ProcessedRequest:
    return ProcessedRequest(request=GenerationRequest(request_id=rid, prompt="x"))


def _drain(sock) -> list:
    dec, out = input_decoder(), []
    while sock.poll(300):
        out.append(dec.decode(sock.recv()))
    return out


def test_pool_balances_aborts_on_the_owner_and_fails_with_one_instance():
    """Three requests over two fake-ready instances go 0, 1, 0; cancelling one aborts it on its own instance only;
    a death fails that instance's requests, turns the pool (and /health) unhealthy once, and routes around it."""
    from diffgentor.server.http.api import AppState, build_app

    async def run() -> None:
        deaths = []
        m = ServerMetrics("m")
        config = EngineConfig(model=ModelConfig(device="cpu"),
                              scheduler=SchedulerConfig(max_num_seqs=2, max_waiting_requests=3))
        pool = EnginePool(config, [[], []], metrics=m,
                          on_death=lambda: deaths.append(1))
        ctx = zmq.Context()
        readers = []
        for c in pool.clients:  # what `start` does, minus the process
            c._in = c._ctx.socket(zmq.PUSH)
            c._in.setsockopt(zmq.LINGER, 0)
            c._in.bind(c.input_addr)
            c.ready = CoreReady(num_blocks=10, block_size=16, max_num_seqs=2, pid=0)
            readers.append(ctx.socket(zmq.PULL))
            readers[-1].connect(c.input_addr)
        outs: dict[str, list] = {rid: [] for rid in "abc"}

        async def consume(rid: str) -> None:
            async for item in pool.generate(_processed(rid)):
                outs[rid].append(item)

        tasks = {}
        for rid in "abc":
            tasks[rid] = asyncio.create_task(consume(rid))
            await asyncio.sleep(0.01)
        sent = [_drain(r) for r in readers]
        assert [[x.processed.request.request_id for x in s if isinstance(x, AddRequest)] for s in sent] == [
            ["a", "c"], ["b"]]
        assert [c.num_in_flight for c in pool.clients] == [2, 1] and pool.num_in_flight == 3
        assert pool.has_room(3) and not pool.has_room(4)  # 2 x 3 (each core's waiting-queue limit)

        tasks["c"].cancel()
        await asyncio.gather(tasks["c"], return_exceptions=True)
        await asyncio.sleep(0.01)  # the abort is sent from a task of its own
        aborts = [[x.request_ids for x in _drain(r) if isinstance(x, AbortRequests)] for r in readers]
        assert aborts == [[["c"]], []]

        c = pool.clients[1]
        c._route(c.process_outputs(CoreOutputs(finished=[FinishedInfo(request_id="b", finish_reason="image")])))
        await tasks["b"]
        assert [i.finish_reason for i in outs["b"]] == ["image"] and not any(map(_drain, readers))

        pool.clients[0]._die("boom")
        pool.clients[0]._die("again")
        await tasks["a"]
        assert outs["a"][-1].finish_reason == "error" and "boom" in outs["a"][-1].error
        assert not pool.healthy and pool.dead and pool.death_reason == "instance 0: boom" and deaths == [1]
        assert pool.has_room(3) and not pool.has_room(4)  # the live instance's capacity only
        assert all(pool.pick() is pool.clients[1] for _ in range(3))
        engine_reqs = [m.registry.get_sample_value("diffgentor:engine_requests_total", {"model_name": "m",
                                                                                           "engine": e})
                       for e in "01"]
        assert engine_reqs == [2, 1]

        app = build_app(AppState(ctx=None, client=pool, metrics=m, model_names=["m"], model_root="m"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            r = await http.get("/health")
        assert r.status_code == 503 and "instance 0: boom" in r.json()["error"]["message"]

        pool.clients[1]._die("gone")
        with pytest.raises(EngineDeadError, match="instance 1: gone"):  # raised while iterating: the stream's
            await pool.generate(_processed("d")).__anext__()  # error path catches it there
        for r in readers:
            r.close(linger=0)
        ctx.term()
        await pool.shutdown()

    asyncio.run(run())


# ------------------------------------------------------------------------------------------------ a live server
class Server:
    def __init__(self, ckpt: Path, log_dir: Path, extra: list[str] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w+")
        cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(ckpt), "--port", str(self.port),
               "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", "8",
               "--max-num-batched-tokens", "16384", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DG_HUNYUAN_IMAGE_3_")}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**env, "PYTHONUNBUFFERED": "1"})

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

    def core_pids(self) -> dict[int, int]:
        """Engine-core pid of each instance, as the server logged them at start."""
        return {int(i): int(p) for i, p in re.findall(r"engine instance (\d+) ready: pid (\d+)", self.log())}

    def metrics(self) -> dict[str, float]:
        out = {}
        for fam in text_string_to_metric_families(httpx.get(self.base + "/metrics", timeout=10).text):
            for s in fam.samples:
                extra = [s.labels[k] for k in ("finished_reason", "engine") if k in s.labels]
                out[s.name + (f"{{{extra[0]}}}" if extra else "")] = s.value
        return out

    def routed(self) -> list[float]:
        m = self.metrics()
        return [m.get(f"diffgentor:engine_requests_total{{{i}}}", 0.0) for i in range(2)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _generate(base: str, seed: int, **kw) -> httpx.Response:
    return httpx.post(base + "/v1/images/generations", json=dict(GEN, prompt=f"a lighthouse {seed}", seed=seed, **kw),
                      timeout=300)


def _concurrently(base: str, seeds: list[int]) -> list[httpx.Response]:
    async def run():
        async with httpx.AsyncClient(timeout=300) as http:
            return await asyncio.gather(*(http.post(base + "/v1/images/generations", json=dict(
                GEN, prompt=f"a lighthouse {s}", seed=s)) for s in seeds))

    return asyncio.run(run())


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The two-instance server, and a function that starts a single-instance reference (only the slow comparison
    needs one)."""
    ckpt = make_tiny(tmp_path_factory.mktemp("dp") / "tiny-Distil", distil=True)
    logs = tmp_path_factory.mktemp("log")
    dp = Server(ckpt, logs, ["--data-parallel-size", "2", "--log-level", "info"])
    refs: list[Server] = []

    def reference() -> Server:
        refs.append(Server(ckpt, logs, ["--log-level", "warning"]))
        return refs[-1]

    yield dp, reference
    dp.stop()
    for ref in refs:
        ref.stop()


# slow (CI runs it: make test-slow): ~23 s; DP serving: test_dp2_killed_instance_fails_its_requests_and_server_exits
#   and test_pool_balances_... run by default
@pytest.mark.slow
def test_dp2_spreads_requests_and_matches_a_single_instance(servers):
    dp, reference = servers
    ref = reference()
    dp.wait_ready()
    pids = dp.core_pids()
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2, dp.log()[-2000:]
    before = dp.routed()
    seeds = [1, 2, 3, 4]
    got = _concurrently(dp.base, seeds)
    assert [r.status_code for r in got] == [200] * 4, [r.text[:300] for r in got]
    routed = [a - b for a, b in zip(dp.routed(), before)]
    assert sum(routed) == 4 and min(routed) >= 1, routed  # both instances served
    want = _concurrently(ref.wait_ready().base, seeds)
    ref.stop()  # frees the CPU for the rest of the module
    assert [r.status_code for r in want] == [200] * 4, [r.text[:300] for r in want]
    for a, b in zip(got, want):
        pa, pb = _pixels(a.json()["data"][0]["b64_json"]), _pixels(b.json()["data"][0]["b64_json"])
        assert pa.shape == pb.shape and int(np.abs(pa - pb).max()) <= MAX_PIXEL_DIFF


def test_dp2_metrics_add_up_over_instances(servers):
    dp, _ = servers
    dp.wait_ready()
    got = _concurrently(dp.base, [11, 12])
    assert [r.status_code for r in got] == [200] * 2, [r.text[:300] for r in got]
    deadline = time.time() + 60
    while True:
        m = dp.metrics()
        if m["diffgentor:num_requests_running"] == 0 and m["diffgentor:kv_cache_usage_perc"] == 0:
            break
        assert time.time() < deadline, m
        time.sleep(0.2)
    assert m["diffgentor:kv_cache_free_blocks"] == 2 * NUM_KV_BLOCKS
    assert m["diffgentor:request_success_total{image}"] == sum(dp.routed()) >= 2
    assert m["diffgentor:engine_steps_total"] >= 2  # at least one step on each instance


def test_dp2_killed_instance_fails_its_requests_and_server_exits(servers):
    """Last user of the module's server: a slow request on each instance; SIGKILL the first one's engine core: its
    request fails (500) within 10 s, /health turns 503, the other instance's request drains, the server exits
    non-zero and neither engine core remains."""
    dp, _ = servers
    dp.wait_ready()
    pids = dp.core_pids()
    out: dict = {}

    def post(key: str, seed: int, steps: int) -> None:
        out[key] = (_generate(dp.base, seed, num_inference_steps=steps), time.monotonic())

    def wait_routed(n: float) -> list[float]:
        deadline = time.time() + 60
        while sum(r := dp.routed()) < n:
            assert time.time() < deadline and not out, (r, {k: v[0].text[:300] for k, v in out.items()})
            time.sleep(0.05)
        return r

    before = dp.routed()
    threads = [threading.Thread(target=post, args=("victim", 7, 200))]
    threads[0].start()
    after = wait_routed(sum(before) + 1)
    victim = next(i for i in range(2) if after[i] > before[i])
    threads.append(threading.Thread(target=post, args=("survivor", 8, 30)))
    threads[1].start()
    wait_routed(sum(before) + 2)
    time.sleep(0.3)  # the survivor is running in its engine core
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    saw_503 = False
    with httpx.Client(base_url=dp.base, timeout=2) as http:  # keep-alive: /health is 503 only until the drain
        while dp.proc.poll() is None and time.monotonic() - killed < 120:
            try:
                saw_503 |= http.get("/health").status_code == 503
            except httpx.HTTPError:
                time.sleep(0.05)
            time.sleep(0.005)
    for t in threads:
        t.join(60)
    r, t_fail = out["victim"]
    assert r.status_code == 500 and "the engine core died" in r.json()["error"]["message"], r.text[:500]
    assert t_fail - killed < 10, t_fail - killed
    assert out["survivor"][0].status_code == 200, out["survivor"][0].text[:500]
    assert dp.proc.wait(30) != 0
    assert saw_503 or f"engine core died (instance {victim})" in dp.log()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids.values())
    print(f"\nkilled instance {victim}: its request failed {t_fail - killed:.2f} s after the kill, the other's "
          f"finished {out['survivor'][1] - killed:.2f} s after it; /health 503 seen: {saw_503}")
