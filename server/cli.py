"""The `diffgentor` command line.

Subcommands import their implementation lazily so that `diffgentor --help` stays fast and a
subcommand's heavy dependencies load only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from diffgentor.engine.testing.tiny_model import SIZE_FIELDS, SMALL_SIZES, make_tiny, size_overrides

    sizes = dict(SMALL_SIZES) if args.size == "small" else {}
    sizes.update({k: getattr(args, k) for k in SIZE_FIELDS if getattr(args, k) is not None})
    try:
        overrides = size_overrides(**sizes)
    except ValueError as e:
        print(f"make-tiny: {e}", file=sys.stderr)
        return 2
    make_tiny(args.out_dir, distil=args.distil, seed=args.seed, config_overrides=overrides)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
    print(f"wrote tiny {'Distil ' if args.distil else ''}checkpoint{f' ({shape})' if shape else ''} to {args.out_dir}")
    return 0


def _cmd_verify_golden(args: argparse.Namespace) -> int:
    from diffgentor.engine.allocator import configure_heap
    from diffgentor.engine.config import EngineConfig
    from diffgentor.engine.models.hunyuan_image_3.golden import GoldenParallelError, verify_golden_set

    configure_heap(EngineConfig.from_cli_and_env({}).cache.heap_reuse_bytes)  # computes the way an engine process does

    try:
        report = verify_golden_set(args.golden_dir, atol=args.atol, tensor_parallel_size=args.tensor_parallel_size,
                                   expert_parallel=args.expert_parallel, timeout_s=args.timeout)
    except GoldenParallelError as e:
        print(f"verify-golden: {e}", file=sys.stderr)
        return 1
    print(report.render())
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from diffgentor.server.demo import run_demo

    return run_demo(args.out)


def _cmd_edit(args: argparse.Namespace) -> int:
    from diffgentor.server.batch.job import run

    return run(args, "edit")


def _cmd_t2i(args: argparse.Namespace) -> int:
    from diffgentor.server.batch.job import run

    return run(args, "t2i")


def _cmd_serve(args: argparse.Namespace) -> int:
    from diffgentor.server.http.api import run_serve

    return run_serve(args)


def _add_serve(sub) -> None:
    from diffgentor.server.http.serve_args import add_serve_args

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible image API (FastAPI + engine-core process)")
    add_serve_args(sv)
    sv.set_defaults(func=_cmd_serve)


def _cmd_tp_worker(args: argparse.Namespace) -> int:
    from diffgentor.engine.tp.rank import run_external_rank

    return run_external_rank(args.connect, setup_timeout_s=args.setup_timeout)


PLAN_MEMORY_HELP = "per-rank GPU memory plan of a checkpoint (weights, activations, KV)"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line `argv`, commands whose flags import torch get their flags only when
    `argv` runs them (`diffgentor --help` lists every command without loading torch)."""
    command = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    p = argparse.ArgumentParser(prog="diffgentor", description="Serve and run HunyuanImage-3.0-Instruct.")
    sub = p.add_subparsers(dest="command", required=True)

    mt = sub.add_parser("make-tiny", help="write a deterministic tiny checkpoint in the official layout")
    mt.add_argument("out_dir")
    mt.add_argument("--distil", action="store_true", help="turn on the Distil switches (guidance, meanflow)")
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--size", choices=["tiny", "small"], default="tiny",
                    help="base shape: the embedded tiny model, or `small` (the `bench offline --preset small` model: "
                    "4 layers, hidden 256, 8/2 heads of 32, 16 experts top-4); the flags below override single sizes")
    for flag, field in (("layers", "num_hidden_layers"), ("hidden", "hidden_size"), ("heads", "num_attention_heads"),
                        ("kv-heads", "num_key_value_heads"), ("head-dim", "attention_head_dim"),
                        ("experts", "num_experts"), ("topk", "moe_topk (every layer)"),
                        ("expert-width", "moe_intermediate_size (every layer)"),
                        ("shared-experts", "num_shared_expert (every layer)"), ("intermediate", "intermediate_size")):
        mt.add_argument(f"--{flag}", type=int, default=None, help=f"config.json {field}")
    mt.set_defaults(func=_cmd_make_tiny)

    vg = sub.add_parser("verify-golden", help="recompute every tensor of a golden set and compare")
    vg.add_argument("golden_dir")
    vg.add_argument("--atol", type=float, default=1e-4)
    vg.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="verify with the model sharded over this many rank processes (gloo on CPU)")
    vg.add_argument("--expert-parallel", action="store_true", default=None,
                    help="shard the MoE by whole experts (default: $DG_HUNYUAN_IMAGE_3_EXPERT_PARALLEL)")
    vg.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds the tensor-parallel ranks get to finish before they are stopped")
    vg.set_defaults(func=_cmd_verify_golden)

    from diffgentor.server.batch.job import add_edit_args, add_t2i_args

    ed = sub.add_parser("edit", help="edit / fuse images for every row of a CSV or parquet input (batch job)")
    add_edit_args(ed)
    ed.set_defaults(func=_cmd_edit)
    t2i = sub.add_parser("t2i", help="text-to-image for a list of prompts (batch job)")
    add_t2i_args(t2i)
    t2i.set_defaults(func=_cmd_t2i)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from diffgentor.bench.offline import add_parser as add_offline

    add_offline(bench_sub)
    from diffgentor.bench.compare import add_parser as add_compare
    from diffgentor.bench.serve import add_parser as add_bench_serve

    add_bench_serve(bench_sub)
    add_compare(bench_sub)
    from diffgentor.bench.decode import add_parser as add_decode

    add_decode(bench_sub)

    _add_serve(sub)

    tw = sub.add_parser("tp-worker", help="one tensor-parallel rank started by torchrun (multi-node); connects to "
                        "a frontend started with --tensor-parallel-size N --rank-endpoint HOST:PORT")
    tw.add_argument("--connect", required=True, metavar="HEAD:PORT", help="the frontend's --rank-endpoint address")
    tw.add_argument("--setup-timeout", type=float, default=600.0,
                    help="seconds to wait for the frontend to send the engine config")
    tw.set_defaults(func=_cmd_tp_worker)

    dm = sub.add_parser("demo", help="build the tiny model and edit one image with it")
    dm.add_argument("--out", default="demo_out")
    dm.set_defaults(func=_cmd_demo)

    if argv is None or command == "plan-memory":
        from diffgentor.engine.memory_plan import add_parser as add_plan_memory
        from diffgentor.engine.memory_plan import run as run_plan_memory

        add_plan_memory(sub).set_defaults(func=run_plan_memory)
    else:
        sub.add_parser("plan-memory", help=PLAN_MEMORY_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
