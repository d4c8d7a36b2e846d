"""FlashInfer proven at start-up, or not used (engine/kernel_warmup.py): a failed or slow build falls back to the
torch path with one warning naming the module, the engine still serves, and `/metrics` says what runs."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from prometheus_client import generate_latest

from diffgentor.engine import kernel_warmup
from diffgentor.engine.config import EngineConfig, ModelConfig
from diffgentor.engine.kernel_warmup import WarmupShapes, prove, warm_attention, warm_moe
from diffgentor.engine.offline import Engine
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.kernels.moe import fused_experts_grouped
from diffgentor.server.http.metrics import ServerMetrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.Distil-3.0", distil=True)


def _pretend_flashinfer_is_there(monkeypatch) -> None:
    monkeypatch.setattr(kernel_warmup, "flashinfer_usable", lambda op, device, quantization: (True, "ok"))


def test_failed_build_falls_back_and_the_engine_serves(tiny, monkeypatch, caplog):
    _pretend_flashinfer_is_there(monkeypatch)
    built: list[str] = []

    def failing_build(module, shapes, device):
        built.append(module)
        raise RuntimeError(f"ninja: build stopped: subcommand failed ({module})")

    monkeypatch.setattr(kernel_warmup, "warm_module", failing_build)
    caplog.set_level(logging.INFO, logger="diffgentor.engine")
    eng = Engine.from_pretrained(tiny, environ={}, device="cpu", dtype="float32", num_kv_blocks=128,
                                 attn_impl="flashinfer", moe_impl="flashinfer")
    assert sorted(built) == ["attention decode", "attention prefill", "fused MoE"]
    assert eng.core.kernel_impls == {"attention": "sdpa", "moe": "grouped"}
    model = eng.core.executor.worker.model
    assert type(model.model.attn).__name__ == "TorchPagedAttention"
    assert {layer.mlp.moe_impl for layer in model.model.layers if hasattr(layer.mlp, "moe_impl")} == {"eager"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for module, fallback in (("attention prefill", "sdpa"), ("attention decode", "sdpa"), ("fused MoE", "torch MoE")):
        (line,) = [w for w in warnings if f"FlashInfer {module} not proven" in w]
        assert fallback in line and "subcommand failed" in line
    assert any("kernels: attention=sdpa, moe=grouped" in r.getMessage() for r in caplog.records)
    (res,) = eng.generate([dict(prompt="a red cube", bot_task="image", image_size="256x256", num_inference_steps=2,
                                seed=1, output_type="latent")])
    assert res.error is None and res.finish_reason == "image"


def test_metrics_name_the_implementation_each_engine_runs():
    m = ServerMetrics("tiny")
    m.on_engine_ready(0, 64, {"attention": "sdpa", "moe": "grouped"})
    text = generate_latest(m.registry).decode()
    assert 'diffgentor:kernel_impl{engine="0",impl="sdpa",model_name="tiny",op="attention"} 1.0' in text
    assert 'diffgentor:kernel_impl{engine="0",impl="grouped",model_name="tiny",op="moe"} 1.0' in text


def test_a_build_past_the_budget_is_not_used():
    shapes = WarmupShapes(4, 2, 16, 16, torch.float32, 64, 32, 2, None)

    def slow(module, shapes, device):
        time.sleep(3 if module == "fused MoE" else 0)
        return "ok"

    t0 = time.monotonic()
    proofs = prove(["attention prefill", "fused MoE"], shapes, torch.device("cpu"), budget_s=0.5, warm=slow)
    assert time.monotonic() - t0 < 2.5
    assert [(p.module, p.ok) for p in proofs] == [("attention prefill", True), ("fused MoE", False)]
    assert "warm-up budget" in proofs[1].detail


def test_proven_flashinfer_is_chosen_and_cuda_defaults_to_it(tiny, monkeypatch):
    from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config

    _pretend_flashinfer_is_there(monkeypatch)
    monkeypatch.setattr(kernel_warmup, "warm_module", lambda module, shapes, device: "max abs error 0")
    mc = HunyuanImage3Config.from_pretrained(tiny)
    flashinfer = EngineConfig(model=ModelConfig(checkpoint=str(tiny), device="cpu", attn_impl="flashinfer"))
    choice = kernel_warmup.choose_kernels(flashinfer, mc)
    assert choice.attn_impl == "flashinfer" and choice.moe_impl == "eager" and len(choice.proofs) == 2
    # not asked for: FlashInfer is wanted on CUDA only; asked for sdpa (flag or env var): never
    unset = EngineConfig(model=ModelConfig(checkpoint=str(tiny))).model
    assert unset.wants_flashinfer_attention(cuda_available=True)
    assert not unset.wants_flashinfer_attention(cuda_available=False)
    sdpa = EngineConfig(model=ModelConfig(checkpoint=str(tiny), attn_impl="sdpa")).model
    assert not sdpa.wants_flashinfer_attention(cuda_available=True)
    env = EngineConfig.from_cli_and_env({"model": str(tiny)}, environ={"DG_HUNYUAN_IMAGE_3_ATTN_IMPL": "sdpa"})
    assert not env.model.wants_flashinfer_attention(cuda_available=True)


def test_warm_up_inputs_check_a_backend_against_the_reference():
    """The warm-up steps (mixed prefill with an image block; decode of three lengths) and the MoE input are sound:
    the torch paths pass them on CPU (FlashInfer's own run happens on a GPU)."""
    shapes = WarmupShapes(8, 2, 32, 16, torch.float32, 64, 48, 3, None)
    assert "max abs error" in warm_attention(shapes, torch.device("cpu"), decode=False, impl="sdpa")
    assert "max abs error" in warm_attention(shapes, torch.device("cpu"), decode=True, impl="sdpa")
    assert "relative L2" in warm_moe(shapes, torch.device("cpu"), fused=fused_experts_grouped)

    def wrong(x, *args):
        return fused_experts_grouped(x, *args) * 1.5

    with pytest.raises(RuntimeError, match="relative L2"):
        warm_moe(shapes, torch.device("cpu"), fused=wrong)
