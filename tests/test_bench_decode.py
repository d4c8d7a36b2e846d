"""`diffgentor bench decode`: the bytes a decode step must move (from the model's shapes) and one tiny run through
the CLI (every batch size and mode measured, per-token cost relative to batch 1)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from diffgentor.bench.decode import relative_per_token, step_bytes
from diffgentor.bench.engine_run import build_random_model
from diffgentor.engine.testing.tiny_model import write_tiny_metadata
from diffgentor.server.cli import main as cli


@pytest.fixture(scope="module")
def model():
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_metadata(Path(tmp) / "ckpt")
        return build_random_model(ckpt, "cpu", torch.float32, None, 0, "sdpa", "eager")


def test_step_bytes_from_the_shapes(model):
    cfg = model.config
    layers = [m for n, m in model.named_modules() if n.startswith("model.layers.") and n.count(".") == 2]
    expert = sum(p.numel() * 4 for lay in layers for p in lay.mlp.experts.parameters())
    text = sum(p.numel() * 4 for lay in layers for p in lay.parameters()) - expert
    head = (model.lm_head.weight.numel() + model.model.ln_f.weight.numel()) * 4
    topk = sum(cfg.moe_topk) / len(cfg.moe_topk)
    one = step_bytes(model, kv_bytes_per_token=100, batch=1, context=10)
    assert one["dense"] == text + head  # the lm_head once per step, never per sequence
    assert one["experts_touched"] == pytest.approx(topk)
    assert one["experts"] == pytest.approx(expert * topk / cfg.num_experts)
    assert one["kv"] == 1000
    many = step_bytes(model, kv_bytes_per_token=100, batch=64, context=10)
    assert many["dense"] == one["dense"] and many["kv"] == 64 * 1000
    assert many["experts_touched"] == pytest.approx(cfg.num_experts)  # 64 tokens touch all 4 experts
    assert many["total"] == many["dense"] + many["experts"] + many["kv"]


def test_relative_per_token():
    rows = [dict(context=8, mode="eager", batch=b, per_token_ms=ms) for b, ms in ((1, 10.0), (4, 5.0), (16, 2.0))]
    assert relative_per_token(rows) == {"ctx8/eager/B1": 1.0, "ctx8/eager/B4": 0.5, "ctx8/eager/B16": 0.2}


def test_cli_tiny_run(tmp_path):
    out = tmp_path / "decode.json"
    assert cli(["bench", "decode", "--shapes", "tiny", "--batch", "1", "3", "--context", "20", "--steps", "1",
                "--warmup", "0", "--save-result", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {(r["batch"], r["mode"]) for r in res["rows"]} == {(1, "eager"), (3, "eager"), (1, "graphs"), (3, "graphs")}
    assert all(r["step_ms"] > 0 and 0 < r["fraction_of_copy_bandwidth"] for r in res["rows"])
    assert res["copy_bandwidth_Bps"] > 0 and set(res["per_token_vs_batch1"]) >= {"ctx20/eager/B3", "ctx20/graphs/B3"}
