"""The worker: one model shard (the whole model in a single process) and the `ModelRunner` that executes plans.

A worker knows nothing of requests as users wrote them: it receives `SchedulerOutput`s from the one scheduler and
answers `RunnerOutput`s. In a single process the engine core calls it directly (`engine.executor.UniProcExecutor`);
with tensor parallelism every rank process holds one (`engine.tp.rank`) and runs the plans the executor broadcasts,
its collectives keeping the shards in lockstep.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from diffgentor.engine.allocator import configure_heap, trim_if_over
from diffgentor.engine.config import EngineConfig
from diffgentor.engine.kernel_warmup import choose_kernels
from diffgentor.engine.memory_plan import (
    device_plan,
    flashinfer_moe_workspace_bytes,
    kv_block_bytes,
    largest_step_tokens,
)
from diffgentor.engine.model_runner import ModelRunner
from diffgentor.engine.models.hunyuan_image_3.execution import HunyuanImage3Config, HunyuanImage3ForCausalMM
from diffgentor.engine.parallel import ParallelContext
from diffgentor.engine.scheduler_output import RunnerOutput, SchedulerOutput
from diffgentor.engine.vae_budget import VaeBudget


class Worker:
    def __init__(self, model: HunyuanImage3ForCausalMM, config: EngineConfig, num_blocks: int,
                 kernel_impls: dict[str, str] | None = None, vae_budget: VaeBudget | None = None) -> None:
        self.model = model
        self.num_blocks = num_blocks
        self.kernel_impls = dict(kernel_impls or {})  # op -> the implementation that runs (engine/kernel_warmup.py)
        self.heap_reuse_bytes = config.cache.heap_reuse_bytes
        self.vae_budget = vae_budget  # the memory plan's VAE limits on a GPU; None: unbounded (CPU)
        self.reports_latents = True  # final latents ride along in the output (ranks other than group leaders: no)
        self.runner = ModelRunner(model, num_blocks, config.cache.block_size, config.model.enforce_eager,
                                  config.scheduler.max_num_seqs, vae_budget=vae_budget,
                                  async_encode=config.scheduler.async_encode,
                                  async_decode=config.scheduler.async_decode)
        tokens = largest_step_tokens(config, model.config)[0]
        quant = None if config.model.quantization == "none" else config.model.quantization
        model.tune_kernels(tokens, flashinfer_moe_workspace_bytes(  # the plan's size of FlashInfer's MoE workspace
            model.config, model.model.parallel, tokens, quant, torch.finfo(model.dtype).bits // 8))

    @classmethod
    def load(cls, config: EngineConfig, parallel: ParallelContext | None = None) -> Worker:
        """Load the checkpoint (only this rank's shards when `parallel` is given) and size the KV cache; the ranks
        of a group agree on the smallest cache (one scheduler plans for all of them). Sets this process's host heap
        policy first (`engine.allocator.configure_heap`): every process that runs a model shard loads it here."""
        m, cache = config.model, config.cache
        if m.checkpoint is None:
            raise ValueError("EngineConfig.model.checkpoint (the checkpoint folder) is required")
        configure_heap(cache.heap_reuse_bytes)
        path = Path(m.checkpoint)
        dtype = getattr(torch, m.resolve_dtype())
        model_config = HunyuanImage3Config.from_pretrained(path)
        planned, vae_budget = None, None
        plan_kv = m.on_cuda() and cache.num_kv_blocks is None and cache.kv_cache_memory_bytes is None
        if plan_kv:
            # the memory planner sizes the KV cache, and refuses (MemoryPlanError, the whole plan) BEFORE any weight
            # is loaded (and before the kernel warm-up) when the layout cannot fit this GPU
            device_plan(config, model_config, parallel)
        # FlashInfer only where its kernels build and pass at start-up (engine/kernel_warmup.py); the config then
        # names what actually runs, for the memory plan and the model
        kernels = choose_kernels(config, model_config, parallel)
        m = dataclasses.replace(m, attn_impl=kernels.attn_impl, moe_impl=kernels.moe_impl)
        config = dataclasses.replace(config, model=m)
        if m.on_cuda():  # the plan's VAE budget sizes the VAE calls (an explicit KV size skips its verdict)
            plan = device_plan(config, model_config, parallel, require_fit=plan_kv)
            planned = plan.kv_blocks if plan_kv else None
            vae_budget = plan.vae_budget()
        model = HunyuanImage3ForCausalMM.from_pretrained(
            path, dtype=dtype, device=m.resolve_device(), attn_backend=m.attn_impl, moe_impl=m.moe_impl,
            parallel=parallel, quantization=m.quantization,
        )
        c = model.config
        bytes_per_block = kv_block_bytes(c, parallel or ParallelContext(), cache.block_size,
                                         torch.finfo(dtype).bits // 8)
        if planned is not None:
            num_blocks = planned
        else:
            num_blocks = config.resolve_num_blocks(bytes_per_block, max_model_len=c.max_position_embeddings)
        if parallel is not None:  # every rank of the layout: one scheduler's block ids index every rank's cache
            num_blocks = parallel.world_min(num_blocks, model.device if m.on_cuda() else "cpu")
        return cls(model, config, num_blocks, kernels.labels, vae_budget)

    def execute_model(self, plan: SchedulerOutput) -> RunnerOutput:
        """Run one plan; the final latents of a diffusion that just ended ride along (the result of the latent output
        type, and what checks compare)."""
        out = self.runner.execute(plan)
        for rid, step in out.diffusion_steps_done.items() if self.reports_latents else ():
            d = self.runner.requests[rid].diffusion
            if step + 1 >= d.schedule.num_steps:
                out.final_latents[rid] = d.latents.detach().cpu()
        trim_if_over(self.heap_reuse_bytes)  # the step's temporaries are free now: keep at most the ceiling resident
        return out

    def close(self) -> None:
        """Stop the encode and decode threads."""
        self.runner.encodes.close()
        self.runner.decodes.close()


__all__ = ["Worker"]
