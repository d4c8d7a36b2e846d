"""The engine-shaped backbone reproduces the official text logits and greedy tokens (golden tiny)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffgentor.engine.models.hunyuan_image_3.backbone import HunyuanImage3Backbone
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.weights import load_hunyuan_image_3
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk
from diffgentor.kernels.kv_cache import PagedKVCache
from diffgentor.kernels.rope import positions_2d

BLOCK = 4
ATOL = 1e-4


class TextHarness(nn.Module):
    """Backbone + lm_head, named like the official top-level model (keys model.* and lm_head.*)."""

    def __init__(self, cfg: HunyuanImage3Config) -> None:
        super().__init__()
        self.model = HunyuanImage3Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata, cache: PagedKVCache):
        h = self.model(self.model.embed_tokens(ids), positions, md, cache)
        return self.lm_head(self.model.final_norm(h)).float()


@pytest.fixture(scope="module")
def harness(golden_tiny) -> TextHarness:
    ckpt = golden_tiny / "checkpoint"
    h = TextHarness(HunyuanImage3Config.from_pretrained(ckpt))
    load_hunyuan_image_3(h, ckpt, select_prefixes=("model.", "lm_head."))
    return h.eval()


@pytest.fixture(scope="module")
def text_golden(golden_tiny):
    tensors = load_file(str(golden_tiny / "text.safetensors"))
    entry = json.loads((golden_tiny / "manifest.json").read_text())["files"]["text.safetensors"]
    return entry, tensors


def _pages(n: int, seed: int) -> list[int]:
    ids = list(range(64))
    random.Random(seed).shuffle(ids)
    return ids[: -(-n // BLOCK)]


def _chunk(start: int, stop: int, table: list[int]) -> SequenceChunk:
    return SequenceChunk(range(start, stop), stop, table)


@torch.no_grad()
def test_prefill_logits_match_golden(harness, text_golden):
    entry, tensors = text_golden
    ids = torch.tensor(entry["token_ids"])
    assert torch.equal(ids, tensors["input_ids"][0])
    n = ids.numel()
    cache = harness.model.make_kv_cache(64, BLOCK)
    md = AttentionMetadata.build([_chunk(0, n, _pages(n, 0))], BLOCK)
    logits = harness.step(ids, positions_2d(n), md, cache)
    err = (logits - tensors["logits"][0]).abs().max().item()
    assert err <= ATOL, f"max |logits - golden| = {err:.3g}"


@torch.no_grad()
def test_greedy_decode_with_paged_cache_matches_full_reforward_tokens(harness, text_golden):
    entry, _ = text_golden
    ids = list(entry["token_ids"])
    want = entry["greedy_new_tokens_no_cache_full_reforward"]
    total = len(ids) + len(want)
    table = _pages(total, 1)
    cache = harness.model.make_kv_cache(64, BLOCK)
    n = len(ids)
    md = AttentionMetadata.build([SequenceChunk(range(n), n, table)], BLOCK)
    logits = harness.step(torch.tensor(ids), positions_2d(n), md, cache)
    new: list[int] = []
    for _ in range(len(want)):
        tok = int(logits[-1].argmax())
        new.append(tok)
        p = len(ids)
        ids.append(tok)
        md = AttentionMetadata.build([SequenceChunk([p], p + 1, table)], BLOCK)
        logits = harness.step(torch.tensor([tok]), torch.tensor([[p, p]]), md, cache)
    assert new == want


@torch.no_grad()
def test_chunked_prefill_equals_single_prefill(harness, text_golden):
    entry, tensors = text_golden
    ids = torch.tensor(entry["token_ids"])
    n = ids.numel()
    table = _pages(n, 2)
    cache = harness.model.make_kv_cache(64, BLOCK)
    pos = positions_2d(n)
    outs = []
    for a, b in [(0, 7), (7, 8), (8, n)]:
        md = AttentionMetadata.build([_chunk(a, b, table)], BLOCK)
        outs.append(harness.step(ids[a:b], pos[a:b], md, cache))
    err = (torch.cat(outs) - tensors["logits"][0]).abs().max().item()
    assert err <= ATOL, f"max |chunked logits - golden| = {err:.3g}"


@torch.no_grad()
def test_flat_batch_of_two_sequences_equals_each_alone(harness, text_golden):
    entry, tensors = text_golden
    ids = torch.tensor(entry["token_ids"])
    n, m = ids.numel(), 11
    other = torch.tensor([5, 17, 300, 42, 9, 9, 100, 250, 3, 77, 460])
    pool = _pages(64 * BLOCK, 3)
    t0, t1 = pool[:7], pool[7:10]
    cache = harness.model.make_kv_cache(64, BLOCK)
    md = AttentionMetadata.build([_chunk(0, n, t0), _chunk(0, m, t1)], BLOCK)
    both = harness.step(torch.cat([ids, other]), torch.cat([positions_2d(n), positions_2d(m)]), md, cache)
    alone_cache = harness.model.make_kv_cache(64, BLOCK)
    md_alone = AttentionMetadata.build([_chunk(0, m, t1)], BLOCK)
    alone = harness.step(other, positions_2d(m), md_alone, alone_cache)
    assert (both[:n] - tensors["logits"][0]).abs().max().item() <= ATOL
    assert (both[n:] - alone).abs().max().item() <= 1e-5


@torch.no_grad()
def test_bf16_forward_runs_close_to_fp32(harness, text_golden):
    entry, tensors = text_golden
    ids = torch.tensor(entry["token_ids"])
    n = ids.numel()
    h16 = TextHarness(harness.model.config)
    h16.load_state_dict(harness.state_dict())
    h16.to(torch.bfloat16)
    assert h16.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    cache = h16.model.make_kv_cache(64, BLOCK)
    assert cache.dtype == torch.bfloat16
    md = AttentionMetadata.build([_chunk(0, n, _pages(n, 4))], BLOCK)
    logits = h16.step(ids, positions_2d(n), md, cache)
    ref = tensors["logits"][0]
    rel = ((logits - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel


@torch.no_grad()
def test_per_layer_moe_config_and_dense_layer(golden_tiny):
    raw = json.loads((golden_tiny / "checkpoint" / "config.json").read_text())
    raw.update(num_hidden_layers=3, moe_layer_num_skipped=1, moe_topk=[1, 1, 3],
               moe_intermediate_size=[8, 16, 24], num_shared_expert=[1, 2, 1], intermediate_size=40)
    cfg = HunyuanImage3Config.from_dict(raw)
    b = HunyuanImage3Backbone(cfg)
    shapes = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    assert shapes["layers.0.mlp.gate_and_up_proj.weight"] == (80, 64)  # dense layer, official keys
    assert shapes["layers.0.mlp.down_proj.weight"] == (64, 40)
    assert not any(k.startswith("layers.0.mlp.experts") for k in shapes)
    assert shapes["layers.1.mlp.shared_mlp.gate_and_up_proj.weight"] == (64, 64)  # 2 x 16, doubled
    assert shapes["layers.2.mlp.experts.3.down_proj.weight"] == (64, 24)
    assert shapes["layers.2.mlp.gate.wg.weight"] == (4, 64)
    assert b.layers[2].mlp.top_k == 3 and b.layers[1].mlp.top_k == 1
    n = 6
    md = AttentionMetadata.build([_chunk(0, n, [0, 1])], BLOCK)
    out = b(torch.randn(n, 64), positions_2d(n), md, b.make_kv_cache(4, BLOCK))
    assert out.shape == (n, 64) and torch.isfinite(out).all()
