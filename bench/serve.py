"""`diffgentor bench serve`: online throughput and latency of a running `diffgentor serve`, `vllm bench serve`-style.

Sends `--num-prompts` requests to `/v1/images/edits` (multipart) or `/v1/images/generations` (JSON) with arrivals
at `--request-rate` (inf = all at once; otherwise Poisson, or gamma gaps with `--burstiness`, rescaled so the
whole schedule lasts num_prompts / rate), at most `--max-concurrency` in flight, after `--num-warmups` uncounted
requests. Requests stream (SSE) so the time to the first think token (`*.text_delta`) and the think-token rate are
seen by the client; diffusion time = the last think delta (or the request's start) to the `*.completed` event.
The server's own per-phase timings come from /metrics scraped before and after the run.

`--save-result` writes vLLM's JSON fields (completed, failed, request_throughput, output_throughput,
mean/median/std/pNN of ttft/tpot/itl/e2el in ms, ...) plus the image fields (total_images, images_per_min,
diffusion and think-rate percentiles, server_phase_* means) and a PNG plot (latency distribution, throughput over
time). The load generator (`RequestSpec`, `arrival_delays`, `run_load`) is also what the reliability tests drive.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

PHASE_HISTOGRAMS = {
    "queue": "diffgentor:request_queue_time_seconds",
    "think": "diffgentor:request_think_time_seconds",
    "diffusion": "diffgentor:request_diffusion_time_seconds",
    "vae_decode": "diffgentor:request_vae_decode_time_seconds",
    "e2e": "diffgentor:e2e_request_latency_seconds",
    "ttft": "diffgentor:time_to_first_token_seconds",
    "itl": "diffgentor:inter_token_latency_seconds",
    "diffusion_step": "diffgentor:diffusion_step_latency_seconds",
}
COUNTERS = ("diffgentor:images_generated_total", "diffgentor:generation_tokens_total", "diffgentor:prompt_tokens_total",
            "diffgentor:num_preemptions_total", "diffgentor:engine_steps_total")
GAUGES = ("diffgentor:max_iteration_num_requests", "diffgentor:kv_cache_usage_perc", "diffgentor:kv_cache_free_blocks",
          "diffgentor:num_requests_running", "diffgentor:num_requests_waiting")


# ------------------------------------------------------------------------------------------------ requests
@dataclass
class RequestSpec:
    """One HTTP request of the load: multipart (`data` + `files`), JSON (`json`) or raw bytes (`content`)."""

    path: str
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    json: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    expect_ok: bool = True  # False: a malformed request that must get a 4xx OpenAI error
    tag: str = "good"
    num_images_in: int = 0
    prompt_len: int = 0


@dataclass
class RequestOutcome:
    index: int
    tag: str
    expect_ok: bool
    success: bool = False
    status: int = 0
    error: str = ""
    error_body: Any = None
    start: float = 0.0  # perf_counter when sent (after the client-side concurrency queue)
    queued_s: float = 0.0  # waiting for a --max-concurrency slot
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    last_delta: float | None = None
    latency: float = 0.0
    end: float = 0.0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    num_deltas: int = 0

    @property
    def diffusion(self) -> float:
        """Client-side image phase: last think delta (or the send) to the final event."""
        return self.end - (self.last_delta if self.last_delta is not None else self.start)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.last_delta is None or self.output_tokens < 2:
            return None
        return (self.last_delta - self.start - self.ttft) / (self.output_tokens - 1)


def _sse_events(buf: str):
    """Split complete SSE events off `buf`; returns ([(event, data)], rest)."""
    out = []
    while "\n\n" in buf:
        raw, buf = buf.split("\n\n", 1)
        ev, data = None, []
        for line in raw.splitlines():
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        out.append((ev, "\n".join(data)))
    return out, buf


async def send_request(http, spec: RequestSpec, out: RequestOutcome, timeout: float) -> RequestOutcome:
    """Send one request and fill `out` (never raises for HTTP/transport errors)."""
    out.start = time.perf_counter()
    kw: dict[str, Any] = {"headers": spec.headers, "timeout": timeout}
    if spec.json is not None:
        kw["json"] = spec.json
    if spec.data is not None:
        kw["data"] = spec.data
    if spec.files is not None:
        kw["files"] = spec.files
    if spec.content is not None:
        kw["content"] = spec.content
    try:
        async with http.stream("POST", spec.path, **kw) as r:
            out.status = r.status_code
            ctype = r.headers.get("content-type", "")
            if r.status_code != 200 or not ctype.startswith("text/event-stream"):
                body = await r.aread()
                out.end = time.perf_counter()
                try:
                    js = json.loads(body)
                except ValueError:
                    js = None
                if r.status_code == 200 and isinstance(js, dict) and js.get("data"):
                    out.success = True
                    out.images = len(js["data"])
                    u = js.get("usage") or {}
                    out.input_tokens = int(u.get("input_tokens") or 0)
                    out.output_tokens = int(u.get("output_tokens") or 0)
                else:
                    out.error_body = js
                    out.error = f"HTTP {r.status_code}: {body[:300]!r}"
                return out
            buf, failed = "", None
            async for chunk in r.aiter_text():
                buf += chunk
                events, buf = _sse_events(buf)
                now = time.perf_counter()
                for ev, data in events:
                    if ev and ev.endswith(".text_delta"):
                        if out.ttft is None:
                            out.ttft = now - out.start
                        elif out.last_delta is not None:
                            out.itl.append(now - out.last_delta)
                        out.last_delta = now
                        out.num_deltas += 1
                    elif ev and ev.endswith(".completed"):
                        js = json.loads(data)
                        out.images += 1
                        u = js.get("usage") or {}
                        out.input_tokens += int(u.get("input_tokens") or 0)
                        out.output_tokens += int(u.get("output_tokens") or 0)
                    elif ev == "error":
                        failed = data
            out.end = time.perf_counter()
            if failed is not None:
                out.error = f"stream error: {failed[:300]}"
                try:
                    out.error_body = json.loads(failed)
                except ValueError:
                    pass
            elif out.images == 0:
                out.error = "stream ended without an image"
            else:
                out.success = True
                if out.output_tokens == 0:
                    out.output_tokens = out.num_deltas
    except Exception as e:  # noqa: BLE001 - transport errors are failures of this request
        out.end = time.perf_counter()
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.latency = (out.end or time.perf_counter()) - out.start
    return out


def arrival_delays(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (s from the start) of n requests: 0 for rate=inf, else gamma(shape=burstiness,
    scale=1/(rate*burstiness)) gaps (burstiness 1 = Poisson), rescaled so the last arrival is at n/rate (vLLM)."""
    if n <= 0:
        return []
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    scale = (n / rate) / out[-1]
    return [x * scale for x in out]


