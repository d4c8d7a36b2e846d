"""`diffgentor bench offline`: offline throughput and latency of the engine on a checkpoint and a workload.

The checkpoint is `--model DIR` (any checkpoint folder) or, by default, a random one of the preset's shape (our
tiny-model writer, resized). The requests are a `--workload FILE.jsonl` (one offline-API request per line, image
paths relative to the file; `--num-prompts N` takes / cycles N of them) or the preset's text-to-image prompts.
Each timed run gets a fresh engine (so no prefix or encoder cache carries over between runs), `--warmup` untimed
warm-up runs first, and runs `--repeat` times at the preset's max_num_seqs and, with `--compare-max-num-seqs K`,
again at K in the same process, and with `--compare-async-encode` each max_num_seqs with condition-image encodes
inside the steps (`--no-async-encode`, before) then beside them (after), so one run shows what moving the encodes
off the step's critical path does to text-to-image latency and images/min. The JSON holds images/min, the
per-phase split of the wall time (encode, prefill, think, diffusion, VAE decode, scheduler, preprocess, other), time
to first think token and end-to-end latency per request (mean / p50 / p99, text-to-image and edits apart), minor
page faults and system / user CPU seconds of the engine's process (and of its rank processes, if any), mean and
spread over the repeats, and the machine's state (git commit, load average before / after, torch threads, CPU
model).

`--layouts tp1,cfg2,tp2,tp2xcfg2` runs the workload once per parallel layout (engine/parallel_layout.py: `tpN`,
`cfgN`, `spN` joined by `x`) on the Instruct (CFG) variant of the preset's checkpoint, every request with CFG
(guidance 5), and reports each layout's per-step image time: the mean wall time of the engine steps that ran only
denoising steps, per step and per denoising step (on a 2-core CPU expect no speed-up: the point is correctness and
the collectives' overhead; on GPUs see bench/gpu_check.py).

`--compare-allocator` is the A/B of the host heap policy (engine/allocator.py): every repeat runs the workload twice,
in two fresh processes, with glibc's defaults (`--heap-reuse-memory 0`) and with heap reuse (the default ceiling or
`--heap-reuse-memory`), in alternating order; the JSON holds both sides, their ratio and whether every image is
identical. The policy is process-wide and cannot be undone, hence one process per side. `cpu_bound` says from the CPU
seconds what images/min ratio the run can show and the most any heap policy could give (all system time removed).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffgentor.engine.config import DEFAULT_HEAP_REUSE_BYTES, _size_arg


@dataclass(frozen=True)
class Preset:
    description: str
    sizes: str  # "small": tiny_model.SMALL_SIZES; "tiny": the embedded tiny model (read when a run builds it, so
    # that `diffgentor --help` does not import torch)
    distil: bool = True
    image_size: str = "256x256"
    think_tokens: int = 32
    steps: int = 8
    num_requests: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 8192
    bot_task: str = "think_recaption"


PRESETS: dict[str, Preset] = {
    "small": Preset(
        description="4 layers, hidden 256, 8 q / 2 kv heads of 32, 16 experts top-4 (width 256) + shared expert, "
        "Distil, 256x256 output, 32 think tokens, 8 steps, 16 requests",
        sizes="small",
    ),
    "tiny": Preset(
        description="the embedded tiny model (2 layers, hidden 64, 4 experts top-2), 4 requests, 8 think tokens, "
        "2 steps (a smoke run)",
        sizes="tiny", think_tokens=8, steps=2, num_requests=4, max_num_seqs=4,
    ),
}

PHASES = ("encode", "prefill", "think", "diffusion", "vae_decode", "scheduler", "preprocess", "other")
"""The partition of a run's wall time (see `phase_split`)."""

_STAT_PHASE = {"prefill": "prefill", "decode": "think", "diffuse": "diffusion"}
"""`StepStats.phase_tokens` / `phase_forward_s` keys -> our phase names."""


# ----------------------------------------------------------------------------------------------- workload


class WorkloadError(ValueError):
    """A workload file that cannot be run as written (the message names the line)."""


def _request_fields() -> set[str]:
    import msgspec

    from diffgentor.engine.request import GenerationRequest

    return {f.name for f in msgspec.structs.fields(GenerationRequest)} - {"request_id"}


