"""The memory plan asks the rules it depends on instead of restating them: which MoE path a card runs
(`kernels.moe.resolve_moe_impl`) and how many images a VAE call carries (`engine.vae_budget.VaeBudget`). Each test
fails when the two sides disagree, and when the plan keeps a copy of its own (a change to the rule must reach it)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from diffgentor.engine import memory_plan
from diffgentor.engine.config import EngineConfig, ModelConfig
from diffgentor.engine.memory_plan import IMAGE_SIDE, plan_memory, planned_moe_impl, vae_decode_bytes
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.parallel import ParallelContext
from diffgentor.engine.vae_budget import VaeBudget
from diffgentor.kernels import moe as moe_mod

from helpers import PUBLISHED_INSTRUCT_CONFIG

CAPABILITIES = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]
QUANTIZATIONS = [None, "fp8", "fp8_block"]


@pytest.fixture
def cuda_card(monkeypatch):
    """Make this process look like it holds a CUDA card of a given capability with flashinfer importable."""
    fused = types.ModuleType("flashinfer.fused_moe")
    fused.cutlass_fused_moe = lambda *a, **k: None
    root = types.ModuleType("flashinfer")
    root.fused_moe = fused
    monkeypatch.setitem(sys.modules, "flashinfer", root)
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe", fused)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)

    return set_capability


@pytest.mark.filterwarnings("ignore:MoE implementation|FP8 MoE fast path:RuntimeWarning")
@pytest.mark.parametrize("moe_impl", ["eager", "flashinfer"])
def test_planned_moe_path_is_the_one_the_kernel_resolves(cuda_card, moe_impl):
    """Every (card, quantization, requested path) of `plan-memory`: the plan names the path the kernel's resolver
    takes on that card ("dequantized" being the plan's name for the grouped path on FP8 weights)."""
    for cap in CAPABILITIES:
        cuda_card(cap)
        for quant in QUANTIZATIONS:
            resolved = moe_mod.resolve_moe_impl(moe_impl, "cuda", quant)
            expected = "dequantized" if quant and resolved == "grouped" else resolved
            assert planned_moe_impl(quant, moe_impl, cap) == expected, (cap, quant, moe_impl)


def test_the_plan_follows_a_change_of_the_kernels_rule(monkeypatch):
    """No copy in the plan: when the kernel's capability rule changes, the plan's answer changes with it."""
    assert planned_moe_impl(None, "flashinfer", (9, 0)) == "flashinfer"
    assert planned_moe_impl("fp8", "eager", (9, 0)) == "fp8_grouped"
    monkeypatch.setattr(moe_mod, "flashinfer_moe_supports", lambda cap, layout=None: (False, "changed rule"))
    monkeypatch.setattr(moe_mod, "fp8_fast_path_on", lambda cap, layout: (None, "changed rule"))
    assert planned_moe_impl(None, "flashinfer", (9, 0)) == "grouped"
    assert planned_moe_impl("fp8", "eager", (9, 0)) == "dequantized"


# ------------------------------------------------------------------------------------------------ the VAE
@pytest.fixture(scope="module")
def real_cfg(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("real_instruct")
    (d / "config.json").write_text(json.dumps(PUBLISHED_INSTRUCT_CONFIG))
    return HunyuanImage3Config.from_pretrained(d)


@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_plan_vae_counts_are_the_budgets_counts(real_cfg, quantization):
    """The counts `plan-memory` prints are the ones the worker and scheduler derive from `plan.vae_budget()`, and
    the planned bytes of a decode of that many images fit the budget while one more does not."""
    config = EngineConfig(model=ModelConfig(quantization=quantization))
    plan = plan_memory(real_cfg, config, ParallelContext(), 141 * 2**30, "H200")
    v, b = plan.vae, plan.vae_budget()
    assert v["decode_images_per_call"] == b.decode_images(IMAGE_SIDE, IMAGE_SIDE)
    assert v["encode_images_per_call"] == b.encode_images(IMAGE_SIDE, IMAGE_SIDE)
    assert v["decode_per_image"] == b.image_bytes(IMAGE_SIDE, IMAGE_SIDE)
    n = v["decode_images_per_call"]
    assert vae_decode_bytes(real_cfg, IMAGE_SIDE, IMAGE_SIDE, n) <= v["budget"]
    assert vae_decode_bytes(real_cfg, IMAGE_SIDE, IMAGE_SIDE, n + 1) > v["budget"]


def test_the_vae_plan_follows_a_change_of_the_budgets_rule(real_cfg, monkeypatch):
    """No copy in the plan: a changed count rule in `VaeBudget` is what the plan reports."""
    monkeypatch.setattr(VaeBudget, "decode_images", lambda self, h, w: 7)
    monkeypatch.setattr(VaeBudget, "encode_images", lambda self, h, w: 11)
    v = memory_plan.vae_plan(real_cfg, 0)
    assert (v["decode_images_per_call"], v["encode_images_per_call"]) == (7, 11)


# ------------------------------------------------------------------------------------------------ the KV cache
def _cache_block_bytes(cfg: HunyuanImage3Config, block_size: int, dtype: torch.dtype) -> int:
    from diffgentor.kernels.kv_cache import PagedKVCache

    cache = PagedKVCache(cfg.num_hidden_layers, 1, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype,
                         device="meta")
    return sum(cache.layer(i).numel() * cache.layer(i).element_size() for i in range(cfg.num_hidden_layers))


@pytest.mark.parametrize("block_size", [16, 64])
def test_planned_kv_block_is_the_caches_own(real_cfg, monkeypatch, block_size):
    """The plan prices a KV block by the cache's page shape (`kernels.kv_cache.kv_page_shape`): equal to what a
    cache allocates per block, also after the page shape changes (no second statement of it in the plan)."""
    from diffgentor.engine.memory_plan import kv_block_bytes
    from diffgentor.kernels import kv_cache

    before = kv_block_bytes(real_cfg, ParallelContext(), block_size, 2)
    assert before == _cache_block_bytes(real_cfg, block_size, torch.bfloat16)
    monkeypatch.setattr(kv_cache, "kv_page_shape", lambda bs, heads, d: (3, bs, heads, d))
    after = kv_block_bytes(real_cfg, ParallelContext(), block_size, 2)
    assert after == _cache_block_bytes(real_cfg, block_size, torch.bfloat16) == before * 3 // 2


def test_plan_memory_flags_take_the_kernels_names():
    """`plan-memory --quantization / --moe-impl` accept exactly the names the engine's flags take
    (`kernels.impl_names`), not a list of their own."""
    import argparse

    from diffgentor.engine.memory_plan import add_parser
    from diffgentor.kernels.impl_names import MOE_IMPLS, QUANTIZATIONS

    p = add_parser(argparse.ArgumentParser().add_subparsers())
    choices = {a.dest: a.choices for a in p._actions}
    assert choices["quantization"] is QUANTIZATIONS and choices["moe_impl"] is MOE_IMPLS