async def run_load(base_url: str, specs: list[RequestSpec], *, request_rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0, timeout: float = 600.0,
                   max_duration_s: float | None = None) -> tuple[list[RequestOutcome], float]:
    """Send `specs` on the arrival schedule; returns (outcomes in spec order, wall duration in s).
    `max_duration_s` bounds the whole run: requests not finished by then are cancelled and count as failed."""
    import httpx

    delays = arrival_delays(len(specs), request_rate, burstiness, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    outcomes = [RequestOutcome(i, s.tag, s.expect_ok) for i, s in enumerate(specs)]
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as http:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + delays[i] - time.perf_counter()))
            q0 = time.perf_counter()
            if sem is None:
                await send_request(http, specs[i], outcomes[i], timeout)
                return
            async with sem:
                outcomes[i].queued_s = time.perf_counter() - q0
                await send_request(http, specs[i], outcomes[i], timeout)

        tasks = [asyncio.create_task(one(i)) for i in range(len(specs))]
        done, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for o in outcomes:
            if not o.success and not o.error and o.end == 0.0:
                o.error = "not finished within the run's time bound"
        duration = time.perf_counter() - t0
    return outcomes, duration


# ------------------------------------------------------------------------------------------------ datasets
_WORDS = ("red blue green sky sea forest city night snow sun moon cat dog house river mountain bright dark soft "
          "painting photo style light shadow cloud tree flower street window garden bridge boat lamp").split()


