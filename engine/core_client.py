"""`EngineCoreClient`: the interface every driver of an engine core uses (vLLM v1's EngineCoreClient shape).

Two classes implement it: the in-process `EngineCore` (engine/core.py) and the tensor-parallel frontend
`TPExecutor` (engine/tp/executor.py), which runs one `EngineCore` replica per rank. The drivers (the offline
`Engine`, the engine-core process loop in engine/core_proc.py) are written against this protocol only, so either
can sit behind them; tests/test_core_client.py checks that both classes keep matching it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from diffgentor.engine.request import CoreSnapshot, EngineEvent, GenerationRequest, RequestResult
    from diffgentor.engine.request_state import ProcessedRequest


class EngineCoreClient(Protocol):
    """Add requests, step, read events and results; each method returns the events it produced at once (refusals,
    aborts), and a finished or failed request's `RequestResult` waits in `results` until the driver pops it."""

    results: dict[str, RequestResult]  # request id -> result of a finished request, popped by the driver
    failed: str | None  # set once the core cannot go on (a tensor-parallel rank died); every later call fails
    num_blocks: int  # KV cache blocks (every rank agrees on the number)

    def add_request(self, req: GenerationRequest) -> list[EngineEvent]:
        """Validate and queue a request (the offline path: images still encoded)."""
        ...

    def add_processed(self, p: ProcessedRequest) -> list[EngineEvent]:
        """Queue a request whose images the API server already decoded and preprocessed (the served path)."""
        ...

    def abort(self, request_id: str) -> list[EngineEvent]:
        ...

    def step(self) -> list[EngineEvent]:
        """One engine step: schedule, run the model, turn the outputs into events."""
        ...

    def has_unfinished(self) -> bool:
        ...

    def needs_release(self) -> bool:
        """Finished requests still hold worker-side state that an idle `run_until_done` frees."""
        ...

    def run_until_done(self) -> list[EngineEvent]:
        """Step until nothing is unfinished, then free the worker-side state of finished requests."""
        ...

    def poll_failures(self) -> list[EngineEvent]:
        """Between steps, while idle: the error events of in-flight requests if the core failed meanwhile."""
        ...

    def snapshot(self) -> CoreSnapshot:
        """The scheduler's counters (running, waiting, KV usage, prefix-cache hits, ...)."""
        ...

    def close(self) -> None:
        """Stop whatever the core runs besides this process (tensor-parallel ranks); idempotent."""
        ...


__all__ = ["EngineCoreClient"]
