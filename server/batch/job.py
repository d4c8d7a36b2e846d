"""``diffgentor edit`` and ``diffgentor t2i``: batch jobs over a CSV / parquet / prompt list, seed-compatible.

Flow of one run (both commands):
1. flags and ``DG_HUNYUAN_IMAGE_3_*`` variables -> `EngineConfig` (an invalid variable stops the run at once,
   naming the variable and the allowed values);
2. rows are read (`server/batch/data.py`), ``--filter_rows`` applied, and every row whose output image already
   exists is skipped (``--resume``, the default; ``--no_resume`` regenerates them);
3. the earlier results CSV, any part files of a killed multi-instance run, and images whose CSV row was lost
   (their PNG carries its own prompt and think/recaption text) are merged, so a resumed run keeps every row;
4. pending rows go through the engine ``--batch_size`` rows per ``Engine.generate`` call (`server/batch/rows.py`),
   in one process, in one child process per model instance (`server/launcher.py`), or on a Ray cluster
   (`server/batch/ray_executor.py`, ``--executor ray``); images are written atomically as
   ``{index:06d}.png`` and the results CSV is rewritten (atomically) after every batch;
5. a summary line; exit code 0 when every row succeeded, 1 when any failed, 2 for a fatal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from diffgentor.server import launcher as L
from diffgentor.server.batch import data as D
from diffgentor.server.batch.ray_executor import run_ray
from diffgentor.server.batch.rows import (
    FatalError,
    Outcome,
    Progress,
    Task,
    Worker,
    batches,
    engine_config,
    png_text,
    record,
    resolve_kernels,
    setup_logging,
)

logger = logging.getLogger("diffgentor.batch")

BACKENDS = ("hunyuan_image_3",)
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_RETRIES = 3
DEFAULT_SEED = 42
EXIT_OK, EXIT_ROWS_FAILED, EXIT_FATAL = 0, 1, 2


def _add_common_args(p: argparse.ArgumentParser) -> None:
    from diffgentor.engine.config import add_engine_args

    g = p.add_argument_group("model")
    g.add_argument("--backend", default="hunyuan_image_3",
                   help="inference backend; only hunyuan_image_3 is served by this engine (default)")
    g.add_argument("--model_name", "--model-name", dest="model_name", default=None,
                   help="checkpoint folder (HunyuanImage-3.0-Instruct or -Instruct-Distil; any folder name, "
                        "dots included) or Hugging Face model id such as tencent/HunyuanImage-3.0-Instruct-Distil, "
                        "downloaded into the cache once (--revision, --download-dir; HF_HUB_OFFLINE=1: cache only) "
                        "(required)")
    g.add_argument("--model_type", "--model-type", dest="model_type", default=None,
                   help="accepted for compatibility; must be hunyuan_image_3 when given (not needed)")
    g = p.add_argument_group("generation")
    g.add_argument("--num_inference_steps", "--num-inference-steps", dest="num_inference_steps", type=int,
                   default=None, help="diffusion steps (default: the checkpoint's, 8 for Distil, 50 for full)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed of every row (default {DEFAULT_SEED})")
    g.add_argument("--guidance_scale", "--guidance-scale", dest="guidance_scale", type=float, default=None,
                   help="CFG scale (default: the checkpoint's; ignored by CFG-distilled checkpoints)")
    g.add_argument("--image_size", "--image-size", dest="image_size", default="auto",
                   help="output size: auto (the model picks), HEIGHTxWIDTH (e.g. 768x1024 is landscape; OpenAI's "
                        "`size` is the other way round) or W:H (e.g. 16:9)")
    g = p.add_argument_group("output and run")
    g.add_argument("--output_dir", "--output-dir", dest="output_dir", default="./output",
                   help="folder for the {index:06d}.png images (default ./output)")
    g.add_argument("--output_csv", "--output-csv", dest="output_csv", default=None,
                   help="results CSV (default OUTPUT_DIR/results.csv)")
    g.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"rows per engine call, generated together (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--max_retries", "--max-retries", dest="max_retries", type=int, default=DEFAULT_MAX_RETRIES,
                   help=f"extra attempts for a row the engine failed (default {DEFAULT_MAX_RETRIES})")
    g.add_argument("--filter_rows", "--filter-rows", dest="filter_rows", default=None,
                   help="row positions to run (0-based, file order): 0:100, 100:, :10, 0,5,10 or a mix")
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip rows whose output image exists (default)")
    g.add_argument("--no_resume", "--no-resume", dest="resume", action="store_false",
                   help="regenerate every selected row, overwriting its image")
    g.add_argument("--log_dir", "--log-dir", dest="log_dir", default=None,
                   help="log folder (default OUTPUT_DIR/logs/YYYYMMDD_HHMMSS)")
    g.add_argument("--num_instances", "--num-instances", dest="num_instances", type=int, default=None,
                   help="model instances side by side: with GPUs at most VISIBLE // GPUS_PER_MODEL (the default); "
                        "without GPUs this many CPU instances (default 1)")
    g.add_argument("--download_timeout", "--download-timeout", dest="download_timeout", type=float,
                   default=D.DEFAULT_DOWNLOAD_TIMEOUT_S,
                   help=f"seconds before an image URL download fails (default {D.DEFAULT_DOWNLOAD_TIMEOUT_S:g})")
    g.add_argument("--no_progress", "--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: instances on this machine (default); ray: a pool of replicas on a Ray cluster "
                        "(pip install -e '.[ray]' in the checkout; see diffgentor.server.batch.ray_executor)")
    g.add_argument("--ray_address", "--ray-address", dest="ray_address", default=None,
                   help="Ray cluster to join with --executor ray (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--_worker_spec", dest="worker_spec", default=None, help=argparse.SUPPRESS)
    add_engine_args(p)


def add_edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", default=None,
                   help="CSV file, parquet file or folder of parquet files (required)")
    g.add_argument("--instruction_key", "--instruction-key", dest="instruction_key", default="instruction",
                   help="column holding the edit instruction (default instruction)")
    g.add_argument("--image_cache_dir", "--image-cache-dir", dest="image_cache_dir", default=None,
                   help="folder for downloaded image URLs (default OUTPUT_DIR/.image_cache)")
    _add_common_args(p)


def add_t2i_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    g.add_argument("--prompts_file", "--prompts-file", dest="prompts_file", default=None,
                   help="prompts: .jsonl / .json (strings or {prompt, index}), .csv (prompt column) or .txt")
    g.add_argument("--num_images_per_prompt", "--num-images-per-prompt", dest="num_images_per_prompt", type=int,
                   default=1, help="images per prompt, seeds SEED, SEED+1, ... (default 1)")
    g.add_argument("--height", type=int, default=None, help="output height (with --width; overrides --image_size)")
    g.add_argument("--width", type=int, default=None, help="output width (with --height)")
    _add_common_args(p)


# ---------------------------------------------------------------------------------------------------- tasks
def _out_name(index: int, sub: int, multi: bool) -> str:
    return f"{index:06d}_{sub:02d}.png" if multi else f"{index:06d}.png"


def _validate(args: argparse.Namespace, command: str) -> None:
    if args.backend not in BACKENDS:
        raise FatalError(f"--backend {args.backend!r} is not served by this engine; the only backend is "
                         f"{', '.join(BACKENDS)}")
    if args.model_type is not None and args.model_type not in BACKENDS:
        raise FatalError(f"--model_type {args.model_type!r} is not supported; use hunyuan_image_3")
    if not args.model_name:
        raise FatalError("--model_name (the checkpoint folder) is required")
    from diffgentor.engine.model_source import is_repo_id

    if not Path(args.model_name).is_dir() and not is_repo_id(args.model_name):
        raise FatalError(f"--model_name {args.model_name}: no such checkpoint folder (nor a Hugging Face model id)")
    if command == "edit" and not args.input:
        raise FatalError("--input (a CSV file, parquet file or folder) is required")
    if command == "t2i" and not args.prompt and not args.prompts_file:
        raise FatalError("give --prompt or --prompts_file")
    for name, minimum in (("batch_size", 1), ("max_retries", 0), ("num_inference_steps", 1), ("seed", 0)):
        v = getattr(args, name)
        if v is not None and v < minimum:
            raise FatalError(f"--{name} must be >= {minimum}, got {v}")
    if command == "t2i":
        if args.num_images_per_prompt < 1:
            raise FatalError(f"--num_images_per_prompt must be >= 1, got {args.num_images_per_prompt}")
        if (args.height is None) != (args.width is None):
            raise FatalError("--height and --width go together")
        if args.height is not None:
            if args.height <= 0 or args.width <= 0:
                raise FatalError("--height and --width must be positive")
            args.image_size = f"{args.height}x{args.width}"


def load_rows(args: argparse.Namespace, command: str) -> tuple[list[D.EditRow], list[str], Path]:
    """(selected rows, input columns, the folder relative image paths resolve against)."""
    if command == "edit":
        rows, columns = D.load_edit_rows(args.input, args.instruction_key)
        base = Path(args.input) if Path(args.input).is_dir() else Path(args.input).parent
    else:
        rows, columns = D.load_prompts(args.prompt, args.prompts_file)
        base = Path(args.prompts_file).parent if args.prompts_file else Path.cwd()
    picked = D.parse_filter_rows(args.filter_rows, len(rows))
    return [rows[i] for i in picked], columns, base


def make_tasks(args: argparse.Namespace, rows: Sequence[D.EditRow], command: str) -> list[Task]:
    n = getattr(args, "num_images_per_prompt", 1) if command == "t2i" else 1
    out = Path(args.output_dir)
    return [Task(r, s, out / _out_name(r.index, s, n > 1), args.seed + s) for r in rows for s in range(n)]


# ---------------------------------------------------------------------------------------------------- resume
def is_done_png(path: Path) -> bool:
    """Whether ``path`` is a finished output: a PNG that decodes (a 0-byte or truncated file is redone)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.verify()  # every chunk's checksum, through IEND: a cut file fails here
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - unreadable in any way: not done
        return False