def _png(w: int, h: int, rng: random.Random) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.RandomState(rng.randrange(2**31)).randint(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _parse_wh(s: str) -> tuple[int, int]:
    w, h = s.lower().split("x")
    return int(w), int(h)


def _params(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    p: dict[str, Any] = {"size": args.size, "seed": seed}
    for k in ("model", "num_inference_steps", "max_new_tokens", "bot_task"):
        v = getattr(args, k, None)
        if v is not None:
            p[k] = v
    return p


def _spec(args: argparse.Namespace, prompt: str, images: list[bytes], seed: int, stream: bool) -> RequestSpec:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    params = _params(args, seed) | {"prompt": prompt}
    if stream:
        params["stream"] = True
        params["stream_text_deltas"] = True  # the think-token timings come from the text deltas
    if args.endpoint == "generations":
        return RequestSpec("/v1/images/generations", json=params, headers=headers, stream=stream,
                           prompt_len=len(prompt.split()))
    key = "image[]" if len(images) > 1 else "image"
    files = [(key, (f"in{i}.png", b, "image/png")) for i, b in enumerate(images)]
    data = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items()}
    return RequestSpec("/v1/images/edits", data=data, files=files, headers=headers, stream=stream,
                       num_images_in=len(images), prompt_len=len(prompt.split()))


def synthetic_specs(args: argparse.Namespace, n: int, seed: int) -> list[RequestSpec]:
    """Random prompts of about --prompt-len words (+- --prompt-len-range) and --num-images random PNGs of
    sizes drawn from --image-sizes (edits only)."""
    rng = random.Random(seed)
    sizes = [_parse_wh(s) for s in args.image_sizes.split(",")]
    cache: dict[tuple[int, int], list[bytes]] = {}
    specs = []
    for i in range(n):
        lo = max(1, round(args.prompt_len * (1 - args.prompt_len_range)))
        hi = max(lo, round(args.prompt_len * (1 + args.prompt_len_range)))
        prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))
        images = []
        if args.endpoint == "edits":
            for _ in range(args.num_images):
                wh = rng.choice(sizes)
                pool = cache.setdefault(wh, [])
                if len(pool) < 8:  # a few distinct images per size keep the dataset cheap to build
                    pool.append(_png(*wh, rng))
                images.append(rng.choice(pool))
        specs.append(_spec(args, prompt, images, args.seed + i, not args.no_stream))
    return specs


def csv_specs(args: argparse.Namespace, n: int) -> list[RequestSpec]:
    """Rows of a diffgentor CSV/parquet (`input_images`, `instruction`), cycled to n requests."""
    from diffgentor.server.batch.data import load_edit_rows, load_prompts, resolve_images

    path = Path(args.dataset_path)
    if args.endpoint == "generations":
        rows, _ = load_prompts(None, path)
        images_of = [[] for _ in rows]
    else:
        rows, _ = load_edit_rows(path, args.instruction_key)
        cache = path.parent / ".bench_image_cache"
        images_of = [resolve_images(r.images, path.parent, cache) for r in rows]
    if not rows:
        raise SystemExit(f"{path} has no rows")
    return [_spec(args, rows[i % len(rows)].prompt, images_of[i % len(rows)], args.seed + i, not args.no_stream)
            for i in range(n)]


# ------------------------------------------------------------------------------------------------ /metrics
def scrape_metrics(base_url: str) -> dict[str, float]:
    """Flat {sample name[{finished_reason}]: value} of the server's /metrics (empty if unreachable)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if "le" in s.labels:
                continue
            key = s.name + ("{" + s.labels["finished_reason"] + "}" if "finished_reason" in s.labels else "")
            out[key] = s.value
    return out


def server_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The server's view of the run: mean seconds per phase (Δsum/Δcount of its histograms), counter deltas."""
    out: dict[str, Any] = {}
    for phase, name in PHASE_HISTOGRAMS.items():
        dc = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
        ds = after.get(name + "_sum", 0.0) - before.get(name + "_sum", 0.0)
        out[f"server_mean_{phase}_s"] = ds / dc if dc > 0 else None
        out[f"server_{phase}_count"] = int(dc)
    for name in COUNTERS:
        out["server_" + name.split(":")[1]] = after.get(name, 0.0) - before.get(name, 0.0)
    for reason in ("image", "text", "length", "abort", "error"):
        k = f"diffgentor:request_success_total{{{reason}}}"
        out[f"server_finished_{reason}"] = int(after.get(k, 0.0) - before.get(k, 0.0))
    for name in GAUGES:
        if name in after:
            out["server_" + name.split(":")[1]] = after[name]
    return out


# ------------------------------------------------------------------------------------------------ statistics
def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def _stats(prefix: str, xs_s: list[float], percentiles: list[float], out: dict[str, Any]) -> None:
    ms = [x * 1000 for x in xs_s]
    n = len(ms)
    mean = sum(ms) / n if n else 0.0
    out[f"mean_{prefix}_ms"] = mean
    out[f"median_{prefix}_ms"] = _pct(ms, 50)
    out[f"std_{prefix}_ms"] = math.sqrt(sum((x - mean) ** 2 for x in ms) / n) if n else 0.0
    for p in percentiles:
        out[f"p{p:g}_{prefix}_ms"] = _pct(ms, p)


