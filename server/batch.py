"""``diffgentor edit`` and ``diffgentor t2i``: batch jobs over a CSV / parquet / prompt list, seed-compatible.

Flow of one run (both commands):
1. flags and ``DG_HUNYUAN_IMAGE_3_*`` variables -> `EngineConfig` (an invalid variable stops the run at once,
   naming the variable and the allowed values);
2. rows are read (`diffgentor.server.data`), ``--filter_rows`` applied, and every row whose output image already
   exists is skipped (``--resume``, the default; ``--no_resume`` regenerates them);
3. the earlier results CSV, any part files of a killed multi-instance run, and images whose CSV row was lost
   (their PNG carries its own prompt and think/recaption text) are merged, so a resumed run keeps every row;
4. pending rows go through the engine ``--batch_size`` rows per ``Engine.generate`` call, in one process or in
   one child process per model instance (`diffgentor.server.launcher`); images are written atomically as
   ``{index:06d}.png`` and the results CSV is rewritten (atomically) after every batch;
5. a summary line; exit code 0 when every row succeeded, 1 when any failed, 2 for a fatal error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffgentor.server import data as D
from diffgentor.server import launcher as L

logger = logging.getLogger("diffgentor.batch")

BACKENDS = ("hunyuan_image_3",)
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_RETRIES = 3
DEFAULT_SEED = 42
PNG_KEY_PREFIX = "diffgentor:"
EXIT_OK, EXIT_ROWS_FAILED, EXIT_FATAL = 0, 1, 2


class FatalError(RuntimeError):
    """The run cannot start or continue (bad flags, input, model); exit code 2."""


# ---------------------------------------------------------------------------------------------------- flags
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
                        "(pip install -e '.[ray]' in the checkout; see diffgentor.server.batch_ray)")
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
@dataclass
class Task:
    row: D.EditRow
    sub: int
    out_path: Path
    seed: int

    @property
    def key(self) -> tuple[int, int]:
        return self.row.index, self.sub


@dataclass
class Outcome:
    key: tuple[int, int]
    ok: bool
    record: dict[str, str]


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


def engine_config(args: argparse.Namespace, environ=None):
    """The EngineConfig of this run (validates every DG_HUNYUAN_IMAGE_3_* variable)."""
    from diffgentor.engine.config import EngineConfig

    given = {k: v for k, v in vars(args).items() if k not in ("seed",)}
    given["model"] = args.model_name
    return EngineConfig.from_cli_and_env(given, environ)


def resolve_kernels(config):
    """FlashInfer needs CUDA and flashinfer-python: without them fall back (with a warning) to eager / sdpa."""
    changes = {}
    for name, fallback in (("moe_impl", "eager"), ("attn_impl", "sdpa")):
        if getattr(config, name) != "flashinfer":
            continue
        reason = None
        if not config.on_cuda():
            reason = "there is no CUDA device"
        elif importlib.util.find_spec("flashinfer") is None:
            reason = "flashinfer-python is not installed (pip install -e '.[gpu]', see docs/flashinfer.md)"
        if reason:
            var = "DG_HUNYUAN_IMAGE_3_" + name.upper()
            logger.warning("%s=flashinfer (or --%s flashinfer) but %s; using %s", var, name.replace("_", "-"),
                           reason, fallback)
            changes[name] = fallback
    return dataclasses.replace(config, **changes) if changes else config


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


# ---------------------------------------------------------------------------------------------------- records
def _record(task: Task, output_image: str = "", text: str = "", error: str = "") -> dict[str, str]:
    rec = dict(task.row.columns)
    rec.update(output_image=output_image, instruction_enhanced=text, error=error)
    return rec


def save_png(path: Path, image, task: Task, text: str) -> None:
    """Write the image atomically; PNG text chunks carry prompt, think/recaption text and seed so a resumed run
    can rebuild a lost CSV row from the image alone."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(PNG_KEY_PREFIX + "index", str(task.row.index))
    info.add_itxt(PNG_KEY_PREFIX + "prompt", task.row.prompt)
    info.add_itxt(PNG_KEY_PREFIX + "instruction_enhanced", text)
    info.add_itxt(PNG_KEY_PREFIX + "seed", str(task.seed))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    D.atomic_write_bytes(path, buf.getvalue())


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


def _png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return {k[len(PNG_KEY_PREFIX):]: v for k, v in (getattr(im, "text", {}) or {}).items()
                    if k.startswith(PNG_KEY_PREFIX)}
    except Exception:
        return {}


