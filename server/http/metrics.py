"""Prometheus metrics of the API server, vLLM-style (`diffgentor:` names, every series labelled `model_name`).

The engine core only ships scheduler stats (`SchedulerStats`) and per-request outcomes (`FinishedInfo`); the
API server turns them, plus its own timestamps (time to first think token, inter-token latency, end-to-end
latency), into metrics here, so the busy loop stays lean.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from diffgentor.engine.core_proc import FinishedInfo, SchedulerStats

# vLLM's bucket families (vllm/v1/metrics): PREFILL_LATENCY, TOKEN_STEP_LATENCY, ACCUMULATED_PHASE_LATENCY.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                      40.0, 80.0)
PHASE_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r, L = self.registry, ["model_name"]

        def g(name, doc):
            return Gauge(name, doc, L, registry=r).labels(model_name)

        def c(name, doc):
            return Counter(name, doc, L, registry=r).labels(model_name)

        def h(name, doc, buckets):
            return Histogram(name, doc, L, buckets=buckets, registry=r).labels(model_name)

        self.running = g("diffgentor:num_requests_running", "Requests in the engine's running set.")
        self.waiting = g("diffgentor:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = g("diffgentor:kv_cache_usage_perc", "KV-cache usage, 0 = empty, 1 = full.")
        self.kv_free = g("diffgentor:kv_cache_free_blocks", "Free KV-cache blocks.")
        self.prefix_queries = c("diffgentor:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = c("diffgentor:prefix_cache_hits", "Prompt tokens served by the prefix cache.")
        self.preemptions = c("diffgentor:num_preemptions", "Preemptions by the scheduler.")
        self.encoder_hits = c("diffgentor:encoder_cache_hits", "Condition images found already encoded.")
        self.encoder_misses = c("diffgentor:encoder_cache_misses", "Condition images the encoder stage encoded.")
        self.encoder_bytes = g("diffgentor:encoder_cache_bytes", "Bytes held by the encoder cache.")
        self.encode_queue = g("diffgentor:encode_queue_images", "Condition images being encoded beside the steps.")
        self.decode_queue = g("diffgentor:decode_queue_images", "Final images and previews being VAE-decoded beside "
                              "the steps.")
        self.step_time = h("diffgentor:engine_step_latency_seconds", "Duration of every engine step (what a running "
                           "request waits between two of its steps).", TOKEN_STEP_BUCKETS)
        self.engine_steps = c("diffgentor:engine_steps", "Engine-core steps.")
        self.batch = h("diffgentor:iteration_num_requests", "Requests in flight during an engine step "
                       "(batching).", BATCH_BUCKETS)
        self.max_batch = g("diffgentor:max_iteration_num_requests", "Most requests in flight during one step.")
        self.ttft = h("diffgentor:time_to_first_token_seconds", "Arrival to the first think/recaption text delta.",
                      TTFT_BUCKETS)
        self.itl = h("diffgentor:inter_token_latency_seconds", "Time between think/recaption text deltas.",
                     TOKEN_STEP_BUCKETS)
        self.think_tokens = c("diffgentor:generation_tokens", "Think/recaption tokens generated.")
        self.prompt_tokens = c("diffgentor:prompt_tokens", "Prompt tokens prefilled (text and image).")
        self.think_hist = h("diffgentor:request_generation_tokens", "Think/recaption tokens per request.",
                            TOKEN_COUNT_BUCKETS)
        self.diff_step = h("diffgentor:diffusion_step_latency_seconds", "Duration of engine steps that ran "
                           "diffusion steps.", TOKEN_STEP_BUCKETS)
        self.queue = h("diffgentor:request_queue_time_seconds", "Time in the waiting queue.", PHASE_BUCKETS)
        self.think_time = h("diffgentor:request_think_time_seconds", "Prefill + think/recaption phase.",
                            PHASE_BUCKETS)
        self.diffuse_time = h("diffgentor:request_diffusion_time_seconds", "Diffusion phase.", PHASE_BUCKETS)
        self.vae_time = h("diffgentor:request_vae_decode_time_seconds", "VAE decode.", PHASE_BUCKETS)
        self.e2e = h("diffgentor:e2e_request_latency_seconds", "Arrival at the API server to the end.",
                     PHASE_BUCKETS)
        self.images = c("diffgentor:images_generated", "Images generated.")
        self._success = Counter("diffgentor:request_success", "Finished engine requests by reason.",
                                ["model_name", "finished_reason"], registry=r)
        for reason in ("image", "text", "length", "abort", "error"):
            self._success.labels(model_name, reason)
        self._kernels = Gauge("diffgentor:kernel_impl", "1 for the kernel implementation each engine instance runs "
                              "per op (attention: flashinfer or sdpa; moe: flashinfer, grouped, fp8_grouped, ...), as "
                              "proven at start-up.", ["model_name", "engine", "op", "impl"], registry=r)
        self._layout = Gauge("diffgentor:parallel_layout", "Each engine instance's rank grid: its tensor-parallel "
                             "(tp), CFG-parallel (cfg) and sequence-parallel (sp) sizes, and world (the rank "
                             "processes, tp x cfg x sp).", ["model_name", "engine", "dim"], registry=r)
        self._routed = Counter("diffgentor:engine_requests", "Requests sent to each engine instance (data parallel).",
                               ["model_name", "engine"], registry=r)
        self._last: dict[int, dict[str, int]] = {}  # cumulative counters last seen, per engine instance
        self._latest: dict[int, tuple[SchedulerStats, int | None]] = {}  # per engine: latest stats, KV size
        self._max_batch = 0

    # ------------------------------------------------------------------ updates
    def on_engine_ready(self, engine: int, num_blocks: int, kernels: dict[str, str] | None = None,
                        layout: dict[str, int] | None = None) -> None:
        """An instance's KV cache before its first step: all blocks free (so /metrics adds up from the start), the
        kernel implementation it runs per op, and its parallel layout (tp / cfg / sp / world sizes)."""
        self._routed.labels(self.model_name, str(engine))
        for dim, size in (layout or {}).items():
            self._layout.labels(self.model_name, str(engine), dim).set(size)
        for op, impl in (kernels or {}).items():
            self._kernels.labels(self.model_name, str(engine), op, impl).set(1)
        self.on_stats(SchedulerStats(num_running=0, num_waiting=0, kv_usage=0.0, num_free_blocks=num_blocks,
                                     prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, num_steps=0),
                      engine=engine, num_blocks=num_blocks)

    def on_routed(self, engine: int) -> None:
        self._routed.labels(self.model_name, str(engine)).inc()

    def on_stats(self, s: SchedulerStats, engine: int = 0, num_blocks: int | None = None) -> None:
        """Scheduler stats of one engine instance (``num_blocks``: its KV-cache size). The gauges show the sum
        over instances; usage is each instance's usage weighted by its share of all blocks."""
        self._latest[engine] = (s, num_blocks)
        latest = self._latest.values()
        self.running.set(sum(x.num_running for x, _ in latest))
        self.waiting.set(sum(x.num_waiting for x, _ in latest))
        self.kv_free.set(sum(x.num_free_blocks for x, _ in latest))
        self.encoder_bytes.set(sum(x.encoder_cache_bytes for x, _ in latest))
        self.encode_queue.set(sum(x.num_encoding for x, _ in latest))
        self.decode_queue.set(sum(x.num_decoding for x, _ in latest))
        if len(latest) == 1:
            self.kv_usage.set(s.kv_usage)
        else:
            weights = [n or 1 for _, n in latest]
            self.kv_usage.set(sum(x.kv_usage * w for (x, _), w in zip(latest, weights)) / sum(weights))
        last = self._last.setdefault(engine, {})
        for cur, name, counter in ((s.prefix_cache_queries, "queries", self.prefix_queries),
                                   (s.prefix_cache_hits, "hits", self.prefix_hits),
                                   (s.num_preemptions, "preempt", self.preemptions),
                                   (s.encoder_cache_hits, "enc_hits", self.encoder_hits),
                                   (s.encoder_cache_misses, "enc_misses", self.encoder_misses)):
            delta = cur - last.get(name, 0)
            if delta > 0:
                counter.inc(delta)
            last[name] = cur
        if s.num_steps:
            self.engine_steps.inc(s.num_steps)
        for b in s.step_batch_sizes:
            self.batch.observe(b)
            if b > self._max_batch:
                self._max_batch = b
                self.max_batch.set(b)
        for d in s.diffusion_step_s:
            self.diff_step.observe(d)
        for d in s.step_s:
            self.step_time.observe(d)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finished(self, info: FinishedInfo, e2e_s: float) -> None:
        self._success.labels(self.model_name, info.finish_reason).inc()
        self.e2e.observe(e2e_s)
        t = info.timings
        if info.num_prompt_tokens:
            self.prompt_tokens.inc(info.num_prompt_tokens)
        if info.finish_reason in ("abort", "error") and not t:
            return
        self.think_tokens.inc(info.num_generated_tokens)
        self.think_hist.observe(info.num_generated_tokens)
        if "queue" in t:
            self.queue.observe(max(0.0, t["queue"]))
        if t.get("think"):
            self.think_time.observe(t["think"])
        if t.get("diffuse"):
            self.diffuse_time.observe(t["diffuse"])
        if t.get("vae_decode"):
            self.vae_time.observe(t["vae_decode"])
        if info.finish_reason == "image":
            self.images.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