def summarize(outcomes: list[RequestOutcome], duration: float, percentiles: list[float]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.success]
    res: dict[str, Any] = {"duration": duration, "completed": len(ok), "failed": len(outcomes) - len(ok)}
    res["total_input_tokens"] = sum(o.input_tokens for o in ok)
    res["total_output_tokens"] = sum(o.output_tokens for o in ok)
    res["request_throughput"] = len(ok) / duration if duration else 0.0
    res["request_goodput"] = None
    res["output_throughput"] = res["total_output_tokens"] / duration if duration else 0.0
    res["total_token_throughput"] = (res["total_input_tokens"] + res["total_output_tokens"]) / duration \
        if duration else 0.0
    # peak think tokens/s and peak concurrent requests, in 1 s buckets (a request's think tokens spread evenly
    # over its first..last delta)
    if ok:
        t0 = min(o.start for o in outcomes)
        horizon = int(max(o.end for o in ok) - t0) + 1
        tok = [0.0] * horizon
        conc = [0] * horizon
        for o in ok:
            for b in range(int(o.start - t0), min(horizon, int(o.end - t0) + 1)):
                conc[b] += 1
            a = o.start + (o.ttft or 0.0) - t0
            z = (o.last_delta if o.last_delta is not None else o.end) - t0
            buckets = range(int(a), min(horizon, int(z) + 1))
            for b in buckets:
                tok[b] += o.output_tokens / len(buckets)
        res["max_output_tokens_per_s"] = max(tok)
        res["max_concurrent_requests"] = max(conc)
    else:
        res["max_output_tokens_per_s"] = 0.0
        res["max_concurrent_requests"] = 0
    _stats("ttft", [o.ttft for o in ok if o.ttft is not None], percentiles, res)
    _stats("tpot", [t for o in ok if (t := o.tpot) is not None], percentiles, res)
    _stats("itl", [x for o in ok for x in o.itl], percentiles, res)
    _stats("e2el", [o.latency for o in ok], percentiles, res)
    # image fields
    res["total_images"] = sum(o.images for o in ok)
    res["images_per_min"] = res["total_images"] / duration * 60 if duration else 0.0
    _stats("diffusion", [o.diffusion for o in ok], percentiles, res)
    rates = [(o.output_tokens - 1) / (o.last_delta - o.start - o.ttft) for o in ok
             if o.ttft is not None and o.last_delta is not None and o.output_tokens > 1
             and o.last_delta - o.start - o.ttft > 0]
    res["mean_think_tokens_per_s"] = sum(rates) / len(rates) if rates else None
    res["median_think_tokens_per_s"] = _pct(rates, 50) if rates else None
    res["mean_client_queue_ms"] = sum(o.queued_s for o in outcomes) / len(outcomes) * 1000 if outcomes else 0.0
    res["max_client_queue_ms"] = max((o.queued_s for o in outcomes), default=0.0) * 1000
    errs: dict[str, int] = {}
    for o in outcomes:
        if not o.success:
            key = o.error.split(":")[0] + (f" {o.status}" if o.status else "")
            errs[key] = errs.get(key, 0) + 1
    res["errors"] = errs
    return res


def throughput_over_time(outcomes: list[RequestOutcome], bucket_s: float = 1.0) -> tuple[list[float], list[float]]:
    ok = [o for o in outcomes if o.success]
    if not ok:
        return [], []
    t0 = min(o.start for o in outcomes)
    n = int((max(o.end for o in ok) - t0) / bucket_s) + 1
    counts = [0] * n
    for o in ok:
        counts[int((o.end - t0) / bucket_s)] += o.images
    return [(i + 0.5) * bucket_s for i in range(n)], [c / bucket_s * 60 for c in counts]


