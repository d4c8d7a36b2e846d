"""Strict checkpoint loader: golden tiny keys load; each kind of broken checkpoint fails naming its cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffgentor.engine.models.hunyuan_image_3.backbone import HunyuanImage3Backbone
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.weights import (
    CheckpointError,
    cast_module_,
    hunyuan_key_transforms,
    load_hunyuan_image_3,
    load_state_into,
    qkv_official_to_ours,
    qkv_ours_to_official,
)

TEXT_PREFIXES = ("model.", "lm_head.")
QKV = "model.layers.1.self_attn.qkv_proj.weight"


class TextHarness(nn.Module):
    """Backbone + lm_head, named like the official top-level model."""

    def __init__(self, cfg: HunyuanImage3Config) -> None:
        super().__init__()
        self.model = HunyuanImage3Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


@pytest.fixture(scope="module")
def ckpt(golden_tiny) -> Path:
    return golden_tiny / "checkpoint"


@pytest.fixture(scope="module")
def cfg(ckpt) -> HunyuanImage3Config:
    return HunyuanImage3Config.from_pretrained(ckpt)


def _copy(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: Path, index: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_shard_of(d: Path, key: str, edit) -> str:
    """Rewrite the shard holding `key` with edit(dict) applied, keep the index in sync, return the shard."""
    index = _index(d)
    shard = index["weight_map"][key]
    tensors = load_file(str(d / shard))
    edit(tensors)
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    _write_index(d, index)
    return shard


def _load(module: nn.Module, d: Path, **kw):
    return load_hunyuan_image_3(module, d, select_prefixes=TEXT_PREFIXES, **kw)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


# ------------------------------------------------------------------------------------------------ success


def test_loads_golden_tiny_checkpoint(ckpt, cfg):
    h = TextHarness(cfg)
    loaded = _load(h, ckpt)
    assert set(loaded) == set(h.state_dict())
    raw = load_file(str(ckpt / _index(ckpt)["weight_map"][QKV]))
    assert torch.equal(h.state_dict()[QKV], qkv_official_to_ours(raw[QKV], cfg))
    wte = "model.wte.weight"
    assert torch.equal(h.state_dict()[wte], load_file(str(ckpt / _index(ckpt)["weight_map"][wte]))[wte])


def test_bf16_load_keeps_router_fp32(ckpt, cfg):
    h = TextHarness(cfg)
    _load(h, ckpt, dtype=torch.bfloat16)
    for name, p in h.named_parameters():
        want = torch.float32 if name.endswith("mlp.gate.wg.weight") else torch.bfloat16
        assert p.dtype == want, name
    # module casts keep the router fp32 too, and cast_module_ does the same for a fresh model
    b = HunyuanImage3Backbone(cfg).to(torch.bfloat16)
    assert b.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    assert b.layers[0].mlp.experts[0].down_proj.weight.dtype == torch.bfloat16
    c = cast_module_(HunyuanImage3Backbone(cfg), torch.float16)
    assert c.layers[1].mlp.gate.wg.weight.dtype == torch.float32 and c.wte.weight.dtype == torch.float16


def test_meta_module_and_dotted_folder_name(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "HunyuanImage-3.0-Instruct.v1")
    with torch.device("meta"):
        h = TextHarness(cfg)
    _load(h, d)
    assert all(t.device.type == "cpu" for t in h.state_dict().values())
    assert h.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32


def test_single_file_checkpoint(ckpt, cfg, tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d / "config.json")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(_index(ckpt)["weight_map"].values())):
        state.update({k: v for k, v in load_file(str(ckpt / shard)).items() if k.startswith(TEXT_PREFIXES)})
    save_file(state, str(d / "model.safetensors"))
    h = TextHarness(cfg)
    _load(h, d)
    assert torch.equal(h.state_dict()["lm_head.weight"], state["lm_head.weight"])


def test_qkv_round_trip_and_layout(cfg):
    w = torch.randn(cfg.qkv_out_features, cfg.hidden_size)
    assert torch.equal(qkv_ours_to_official(qkv_official_to_ours(w, cfg), cfg), w)
    assert torch.equal(qkv_official_to_ours(qkv_ours_to_official(w, cfg), cfg), w)
    b = torch.randn(cfg.qkv_out_features)
    assert torch.equal(qkv_ours_to_official(qkv_official_to_ours(b, cfg), cfg), b)
    # official rows: per KV group g: q heads g*r .. g*r+r-1, then k_g, then v_g (r = q heads per KV head)
    d, r, nkv = cfg.head_dim, cfg.q_per_kv, cfg.num_key_value_heads
    ours = qkv_official_to_ours(w, cfg)
    group = (r + 2) * d
    for g in range(nkv):
        for j in range(r):
            h = g * r + j
            assert torch.equal(ours[h * d : (h + 1) * d], w[g * group + j * d : g * group + (j + 1) * d])
        k0 = cfg.num_attention_heads * d
        k_rows = w[g * group + r * d : g * group + (r + 1) * d]
        assert torch.equal(ours[k0 + g * d : k0 + (g + 1) * d], k_rows)
        v0 = k0 + nkv * d
        assert torch.equal(ours[v0 + g * d : v0 + (g + 1) * d], w[g * group + (r + 1) * d : (g + 1) * group])
    assert len(hunyuan_key_transforms(cfg)) == 2


# ------------------------------------------------------------------------------------------------ failures


def test_unselected_top_level_keys_are_unexpected(ckpt, cfg):
    h = TextHarness(cfg)
    with pytest.raises(CheckpointError) as ei:
        load_state_into(h, ckpt)
    assert "vae.decoder.conv_in.weight" in ei.value.unexpected
    assert not ei.value.missing and not ei.value.mismatched


def test_missing_key_is_named(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    key = "model.layers.0.mlp.experts.3.down_proj.weight"
    _edit_shard_of(d, key, lambda t: t.pop(key))
    h = TextHarness(cfg)
    snap = _snapshot(h)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\)") as ei:
        _load(h, d)
    assert ei.value.missing == [key] and key in str(ei.value)
    assert _unchanged(h, snap)


def test_extra_key_is_named(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    extra = "model.layers.0.mlp.experts.9.down_proj.weight"
    _edit_shard_of(d, QKV, lambda t: t.__setitem__(extra, torch.zeros(64, 32)))
    with pytest.raises(CheckpointError) as ei:
        _load(TextHarness(cfg), d)
    assert ei.value.unexpected == [extra] and extra in str(ei.value)


def test_misshaped_tensor_is_named_with_shapes(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    key = "model.layers.1.self_attn.o_proj.weight"
    _edit_shard_of(d, key, lambda t: t.__setitem__(key, torch.zeros(64, 48)))
    with pytest.raises(CheckpointError) as ei:
        _load(TextHarness(cfg), d)
    assert ei.value.mismatched == [(key, (64, 64), (64, 48))]
    assert f"{key}: expected [64, 64], found [64, 48]" in str(ei.value)


def test_all_problems_reported_together(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    gone, extra, bad = "lm_head.weight", "model.extra.weight", "model.ln_f.weight"

    def edit(t):
        t.pop(gone, None)
        t[extra] = torch.zeros(2)

    _edit_shard_of(d, gone, edit)
    _edit_shard_of(d, bad, lambda t: t.__setitem__(bad, torch.ones(65)))
    with pytest.raises(CheckpointError) as ei:
        _load(TextHarness(cfg), d)
    e = ei.value
    assert e.missing == [gone] and e.unexpected == [extra] and [m[0] for m in e.mismatched] == [bad]


def test_truncated_shard_is_named(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    shard = _index(d)["weight_map"][QKV]
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) - 1000])
    h = TextHarness(cfg)
    snap = _snapshot(h)
    with pytest.raises(CheckpointError, match="truncated") as ei:
        _load(h, d)
    assert len(ei.value.bad_shards) == 1 and shard in ei.value.bad_shards[0]
    assert not ei.value.missing  # keys of the broken shard are not double-reported
    assert _unchanged(h, snap)


def test_corrupt_header_and_missing_shard_are_named(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    shards = sorted(set(_index(d)["weight_map"].values()))
    data = (d / shards[0]).read_bytes()
    (d / shards[0]).write_bytes(data[:8] + b"{not json" + data[17:])
    (d / shards[1]).unlink()
    with pytest.raises(CheckpointError) as ei:
        _load(TextHarness(cfg), d)
    msg = str(ei.value)
    assert shards[0] in msg and "corrupt" in msg
    assert shards[1] in msg and "missing" in msg


def test_index_pointing_to_wrong_shard_is_named(ckpt, cfg, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    index = _index(d)
    shards = sorted(set(index["weight_map"].values()))
    other = next(s for s in shards if s != index["weight_map"][QKV])
    index["weight_map"][QKV] = other
    _write_index(d, index)
    with pytest.raises(CheckpointError) as ei:
        _load(TextHarness(cfg), d)
    assert other in str(ei.value) and QKV in str(ei.value)


def test_not_a_checkpoint_folder(cfg, tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_state_into(TextHarness(cfg), tmp_path)


def test_read_failure_after_validation_leaves_module_untouched(ckpt, cfg, monkeypatch):
    import diffgentor.engine.models.hunyuan_image_3.weights as weights

    real = weights.safe_open
    reads = {"n": 0}

    class Flaky:
        """Reads 10 tensors fine, then fails (after validation, mid-way through phase 2)."""

        def __init__(self, *a, **kw):
            self.inner = real(*a, **kw)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            reads["n"] += 1
            if reads["n"] > 10:
                raise OSError("disk went away")
            return self.f.get_tensor(name)

    flaky = Flaky

    monkeypatch.setattr(weights, "safe_open", flaky)
    h = TextHarness(cfg)
    snap = _snapshot(h)
    with pytest.raises(CheckpointError, match="disk went away"):
        _load(h, ckpt)
    assert reads["n"] == 11
    assert _unchanged(h, snap)
