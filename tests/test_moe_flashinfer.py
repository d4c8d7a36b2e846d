"""FlashInfer's fused MoE as the engine drives it, proven on CPU with a stand-in `flashinfer` that computes what the
kernel computes (the routed / one-expert SwiGLU MoE from the weights it is handed) and records every call:

* one workspace buffer, sized at start-up by the memory plan (grown to FlashInfer's own size query when that is
  larger), is passed to every call of every layer: no per-call workspace;
* with `fp8_block` the shared expert runs through the block-scale fused kernel on its FP8 weights (a one-expert
  MoE), never dequantised to the activation dtype on a forward.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from diffgentor.bench.engine_run import build_random_model
from diffgentor.engine.config import EngineConfig, ModelConfig, SchedulerConfig
from diffgentor.engine.memory_plan import flashinfer_moe_workspace_bytes, largest_step_tokens
from diffgentor.engine.models.hunyuan_image_3.backbone import MoEBlock
from diffgentor.engine.parallel import ParallelContext
from diffgentor.engine.testing.tiny_model import write_tiny_metadata
from diffgentor.engine.worker import Worker
from diffgentor.kernels import moe as moe_mod
from diffgentor.kernels import quantization as quant_mod
from diffgentor.kernels.activation import silu_and_mul

from helpers import flashinfer_autotune_recorder


def _dense(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[E, N, K] fp8 values with [E, N/128, K/128] block scales -> fp32 (the stand-in's own arithmetic)."""
    n, k = w.shape[-2:]
    s = scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :k]
    return w.float() * s


