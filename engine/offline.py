"""The offline API: `Engine.generate(requests)` and `Engine.stream(requests)` over one engine core.

The `Engine` is the frontend: input processing (validation, tokenisation, image decoding: engine/input_processor.py)
before a request reaches the core, output processing (text deltas, the final text, aligned PIL images:
engine/output_processor.py) of what each step reports.

With ``tensor_parallel_size > 1`` the core's executor runs one worker process per rank (engine/tp/), each over
its model shard, executing the core's plans; call `close()` (or use `with`) to stop them.

Requests may be `GenerationRequest`s or plain dicts of the same fields; images may be bytes, file paths
or PIL images (PIL images are encoded losslessly as PNG so the engine only ever sees encoded files, as
across a process boundary).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from diffgentor.engine.allocator import IdleRelease
from diffgentor.engine.config import EngineConfig
from diffgentor.engine.core import EngineCore, EngineCoreOutputs, StepStats
from diffgentor.engine.input_processor import process_request
from diffgentor.engine.output_processor import OutputProcessor
from diffgentor.engine.request import EngineEvent, GenerationRequest, RequestResult
from diffgentor.engine.request_contract import RequestError


def _image_bytes(src: Any) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    if isinstance(src, (str, Path)):
        return Path(src).read_bytes()
    if hasattr(src, "save"):  # PIL
        buf = io.BytesIO()
        src.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"unsupported image type {type(src).__name__}")


class Engine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.outputs = OutputProcessor(core.ctx)
        self.results: dict[str, RequestResult] = {}  # request id -> result of a finished request (generate pops)
        self._ids = itertools.count()
        # after each batch the engine is idle until the caller's next one: its freed heap goes back after a while
        self.idle_release = IdleRelease.from_config(core.config)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """One engine core; when the resolved layout has more than one rank (``tensor_parallel_size`` > 1, or 0 =
        every visible GPU) its executor runs one process per rank, as ``config.parallel`` says."""
        return cls(EngineCore.from_config(config))

    def close(self) -> None:
        """Stop the tensor-parallel ranks (a no-op for a single-process engine)."""
        self.core.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def from_pretrained(cls, model: str | Path, environ: dict[str, str] | None = None, **engine_args: Any) -> Engine:
        """`model`: a checkpoint folder or a Hugging Face model id (`revision=`, `download_dir=`; HF_HUB_OFFLINE=1
        in `environ` reads only the cache)."""
        config = EngineConfig.from_cli_and_env({"model": str(model), **engine_args}, environ=environ)
        return cls.from_config(config.with_local_checkpoint())

    @property
    def stats(self) -> StepStats:
        """The core's cumulative step counters (read-only use: benchmarks snapshot them between steps)."""
        return self.core.stats

    def make_request(self, req: GenerationRequest | dict[str, Any]) -> GenerationRequest:
        if isinstance(req, GenerationRequest):
            return req
        fields = dict(req)
        fields.setdefault("request_id", f"req-{next(self._ids)}")
        fields["images"] = [_image_bytes(x) for x in fields.get("images") or []]
        return msgspec.convert(fields, GenerationRequest)

    def add_request(self, req: GenerationRequest | dict[str, Any]) -> None:
        """Input processing here, then the core queues it; a refused request's error and result come with the
        core's next step (as the core's own refusals do)."""
        req = self.make_request(req)
        try:
            p = process_request(self.core.ctx, req)
        except RequestError as e:
            return self.core.reject(req.request_id, 400, str(e), e.param)
        if req.request_id not in self.core.requests:  # a duplicate id keeps the running request's outputs
            self.outputs.add_request(p)
        self.core.add_processed(p)

    def process_outputs(self, outputs: EngineCoreOutputs) -> list[EngineEvent]:
        """One step's outputs through output processing: its events, and each ended request's result (with its
        text and image) into `results`."""
        events = [e for e in map(self.outputs.process, outputs.events) if e is not None]
        for rid, res in outputs.finished.items():
            done = self.outputs.finish(rid)
            res.text, res.image = done.text, done.image
            self.results[rid] = res
        return events

    def stream(self, requests: Iterable[GenerationRequest | dict[str, Any]]) -> Iterator[EngineEvent]:
        """Per-request events (text deltas, image, finished / error) as the engine produces them; each ended
        request's `RequestResult` lands in `results`."""
        self.idle_release.busy()
        try:
            for r in requests:
                self.add_request(r)
            while self.core.has_unfinished_requests():
                yield from self.process_outputs(self.core.step())
        finally:
            self.idle_release.release_after_idle()

    def generate(self, requests: Sequence[GenerationRequest | dict[str, Any]]) -> list[RequestResult]:
        """Run all requests batched together; results in input order (errors as results, never raised)."""
        reqs = [self.make_request(r) for r in requests]
        for _ in self.stream(reqs):
            pass
        return [self.results.pop(r.request_id) for r in reqs]