# ---------------------------------------------------------------------------------------------------- worker
class Worker:
    """Runs tasks through one engine, batch by batch; reports each finished batch to ``on_batch``."""

    def __init__(self, args: argparse.Namespace, config, base_dir: Path, cache_dir: Path) -> None:
        self.args = args
        self.config = config
        self.base_dir = base_dir
        self.cache_dir = cache_dir
        self._engine = None

    @property
    def engine(self):
        """Loaded on first use: a run whose pending rows are all bad never loads the model."""
        if self._engine is None:
            from diffgentor.engine.offline import Engine

            t0 = time.perf_counter()
            try:
                self._engine = Engine.from_config(self.config)
            except Exception as e:
                logger.exception("could not load %s", self.config.model)
                raise FatalError(f"could not load the model {self.config.model}: {type(e).__name__}: {e}") from e
            logger.info("loaded %s in %.1f s", self.config.model, time.perf_counter() - t0)
        return self._engine

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks, if any (an in-process run must not leave them behind)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _request(self, task: Task, images: list[bytes]) -> dict[str, Any]:
        a = self.args
        req: dict[str, Any] = {"prompt": task.row.prompt, "images": images, "seed": task.seed,
                               "image_size": a.image_size or "auto"}
        if a.num_inference_steps is not None:
            req["num_inference_steps"] = a.num_inference_steps
        if a.guidance_scale is not None:
            req["guidance_scale"] = a.guidance_scale
        return req

    def run_batch(self, batch: Sequence[Task]) -> list[Outcome]:
        outcomes: dict[tuple[int, int], Outcome] = {}
        ready: list[tuple[Task, list[bytes]]] = []
        for t in batch:
            try:
                if t.row.error:
                    raise D.RowError(t.row.error)
                if not t.row.prompt:
                    raise D.RowError("empty instruction" if self.args.command == "edit" else "empty prompt")
                images = D.resolve_images(t.row.images, self.base_dir, self.cache_dir, self.args.download_timeout)
            except D.RowError as e:
                outcomes[t.key] = Outcome(t.key, False, _record(t, error=str(e)))
                logger.warning("row %d: %s", t.row.index, e)
                continue
            ready.append((t, images))
        attempt = 0
        engine = self.engine if ready else None  # a load failure is fatal, not a row error
        while ready:
            try:
                results = engine.generate([self._request(t, imgs) for t, imgs in ready])
            except Exception as e:  # the engine itself failed: every row of this attempt failed
                logger.exception("engine call failed (attempt %d)", attempt + 1)
                results = [None] * len(ready)
                errors = [f"engine failure: {type(e).__name__}: {e}"] * len(ready)
            else:
                errors = [None] * len(ready)
            retry: list[tuple[Task, list[bytes]]] = []
            for (t, imgs), res, err in zip(ready, results, errors):
                text = (res.text or "").strip() if res is not None else ""
                if res is not None and res.error is None and res.image is not None:
                    try:
                        save_png(t.out_path, res.image, t, text)
                    except OSError as e:  # this row's image could not be written: its error, the others go on
                        err = f"could not write {t.out_path}: {e.strerror or e}"
                        outcomes[t.key] = Outcome(t.key, False, _record(t, text=text, error=err))
                        logger.warning("row %d: %s", t.row.index, err)
                        continue
                    outcomes[t.key] = Outcome(t.key, True, _record(t, str(t.out_path), text))
                    continue
                if res is not None:
                    reason = getattr(res.finish_reason, "value", res.finish_reason)
                    err = res.error or f"no image (finish_reason={reason})"
                if res is not None and res.error is None:  # a text-only answer (bot_task auto): not retried
                    outcomes[t.key] = Outcome(t.key, False, _record(t, text=text, error=err))
                elif attempt < self.args.max_retries:
                    retry.append((t, imgs))
                    logger.warning("row %d: %s; retrying (%d/%d)", t.row.index, err, attempt + 1,
                                   self.args.max_retries)
                else:
                    outcomes[t.key] = Outcome(t.key, False, _record(t, text=text, error=err))
                    logger.warning("row %d failed: %s", t.row.index, err)
            ready = retry
            attempt += 1
        return [outcomes[t.key] for t in batch]


def _batches(tasks: Sequence[Task], size: int):
    for i in range(0, len(tasks), size):
        yield tasks[i:i + size]


class Progress:
    """A tqdm bar: rows done, images/min, failures, ETA (or nothing with --no_progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.t0 = time.perf_counter()
        self.done = self.generated = self.failed = 0
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr, desc="rows")

    def images_per_min(self) -> float:
        dt = time.perf_counter() - self.t0
        return 60.0 * self.generated / dt if dt > 0 else 0.0

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def set(self, done: int, generated: int, failed: int) -> None:
        if (done, generated, failed) == (self.done, self.generated, self.failed):
            return
        delta = done - self.done
        self.done, self.generated, self.failed = done, generated, failed
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.images_per_min():.1f} img/min, {failed} failed", refresh=False)
            self.bar.update(delta) if delta else self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _worker_main(spec_path: str) -> int:
    """A child instance: run the tasks named in the spec file, writing a part CSV and a progress file."""
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    _setup_logging(None, console_level=logging.INFO)
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
        for batch in _batches(tasks, args.batch_size):
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
def _setup_logging(log_file: Path | None, console_level: int = logging.WARNING) -> None:
    root = logging.getLogger("diffgentor")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_diffgentor_batch", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(fmt)
    console._diffgentor_batch = True
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.INFO)
        fh.setFormatter(fmt)
        fh._diffgentor_batch = True
        root.addHandler(fh)


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
    args.model_name = config.model
    output_dir = Path(args.output_dir)
    output_csv = Path(args.output_csv) if args.output_csv else output_dir / "results.csv"
    log_dir = Path(args.log_dir) if args.log_dir else output_dir / "logs" / time.strftime("%Y%m%d_%H%M%S")
    cache_dir = Path(args.image_cache_dir) if getattr(args, "image_cache_dir", None) else output_dir / ".image_cache"
    check_output_paths(output_dir, output_csv, log_dir)
    _setup_logging(log_dir / "main.log")
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
            meta = _png_text(t.out_path)
            results[t.key] = _record(t, str(t.out_path), meta.get("instruction_enhanced", ""))
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
            from diffgentor.server.batch_ray import run_ray

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
            slices = [[]] if config.rank_endpoint else L.plan_instances(config.ranks_per_instance, gpus,
                                                                        args.num_instances)
            slices = slices[:max(1, min(len(slices), len(pending)))]
            if len(slices) == 1:
                if slices[0]:
                    logger.info("one instance on GPU %s", ",".join(slices[0]))
                config = resolve_kernels(config)
                worker = Worker(args, config, base, cache_dir)
                try:
                    for batch in _batches(pending, args.batch_size):
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
                rec = _record(t, error=f"instance {inst.rank} ({inst.where}) exited with code {inst.returncode} "
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