def check_output_paths(output_dir: Path, output_csv: Path, log_dir: Path) -> None:
    """Create the output, log and results-CSV folders and prove each writable before anything is generated;
    FatalError (exit 2) naming the folder otherwise (a read-only or immutable folder, a file in the way)."""
    for folder in dict.fromkeys((output_dir, output_csv.parent, log_dir)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            D.atomic_write_bytes(folder / ".diffgentor-write-check", b"")
            (folder / ".diffgentor-write-check").unlink()
        except OSError as e:
            raise FatalError(f"cannot write to {folder}: {e.strerror or e}") from None
    if output_csv.is_dir():
        raise FatalError(f"--output_csv {output_csv} is a folder")


def _worker_main(spec_path: str) -> int:
    """A child instance: run the tasks named in the spec file, writing a part CSV and a progress file."""
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    setup_logging(None, console_level=logging.INFO)
    try:
        config = resolve_kernels(engine_config(args))
        rows, columns, base = load_rows(args, args.command)
        wanted = {tuple(k) for k in spec["tasks"]}
        tasks = [t for t in make_tasks(args, rows, args.command) if t.key in wanted]
        worker = Worker(args, config, base, Path(spec["cache_dir"]))
    except Exception:
        logger.exception("instance %d could not start", spec["rank"])
        return EXIT_FATAL
    part: dict[tuple[int, int], dict[str, str]] = {}
    n_ok = n_fail = 0
    try:
        for batch in batches(tasks, args.batch_size):
            try:
                outcomes = worker.run_batch(batch)
            except FatalError as e:
                logger.error("instance %d: %s", spec["rank"], e)
                return EXIT_FATAL
            for o in outcomes:
                part[o.key] = o.record
                n_ok += o.ok
                n_fail += not o.ok
            D.write_results_csv(Path(spec["part_csv"]), part, columns, spec["with_image_num"])
            D.atomic_write_bytes(Path(spec["progress"]), json.dumps({"done": n_ok + n_fail, "generated": n_ok,
                                                                     "failed": n_fail}).encode())
            logger.info("instance %d: %d/%d rows done, %d failed", spec["rank"], n_ok + n_fail, len(tasks), n_fail)
    finally:
        worker.close()
    return EXIT_ROWS_FAILED if n_fail else EXIT_OK


# ---------------------------------------------------------------------------------------------------- driver
def _parts_dir(output_dir: Path) -> Path:
    return output_dir / ".instances"


def _merge_leftover_parts(results: dict, output_dir: Path) -> None:
    """Part CSVs of a multi-instance run that was killed before merging: fold them in, then delete them."""
    pdir = _parts_dir(output_dir)
    if not pdir.is_dir():
        return
    for f in sorted(pdir.glob("part*.csv")):
        results.update(D.read_results_csv(f))
    _remove_parts(pdir)


def _remove_parts(pdir: Path) -> None:
    for f in pdir.iterdir():
        if f.is_file():
            f.unlink()
    try:
        pdir.rmdir()
    except OSError:
        pass


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of ``diffgentor edit`` / ``diffgentor t2i``; returns the exit code."""
    args.command = command
    if args.worker_spec:
        return _worker_main(args.worker_spec)
    try:
        return _run(args, command)
    except (FatalError, D.InputError, ValueError) as e:  # EnvVarError is a ValueError
        print(f"diffgentor {command}: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except OSError as e:  # the output folder or results CSV became unwritable during the run
        where = f" ({e.filename})" if e.filename else ""
        print(f"diffgentor {command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_FATAL


def _run(args: argparse.Namespace, command: str) -> int:
    t_start = time.perf_counter()
    _validate(args, command)
    config = engine_config(args)  # every env var checked before any work
    try:  # a Hugging Face model id becomes its folder in the cache (downloaded once); instances get that folder
        config = config.with_local_checkpoint()
    except FileNotFoundError as e:
        raise FatalError(str(e)) from None
    args.model_name = config.model.checkpoint
    output_dir = Path(args.output_dir)
    output_csv = Path(args.output_csv) if args.output_csv else output_dir / "results.csv"
    log_dir = Path(args.log_dir) if args.log_dir else output_dir / "logs" / time.strftime("%Y%m%d_%H%M%S")
    cache_dir = Path(args.image_cache_dir) if getattr(args, "image_cache_dir", None) else output_dir / ".image_cache"
    check_output_paths(output_dir, output_csv, log_dir)
    setup_logging(log_dir / "main.log")
    logger.info("diffgentor %s: %s", command, json.dumps({k: v for k, v in vars(args).items() if k != "func"},
                                                         default=str))
    logger.info("engine config: %s", json.dumps(config.describe(), default=str))

    rows, columns, base = load_rows(args, command)
    tasks = make_tasks(args, rows, command)
    with_image_num = command == "t2i" and args.num_images_per_prompt > 1
    D.remove_stale_temp_files(output_dir)

    # earlier results: the CSV, parts of a killed multi-instance run, and images whose CSV row was lost
    results = D.read_results_csv(output_csv)
    _merge_leftover_parts(results, output_dir)
    done = [t for t in tasks if is_done_png(t.out_path)] if args.resume else []
    done_keys = {t.key for t in done}
    pending = [t for t in tasks if t.key not in done_keys]
    for t in done:
        prev = results.get(t.key)
        if prev is None or prev.get("error") or not prev.get("output_image"):
            meta = png_text(t.out_path)
            results[t.key] = record(t, str(t.out_path), meta.get("instruction_enhanced", ""))
    D.write_results_csv(output_csv, results, columns, with_image_num)
    msg = (f"{len(tasks)} row(s) selected: {len(done)} already done (skipped), {len(pending)} to generate"
           if args.resume else f"{len(tasks)} row(s) selected, regenerating all (--no_resume)")
    print(msg, file=sys.stderr)
    logger.info(msg)

    failed_instances: list[str] = []
    progress = Progress(len(pending), args.progress)
    n_ok = n_fail = 0
    try:
        if pending and args.executor == "ray":
            def absorb(outcomes: list[Outcome]) -> None:
                nonlocal n_ok, n_fail
                for o in outcomes:
                    results[o.key] = o.record
                    n_ok += o.ok
                    n_fail += not o.ok
                D.write_results_csv(output_csv, results, columns, with_image_num)
                progress.set(n_ok + n_fail, n_ok, n_fail)

            run_ray(args, pending, base, cache_dir, log_dir, absorb, progress)
        elif pending:
            gpus = L.visible_gpus()
            # external (torchrun, multi-node) ranks: one instance here, its ranks bring their own GPUs
            slices = [[]] if config.parallel.rank_endpoint else L.plan_instances(config.ranks_per_instance, gpus,
                                                                                 args.num_instances)
            slices = slices[:max(1, min(len(slices), len(pending)))]
            if len(slices) == 1:
                if slices[0]:
                    logger.info("one instance on GPU %s", ",".join(slices[0]))
                config = resolve_kernels(config)
                worker = Worker(args, config, base, cache_dir)
                try:
                    for batch in batches(pending, args.batch_size):
                        for o in worker.run_batch(batch):
                            results[o.key] = o.record
                            n_ok += o.ok
                            n_fail += not o.ok
                        D.write_results_csv(output_csv, results, columns, with_image_num)
                        progress.set(n_ok + n_fail, n_ok, n_fail)
                finally:
                    worker.close()
            else:
                n_ok, n_fail = _run_multi(args, command, pending, slices, results, output_dir, cache_dir, log_dir,
                                          columns, with_image_num, output_csv, progress, failed_instances)
    finally:
        progress.close()
    D.write_results_csv(output_csv, results, columns, with_image_num)

    elapsed = time.perf_counter() - t_start
    selected_failed = sum(1 for t in tasks if results.get(t.key, {}).get("error"))
    rate = 60.0 * n_ok / elapsed if elapsed > 0 else 0.0
    summary = (f"diffgentor {command}: {n_ok} generated, {len(done)} skipped (already done), {n_fail} failed "
               f"of {len(tasks)} row(s) in {elapsed:.1f} s ({rate:.1f} img/min); images in {output_dir}, "
               f"results in {output_csv}, logs in {log_dir}")
    print(summary, file=sys.stderr)
    logger.info(summary)
    for name in failed_instances:
        print(f"diffgentor {command}: {name}", file=sys.stderr)
    if selected_failed:
        print(f"diffgentor {command}: {selected_failed} row(s) have an error; see the error column of {output_csv}",
              file=sys.stderr)
    if failed_instances:
        return EXIT_ROWS_FAILED
    return EXIT_ROWS_FAILED if (n_fail or selected_failed) else EXIT_OK


def _run_multi(args, command, pending, slices, results, output_dir, cache_dir, log_dir, columns, with_image_num,
               output_csv, progress, failed_instances) -> tuple[int, int]:
    """One child process per instance, contiguous shares of the pending rows; merge their parts at the end."""
    pdir = _parts_dir(output_dir)
    pdir.mkdir(parents=True, exist_ok=True)
    shares = L.split_contiguous(pending, len(slices))
    base_args = {k: v for k, v in vars(args).items() if k not in ("func", "worker_spec")}
    instances: list[L.Instance] = []
    for i, (devs, share) in enumerate(zip(slices, shares)):
        spec = {"args": base_args, "tasks": [list(t.key) for t in share], "rank": i, "cache_dir": str(cache_dir),
                "part_csv": str(pdir / f"part{i}.csv"), "progress": str(pdir / f"progress{i}.json"),
                "with_image_num": with_image_num}
        spec_path = pdir / f"spec{i}.json"
        D.atomic_write_bytes(spec_path, json.dumps(spec, default=str).encode())
        cmd = [sys.executable, "-m", "diffgentor.server.cli", command, "--_worker_spec", str(spec_path)]
        inst = L.Instance(i, list(devs), cmd, L.instance_env(os.environ, devs, len(slices)),
                          log_dir / f"instance{i}.log")
        inst.extra["share"] = share
        instances.append(inst)
    progress.write(f"{len(instances)} instances: " + "; ".join(
        f"{k.rank} on {k.where} ({len(k.extra['share'])} rows, log {k.log_path})" for k in instances))

    def poll() -> None:
        tot = [0, 0, 0]
        for inst in instances:
            try:
                p = json.loads(Path(pdir / f"progress{inst.rank}.json").read_text())
            except (OSError, ValueError):
                continue
            tot[0] += p["done"]
            tot[1] += p["generated"]
            tot[2] += p["failed"]
        progress.set(*tot)

    L.run_instances(instances, poll)
    n_ok = n_fail = 0
    for inst in instances:
        part = D.read_results_csv(pdir / f"part{inst.rank}.csv")
        for t in inst.extra["share"]:
            rec = part.get(t.key)
            if rec is None:
                rec = record(t, error=f"instance {inst.rank} ({inst.where}) exited with code {inst.returncode} "
                                       "before this row finished")
            results[t.key] = rec
            if rec.get("error"):
                n_fail += 1
            else:
                n_ok += 1
        if inst.returncode not in (EXIT_OK, EXIT_ROWS_FAILED):
            tail = L.log_tail(inst.log_path)
            failed_instances.append(f"instance {inst.rank} on {inst.where} failed with exit code {inst.returncode}; "
                                    f"log {inst.log_path}:\n{tail}")
    D.write_results_csv(output_csv, results, columns, with_image_num)
    _remove_parts(pdir)
    return n_ok, n_fail
