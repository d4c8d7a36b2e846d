"""Executors: how the engine core's one scheduler reaches the worker(s) that run its plans.

`EngineCore.step()` hands each `SchedulerOutput` to `Executor.execute_model` and gets one `RunnerOutput` back.
`UniProcExecutor` calls the in-process `Worker`; `engine.tp.executor.MultiprocExecutor` broadcasts the plan to one
worker process per tensor-parallel rank and returns rank 0's output. Either way there is exactly one scheduler.
"""

from __future__ import annotations

from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.engine.scheduler_output import RunnerOutput, SchedulerOutput
from diffgentor.engine.vae_budget import VaeBudget
from diffgentor.engine.worker import Worker


class ExecutorError(RuntimeError):
    """A worker rank failed to start, died, hung or failed a step: the engine cannot go on."""


class Executor:
    """The engine core's view of its workers."""

    num_blocks: int  # KV cache blocks every worker holds (the scheduler's block pool)
    kernel_impls: dict[str, str] = {}  # noqa: RUF012 - op -> implementation that runs; set by executors that know
    vae_budget: VaeBudget | None = None  # the VAE work one step may carry (the memory plan's, on a GPU)
    layout: ParallelLayout = ParallelLayout()  # the workers' rank grid (one process: 1 x 1 x 1)

    def execute_model(self, plan: SchedulerOutput) -> RunnerOutput:
        """Run one plan on every worker; raises `ExecutorError` when a worker is lost."""
        raise NotImplementedError

    def check_health(self) -> None:
        """Between steps, while idle: raise `ExecutorError` if a worker died or failed since the last step."""

    def close(self) -> None:
        """Stop the worker processes (nothing in-process); idempotent."""

    def kill(self) -> None:
        """SIGKILL the worker processes at once (the last resort of a process that must exit now)."""


class UniProcExecutor(Executor):
    """The single-process case: the worker lives in the engine core's own process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.num_blocks = worker.num_blocks
        self.kernel_impls = worker.kernel_impls
        self.vae_budget = worker.vae_budget

    def execute_model(self, plan: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute_model(plan)

    def close(self) -> None:
        self.worker.close()


__all__ = ["Executor", "ExecutorError", "UniProcExecutor"]
