"""Data-parallel serving: several engine instances behind the one client interface the API server uses.

With ``DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL=k`` (or ``--tensor-parallel-size k``) and N visible GPUs the server runs
N // k engine instances side by side, each an engine-core process (with its own tensor-parallel ranks when k > 1)
on a contiguous slice of the GPUs (its ``CUDA_VISIBLE_DEVICES``), planned by the batch CLI's
`launcher.plan_instances` so the two agree; ``--data-parallel-size`` caps the count. Without GPUs (or with
``--device cpu``) ``--data-parallel-size`` CPU instances run (default 1), sharing the CPU threads.

Balancing: a new request goes to the healthy instance with the fewest requests in flight (ties: round robin, so a
light load still spreads), like vLLM's data-parallel load balancer; its abort follows it there. Every instance keeps
its own KV cache and prefix cache. Health is all-or-nothing: when one instance dies its in-flight requests fail, the
pool reports unhealthy and the server shuts down (the other instances' in-flight requests drain) and exits non-zero,
so a supervisor restarts it rather than it silently serving at reduced capacity beside a broken GPU slice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.core_proc import FinishedInfo
from diffgentor.engine.input_processor import ProcessedRequest, ProcessorContext
from diffgentor.engine.request import EngineEvent
from diffgentor.server import launcher
from diffgentor.server.http.engine_client import EngineClient, EngineDeadError

logger = logging.getLogger(__name__)


def plan_engine_instances(config: EngineConfig, data_parallel_size: int | None = None,
                          gpus: Sequence[str] | None = None) -> list[list[str]]:
    """Device slices of the server's instances (empty = CPU). ``gpus`` defaults to the visible GPUs when the engine
    runs on CUDA. A pinned device (``cuda:N``) or ranks started elsewhere (``rank_endpoint``) make one instance."""
    pinned = config.model.device.startswith("cuda:") or config.parallel.rank_endpoint is not None
    if pinned:
        if data_parallel_size not in (None, 1):
            raise ValueError("--data-parallel-size > 1 needs the engine's devices to be planned: drop --device "
                             "cuda:N / --rank-endpoint")
        return [[]]
    if gpus is None:
        gpus = launcher.visible_gpus() if config.model.on_cuda() else []
    return launcher.plan_instances(config.ranks_per_instance, gpus, data_parallel_size)


def instance_env(devices: Sequence[str], num_instances: int) -> dict[str, str] | None:
    """What an instance's engine core sees differently from the server: its GPU slice, or (several CPU instances)
    no GPU and an equal share of the CPU threads, as the batch CLI gives its instances."""
    if not devices and num_instances == 1:
        return None
    env = launcher.instance_env(os.environ, devices, num_instances)
    return {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if k in env and env[k] != os.environ.get(k)}


class EnginePool:
    """`EngineClient`s of several engine instances, used exactly like one `EngineClient`."""

    def __init__(self, config: EngineConfig, device_slices: Sequence[Sequence[str]], metrics=None,
                 on_death: Callable[[], None] | None = None, startup_timeout_s: float = 600.0,
                 ctx: ProcessorContext | None = None) -> None:
        if not device_slices:
            raise ValueError("an engine pool needs at least one instance")
        self.config = config
        self.on_death = on_death
        self.clients = [
            EngineClient(config, metrics=metrics, on_death=self._on_instance_death, startup_timeout_s=startup_timeout_s,
                         env=instance_env(devs, len(device_slices)), index=i, ctx=ctx)
            for i, devs in enumerate(device_slices)
        ]
        self._died = False
        self._next = 0  # round-robin start among equally loaded instances
        self.reserved: set[str] = set()  # request ids admitted (`reserve`) that have not started yet

    # ------------------------------------------------------------------ the EngineClient interface
    @property
    def healthy(self) -> bool:
        return all(c.healthy for c in self.clients)

    @property
    def dead(self) -> bool:
        return any(c.dead for c in self.clients)

    @property
    def death_reason(self) -> str:
        many = len(self.clients) > 1
        return "; ".join((f"instance {c.index}: " if many else "") + c.death_reason for c in self.clients if c.dead)

    @property
    def num_in_flight(self) -> int:
        return sum(c.num_in_flight for c in self.clients)

    def has_room(self, n: int) -> bool:
        """Whether n more requests fit the healthy instances' capacity together (balancing keeps each instance
        within its own). The server's only slot accounting: one instance is a pool of one."""
        return self.num_in_flight + len(self.reserved) + n <= self.capacity

    @property
    def capacity(self) -> int:
        """Requests the healthy instances are sure to take at once (`EngineClient.capacity`)."""
        return sum(c.capacity for c in self.clients if c.healthy)

    def reserve(self, request_ids: list[str]) -> bool:
        """Admit these requests now, if they fit, by taking their slots at once: the check and the taking happen in
        one step, so concurrent requests cannot both pass the check (the slots turn into in-flight requests in
        `generate`; `release` gives back the ones never started)."""
        if not self.healthy or not self.has_room(len(request_ids)):
            return False
        self.reserved.update(request_ids)
        return True

    def release(self, request_ids: list[str]) -> None:
        self.reserved.difference_update(request_ids)

    async def start(self) -> None:
        """Start every instance at once (loading is the slow part); the first failure stops the others' start."""
        tasks = [asyncio.create_task(c.start()) for c in self.clients]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        errors = [(c, t.exception()) for c, t in zip(self.clients, tasks) if not t.cancelled() and t.exception()]
        if errors:
            if len(self.clients) == 1:
                raise errors[0][1]
            raise EngineDeadError("; ".join(f"instance {c.index}: {e}" for c, e in errors))
        if len(self.clients) > 1:
            logger.info("%d engine instances ready", len(self.clients))

    async def shutdown(self) -> None:
        await asyncio.gather(*(c.shutdown() for c in self.clients), return_exceptions=True)

    def pick(self) -> EngineClient:
        """The healthy instance with the fewest requests in flight."""
        live = [c for c in self.clients if c.healthy]
        if not live:
            raise EngineDeadError(self.death_reason or "no engine instance is running")
        n = len(self.clients)
        best = min(live, key=lambda c: (c.num_in_flight, (c.index - self._next) % n))
        self._next = (best.index + 1) % n
        return best

    async def generate(self, processed: ProcessedRequest) -> AsyncIterator[EngineEvent | FinishedInfo]:
        """The picked instance's events. Picking here, at the first ``__anext__``, counts the request in that
        instance's ``num_in_flight`` in the same step, so a burst of requests spreads; closing or cancelling this
        closes the instance's generator, which aborts the request in that instance's engine core."""
        self.reserved.discard(processed.request.request_id)
        gen = self.pick().generate(processed)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()

    def _on_instance_death(self) -> None:
        if self._died:
            return
        self._died = True  # the other instances' requests drain while the server shuts down
        if self.on_death is not None:
            self.on_death()


__all__ = ["EnginePool", "instance_env", "plan_engine_instances"]
