"""The memory planner on the REAL HunyuanImage-3.0-Instruct config (its published config.json, written here: no
download): per-rank weight bytes by part against a hand computation from those shapes, KV block bytes, the
budget arithmetic, the verdicts, `kv_blocks_for` and the `diffgentor plan-memory` command."""

from __future__ import annotations

import json
import math

import pytest

from diffgentor.engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from diffgentor.engine.memory_plan import (
    GPUS,
    MemoryPlanError,
    kv_blocks_for,
    plan_memory,
    weight_bytes_by_part,
)
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.parallel import ParallelContext

from helpers import PUBLISHED_INSTRUCT_CONFIG

# the published Instruct config.json: the fields the module tree depends on
H, L, E, I, K = 4096, 32, 64, 3072, 8  # noqa: E741
NQ, NKV, D, V = 32, 8, 128, 133120
REAL_INSTRUCT = PUBLISHED_INSTRUCT_CONFIG


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_instruct")
    (d / "config.json").write_text(json.dumps(REAL_INSTRUCT))
    return d


@pytest.fixture(scope="module")
def real_cfg(real_dir):
    return HunyuanImage3Config.from_pretrained(real_dir)


# ------------------------------------------------------------------------------------------ hand computation
def hand_experts(tp: int, ep: bool, fp8: bool) -> int:
    """Routed + shared expert bytes of one rank: per expert 2I x H (gate_and_up) + H x I (down)."""
    if ep:  # whole experts, E / tp of them; the shared expert is still width-sharded
        routed = [(2 * I, H), (H, I)] * (E // tp)
    else:
        routed = [(2 * I // tp, H), (H, I // tp)] * E
    shared = [(2 * I // tp, H), (H, I // tp)]
    mats = (routed + shared) * L
    if not fp8:
        return sum(2 * n * k for n, k in mats)
    return sum(n * k + 4 * n for n, k in mats)  # 1 byte per weight + one fp32 scale per output row


def hand_attention(tp: int) -> int:
    q, kv = NQ // tp, max(1, NKV // tp)
    qkv = (q + 2 * kv) * D * H
    o = H * q * D
    return L * 2 * (qkv + o + 2 * D)  # + query/key layernorm weights [D] each


def hand_embeddings(tp: int) -> int:
    return 2 * 2 * math.ceil(V / tp) * H  # wte + lm_head rows of rank 0


def hand_vit() -> int:
    c, f, p = 1152, 4304, 3 * 16 * 16
    layer = 2 * c + 4 * (c * c + c) + 2 * c + (f * c + f) + (c * f + c)
    head = c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (f * c + f) + (c * f + c)
    vision = (c * p + c + 256 * c) + 27 * layer + 2 * c + head
    aligner = (c * H + H) + (H * H + H)
    return 2 * (vision + aligner)  # bf16


def kv_block(tp: int, block_size: int = 16) -> int:
    return 2 * L * block_size * max(1, NKV // tp) * D * 2


LAYOUTS = [  # gpu, tp, ep, quantization
    ("h200", 1, False, "fp8"),
    ("h100", 8, False, "none"),
    ("h100", 4, False, "fp8"),
    ("h100", 4, True, "fp8"),
]


def _plan(cfg, gpu, tp, ep, quant, **kw):
    spec = GPUS[gpu]
    config = EngineConfig(model=ModelConfig(quantization=quant), cache=CacheConfig(**kw),
                          parallel=ParallelConfig(tensor_parallel_size=tp))
    return plan_memory(cfg, config, ParallelContext(tp, 0, expert_parallel=ep), spec.total_bytes, spec.name,
                       spec.capability)


def test_real_layouts_match_the_hand_computation(real_cfg):
    replicated = None
    for gpu, tp, ep, quant in LAYOUTS:
        plan = _plan(real_cfg, gpu, tp, ep, quant)
        w = plan.weights
        assert w["experts"] == hand_experts(tp, ep, quant == "fp8"), (gpu, tp, ep, quant)
        assert w["attention"] == hand_attention(tp)
        assert w["embeddings"] == hand_embeddings(tp)
        assert w["vit"] == hand_vit()
        # VAE (fp32, conv3d), routers (fp32), norms and image heads are replicated: identical on every layout
        rest = (w["vae"], w["other"])
        replicated = replicated or rest
        assert rest == replicated
        assert plan.kv_block_bytes == kv_block(tp)
        left = int(GPUS[gpu].total_bytes * 0.9) - plan.weight_bytes - plan.transient_bytes
        left -= sum(plan.workspace.values()) + plan.encoder_cache_bytes + plan.graph_pool_bytes
        assert plan.kv_blocks == left // kv_block(tp) and plan.fits, plan.render()
        assert plan.largest_step_tokens == 2 * (64 * 64 + 3)  # a 1024x1024 CFG denoising step > 8192
    # the replicated parts: VAE weights are fp32 (4 bytes each), and the whole model is the published ~83 B
    # parameters: summing the TP1 bf16 layout's parts, priced back to parameter counts, must land there
    full = weight_bytes_by_part(real_cfg, ParallelContext(), None)
    assert full["experts"] == hand_experts(1, False, False) and full["vae"] % 4 == 0
    params = (sum(full.values()) - full["vae"] - L * E * H * 4) // 2 + full["vae"] // 4 + L * E * H
    assert 83.0e9 < params + 2 * (H * 256 + H + H * H + H) < 83.1e9  # + Distil's 2 embedders: the published total


def test_fp8_is_what_makes_one_h200_fit(real_cfg):
    bf16 = _plan(real_cfg, "h200", 1, False, "none")
    assert not bf16.fits and bf16.kv_blocks == 0
    assert "exceed the usable" in bf16.problems[0] and "--quantization fp8" in bf16.problems[0]
    fp8 = _plan(real_cfg, "h200", 1, False, "fp8")
    assert fp8.fits and fp8.weights["experts"] < 0.51 * bf16.weights["experts"]
    # a KV cache too small for one request at the maximum length is named as such
    tight = _plan(real_cfg, "h200", 1, False, "fp8", gpu_memory_utilization=0.68)
    assert not tight.fits and "less than one request" in tight.problems[0], tight.render()
    # the A100 has no FP8 tensor cores: the dequantised layer is a transient the plan counts
    assert _plan(real_cfg, "a100-80g", 2, False, "fp8").activations["moe"] > \
        _plan(real_cfg, "h100", 2, False, "fp8").activations["moe"]


def test_kv_blocks_for_is_the_plan(real_cfg):
    config = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=4), model=ModelConfig(quantization="fp8"))
    par = ParallelContext(4, 0)
    total = GPUS["h100"].total_bytes
    assert kv_blocks_for(config, real_cfg, par, total_memory_bytes=total) == \
        plan_memory(real_cfg, config, par, total).kv_blocks
    with pytest.raises(MemoryPlanError, match="does NOT fit"):
        kv_blocks_for(EngineConfig(), real_cfg, None, total_memory_bytes=total)


def test_one_layer_dedupe_equals_the_full_build(tmp_path):
    """The planner builds one decoder layer when all are alike; the full module tree gives the same bytes."""
    from diffgentor.engine.testing.tiny_model import build_tiny_tokenizer, tiny_config_dict

    cfg = HunyuanImage3Config.from_dict(tiny_config_dict(build_tiny_tokenizer()))
    for par, quant in ((ParallelContext(2, 1), "fp8"), (ParallelContext(2, 0, expert_parallel=True), "fp8_block")):
        assert weight_bytes_by_part(cfg, par, quant) == weight_bytes_by_part(cfg, par, quant, dedupe_layers=False)


def test_plan_memory_cli(real_dir, capsys):
    from diffgentor.server.cli import main

    assert main(["plan-memory", str(real_dir), "--gpu", "h100", "--tensor-parallel-size", "4", "--expert-parallel",
                 "--quantization", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel 4 + expert parallel" in out and "fits:" in out and "experts" in out
    assert main(["plan-memory", str(real_dir), "--gpu", "h100", "--tensor-parallel-size", "1"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan-memory", str(real_dir / "missing"), "--gpu", "h100"]) == 2
    assert "not found" in capsys.readouterr().out
