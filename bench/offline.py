"""`diffgentor bench offline`: offline throughput of the engine on a named random configuration.

Builds a random checkpoint of the preset's shape (our tiny-model writer, resized), runs the same N
requests through `Engine.generate` at the preset's max_num_seqs and, with `--compare-max-num-seqs K`,
again at max_num_seqs=K in the same process, and prints images/min, think tokens/s, diffusion steps/s,
the per-phase time split and the scheduler's own overhead per step, plus the ratio between the runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Preset:
    description: str
    config_overrides: dict[str, Any]
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
        config_overrides=dict(
            num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
            attention_head_dim=32, num_experts=16, moe_topk=4, moe_intermediate_size=256, num_shared_expert=1,
            intermediate_size=512,
        ),
    ),
    "tiny": Preset(
        description="the embedded tiny model (2 layers, hidden 64, 4 experts top-2), 4 requests, 8 think tokens, "
        "2 steps (a smoke run)",
        config_overrides={}, think_tokens=8, steps=2, num_requests=4, max_num_seqs=4,
    ),
}


@dataclass
class RunResult:
    max_num_seqs: int
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
    phase_tokens: dict[str, int] = field(default_factory=dict)
    scheduler_overhead_ms_per_step: float = 0.0
    errors: list[str] = field(default_factory=list)


def build_checkpoint(preset: Preset, out_dir: Path, seed: int = 0) -> Path:
    from diffgentor.engine.tiny_model import make_tiny

    return make_tiny(out_dir, distil=preset.distil, seed=seed, config_overrides=preset.config_overrides)


def requests(preset: Preset, num: int) -> list[dict[str, Any]]:
    return [
        dict(request_id=f"bench-{i}", prompt=f"a photo of object number {i} on a table, studio light",
             bot_task=preset.bot_task, image_size=preset.image_size, max_new_tokens=preset.think_tokens,
             num_inference_steps=preset.steps, seed=1000 + i, infer_align_image_size=False)
        for i in range(num)
    ]


def run_once(ckpt: Path, preset: Preset, num: int, max_num_seqs: int) -> RunResult:
    from diffgentor.engine.offline import Engine

    eng = Engine.from_pretrained(
        ckpt, environ={}, device="cpu", dtype="float32", max_num_seqs=max_num_seqs,
        max_num_batched_tokens=preset.max_num_batched_tokens, num_kv_blocks=4096,
    )
    eng.generate(requests(preset, 1)[:1])  # warm-up (allocator, kernels); not counted
    core = eng.core
    core.stats = type(core.stats)()
    t0 = time.perf_counter()
    results = eng.generate(requests(preset, num))
    dur = time.perf_counter() - t0
    s = core.stats
    images = sum(r.image is not None for r in results)
    think = sum(r.num_generated_tokens for r in results)
    steps = s.diffusion_steps
    return RunResult(
        max_num_seqs=max_num_seqs, duration_s=dur, num_requests=num, num_images=images, think_tokens=think,
        diffusion_steps=steps, engine_steps=s.steps, images_per_min=60.0 * images / dur,
        think_tokens_per_s=think / dur, diffusion_steps_per_s=steps / dur,
        phase_time_s={"forward": s.forward_s, "sample_and_euler": s.post_s, "vae_decode": s.vae_s,
                      "schedule": s.schedule_s, "update": s.update_s},
        phase_tokens=dict(s.phase_tokens),
        scheduler_overhead_ms_per_step=1000.0 * (s.schedule_s + s.update_s) / max(s.steps, 1),
        errors=[r.error for r in results if r.error],
    )


def render(run: RunResult) -> str:
    p = run.phase_time_s
    return (
        f"max_num_seqs={run.max_num_seqs:>3}: {run.duration_s:7.2f} s  {run.images_per_min:7.2f} images/min  "
        f"{run.think_tokens_per_s:7.1f} think tok/s  {run.diffusion_steps_per_s:6.2f} diffusion steps/s  "
        f"[forward {p['forward']:.1f}s, VAE {p['vae_decode']:.1f}s, sample+euler {p['sample_and_euler']:.1f}s; "
        f"scheduler {run.scheduler_overhead_ms_per_step:.2f} ms/step over {run.engine_steps} steps]"
    )


def main(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    num = args.num_requests or preset.num_requests
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(preset, Path(tmp) / f"random-{args.preset}")
        runs = [run_once(ckpt, preset, num, args.max_num_seqs or preset.max_num_seqs)]
        print(render(runs[0]), flush=True)
        if args.compare_max_num_seqs:
            runs.append(run_once(ckpt, preset, num, args.compare_max_num_seqs))
            print(render(runs[1]), flush=True)
    out: dict[str, Any] = {
        "benchmark": "offline", "preset": args.preset, "description": preset.description,
        "preset_settings": asdict(preset), "num_requests": num, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
        "runs": [asdict(r) for r in runs],
    }
    if len(runs) == 2:
        a, b = runs
        out["ratio"] = {
            "images_per_min": a.images_per_min / b.images_per_min,
            "think_tokens_per_s": a.think_tokens_per_s / b.think_tokens_per_s,
            "diffusion_steps_per_s": a.diffusion_steps_per_s / b.diffusion_steps_per_s,
            "engine_time_excluding_vae": (b.duration_s - b.phase_time_s["vae_decode"])
            / (a.duration_s - a.phase_time_s["vae_decode"]),
        }
        r = out["ratio"]
        print(f"ratio max_num_seqs={a.max_num_seqs} vs {b.max_num_seqs}: images/min x{r['images_per_min']:.2f}, "
              f"think tok/s x{r['think_tokens_per_s']:.2f}, diffusion steps/s x{r['diffusion_steps_per_s']:.2f}, "
              f"time without VAE decode x{r['engine_time_excluding_vae']:.2f}")
    if args.save_result:
        Path(args.save_result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_result).write_text(json.dumps(out, indent=2) + "\n")
        print(f"saved {args.save_result}")
    bad = [e for r in runs for e in r.errors]
    return 1 if bad else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("offline", help="offline throughput on a named random configuration")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--compare-max-num-seqs", type=int, default=None,
                   help="also run the same requests at this max_num_seqs and print the ratio")
    p.add_argument("--save-result", default=None, help="write the JSON result here")
    p.set_defaults(func=main)
