"""Decode-only step time: eager forward vs CUDA-graph replay, per batch size, on a random-weight model.

    python -m diffgentor.bench.decode_graphs --shapes small --batch 1 4 16 --out decode_graphs.json   # GPU
    python -m diffgentor.bench.decode_graphs --shapes tiny --device cpu --steps 3                      # CPU smoke

Each measured step is a whole worker step (`ModelRunner.execute`: the forward, logits and sampling) of `batch`
think tokens, one per sequence, at `--context` keys each, advancing one token per step. The same runner runs it
eagerly (its graph runner switched off) and through `engine.cuda_graph` (captured lazily at the first step of each
batch size, which the warm-up steps absorb). On CPU there are no graphs: the static decode forward is timed instead
(same shapes, no capture), as a smoke of the code path. Times are medians of `--steps` steps after `--warmup`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = ("tiny", "small", "real")


def _text_layout(n: int):
    """A plain text prompt of n tokens (no image slots): every position is a decode-eligible text token."""
    from diffgentor.engine.models.hunyuan_image_3.prompt import BuiltPrompt

    idx = torch.arange(n)
    return BuiltPrompt(token_ids=[5 + i % 200 for i in range(n)], positions=torch.stack([idx, idx], 1),
                       image_slots=[], cond_timestep_indexes=[], gen_timestep_index=None, guidance_index=None,
                       timestep_r_index=None, full_attn_spans=[], text_slices=[(0, n)], rope_image_info=[])


def _overrides(shapes: str, layers: int | None) -> dict[str, Any]:
    from diffgentor.bench.engine_run import REAL_SHAPES
    from diffgentor.engine.testing.tiny_model import SMALL_SIZES, size_overrides

    out = {"tiny": {}, "small": size_overrides(**SMALL_SIZES), "real": dict(REAL_SHAPES)}[shapes]
    if layers is not None:
        out["num_hidden_layers"] = layers
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffgentor.bench.engine_run import build_random_model
    from diffgentor.engine.cuda_graph import DecodeGraphRunner
    from diffgentor.engine.model_runner import ModelRunner
    from diffgentor.engine.models.hunyuan_image_3.sampling import SamplingParams
    from diffgentor.engine.plan import Chunk, NewRequestData, SampleSpec, SchedulerOutput
    from diffgentor.engine.testing.tiny_model import write_tiny_metadata

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    bs = 16
    max_batch = max(args.batch)
    total = args.context + args.warmup + args.steps + 1
    pages = -(-total // bs)
    result: dict[str, Any] = {"device": args.device, "shapes": args.shapes, "context": args.context,
                              "steps": args.steps, "batches": {}}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_metadata(Path(tmp) / "ckpt", config_overrides=_overrides(args.shapes, args.layers))
        model = build_random_model(ckpt, args.device, dtype, None, 0, "sdpa", args.moe_impl)
    result["layers"] = model.config.num_hidden_layers
    runner = ModelRunner(model, max_batch * pages, bs, enforce_eager=False, max_num_seqs=max_batch)
    graphs = runner.decode_graphs or DecodeGraphRunner(model, runner.kv_cache, runner.scratch_block, max_batch,
                                                       use_graphs=False)
    layout = _text_layout(args.context)
    sample = SampleSpec(SamplingParams(do_sample=False))  # greedy: sampling cost is the same in both modes
    rids = [f"seq{r}" for r in range(max_batch)]
    runner.execute(SchedulerOutput(new_requests=[NewRequestData(r, i, [], [], SamplingParams())
                                                 for i, r in enumerate(rids)]))

    def step(batch: int, at: int) -> float:
        chunks = [Chunk(rid, rid, layout.token_ids + [7] * (at + 1 - args.context), layout, at, at + 1,
                        list(range(r * pages, (r + 1) * pages)), sample=sample)
                  for r, rid in enumerate(rids[:batch])]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = runner.execute(SchedulerOutput(chunks=chunks))
        if cuda:
            torch.cuda.synchronize()
        if out.failed:
            raise RuntimeError(f"decode step failed: {out.failed}")
        return time.perf_counter() - t

    def timed(batch: int) -> float:
        times = [step(batch, args.context + s) for s in range(args.warmup + args.steps)]
        return statistics.median(times[args.warmup :])

    for batch in args.batch:
        runner.decode_graphs = None
        eager = timed(batch)
        runner.decode_graphs = graphs
        static = timed(batch)
        row = {"eager_ms": eager * 1e3, ("graph_ms" if cuda else "static_uncaptured_ms"): static * 1e3,
               "speedup": eager / static}
        if cuda:
            row["captured"] = [list(k) for k in graphs.captured]  # (batch bucket, page-table width) so far
            row["disabled_reason"] = graphs.disabled_reason
        result["batches"][str(batch)] = row
        print(f"batch {batch}: {json.dumps(row)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=SHAPES, default="small")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's; real: 2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--context", type=int, default=512, help="keys per sequence at the first measured step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--moe-impl", default="eager")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.shapes == "real" and args.layers is None:
        args.layers = 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench decode_graphs: CUDA graphs need a CUDA device and this torch has none (torch "
              f"{torch.__version__}); on CPU run with --device cpu (eager only: no graphs to compare)", file=sys.stderr)
        return 2
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
