"""A batch job's rows through one engine, shared by the local executor (`server/batch/job.py`) and the Ray
executor (`server/batch/ray_executor.py`): the tasks (one output image each), the `Worker` that runs them batch by
batch with retries, the results-CSV record of each, the output PNG (whose text chunks let a resumed run rebuild a
lost row), the progress bar, the run's engine config and logging.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffgentor.server.batch import data as D

logger = logging.getLogger("diffgentor.batch")


PNG_KEY_PREFIX = "diffgentor:"


class FatalError(RuntimeError):
    """The run cannot start or continue (bad flags, input, model); exit code 2."""


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


def engine_config(args: argparse.Namespace, environ=None):
    """The EngineConfig of this run (validates every DG_HUNYUAN_IMAGE_3_* variable). The generation flags map onto
    it like `serve`'s: ``--num_inference_steps`` and ``--guidance_scale`` are the default steps and guidance of
    every request (`engine/request_defaults.py`), ``--seed`` the default seed (each row's own seed is still
    ``--seed`` plus its image number)."""
    from diffgentor.engine.config import EngineConfig

    given = dict(vars(args))
    given["model"] = args.model_name
    return EngineConfig.from_cli_and_env(given, environ)


def resolve_kernels(config):
    """FlashInfer needs CUDA and flashinfer-python: without them fall back (with a warning) to eager / sdpa."""
    changes = {}
    for name, fallback in (("moe_impl", "eager"), ("attn_impl", "sdpa")):
        if getattr(config.model, name) != "flashinfer":
            continue
        reason = None
        if not config.model.on_cuda():
            reason = "there is no CUDA device"
        elif importlib.util.find_spec("flashinfer") is None:
            reason = "flashinfer-python is not installed (pip install -e '.[gpu]', see docs/flashinfer.md)"
        if reason:
            var = "DG_HUNYUAN_IMAGE_3_" + name.upper()
            logger.warning("%s=flashinfer (or --%s flashinfer) but %s; using %s", var, name.replace("_", "-"),
                           reason, fallback)
            changes[name] = fallback
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes)) if changes else config


def record(task: Task, output_image: str = "", text: str = "", error: str = "") -> dict[str, str]:
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


def png_text(path: Path) -> dict[str, str]:
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
                name = self.config.model.checkpoint
                logger.exception("could not load %s", name)
                raise FatalError(f"could not load the model {name}: {type(e).__name__}: {e}") from e
            logger.info("loaded %s in %.1f s", self.config.model.checkpoint, time.perf_counter() - t0)
        return self._engine

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks, if any (an in-process run must not leave them behind)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _request(self, task: Task, images: list[bytes]) -> dict[str, Any]:
        a = self.args
        # steps and guidance: the engine's request defaults, from this run's flags (`engine_config`)
        return {"prompt": task.row.prompt, "images": images, "seed": task.seed, "image_size": a.image_size or "auto"}

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
                outcomes[t.key] = Outcome(t.key, False, record(t, error=str(e)))
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
                        outcomes[t.key] = Outcome(t.key, False, record(t, text=text, error=err))
                        logger.warning("row %d: %s", t.row.index, err)
                        continue
                    outcomes[t.key] = Outcome(t.key, True, record(t, str(t.out_path), text))
                    continue
                if res is not None:
                    reason = getattr(res.finish_reason, "value", res.finish_reason)
                    err = res.error or f"no image (finish_reason={reason})"
                if res is not None and res.error is None:  # a text-only answer (bot_task auto): not retried
                    outcomes[t.key] = Outcome(t.key, False, record(t, text=text, error=err))
                elif attempt < self.args.max_retries:
                    retry.append((t, imgs))
                    logger.warning("row %d: %s; retrying (%d/%d)", t.row.index, err, attempt + 1,
                                   self.args.max_retries)
                else:
                    outcomes[t.key] = Outcome(t.key, False, record(t, text=text, error=err))
                    logger.warning("row %d failed: %s", t.row.index, err)
            ready = retry
            attempt += 1
        return [outcomes[t.key] for t in batch]


def batches(tasks: Sequence[Task], size: int):
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


def setup_logging(log_file: Path | None, console_level: int = logging.WARNING) -> None:
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