def load_workload(path: str | Path) -> list[dict[str, Any]]:
    """One request per non-empty line: the offline API's request fields; `images` are paths relative to the file
    (read here, so a missing image is an error before any engine starts). Adds `request_id` = `w{line}`."""
    path = Path(path)
    allowed = _request_fields()
    out: list[dict[str, Any]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(row, dict):
            raise WorkloadError(f"{path}:{n}: a request must be a JSON object")
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise WorkloadError(f"{path}:{n}: unknown fields {unknown}; allowed: {sorted(allowed)}")
        if not isinstance(row.get("prompt"), str):
            raise WorkloadError(f"{path}:{n}: `prompt` (a string) is required")
        images = row.get("images") or []
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise WorkloadError(f"{path}:{n}: `images` must be a list of paths")
        try:
            row["images"] = [(path.parent / p).read_bytes() for p in images]
        except OSError as e:
            raise WorkloadError(f"{path}:{n}: cannot read image: {e}") from None
        row["request_id"] = f"w{n}"
        out.append(row)
    if not out:
        raise WorkloadError(f"{path}: no requests")
    return out


def preset_requests(preset: Preset, num: int) -> list[dict[str, Any]]:
    """The preset's synthetic text-to-image requests (the default when no workload is given)."""
    return [
        dict(request_id=f"bench-{i}", prompt=f"a photo of object number {i} on a table, studio light",
             bot_task=preset.bot_task, image_size=preset.image_size, max_new_tokens=preset.think_tokens,
             num_inference_steps=preset.steps, seed=1000 + i, infer_align_image_size=False)
        for i in range(num)
    ]


def take(requests: list[dict[str, Any]], num: int | None) -> list[dict[str, Any]]:
    """The first `num` requests, cycling the list when it is shorter; copies get their own request ids."""
    if not num:
        return [dict(r) for r in requests]
    out = []
    for i, r in zip(range(num), itertools.cycle(requests)):
        lap = i // len(requests)
        out.append({**r, "request_id": r["request_id"] if lap == 0 else f"{r['request_id']}.{lap}"})
    return out


def kind_of(request: dict[str, Any]) -> str:
    return "edit" if request.get("images") else "t2i"


def _invert_png(data: bytes) -> bytes:
    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(data)).convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


def warmup_requests(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One request of each kind in the workload, changed so it shares no cache entry with the timed ones: another
    prompt (the system prompt prefix is still shared, as in steady serving), another seed, inverted images."""
    out = []
    for kind in ("t2i", "edit"):
        r = next((r for r in requests if kind_of(r) == kind), None)
        if r is not None:
            out.append({**r, "request_id": f"warmup-{kind}", "prompt": "warm-up: " + r["prompt"],
                        "seed": int(r.get("seed") or 0) + 7919,
                        "images": [_invert_png(b) for b in r.get("images") or []]})
    return out


# ----------------------------------------------------------------------------------------------- measuring


def _config_overrides(preset: Preset) -> dict[str, Any]:
    from diffgentor.engine.testing.tiny_model import SMALL_SIZES, size_overrides

    return size_overrides(**SMALL_SIZES) if preset.sizes == "small" else {}


LAYOUT_GUIDANCE = 5.0
"""Guidance of every request in a `--layouts` run: each has CFG, so CFG parallel has two rows to split."""


def parse_layout(name: str) -> dict[str, int]:
    """"tp2xcfg2" -> the engine arguments of that layout (validated: ValueError with the reason)."""
    from diffgentor.engine.parallel_layout import ParallelLayout

    sizes = {"tp": 1, "cfg": 1, "sp": 1}
    for part in name.strip().lower().split("x"):
        dim = part.rstrip("0123456789")
        if dim not in sizes or not part[len(dim):]:
            raise ValueError(f"layout {name!r}: expected parts like tp2, cfg2, sp2 joined by 'x'")
        sizes[dim] = int(part[len(dim):])
    ParallelLayout(**sizes)
    return {"tensor_parallel_size": sizes["tp"], "cfg_parallel_size": sizes["cfg"],
            "sequence_parallel_size": sizes["sp"]}


@dataclass(frozen=True)
class Setting:
    """One engine setting a run is timed at."""

    max_num_seqs: int
    async_encode: bool = True
    layout: str = "tp1"

    @property
    def key(self) -> str:
        return f"mns{self.max_num_seqs}" + ("" if self.async_encode else "_inline") + \
            ("" if self.layout == "tp1" else f"_{self.layout}")


@dataclass
class RunResult:
    max_num_seqs: int
    repeat: int
    duration_s: float
    num_requests: int
    num_images: int
    think_tokens: int
    diffusion_steps: int
    engine_steps: int
    images_per_min: float
    think_tokens_per_s: float
    diffusion_steps_per_s: float
    phase_time_s: dict[str, float] = field(default_factory=dict)
    phase_fraction: dict[str, float] = field(default_factory=dict)
    phase_split_source: str = ""
    phase_tokens: dict[str, int] = field(default_factory=dict)
    scheduler_overhead_ms_per_step: float = 0.0
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    slowest_steps: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    heap_reuse_bytes: int | None = None  # the engine's host heap ceiling (0: glibc's defaults)
    cpu: dict[str, float] = field(default_factory=dict)  # `cpu_usage`: this process over the timed run + children
    async_encode: bool = True
    layout: str = "tp1"
    # engine steps that ran only denoising steps: how many, their mean wall time, and wall time per denoising step
    image_steps: dict[str, float] = field(default_factory=dict)

    @property
    def setting(self) -> Setting:
        return Setting(self.max_num_seqs, self.async_encode, self.layout)


def image_step_time(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Per-step image time from a run's steps: those whose tokens were all denoising-block tokens (no prefill, no
    think decode) and that finished at least one denoising step, or Taylor-cache steps with no tokens at all."""
    sel = [s for s in steps if s["diffusion_steps"] > 0
           and not s["tokens"].get("prefill", 0) and not s["tokens"].get("decode", 0)]
    wall = sum(s["wall_s"] for s in sel)
    denoise = sum(s["diffusion_steps"] for s in sel)
    return {"steps": float(len(sel)), "mean_s": wall / len(sel) if sel else 0.0,
            "per_denoising_step_s": wall / denoise if denoise else 0.0}


def cpu_usage(before: tuple[Any, Any], after: tuple[Any, Any]) -> dict[str, float]:
    """What the kernel did for the engine between two `_rusage()` readings: minor / major page faults, system / user
    CPU seconds and context switches of this process, and of its reaped child processes (tensor-parallel ranks) as
    ``children_*``. A voluntary switch is a thread going to sleep (a contended lock, e.g. the allocator's arena, or an
    idle OpenMP worker); an involuntary one is a thread preempted (more runnable threads than cores). Counts, so a
    loaded machine does not change them much (unlike wall time)."""
    out: dict[str, float] = {}
    for prefix, a, b in (("", before[0], after[0]), ("children_", before[1], after[1])):
        out[prefix + "minor_faults"] = float(b.ru_minflt - a.ru_minflt)
        out[prefix + "major_faults"] = float(b.ru_majflt - a.ru_majflt)
        out[prefix + "system_s"] = b.ru_stime - a.ru_stime
        out[prefix + "user_s"] = b.ru_utime - a.ru_utime
        out[prefix + "voluntary_switches"] = float(b.ru_nvcsw - a.ru_nvcsw)
        out[prefix + "involuntary_switches"] = float(b.ru_nivcsw - a.ru_nivcsw)
    return out


def _rusage() -> tuple[Any, Any]:
    return resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)