def plot(outcomes: list[RequestOutcome], result: dict[str, Any], path: Path) -> Path:
    """PNG: e2e latency histogram (with TTFT and diffusion), and images/min over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [o for o in outcomes if o.success]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    if ok:
        bins = min(40, max(5, len(ok) // 3))
        a.hist([o.latency for o in ok], bins=bins, alpha=0.7, label="end-to-end")
        tt = [o.ttft for o in ok if o.ttft is not None]
        if tt:
            a.hist(tt, bins=bins, alpha=0.6, label="time to first think token")
        a.hist([o.diffusion for o in ok], bins=bins, alpha=0.5, label="diffusion (client side)")
        for p, style in ((50, "-"), (90, "--"), (99, ":")):
            a.axvline(result.get(f"p{p}_e2el_ms", 0) / 1000, color="k", linestyle=style, linewidth=1, label=f"p{p} e2e")
    a.set_xlabel("seconds")
    a.set_ylabel("requests")
    a.set_title("latency distribution")
    a.legend(fontsize=8)
    xs, ys = throughput_over_time(outcomes)
    b.plot(xs, ys, marker=".", label="images/min (1 s buckets)")
    if xs:
        b.axhline(result.get("images_per_min", 0), color="r", linestyle="--", label="mean images/min")
    b.set_xlabel("seconds since start")
    b.set_ylabel("images/min")
    b.set_title("throughput over time")
    b.legend(fontsize=8)
    fig.suptitle(f"{result.get('label') or result.get('model_id')}: rate {result.get('request_rate')}, "
                 f"concurrency {result.get('max_concurrency')}, "
                 f"{result.get('completed')}/{result.get('num_prompts')} ok",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ the command
def _wait_ready(args: argparse.Namespace) -> str:
    """Poll /health, then send one test request until it succeeds; returns the served model id."""
    import httpx

    base = args.base_url.rstrip("/")
    deadline = time.time() + args.ready_check_timeout_sec
    model = args.model
    while True:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                if model is None:
                    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
                    model = httpx.get(base + "/v1/models", headers=headers, timeout=5).json()["data"][0]["id"]
                break
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        if time.time() > deadline:
            raise SystemExit(f"the server at {base} did not become healthy in {args.ready_check_timeout_sec} s")
        time.sleep(0.5)
    return model


def _fmt_rate(r: float) -> str | float:
    return "inf" if math.isinf(r) else r


def print_result(res: dict[str, Any]) -> None:
    w = 50
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="))
    rows = [("Successful requests:", res["completed"]), ("Failed requests:", res["failed"]),
            ("Maximum request concurrency:", res["max_concurrency"]),
            ("Request rate configured (RPS):", res["request_rate"]),
            ("Benchmark duration (s):", f"{res['duration']:.2f}"),
            ("Total images:", res["total_images"]),
            ("Total input tokens:", res["total_input_tokens"]),
            ("Total think tokens:", res["total_output_tokens"]),
            ("Request throughput (req/s):", f"{res['request_throughput']:.3f}"),
            ("Images per minute:", f"{res['images_per_min']:.2f}"),
            ("Think token throughput (tok/s):", f"{res['output_throughput']:.2f}"),
            ("Peak concurrent requests:", res["max_concurrent_requests"])]
    for k, v in rows:
        print(f"{k:<36}{v!s:>14}")
    pcts = res.get("metric_percentiles", [50, 90, 99])
    for key, title in (("ttft", "Time to First Think Token"), ("tpot", "Time per Think Token (excl. 1st)"),
                       ("itl", "Inter-token Latency"), ("diffusion", "Diffusion (client side)"),
                       ("e2el", "End-to-end Latency")):
        print("{s:{c}^{n}}".format(s=f" {title} ", n=w, c="-"))
        print(f"{'Mean (ms):':<36}{res[f'mean_{key}_ms']:>14.2f}")
        print(f"{'Median (ms):':<36}{res[f'median_{key}_ms']:>14.2f}")
        for p in pcts:
            print(f"{f'P{p:g} (ms):':<36}{res[f'p{p:g}_{key}_ms']:>14.2f}")
    if res.get("mean_think_tokens_per_s") is not None:
        print(f"{'Mean think tokens/s per request:':<36}{res['mean_think_tokens_per_s']:>14.2f}")
    srv = {k: v for k, v in res.items() if k.startswith("server_mean_") and v is not None}
    if srv:
        print("{s:{c}^{n}}".format(s=" Server per-phase means (/metrics) ", n=w, c="-"))
        for k, v in srv.items():
            print(f"{k[len('server_mean_'):-2] + ' (ms):':<36}{v * 1000:>14.2f}")
    if res.get("errors"):
        print("errors:", res["errors"])
    print("=" * w)


def main(args: argparse.Namespace) -> int:
    pcts = [float(x) for x in args.metric_percentiles.split(",")]
    model = _wait_ready(args)
    args.model = model
    n = args.num_prompts
    specs = (csv_specs(args, n + args.num_warmups) if args.dataset_name == "csv"
             else synthetic_specs(args, n + args.num_warmups, args.seed))
    warm, specs = specs[:args.num_warmups], specs[args.num_warmups:]
    base = args.base_url.rstrip("/")
    rate = float(args.request_rate)
    if warm:
        wo, _ = asyncio.run(run_load(base, warm, max_concurrency=args.max_concurrency, timeout=args.timeout))
        print(f"warm-up: {sum(o.success for o in wo)}/{len(wo)} ok")
        bad = [o for o in wo if not o.success]
        if bad and len(bad) == len(wo):
            raise SystemExit(f"every warm-up request failed: {bad[0].error}")
    before = scrape_metrics(base)
    print(f"sending {n} requests to {base}{specs[0].path if specs else ''} at rate {_fmt_rate(rate)} "
          f"(burstiness {args.burstiness}), max concurrency {args.max_concurrency}")
    outcomes, duration = asyncio.run(run_load(base, specs, request_rate=rate, burstiness=args.burstiness,
                                              max_concurrency=args.max_concurrency, seed=args.seed,
                                              timeout=args.timeout, max_duration_s=args.max_duration))
    after = scrape_metrics(base)
    res: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": f"openai-images-{args.endpoint}",
        "backend": "diffgentor", "label": args.label, "model_id": model, "tokenizer_id": None,
        "base_url": base, "endpoint": specs[0].path if specs else None, "num_prompts": n,
        "request_rate": _fmt_rate(rate), "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "num_warmups": args.num_warmups, "seed": args.seed, "dataset_name": args.dataset_name,
        "dataset_path": args.dataset_path, "image_sizes": args.image_sizes, "num_images": args.num_images,
        "prompt_len": args.prompt_len, "size": args.size, "num_inference_steps": args.num_inference_steps,
        "max_new_tokens": args.max_new_tokens, "bot_task": args.bot_task, "stream": not args.no_stream,
        "metric_percentiles": pcts,
    }
    res |= summarize(outcomes, duration, pcts)
    res |= server_deltas(before, after)
    for kv in args.metadata or []:
        k, _, v = kv.partition("=")
        res[k] = v
    if args.save_detailed:
        res["e2els"] = [o.latency for o in outcomes]
        res["ttfts"] = [o.ttft for o in outcomes]
        res["diffusions"] = [o.diffusion if o.success else None for o in outcomes]
        res["output_lens"] = [o.output_tokens for o in outcomes]
        res["start_times"] = [o.start - outcomes[0].start for o in outcomes] if outcomes else []
        res["error_messages"] = [o.error for o in outcomes]
    print_result(res)
    if args.save_result:
        name = args.result_filename or (
            f"{args.label or 'diffgentor'}-{_fmt_rate(rate)}qps"
            f"{f'-concurrency{args.max_concurrency}' if args.max_concurrency else ''}-{model}-{res['date']}.json")
        path = Path(args.result_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
        if not args.no_plot:
            try:
                print(f"wrote {plot(outcomes, res, path.with_suffix('.png'))}")
            except ImportError:
                print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0 if res["failed"] == 0 else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="online throughput / latency against a running `diffgentor serve` "
                       "(vllm bench serve semantics)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--endpoint", choices=("edits", "generations"), default="edits")
    p.add_argument("--dataset-name", choices=("synthetic", "csv"), default="synthetic")
    p.add_argument("--dataset-path", default=None, help="diffgentor CSV/parquet (input_images, instruction)")
    p.add_argument("--instruction-key", default="instruction")
    p.add_argument("--num-images", type=int, default=1, help="synthetic: input images per edit request")
    p.add_argument("--image-sizes", default="256x256", help="synthetic: comma list of WxH input sizes to draw from")
    p.add_argument("--prompt-len", type=int, default=16, help="synthetic: prompt length in words")
    p.add_argument("--prompt-len-range", type=float, default=0.0, help="synthetic: +- ratio of --prompt-len")
    p.add_argument("--size", default="256x256", help="output size sent with every request")
    p.add_argument("--num-inference-steps", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--bot-task", default=None, help="think_recaption (default on the server), recaption, image")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", default="inf", help="requests/s, or inf to send all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", action="store_true", help="plain JSON responses (no TTFT / think-rate figures)")
    p.add_argument("--timeout", type=float, default=600.0, help="per request (s)")
    p.add_argument("--max-duration", type=float, default=None, help="bound the whole run (s)")
    p.add_argument("--ready-check-timeout-sec", type=float, default=600.0)
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true", help="also keep per-request arrays in the JSON")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--label", default=None)
    p.add_argument("--metadata", nargs="*", default=None, help="KEY=VALUE pairs stored in the JSON")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG written next to the JSON")
    p.set_defaults(func=main)