class _FusedMoeStandIn:
    """`flashinfer` with `autotune`, `fused_moe.cutlass_fused_moe` and `fused_moe.cutlass_fused_moe_workspace_size`."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.size_queries: list[tuple] = []
        self.tuning = False
        rec = self

        def cutlass_fused_moe(x, ids, scales, w1, w2, dtype, quant_scales=None, output=None, workspace_buffer=None,
                              use_deepseek_fp8_block_scale=False, **kw):
            rec.calls.append(dict(tokens=int(x.shape[0]), experts=int(w1.shape[0]), top_k=int(ids.shape[1]),
                                  weight_dtype=w1.dtype, tuning=rec.tuning, block_fp8=use_deepseek_fp8_block_scale,
                                  workspace=None if workspace_buffer is None else workspace_buffer.data_ptr()))
            if use_deepseek_fp8_block_scale:
                w1, w2 = _dense(w1, quant_scales[0]), _dense(w2, quant_scales[1])
            out = torch.zeros(x.shape, dtype=torch.float32)
            for t in range(x.shape[0]):
                for j in range(ids.shape[1]):
                    e = int(ids[t, j]) - kw.get("ep_rank", 0) * w1.shape[0]
                    h = silu_and_mul(x[t : t + 1].float() @ w1[e].float().t())
                    out[t] += float(scales[t, j]) * (h @ w2[e].float().t())[0]
            output.copy_(out.to(output.dtype))
            return [output]

        def cutlass_fused_moe_workspace_size(max_num_tokens, hidden, inter, experts, top_k, **kw):
            rec.size_queries.append((max_num_tokens, hidden, inter, experts, top_k))
            return 1000 * max_num_tokens * top_k

        self.module = types.ModuleType("flashinfer")
        self.module.autotune = flashinfer_autotune_recorder(rec)
        self.module.fused_moe = types.ModuleType("flashinfer.fused_moe")
        self.module.fused_moe.cutlass_fused_moe = cutlass_fused_moe
        self.module.fused_moe.cutlass_fused_moe_workspace_size = cutlass_fused_moe_workspace_size


@pytest.fixture
def fake(monkeypatch):
    f = _FusedMoeStandIn()
    monkeypatch.setitem(sys.modules, "flashinfer", f.module)
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe", f.module.fused_moe)
    monkeypatch.setattr(moe_mod, "flashinfer_moe_available", lambda device, layout=None: (True, "ok"))
    monkeypatch.setattr(moe_mod, "_FLASHINFER_TUNED", set())
    monkeypatch.setattr(moe_mod, "_FLASHINFER_WORKSPACE", {})
    return f


@pytest.mark.parametrize("quantization", [None, "fp8_block"])
def test_one_workspace_sized_by_the_plan_serves_every_call(tmp_path, fake, quantization):
    """The worker reserves ONE workspace at start-up (the plan's bytes, or FlashInfer's query when larger) and every
    fused-MoE call of every layer gets that same buffer; a call larger than the reserved step gets none (FlashInfer
    then allocates its own, as before)."""
    model = build_random_model(write_tiny_metadata(tmp_path / "tiny"), "cpu", torch.float32, quantization, 0,
                               "sdpa", "flashinfer")
    config = EngineConfig(model=ModelConfig(device="cpu", dtype="float32", quantization=quantization or "none"),
                          scheduler=SchedulerConfig(max_num_batched_tokens=256))
    Worker(model, config, 64)
    tokens = largest_step_tokens(config, model.config)[0]
    planned = flashinfer_moe_workspace_bytes(model.config, ParallelContext(), tokens, quantization, 4)
    ws = moe_mod._FLASHINFER_WORKSPACE["cpu"]
    shapes = 2 if quantization else 1  # routed experts, and the block-scaled shared expert
    assert len({q for q in fake.size_queries}) == shapes and all(q[0] == tokens for q in fake.size_queries)
    assert ws.buffer.numel() == max([planned] + [1000 * tokens * q[4] for q in fake.size_queries])
    assert ws.max_tokens == tokens
    assert len(fake.calls) == shapes and all(c["tuning"] for c in fake.calls)  # tuned with the workspace too
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    x = torch.randn(7, model.config.hidden_size)
    for b in blocks:
        b(x)
    after = fake.calls[shapes:]
    assert len(after) == shapes * len(blocks)
    assert {c["workspace"] for c in fake.calls} == {ws.buffer.data_ptr()}  # one buffer, every call and layer
    blocks[0](torch.randn(tokens + 1, model.config.hidden_size))
    assert fake.calls[-1]["workspace"] is None


def test_fp8_block_shared_expert_stays_fp8_and_matches_the_dequantised_path(tmp_path, fake, monkeypatch):
    """With fp8_block and the FlashInfer MoE, a layer makes two fused calls on FP8 weights (its routed experts, then
    the shared expert as ONE expert with weight 1) and dequantises nothing; the result equals the eager path on the
    dequantised weights."""
    model = build_random_model(write_tiny_metadata(tmp_path / "tiny"), "cpu", torch.float32, "fp8_block", 0,
                               "sdpa", "flashinfer")
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    x = torch.randn(6, model.config.hidden_size)
    dequantised: list[tuple] = []
    real = quant_mod.dequantize_fp8

    def counted(q, scale, dtype=torch.float32, blk=None):
        dequantised.append(tuple(q.shape))
        return real(q, scale, dtype, blk)

    monkeypatch.setattr(quant_mod, "dequantize_fp8", counted)
    with torch.no_grad():
        got = block(x)
    assert dequantised == []
    routed, shared = fake.calls
    assert routed["block_fp8"] and routed["weight_dtype"] == torch.float8_e4m3fn
    assert (routed["experts"], routed["top_k"]) == (model.config.num_experts, block.top_k)
    assert shared["block_fp8"] and shared["weight_dtype"] == torch.float8_e4m3fn
    assert (shared["experts"], shared["top_k"], shared["tokens"]) == (1, 1, 6)
    monkeypatch.setattr(quant_mod, "dequantize_fp8", real)
    eager = MoEBlock(model.config, 0, "eager")
    eager.load_state_dict(block.state_dict(), strict=False)
    for name in ("shared_mlp", "experts"):
        setattr(eager, name, getattr(block, name))  # the same FP8 modules, run through the dequantising path
    with torch.no_grad():
        ref = eager(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_fp8_block_shared_expert_through_the_fused_kernel():
    """On SM90 with FlashInfer: a block-scaled FP8 shared expert at the real widths run as a one-expert fused MoE
    matches the dequantised reference (the kernel rounds the activations to FP8 per 128 columns)."""
    from diffgentor.kernels.moe import swiglu_mlp
    from diffgentor.kernels.quantization import quantize_fp8

    ok, why = moe_mod.flashinfer_moe_available("cuda", "block")
    if not ok:
        pytest.skip(why)
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, i = 4096, 3072
    q13 = quantize_fp8(torch.randn(2 * i, h, generator=gen, device="cuda") * h**-0.5, "block")
    q2 = quantize_fp8(torch.randn(h, i, generator=gen, device="cuda") * i**-0.5, "block")
    x = torch.randn(64, h, generator=gen, device="cuda").to(torch.bfloat16)
    ref = swiglu_mlp(x, q13, q2, "reference").float()
    got = swiglu_mlp(x, q13, q2, "flashinfer").float()
    assert float((got - ref).norm() / ref.norm()) < 0.06