def _image_digest(res: Any) -> str | None:
    img = getattr(res, "image", None)
    return hashlib.sha256(img.tobytes()).hexdigest()[:16] if img is not None else None


def _stats_snapshot(stats: Any) -> dict[str, Any]:
    """A deep copy of the engine's `StepStats` as plain numbers (fields it lacks read as zero later)."""
    return json.loads(json.dumps(asdict(stats)))


def _delta(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return float(b.get(key, 0.0)) - float(a.get(key, 0.0))


def _dict_delta(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, float]:
    da, db = a.get(key) or {}, b.get(key) or {}
    return {k: float(db.get(k, 0.0)) - float(da.get(k, 0.0)) for k in db}


@dataclass
class _PhaseAccumulator:
    """Attributes each engine step's time to phases; `other` is whatever the engine's counters do not explain."""

    time_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    engine_split_steps: int = 0
    token_share_steps: int = 0

    def add_step(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        tokens = _dict_delta(before, after, "phase_tokens")
        engine_split = _dict_delta(before, after, "phase_forward_s")
        forward, post = _delta(before, after, "forward_s"), _delta(before, after, "post_s")
        total_tokens = sum(tokens.values())
        step: dict[str, float] = {
            "encode": _delta(before, after, "encode_s"),
            "vae_decode": _delta(before, after, "vae_s"),
            "scheduler": _delta(before, after, "schedule_s") + _delta(before, after, "update_s"),
        }
        # forward seconds per phase: the engine's own split when it fills one, else this step's token shares;
        # sampling / Euler time (post) always by token share
        if sum(engine_split.values()) > 0:
            self.engine_split_steps += 1
            fwd = {k: engine_split.get(k, 0.0) for k in _STAT_PHASE}
        else:
            self.token_share_steps += 1 if total_tokens else 0
            fwd = {k: forward * tokens.get(k, 0) / total_tokens if total_tokens else 0.0 for k in _STAT_PHASE}
        for k, ours in _STAT_PHASE.items():
            share = tokens.get(k, 0) / total_tokens if total_tokens else 0.0
            step[ours] = fwd[k] + post * share
        for k, v in step.items():
            self.time_s[k] += v
        return step

    def source(self) -> str:
        if self.engine_split_steps and self.token_share_steps:
            return "mixed: StepStats.phase_forward_s where filled, else token share of forward_s"
        return "StepStats.phase_forward_s" if self.engine_split_steps else "token share of StepStats.forward_s"


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"count": len(values), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def latency_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind (t2i, edit, all): time to first think token, end to end, and the engine step of the first text."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("t2i", "edit", "all"):
        sel = [r for r in rows if r["ok"] and (kind == "all" or r["kind"] == kind)]
        out[kind] = {
            "completed": len(sel),
            "first_token_s": _summary([r["first_token_s"] for r in sel if r["first_token_s"] is not None]),
            "e2e_s": _summary([r["e2e_s"] for r in sel]),
            "first_text_step": _summary([r["first_text_step"] for r in sel if r["first_text_step"] is not None]),
        }
    return out


def run_once(ckpt: Path, engine_args: dict[str, Any], reqs: list[dict[str, Any]], warmup: int,
             repeat: int, layout: str = "tp1") -> RunResult:
    """A fresh engine, `warmup` untimed warm-up runs, then the timed run, stepped here like `Engine.stream` does so
    every step's counters can be attributed to phases."""
    from diffgentor.engine.offline import Engine

    children0 = _rusage()[1]
    eng = Engine.from_pretrained(ckpt, environ={}, **engine_args, **parse_layout(layout))
    try:
        for _ in range(warmup):
            eng.generate(warmup_requests(reqs))
        eng.idle_release.busy()  # the timed run follows at once: no idle release of the warm-up's heap in it
        core = eng.core
        kinds = {r["request_id"]: kind_of(r) for r in reqs}
        first_text: dict[str, int] = {}
        acc = _PhaseAccumulator()
        steps: list[dict[str, Any]] = []
        start = _stats_snapshot(eng.stats)
        usage0 = _rusage()
        t0 = time.perf_counter()
        for r in reqs:
            eng.add_request(r)
        acc.time_s["preprocess"] = time.perf_counter() - t0
        before = start
        while core.has_unfinished_requests():
            ts = time.perf_counter()
            outputs = core.step()
            wall = time.perf_counter() - ts
            eng.process_outputs(outputs)  # the frontend's output processing: results (text, image) into eng.results
            after = _stats_snapshot(eng.stats)
            split = acc.add_step(before, after)
            steps.append({"index": len(steps), "wall_s": wall, **split,
                          "tokens": _dict_delta(before, after, "phase_tokens"),
                          "diffusion_steps": int(_delta(before, after, "diffusion_steps"))})
            before = after
            for ev in outputs.events:
                if ev.kind == "tokens":
                    first_text.setdefault(ev.request_id, len(steps) - 1)
        dur = time.perf_counter() - t0
        usage1 = _rusage()
        end = _stats_snapshot(eng.stats)
        results = [eng.results.pop(r["request_id"]) for r in reqs]
    finally:
        eng.close()
    # children (ranks) are counted once reaped, so over the engine's whole life; this process over the timed run
    cpu = cpu_usage((usage0[0], children0), (usage1[0], _rusage()[1]))
    acc.time_s["other"] = dur - sum(v for k, v in acc.time_s.items() if k != "other")
    rows = []
    for res in results:
        t = res.timings
        rows.append({
            "request_id": res.request_id, "kind": kinds[res.request_id], "ok": res.error is None,
            "first_token_s": t.get("first_token"), "e2e_s": t.get("total"), "queue_s": t.get("queue"),
            "think_s": t.get("think"), "diffuse_s": t.get("diffuse"), "vae_decode_s": t.get("vae_decode"),
            "think_tokens": res.num_generated_tokens, "prompt_tokens": res.num_prompt_tokens,
            "first_text_step": first_text.get(res.request_id), "error": res.error,
            "image_sha256": _image_digest(res),
        })
    images = sum(r.finish_reason == "image" for r in results)  # output_type latent counts: the image was made
    think = sum(r.num_generated_tokens for r in results)
    engine_steps = int(_delta(start, end, "steps"))
    diffusion_steps = int(_delta(start, end, "diffusion_steps"))
    sched = _delta(start, end, "schedule_s") + _delta(start, end, "update_s")
    return RunResult(
        max_num_seqs=int(engine_args["max_num_seqs"]), async_encode=bool(engine_args.get("async_encode", True)),
        repeat=repeat, duration_s=dur, num_requests=len(reqs),
        num_images=images, think_tokens=think, diffusion_steps=diffusion_steps, engine_steps=engine_steps,
        images_per_min=60.0 * images / dur, think_tokens_per_s=think / dur,
        diffusion_steps_per_s=diffusion_steps / dur,
        phase_time_s=dict(acc.time_s), phase_fraction={k: v / dur for k, v in acc.time_s.items()},
        phase_split_source=acc.source(),
        phase_tokens={k: int(v) for k, v in _dict_delta(start, end, "phase_tokens").items()},
        scheduler_overhead_ms_per_step=1000.0 * sched / max(engine_steps, 1),
        latency=latency_summary(rows),
        slowest_steps=sorted(steps, key=lambda s: -s["wall_s"])[:5],
        requests=rows,
        errors=[f"{r.request_id}: {r.error}" for r in results if r.error],
        heap_reuse_bytes=eng.core.config.cache.heap_reuse_bytes, cpu=cpu, layout=layout,
        image_steps=image_step_time(steps),
    )


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """Mean and spread over the repeats of one max_num_seqs setting."""

    def lat(kind: str, metric: str, stat: str) -> list[float]:
        return [v for r in runs if (v := r.latency[kind][metric][stat]) is not None]

    out: dict[str, Any] = {
        "repeats": len(runs),
        "images_per_min": _spread([r.images_per_min for r in runs]),
        "duration_s": _spread([r.duration_s for r in runs]),
        "think_tokens_per_s": _spread([r.think_tokens_per_s for r in runs]),
        "diffusion_steps_per_s": _spread([r.diffusion_steps_per_s for r in runs]),
        "phase_time_s": {k: statistics.fmean(r.phase_time_s[k] for r in runs) for k in PHASES},
        "phase_fraction": {k: statistics.fmean(r.phase_fraction[k] for r in runs) for k in PHASES},
        "cpu": {k: statistics.fmean(r.cpu[k] for r in runs) for k in runs[0].cpu},
        "image_step_s": _spread([r.image_steps.get("mean_s", 0.0) for r in runs]),
        "image_step_per_denoising_step_s": _spread([r.image_steps.get("per_denoising_step_s", 0.0) for r in runs]),
    }
    for kind in ("t2i", "edit", "all"):
        out[kind] = {m: {s: statistics.fmean(v) for s in ("mean", "p50", "p99") if (v := lat(kind, m, s))}
                     for m in ("first_token_s", "e2e_s", "first_text_step")}
    return out


def machine_info() -> dict[str, Any]:
    import torch

    """What the numbers depend on: code version, CPU, threads, and how busy the machine was."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_uncommitted": dirty.splitlines() if dirty else [],
        "cpu_model": cpu, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:],
    }


# ----------------------------------------------------------------------------------------------- CLI


def render(run: RunResult) -> str:
    p = run.phase_time_s
    lat = run.latency
    ft = {k: lat[k]["first_token_s"]["mean"] for k in ("t2i", "edit")}
    ft_s = ", ".join(f"{k} {v:.2f}s" for k, v in ft.items() if v is not None)
    heap = "glibc defaults" if not run.heap_reuse_bytes else f"heap reuse {(run.heap_reuse_bytes or 0) >> 20} MiB"
    im = run.image_steps
    layout = "" if run.layout == "tp1" else f" layout {run.layout}"
    return (
        f"max_num_seqs={run.max_num_seqs:>3}{'' if run.async_encode else ' inline encodes'}{layout} #{run.repeat}: "
        f"{run.duration_s:7.2f} s  {run.images_per_min:7.2f} "
        f"images/min  {run.think_tokens_per_s:6.1f} think tok/s  first think token (mean) {ft_s or '-'}\n"
        f"    split: " + ", ".join(f"{k} {p[k]:.2f}s" for k in PHASES)
        + f"  [{run.engine_steps} steps, scheduler {run.scheduler_overhead_ms_per_step:.2f} ms/step]\n"
        f"    {heap}: {run.cpu.get('minor_faults', 0):.0f} minor page faults, system {run.cpu.get('system_s', 0):.2f} s"
        f", user {run.cpu.get('user_s', 0):.2f} s, {run.cpu.get('voluntary_switches', 0):.0f} voluntary context "
        "switches\n"
        f"    image steps: {im.get('steps', 0):.0f}, {1000 * im.get('mean_s', 0):.1f} ms per step, "
        f"{1000 * im.get('per_denoising_step_s', 0):.1f} ms per denoising step"
    )


def build_result(args: argparse.Namespace, info: dict[str, Any], load_before: tuple[float, ...],
                 reqs: list[dict[str, Any]], settings: list[Setting], runs: list[RunResult]) -> dict[str, Any]:
    """The JSON document; `complete` is false while runs are still missing (it is saved after every run)."""
    preset = PRESETS[args.preset]
    by_setting = {st: rs for st in settings if (rs := [r for r in runs if r.setting == st])}
    summary = {st.key: summarize(rs) for st, rs in by_setting.items()}
    counts = {k: sum(kind_of(r) == k for r in reqs) for k in ("t2i", "edit")}
    out: dict[str, Any] = {
        "benchmark": "offline", "label": args.label, "complete": len(runs) == len(settings) * args.repeat, **info,
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "model": str(args.model) if args.model else f"random preset {args.preset}",
        "preset": args.preset, "description": preset.description, "preset_settings": asdict(preset),
        "workload": str(args.workload) if args.workload else None, "num_requests": len(reqs),
        "num_t2i": counts["t2i"], "num_edit": counts["edit"], "warmup_runs": args.warmup, "repeats": args.repeat,
        "device": args.device, "dtype": args.dtype, "scheduling": _scheduling_args(args),
        "max_num_seqs": list(dict.fromkeys(st.max_num_seqs for st in settings)),
        "settings": [st.key for st in settings],
        "images_per_min": summary[settings[0].key]["images_per_min"]["mean"] if settings[0] in by_setting else None,
        "summary": summary,
        "runs": [asdict(r) for r in runs],
    }
    mns = list(dict.fromkeys(st.max_num_seqs for st in settings))
    pair = [st for st in settings if st.async_encode == settings[-1].async_encode
            and st.layout == settings[0].layout]  # one per max_num_seqs
    if len(pair) == 2 and all(st in by_setting for st in pair):
        a, b = (summary[st.key] for st in pair)
        no_vae = [statistics.fmean(r.duration_s - r.phase_time_s["vae_decode"] for r in by_setting[st])
                  for st in pair]
        out["ratio"] = {
            key: a[key]["mean"] / b[key]["mean"]
            for key in ("images_per_min", "think_tokens_per_s", "diffusion_steps_per_s")
        } | {"engine_time_excluding_vae": no_vae[1] / no_vae[0]}
    layouts = list(dict.fromkeys(st.layout for st in settings))
    if len(layouts) > 1:
        first: dict[str, Any] = {}  # each layout's first setting (the first max_num_seqs and encode mode)
        for st in settings:
            if st in by_setting:
                first.setdefault(st.layout, summary[st.key])
        base = first.get(layouts[0])
        out["layout_comparison"] = {
            lay: {"image_step_s": s["image_step_s"]["mean"],
                  "per_denoising_step_s": s["image_step_per_denoising_step_s"]["mean"],
                  "vs_" + layouts[0]: (s["image_step_s"]["mean"] / base["image_step_s"]["mean"]
                                       if base and base["image_step_s"]["mean"] else None)}
            for lay, s in first.items()}
    out["encode_comparison"] = {
        f"mns{m}": encode_comparison(summary[before.key], summary[after.key])
        for m in mns if (before := Setting(m, False)) in by_setting and (after := Setting(m, True)) in by_setting
    }
    return out


def encode_comparison(inline: dict[str, Any], asynchronous: dict[str, Any]) -> dict[str, Any]:
    """Inline (before) vs asynchronous (after) encodes at one max_num_seqs: end-to-end latency by kind and
    images/min, with the after / before ratios."""
    out: dict[str, Any] = {}
    for kind in ("t2i", "edit"):
        b, a = inline[kind]["e2e_s"].get("mean"), asynchronous[kind]["e2e_s"].get("mean")
        out[f"{kind}_e2e_mean_s"] = {"inline": b, "async": a, "ratio": a / b if a is not None and b else None}
    b, a = inline["images_per_min"]["mean"], asynchronous["images_per_min"]["mean"]
    out["images_per_min"] = {"inline": b, "async": a, "ratio": a / b if b else None}
    return out


ALLOCATOR_SIDES = ("glibc_default", "heap_reuse")
"""The two sides of `--compare-allocator`: ``--heap-reuse-memory 0``, and heap reuse at the run's ceiling."""


def _scheduling_args(args: argparse.Namespace) -> dict:
    """The scheduling settings given on the command line (engine keywords), the engine's defaults otherwise."""
    keys = ("max_num_image_tokens", "encode_defer_ms", "max_step_ms")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _side_argv(args: argparse.Namespace, model: Path, heap_reuse_bytes: int, out: Path) -> list[str]:
    """`bench offline` for one side of the allocator A/B: one timed run in a fresh process, same settings."""
    argv = [sys.executable, "-m", "diffgentor.server.cli", "bench", "offline", "--preset", args.preset,
            "--model", str(model), "--warmup", str(args.warmup), "--repeat", "1",
            "--num-kv-blocks", str(args.num_kv_blocks), "--device", args.device, "--dtype", args.dtype,
            "--heap-reuse-memory", str(heap_reuse_bytes), "--save-result", str(out)]
    optional = {"--workload": args.workload, "--num-prompts": args.num_prompts, "--max-num-seqs": args.max_num_seqs,
                "--max-num-batched-tokens": args.max_num_batched_tokens,
                **{f"--{k.replace('_', '-')}": v for k, v in _scheduling_args(args).items()}}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if args.no_async_encode:
        argv.append("--no-async-encode")
    return argv


def allocator_result(args: argparse.Namespace, info: dict[str, Any], load_before: tuple[float, ...],
                     reqs: list[dict[str, Any]], runs: dict[str, list[RunResult]], ceiling: int) -> dict[str, Any]:
    """The A/B document: each side's runs and summary, heap reuse / glibc ratios, and whether the images agree."""
    done = {side: rs for side, rs in runs.items() if rs}
    summary = {side: summarize(rs) for side, rs in done.items()}
    digests = {side: {(row["request_id"], row["image_sha256"]) for r in rs for row in r.requests}
               for side, rs in done.items()}
    out: dict[str, Any] = {
        "benchmark": "offline-allocator", "label": args.label,
        "complete": all(len(rs) == args.repeat for rs in runs.values()), **info,
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "model": str(args.model) if args.model else f"random preset {args.preset}", "preset": args.preset,
        "workload": str(args.workload) if args.workload else None, "num_requests": len(reqs),
        "warmup_runs": args.warmup, "repeats": args.repeat, "device": args.device, "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs or PRESETS[args.preset].max_num_seqs,
        "heap_reuse_bytes": {"glibc_default": 0, "heap_reuse": ceiling},
        "summary": summary,
        "identical_images": len(digests) == 2 and digests["glibc_default"] == digests["heap_reuse"],
        "runs": {side: [asdict(r) for r in rs] for side, rs in runs.items()},
    }
    if len(summary) == 2:
        a, b = summary["glibc_default"], summary["heap_reuse"]
        out["ratio"] = {key: b[key]["mean"] / a[key]["mean"] for key in ("images_per_min", "think_tokens_per_s",
                                                                        "diffusion_steps_per_s")}
        out["ratio"] |= {f"cpu_{k}": b["cpu"][k] / a["cpu"][k] if a["cpu"][k] else None
                         for k in ("minor_faults", "system_s", "user_s", "voluntary_switches")}
        out["cpu_bound"] = cpu_bound(a["cpu"], b["cpu"])
    return out


def cpu_bound(default: dict[str, float], reuse: dict[str, float]) -> dict[str, float | None]:
    """What the CPU seconds allow, counted rather than timed: on a machine whose cores the engine keeps busy, images/min
    can rise by at most the ratio of CPU seconds (``cpu_s``: glibc's defaults over heap reuse), and no heap policy can
    do better than removing every system second while adding no user time (``without_system_time``)."""
    used = {side: c["user_s"] + c["system_s"] for side, c in (("default", default), ("reuse", reuse))}
    return {"cpu_s": used["default"] / used["reuse"] if used["reuse"] else None,
            "without_system_time": used["default"] / default["user_s"] if default["user_s"] else None}


def compare_allocator(args: argparse.Namespace, info: dict[str, Any], load_before: tuple[float, ...],
                      reqs: list[dict[str, Any]]) -> int:
    """`--compare-allocator`: each repeat runs glibc's defaults and heap reuse in a fresh process each, the order
    alternating between repeats; saved after every run."""
    ceiling = args.heap_reuse_memory if args.heap_reuse_memory is not None else DEFAULT_HEAP_REUSE_BYTES
    save = Path(args.save_result) if args.save_result else None
    if save:
        save.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[RunResult]] = {side: [] for side in ALLOCATOR_SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model)
        else:
            from diffgentor.engine.testing.tiny_model import make_tiny

            preset = PRESETS[args.preset]
            model = make_tiny(Path(tmp) / f"random-{args.preset}", distil=preset.distil, seed=0,
                              config_overrides=_config_overrides(preset))
        for rep in range(args.repeat):
            for side in ALLOCATOR_SIDES if rep % 2 == 0 else ALLOCATOR_SIDES[::-1]:
                side_out = Path(tmp) / f"{side}-{rep}.json"
                print(f"allocator A/B #{rep}: {side} (a fresh process)", flush=True)
                heap = 0 if side == "glibc_default" else ceiling
                rc = subprocess.run(_side_argv(args, model, heap, side_out)).returncode
                if not side_out.is_file():
                    print(f"bench offline: the {side} run failed (exit {rc})", file=sys.stderr)
                    return 1
                (run,) = json.loads(side_out.read_text())["runs"]
                runs[side].append(RunResult(**{**run, "repeat": rep}))
                if save:
                    doc = allocator_result(args, info, load_before, reqs, runs, ceiling)
                    save.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    out = allocator_result(args, info, load_before, reqs, runs, ceiling)
    r = out["ratio"]
    print(f"heap reuse ({ceiling >> 20} MiB) vs glibc defaults: images/min x{r['images_per_min']:.2f}, minor page "
          f"faults x{r['cpu_minor_faults'] or 0:.3f}, system time x{r['cpu_system_s'] or 0:.3f}, user time "
          f"x{r['cpu_user_s'] or 0:.3f}; identical images: {out['identical_images']}")
    bound = out["cpu_bound"]
    print(f"CPU seconds glibc / heap reuse x{bound['cpu_s'] or 0:.3f} (a CPU-bound run's images/min ratio); no heap "
          f"policy can exceed x{bound['without_system_time'] or 0:.3f} (every system second removed)")
    print(f"load average before {load_before[0]:.2f}, after {out['loadavg_after'][0]:.2f}")
    if save:
        save.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        print(f"saved {save}")
    failed = any(r.errors for rs in runs.values() for r in rs)
    return 1 if failed or not out["identical_images"] else 0


def main(args: argparse.Namespace) -> int:
    import torch

    preset = PRESETS[args.preset]
    load_before = os.getloadavg()
    info = machine_info()
    try:
        reqs = load_workload(args.workload) if args.workload else preset_requests(
            preset, args.num_prompts or preset.num_requests)
    except WorkloadError as e:
        print(f"bench offline: {e}", file=sys.stderr)
        return 2
    reqs = take(reqs, args.num_prompts)
    if args.repeat < 1 or args.warmup < 0:
        print("bench offline: --repeat must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.compare_allocator:
        if args.compare_max_num_seqs or args.compare_async_encode or args.heap_reuse_memory == 0 or args.layouts:
            print("bench offline: --compare-allocator compares glibc's defaults with heap reuse at one max_num_seqs "
                  "(no --compare-max-num-seqs, --compare-async-encode or --layouts, no --heap-reuse-memory 0)",
                  file=sys.stderr)
            return 2
        return compare_allocator(args, info, load_before, reqs)
    torch.manual_seed(0)
    mns = [args.max_num_seqs or preset.max_num_seqs] + ([args.compare_max_num_seqs]
                                                         if args.compare_max_num_seqs else [])
    modes = [False, True] if args.compare_async_encode else [not args.no_async_encode]
    try:
        layouts = [x.strip().lower() for x in args.layouts.split(",")] if args.layouts else ["tp1"]
        for lay in layouts:
            parse_layout(lay)
    except ValueError as e:
        print(f"bench offline: --layouts: {e}", file=sys.stderr)
        return 2
    if args.layouts:  # every request with CFG: CFG parallel has both rows to split
        reqs = [{**r, "guidance_scale": LAYOUT_GUIDANCE} for r in reqs]
    settings = [Setting(m, mode, lay) for m in mns for mode in modes for lay in layouts]
    save = Path(args.save_result) if args.save_result else None
    if save:
        save.parent.mkdir(parents=True, exist_ok=True)
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            ckpt = Path(args.model)
        else:
            from diffgentor.engine.testing.tiny_model import make_tiny

            distil = preset.distil and not args.layouts  # layouts: the Instruct variant, with CFG
            ckpt = make_tiny(Path(tmp) / f"random-{args.preset}{'' if distil else '-instruct'}", distil=distil,
                             seed=0, config_overrides=_config_overrides(preset))
        for st in settings:
            engine_args = dict(device=args.device, dtype=args.dtype, max_num_seqs=st.max_num_seqs,
                               max_num_batched_tokens=args.max_num_batched_tokens or preset.max_num_batched_tokens,
                               num_kv_blocks=args.num_kv_blocks, heap_reuse_memory=args.heap_reuse_memory,
                               async_encode=st.async_encode, async_decode=not args.no_async_decode,
                               **_scheduling_args(args))
            for rep in range(args.repeat):
                runs.append(run_once(ckpt, engine_args, reqs, args.warmup, rep, st.layout))
                print(render(runs[-1]), flush=True)
                if save:  # a long run killed later still leaves the runs done so far
                    out = build_result(args, info, load_before, reqs, settings, runs)
                    save.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    out = build_result(args, info, load_before, reqs, settings, runs)
    if "ratio" in out:
        r = out["ratio"]
        print(f"ratio max_num_seqs={mns[0]} vs {mns[1]}: images/min x{r['images_per_min']:.2f}, "
              f"think tok/s x{r['think_tokens_per_s']:.2f}, diffusion steps/s x{r['diffusion_steps_per_s']:.2f}, "
              f"time without VAE decode x{r['engine_time_excluding_vae']:.2f}")
    for lay, c in out.get("layout_comparison", {}).items():
        ratio = c[f"vs_{layouts[0]}"]
        print(f"layout {lay}: {1000 * c['image_step_s']:.1f} ms per image step, "
              f"{1000 * c['per_denoising_step_s']:.1f} ms per denoising step"
              + (f" (x{ratio:.2f} of {layouts[0]})" if ratio is not None else ""))
    for key, c in out["encode_comparison"].items():
        t2i, ipm = c["t2i_e2e_mean_s"], c["images_per_min"]
        t2i_s = f"{t2i['inline']:.2f} s -> {t2i['async']:.2f} s" if t2i["ratio"] is not None else "-"
        print(f"{key} inline -> async encodes: text-to-image mean end-to-end {t2i_s}, images/min "
              f"{ipm['inline']:.2f} -> {ipm['async']:.2f} (x{ipm['ratio']:.3f})")
    print(f"load average before {load_before[0]:.2f}, after {out['loadavg_after'][0]:.2f}; "
          f"{info['torch_threads']} torch threads")
    if save:
        save.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        print(f"saved {save}")
    return 1 if any(r.errors for r in runs) else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("offline", help="offline throughput and latency on a checkpoint and a workload")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="engine settings and, without --model / --workload, the random checkpoint and requests")
    p.add_argument("--model", default=None, help="a checkpoint folder (default: a random one of the preset's shape)")
    p.add_argument("--workload", default=None,
                   help="JSON lines, one offline-API request each (prompt, images as paths relative to the file, "
                   "image_size HxW, bot_task, max_new_tokens, num_inference_steps, seed, use_system_prompt, ...)")
    p.add_argument("--num-prompts", "--num-requests", dest="num_prompts", type=int, default=None,
                   help="take this many requests (cycling the workload when it is shorter)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed warm-up runs per engine, each of one request per kind (first text-to-image, "
                   "first edit) with another prompt, seed and images")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per max_num_seqs (mean and spread reported)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--compare-max-num-seqs", type=int, default=None,
                   help="also run the same requests at this max_num_seqs and print the ratio")
    p.add_argument("--compare-async-encode", action="store_true",
                   help="run each max_num_seqs with condition-image encodes inside the steps (before) and beside "
                   "them (after), and print text-to-image latency and images/min of both")
    p.add_argument("--no-async-encode", action="store_true",
                   help="encode condition images inside the steps (the engine's --no-async-encode)")
    p.add_argument("--no-async-decode", action="store_true",
                   help="VAE-decode finished images inside the steps (the engine's --no-async-decode)")
    p.add_argument("--layouts", default=None, metavar="LIST",
                   help="parallel layouts to compare, e.g. tp1,cfg2,tp2,tp2xcfg2 (Instruct variant, every request "
                   "with CFG): per-step image time per layout")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-image-tokens", type=int, default=None,
                   help="denoising-block tokens per step (1: one image's step at a time, first come first served)")
    p.add_argument("--encode-defer-ms", type=float, default=None,
                   help="latency first: queued encodes wait while text-to-image requests run, at most this long")
    p.add_argument("--max-step-ms", type=float, default=None, help="the engine's step-time target")
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--heap-reuse-memory", type=_size_arg, default=None, metavar="SIZE",
                   help="the engine's host heap ceiling (engine/allocator.py); 0 = glibc's defaults (default 4GiB)")
    p.add_argument("--compare-allocator", action="store_true",
                   help="A/B of glibc's defaults against heap reuse: each repeat runs both, each in a fresh process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--label", default=None, help="a name for this result (shown by `bench compare`)")
    p.add_argument("--save-result", default=None, help="write the JSON result here")
    p.set_defaults(func=main)
