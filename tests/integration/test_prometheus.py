"""A real Prometheus server scrapes a running `diffgentor serve` (tiny model, loopback): the shipped scrape config,
recording and alert rules load (promtool and the server agree), the stored series agree with the requests this
test sent, and every query of the Grafana dashboard runs without error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from diffgentor.server.http.metrics import PHASE_BUCKETS

from .conftest import REPO_ROOT, cli_env, free_port, stop_process

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                 reason="the prometheus and promtool binaries are not installed "
                                        "(apt-get install prometheus; .ci/run does)")]

EXAMPLES = REPO_ROOT / "examples"
N_REQUESTS = 4
SCRAPE = "500ms"


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not come up:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def serve(tmp_path_factory, tiny_distil):
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(tiny_distil), "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "1024", "--max-num-seqs", "1",
           "--log-level", "warning"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=cli_env(PYTHONUNBUFFERED="1"))
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield {"base": f"http://127.0.0.1:{port}", "port": port}
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def prom(tmp_path_factory, serve):
    """Prometheus with the shipped config, rules and alerts; only the target and intervals changed for the test."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((EXAMPLES / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=SCRAPE, scrape_timeout=SCRAPE, evaluation_interval=SCRAPE)
    config["rule_files"] = [str(EXAMPLES / "prometheus" / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{serve['port']}"]}]
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    _promtool("check", "config", str(cfg))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/-/ready", proc, log)
        yield base
    finally:
        stop_process(proc)


def _promtool(*args: str) -> str:
    r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def _value(prom: str, expr: str) -> float | None:
    res = _query(prom, expr)
    assert len(res) <= 1, (expr, res)
    return float(res[0]["value"][1]) if res else None


def _wait_value(prom: str, expr: str, ok, timeout: float = 30) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        v = _value(prom, expr)
        if v is not None and ok(v):
            return v
        assert time.monotonic() < deadline, f"{expr} = {v}"
        time.sleep(0.25)


def _server_metrics(base: str) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text)
            for s in fam.samples if "le" not in s.labels and "finished_reason" not in s.labels}


def _bucket_bounds(seconds: float) -> tuple[float, float]:
    """The histogram bucket (lower, upper] holding ``seconds``."""
    lower = 0.0
    for b in PHASE_BUCKETS:
        if seconds <= b:
            return lower, b
        lower = b
    return lower, float("inf")


def test_shipped_files_validate():
    _promtool("check", "config", str(EXAMPLES / "prometheus" / "prometheus.yml"))
    out = _promtool("check", "rules", str(EXAMPLES / "prometheus" / "recording_rules.yml"),
                    str(EXAMPLES / "prometheus" / "alert_rules.yml"))
    assert "SUCCESS: 7 rules found" in out and "SUCCESS: 4 rules found" in out
    alerts = {r["alert"] for g in yaml.safe_load((EXAMPLES / "prometheus" / "alert_rules.yml").read_text())["groups"]
              for r in g["rules"]}
    assert alerts == {"DiffgentorEngineDown", "DiffgentorQueueSaturated", "DiffgentorP99LatencyHigh",
                      "DiffgentorKVCacheNearFull"}


