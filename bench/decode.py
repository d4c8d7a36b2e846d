"""Think-phase decode step time vs batch size and context, with the bytes a step must move: `diffgentor bench decode`.

    diffgentor bench decode --shapes small --batch 1 16 64 --context 512 --save-result decode.json      # CPU
    diffgentor bench decode --shapes real --layers 4 --device cuda --batch 1 16 64 --modes eager graphs
    diffgentor bench decode --shapes small --base 6df4fe5 --repeat 2 --save-result ab.json   # before vs after

Each measured step is a whole worker step (`ModelRunner.execute`: forward, logits, forcing-free sampling with the
checkpoints' default temperature / top-k / top-p, seeded per sequence) of `batch` think tokens, one per sequence,
at `context` keys each, advancing one token per step, on a random-weight model of a preset's shape or of a
checkpoint's config (`--model`: its config only, no weights read). Modes: `eager` (the flat forward) and `graphs`
(the decode-only path of `engine.cuda_graph`: captured CUDA graphs on CUDA; on CPU the same static forward,
uncaptured).

Bytes per step (`step_bytes`) are the least a step must read, from the model's shapes: the text layers' dense
weights and the lm_head once, the routed experts a batch of `batch` tokens touches (expected distinct experts of
uniform top-k routing), and every sequence's K/V (`context` slots of the paged cache, all its layers). Achieved
bandwidth = bytes / step time, as a fraction of a measured device copy bandwidth (read + write of a large tensor).

`--base REV` runs the same measurement in a subprocess whose `diffgentor` is that commit's tree (this file is run as
a script there, using only APIs the base has), alternating base and head per repeat, and reports both sides and the
per-token cost at each batch size relative to batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = ("tiny", "small", "real")
MODES = ("eager", "graphs")
RESULT_TAG = "DECODE-RESULT "


def copy_bandwidth(device: str, mib: int = 256, repeat: int = 5) -> float:
    """Bytes/s of the best of `repeat` copies of a `mib` MiB tensor (each copy reads and writes it)."""
    import torch

    src = torch.empty(mib << 18, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        if src.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best


def step_bytes(model: Any, kv_bytes_per_token: int, batch: int, context: int) -> dict[str, float]:
    """The least bytes one decode step of `batch` sequences at `context` keys reads (module docstring)."""
    cfg = model.config
    experts = int(cfg.num_experts)
    dense = expert = 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if name.startswith("model.layers."):
            if ".mlp.experts." in name:
                expert += nbytes
            else:
                dense += nbytes
        elif name.startswith(("lm_head.", "model.ln_f.")):
            dense += nbytes
    topk = cfg.moe_topk
    topk = sum(topk) / len(topk) if isinstance(topk, (list, tuple)) else float(topk)
    touched = experts * (1 - (1 - topk / experts) ** batch)  # expected distinct experts for `batch` tokens
    experts_read = expert * touched / experts
    kv = kv_bytes_per_token * batch * context
    return dict(dense=float(dense), experts=experts_read, kv=float(kv), total=dense + experts_read + kv,
                experts_touched=touched)


def _overrides(shapes: str, layers: int | None) -> dict[str, Any]:
    from diffgentor.bench.engine_run import REAL_SHAPES
    from diffgentor.engine.testing.tiny_model import SMALL_SIZES, size_overrides

    out = {"tiny": {}, "small": size_overrides(**SMALL_SIZES), "real": dict(REAL_SHAPES)}[shapes]
    if layers is not None:
        out["num_hidden_layers"] = layers
    return out


def _text_layout(n: int):
    """A plain text prompt of n tokens (no image slots): every position is a decode-eligible text token."""
    import torch

    from diffgentor.engine.models.hunyuan_image_3.prompt import BuiltPrompt

    idx = torch.arange(n)
    return BuiltPrompt(token_ids=[5 + i % 200 for i in range(n)], positions=torch.stack([idx, idx], 1),
                       image_slots=[], cond_timestep_indexes=[], gen_timestep_index=None, guidance_index=None,
                       timestep_r_index=None, full_attn_spans=[], text_slices=[(0, n)], rope_image_info=[])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Step times per (context, batch, mode) on one random-weight model."""
    import json as _json

    import torch

    from diffgentor.bench.engine_run import build_random_model
    from diffgentor.engine.cuda_graph import DecodeGraphRunner
    from diffgentor.engine.model_runner import ModelRunner
    from diffgentor.engine.models.hunyuan_image_3.sampling import SamplingParams
    from diffgentor.engine.scheduler_output import Chunk, NewRequestData, SampleSpec, SchedulerOutput
    from diffgentor.engine.testing.tiny_model import write_tiny_metadata

    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    bs = 16
    max_batch = max(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            ckpt = Path(tmp) / "ckpt"
            cfg = _json.loads((Path(args.model) / "config.json").read_text())
            ckpt = write_tiny_metadata(ckpt, config_overrides=dict(cfg, **(
                {"num_hidden_layers": args.layers} if args.layers else {})))
        else:
            ckpt = write_tiny_metadata(Path(tmp) / "ckpt", config_overrides=_overrides(args.shapes, args.layers))
        model = build_random_model(ckpt, args.device, dtype, None, 0, args.attn_impl, args.moe_impl)
    total = max(args.context) + args.warmup + args.steps + 1
    pages = -(-total // bs)
    runner = ModelRunner(model, max_batch * pages, bs, enforce_eager=False, max_num_seqs=max_batch)
    cache = runner.kv_cache
    kv_per_token = sum(t.numel() * t.element_size() for t in cache.kv) // (cache.num_blocks * cache.block_size)
    graphs = runner.decode_graphs or DecodeGraphRunner(model, cache, runner.scratch_block, max_batch,
                                                       use_graphs=False)
    sample = SampleSpec(SamplingParams(temperature=0.6, top_k=1024, top_p=0.95))
    rids = [f"seq{r}" for r in range(max_batch)]
    runner.execute(SchedulerOutput(new_requests=[NewRequestData(r, i, [], [], SamplingParams())
                                                 for i, r in enumerate(rids)]))
    result: dict[str, Any] = dict(device=args.device, shapes=args.model or args.shapes,
                                  layers=model.config.num_hidden_layers, steps=args.steps, rows=[],
                                  graph_attention=getattr(graphs, "attn", None) and graphs.attn.name)
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    result["copy_bandwidth_Bps"] = copy_bandwidth(args.device)

    def step(layout, context: int, batch: int, at: int) -> float:
        chunks = [Chunk(rid, rid, layout.token_ids + [7] * (at + 1 - context), layout, at, at + 1,
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

    for context in args.context:
        layout = _text_layout(context)
        for batch in args.batch:
            for mode in args.modes:
                runner.decode_graphs = graphs if mode == "graphs" else None
                times = [step(layout, context, batch, context + s) for s in range(args.warmup + args.steps)]
                sec = statistics.median(times[args.warmup:])
                need = step_bytes(model, kv_per_token, batch, context)
                row = dict(context=context, batch=batch, mode=mode, step_ms=sec * 1e3,
                           per_token_ms=sec * 1e3 / batch, bytes=need,
                           achieved_Bps=need["total"] / sec,
                           fraction_of_copy_bandwidth=need["total"] / sec / result["copy_bandwidth_Bps"])
                result["rows"].append(row)
                print(f"context {context} batch {batch} {mode}: {row['step_ms']:.2f} ms/step, "
                      f"{row['per_token_ms']:.3f} ms/token, {need['total'] / 2**20:.1f} MiB, "
                      f"{row['fraction_of_copy_bandwidth']:.1%} of copy bandwidth", file=sys.stderr, flush=True)
    return result


def relative_per_token(rows: list[dict]) -> dict[str, float]:
    """Per-token step cost at each (context, mode, batch) relative to batch 1 of the same context and mode."""
    one = {(r["context"], r["mode"]): r["per_token_ms"] for r in rows if r["batch"] == 1}
    return {f"ctx{r['context']}/{r['mode']}/B{r['batch']}": r["per_token_ms"] / one[(r["context"], r["mode"])]
            for r in rows if (r["context"], r["mode"]) in one}


def _side_args(args: argparse.Namespace) -> list[str]:
    out = ["--measure", "--shapes", args.shapes, "--device", args.device, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--moe-impl", args.moe_impl, "--attn-impl", args.attn_impl,
           "--batch", *map(str, args.batch), "--context", *map(str, args.context), "--modes", *args.modes]
    if args.layers is not None:
        out += ["--layers", str(args.layers)]
    if args.model:
        out += ["--model", str(Path(args.model).resolve())]
    return out


def _run_side(pkg_root: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pkg_root))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *_side_args(args)], env=env,
                          capture_output=True, text=True, cwd=pkg_root)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            if Path(res["package"]).resolve() != (pkg_root / "diffgentor").resolve():
                raise RuntimeError(f"the side imported {res['package']}, not {pkg_root / 'diffgentor'}")
            return res
    raise RuntimeError(f"side failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def _ab(args: argparse.Namespace) -> dict:
    from diffgentor.bench.ab_commits import _git, side_roots

    base, head = _git("rev-parse", args.base), _git("rev-parse", "HEAD")
    out: dict = dict(base=base, head=head, head_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
                     loadavg_before=os.getloadavg(), runs={"base": [], "head": []})
    with side_roots(base) as roots:
        for i in range(args.repeat):
            for side in ("base", "head"):
                out["runs"][side].append(_run_side(roots[side], args))
                print(f"run {i} {side} done", file=sys.stderr, flush=True)
    out["loadavg_after"] = os.getloadavg()
    summary = {}
    for side, runs in out["runs"].items():
        keyed: dict[tuple, list[dict]] = {}
        for r in runs:
            for row in r["rows"]:
                keyed.setdefault((row["context"], row["batch"], row["mode"]), []).append(row)
        rows = [dict(context=c, batch=b, mode=m, step_ms=statistics.fmean(x["step_ms"] for x in rs),
                     per_token_ms=statistics.fmean(x["per_token_ms"] for x in rs))
                for (c, b, m), rs in keyed.items()]
        summary[side] = dict(rows=rows, per_token_vs_batch1=relative_per_token(rows))
    summary["head_over_base_step_ms"] = {
        f"ctx{h['context']}/{h['mode']}/B{h['batch']}": h["step_ms"] / b["step_ms"]
        for h in summary["head"]["rows"] for b in summary["base"]["rows"]
        if (h["context"], h["batch"], h["mode"]) == (b["context"], b["batch"], b["mode"])}
    out["summary"] = summary
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", choices=SHAPES, default="small", help="the model's shape preset (random weights)")
    p.add_argument("--model", default=None, help="a checkpoint folder: its config.json's shapes (no weights read)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's; real: 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, nargs="+", default=[512], help="keys per sequence at the first step")
    p.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--moe-impl", default="eager")
    p.add_argument("--attn-impl", default="sdpa")
    p.add_argument("--base", default=None, help="also measure this git revision, alternating with the head")
    p.add_argument("--repeat", type=int, default=1, help="runs per side with --base")
    p.add_argument("--save-result", default=None, help="write the JSON result here")


def _cuda_missing(device: str) -> bool:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench decode: --device {device} needs a CUDA device and this torch has none (torch "
              f"{torch.__version__}); on CPU run with --device cpu (graphs mode = the static forward, uncaptured)",
              file=sys.stderr)
        return True
    return False


def run(args: argparse.Namespace) -> int:
    if _cuda_missing(args.device):
        return 2
    if args.shapes == "real" and args.layers is None and not args.model:
        args.layers = 2
    if args.base:
        result = _ab(args)
    else:
        result = measure(args)
        result["per_token_vs_batch1"] = relative_per_token(result["rows"])
    text = json.dumps(result, indent=1)
    if args.save_result:
        Path(args.save_result).write_text(text + "\n")
    print(text)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="think-phase decode step time vs batch size and context, with bytes moved")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffgentor bench decode", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one side of --base (a subprocess)
    args = ap.parse_args(argv)
    if args.measure:
        import diffgentor

        if args.shapes == "real" and args.layers is None and not args.model:
            args.layers = 2
        res = measure(args)
        res["package"] = str(Path(diffgentor.__file__).parent)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