def test_prometheus_scrapes_the_server(serve, prom):
    _wait_value(prom, 'up{job="diffgentor"}', lambda v: v == 1)

    def one(i: int) -> float:
        t0 = time.monotonic()
        # 100 steps: a request holds KV blocks from its prefill through its last step only (its VAE decode, ~0.7 s
        # on the tiny model, runs with them freed). With 2 steps that was ~50 ms of a ~0.75 s request and the 500 ms
        # scrapes could miss it (a CI run saw max KV usage 0); 100 steps hold them for longer than a scrape interval
        r = httpx.post(serve["base"] + "/v1/images/generations", timeout=600, json={
            "prompt": f"a red cube number {i}", "size": "256x256", "num_inference_steps": 100, "seed": i,
            "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        return time.monotonic() - t0

    # --max-num-seqs 1: while one runs the others wait, so the queue and the KV cache are seen non-empty
    with ThreadPoolExecutor(N_REQUESTS) as pool:
        latencies = list(pool.map(one, range(N_REQUESTS)))

    _wait_value(prom, "diffgentor:images_generated_total", lambda v: v == N_REQUESTS)
    _wait_value(prom, "diffgentor:e2e_request_latency_seconds_count", lambda v: v == N_REQUESTS)
    assert _value(prom, 'diffgentor:request_success_total{finished_reason="image"}') == N_REQUESTS
    (series,) = _query(prom, "diffgentor:images_generated_total")
    assert series["metric"]["model_name"] == "tiny-HunyuanImage-3.0-Instruct-Distil"

    # throughput: every image happened within the last minute, so rate * 60 is the count (Prometheus
    # extrapolates toward the window's edges, never below the first sample)
    rate = _value(prom, "rate(diffgentor:images_generated_total[1m])")
    assert N_REQUESTS * 0.5 <= rate * 60 <= N_REQUESTS * 1.6, rate
    assert _value(prom, "increase(diffgentor:images_generated_total[5m])") == pytest.approx(N_REQUESTS, rel=0.5)

    # p99 of the end-to-end latency: in the bucket of the slowest request the client saw
    p99 = _value(prom, "histogram_quantile(0.99, sum by (le) (rate(diffgentor:e2e_request_latency_seconds_bucket"
                       "[5m])))")
    low, _ = _bucket_bounds(max(latencies) * 0.8)
    _, high = _bucket_bounds(max(latencies))
    assert low <= p99 <= high, (p99, latencies)
    assert _value(prom, "diffgentor:e2e_request_latency_seconds_sum") <= sum(latencies)

    # queue and KV usage: non-empty while the requests ran, empty now, and what the server itself says
    assert _value(prom, "max_over_time(diffgentor:num_requests_waiting[5m])") >= 1
    assert _value(prom, "max_over_time(diffgentor:num_requests_running[5m])") == 1
    assert _value(prom, "max_over_time(diffgentor:kv_cache_usage_perc[5m])") > 0
    now = _server_metrics(serve["base"])
    _wait_value(prom, "diffgentor:num_requests_waiting", lambda v: v == 0)
    _wait_value(prom, "diffgentor:num_requests_running", lambda v: v == 0)
    _wait_value(prom, "diffgentor:kv_cache_usage_perc", lambda v: v == now["diffgentor:kv_cache_usage_perc"])
    _wait_value(prom, "diffgentor:kv_cache_free_blocks", lambda v: v == now["diffgentor:kv_cache_free_blocks"])

    # the recording rules evaluate; the alert rules are loaded and healthy, and none fires
    _wait_value(prom, "model_name:diffgentor_images_generated:rate1m", lambda v: v > 0)
    _wait_value(prom, "model_name:diffgentor_e2e_request_latency_seconds:p99_5m", lambda v: 0 < v <= high)
    groups = httpx.get(prom + "/api/v1/rules").json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(rules) == 11 and all(r["health"] == "ok" for r in rules.values()), rules
    assert rules["DiffgentorEngineDown"]["state"] == "inactive"
    for name in ("DiffgentorQueueSaturated", "DiffgentorP99LatencyHigh", "DiffgentorKVCacheNearFull"):
        active = bool(_query(prom, rules[name]["query"]))  # the condition holds now <=> pending or firing
        assert (rules[name]["state"] != "inactive") == active, (name, rules[name])

    # every Grafana query runs (series that do not exist yet, e.g. the encoder cache's, give empty results)
    dashboard = json.loads((EXAMPLES / "grafana" / "diffgentor.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    answered = 0
    for expr in exprs:
        concrete = expr.replace("$model_name", ".*").replace("$__rate_interval", "1m")
        answered += bool(_query(prom, concrete))
    assert answered >= len(exprs) - 4, "most dashboard queries should have data after the requests"
    var = dashboard["templating"]["list"][1]["definition"]
    assert var == "label_values(diffgentor:num_requests_running, model_name)"
    values = httpx.get(prom + "/api/v1/label/model_name/values",
                       params={"match[]": "diffgentor:num_requests_running"}).json()["data"]
    assert values == ["tiny-HunyuanImage-3.0-Instruct-Distil"]
