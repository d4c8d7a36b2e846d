"""The embedded tiny checkpoint: official layout, deterministic bytes, parseable by our own loaders."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from diffgentor.engine.models.hunyuan_image_3.checkpoint_writer import (
    INDEX_FILE,
    save_sharded_safetensors,
    shard_file_name,
)
from diffgentor.engine.models.hunyuan_image_3.config import GenerationDefaults, HunyuanImage3Config
from diffgentor.engine.testing.tiny_model import (
    ADDED_SPECIAL_TOKENS,
    BASE_SPECIAL_TOKENS,
    TOKENIZER_REAL_VOCAB,
    build_tiny_tokenizer,
    draw_parameters,
    make_tiny,
    write_tiny_metadata,
)

METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "system_prompt.py",
)
SYSTEM_PROMPT_NAMES = {
    "en_vanilla": "t2i_system_prompt_en_vanilla",
    "en_recaption": "t2i_system_prompt_en_recaption",
    "en_think_recaption": "t2i_system_prompt_en_think_recaption",
    "en_unified": "unified_system_prompt_en",
}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _string_constants(path: Path) -> dict[str, str]:
    """Module-level `NAME = "..."` assignments, read without executing the file."""
    out: dict[str, str] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                out[node.targets[0].id] = node.value.value
    return out


# ---------------------------------------------------------------------------- metadata files


@pytest.fixture(scope="module")
def tiny_meta(tmp_path_factory) -> dict[bool, Path]:
    return {d: write_tiny_metadata(tmp_path_factory.mktemp(f"meta_{d}"), distil=d) for d in (False, True)}


def test_metadata_files_are_deterministic(tiny_meta, tmp_path):
    for distil, first in tiny_meta.items():
        again = write_tiny_metadata(tmp_path / str(distil), distil=distil)
        assert sorted(_files(first)) == sorted(METADATA_FILES)
        assert _files(first) == _files(again)


@pytest.mark.parametrize("distil", [False, True])
def test_config_parses_and_matches_golden_fields(tiny_meta, golden_tiny, distil):
    folder = tiny_meta[distil]
    cfg = HunyuanImage3Config.from_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    golden = json.loads((golden_tiny / "checkpoint" / "config.json").read_text())
    assert set(golden) <= set(raw), set(golden) - set(raw)
    for sub in ("vae", "vit", "vit_aligner", "vit_processor"):
        assert set(golden[sub]) <= set(raw[sub]), (sub, set(golden[sub]) - set(raw[sub]))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (64, 2, 16)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts) == (4, 2, 4)
    assert cfg.moe_topk == (2, 2) and cfg.num_shared_expert == (1, 1)
    assert cfg.moe_intermediate_size == (32, 32)
    assert isinstance(raw["moe_topk"], list) and isinstance(raw["num_shared_expert"], list)
    assert isinstance(raw["moe_intermediate_size"], list)
    assert cfg.cond_token_attn_type == "joint_full"
    assert cfg.image_base_size == 256 and cfg.latent_channels == 16 and cfg.max_position_embeddings == 8192
    assert cfg.vae["block_out_channels"] == [32] * 5 and cfg.vae["layers_per_block"] == 1
    assert cfg.vit["hidden_size"] == 32 and cfg.vit_processor["max_num_patches"] == 64
    assert (cfg.vit_aligner["input_dim"], cfg.vit_aligner["n_embed"]) == (32, 64)
    assert cfg.cfg_distilled is distil and cfg.use_meanflow is distil

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert cfg.vocab_size >= tok.get_vocab_size()
    assert cfg.bos_token_id == tok.token_to_id("<|startoftext|>")
    assert cfg.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert cfg.pad_token_id == tok.token_to_id("<pad>")
    assert cfg.image_token_id == tok.token_to_id("<img>")


@pytest.mark.parametrize("distil", [False, True])
def test_generation_config(tiny_meta, distil):
    gen = GenerationDefaults.from_pretrained(tiny_meta[distil])
    assert gen.diff_infer_steps == (8 if distil else 4)
    assert gen.diff_guidance_scale == 2.5 and gen.flow_shift == 3.0
    assert (gen.bot_task, gen.use_system_prompt) == ("think_recaption", "en_unified")
    assert gen.sequence_template == "instruct"
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k) == (True, 0.6, 0.95, 1024)
    assert gen.max_new_tokens == 2048


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_every_special_token_and_roundtrips(tiny_meta):
    folder = tiny_meta[False]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == TOKENIZER_REAL_VOCAB + len(ADDED_SPECIAL_TOKENS)
    for i, name in enumerate(BASE_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    for i, name in enumerate(ADDED_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == TOKENIZER_REAL_VOCAB + i
    for name in ("<timestep_r>", "<guidance>", "<joint_img_sep>", "<img_size_1024>", "<img_ratio_36>"):
        assert name in ADDED_SPECIAL_TOKENS

    text = "User: a small house by the lake\n\nAssistant: "
    enc = tok.encode(text)
    assert enc.ids[0] != tok.token_to_id("<|startoftext|>")  # no post-processor: BOS is added by our code
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    tail = "<answer><boi><img_size_256><img_ratio_16><timestep><guidance><timestep_r><img><img><eoi></answer>"
    ids = tok.encode(tail).ids
    assert ids == [tok.token_to_id(t) for t in ("<answer>", "<boi>", "<img_size_256>", "<img_ratio_16>",
                                                "<timestep>", "<guidance>", "<timestep_r>", "<img>", "<img>",
                                                "<eoi>", "</answer>")]
    assert tok.decode(ids, skip_special_tokens=False) == tail
    # the BPE learned merges (not just bytes)
    assert len(tok.encode("the image").ids) < len("the image")

    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    smap = json.loads((folder / "special_tokens_map.json").read_text())
    assert tcfg["tokenizer_class"] == "HunyuanImage3TokenizerFast"
    assert smap["additional_special_tokens"] == list(ADDED_SPECIAL_TOKENS)
    assert tcfg["additional_special_tokens"] == list(ADDED_SPECIAL_TOKENS)
    assert (smap["bos_token"], smap["eos_token"]) == ("<|startoftext|>", "<|endoftext|>")
    assert smap["pad_token"] == "<pad>"


def test_tokenizer_build_is_stable():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.to_str() == b.to_str()


# ---------------------------------------------------------------------------- system prompts


def test_system_prompt_file_is_read_by_ast_only(tiny_meta):
    path = tiny_meta[False] / "system_prompt.py"
    consts = _string_constants(path)
    for key, name in SYSTEM_PROMPT_NAMES.items():
        assert name in consts, key
        assert 20 < len(consts[name].strip()) < 400
    # the official dynamic mode strips newlines from the vanilla prompt: ours has them to strip, like theirs
    assert consts["t2i_system_prompt_en_vanilla"].startswith("\n")
    loaded = [Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    assert path.resolve() not in loaded


# ---------------------------------------------------------------------------- shard writer


def _stand_in_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "model.wte.weight": torch.randn(64, 32, generator=g),
        "model.layers.0.self_attn.qkv_proj.weight": torch.randn(48, 32, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(32, generator=g),
        "lm_head.weight": torch.randn(64, 32, generator=g),
        "patch_embed.model.0.bias": torch.randn(32, generator=g).to(torch.bfloat16),
        "vision_model.embeddings.position_embedding.weight": torch.randn(16, 8, generator=g),
    }


def test_shard_writer_index_and_naming(tmp_path):
    state = _stand_in_state()
    index = save_sharded_safetensors(state, tmp_path, max_shard_bytes=10_000)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(files)
    assert n >= 2
    assert files == [shard_file_name(i, n) for i in range(1, n + 1)]
    assert files[0] == f"model-00001-of-{n:05d}.safetensors"
    on_disk = json.loads((tmp_path / INDEX_FILE).read_text())
    assert on_disk == index
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(tmp_path / f))
        assert all(index["weight_map"][k] == f for k in part)
        loaded.update(part)
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    with safe_open(str(tmp_path / files[0]), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_shard_writer_is_byte_deterministic_and_handles_edge_cases(tmp_path):
    state = _stand_in_state()
    save_sharded_safetensors(state, tmp_path / "a", max_shard_bytes=10_000)
    save_sharded_safetensors(dict(state), tmp_path / "b", max_shard_bytes=10_000)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # a tensor larger than the limit gets its own shard; aliased tensors are still saved
    w = torch.randn(8, 8)
    idx = save_sharded_safetensors({"a": w, "b": w, "c": w[0]}, tmp_path / "c", max_shard_bytes=1)
    assert len(set(idx["weight_map"].values())) == 3
    assert torch.equal(load_file(str(tmp_path / "c" / idx["weight_map"]["c"]))["c"], w[0])
    with pytest.raises(ValueError):
        save_sharded_safetensors({}, tmp_path / "d", max_shard_bytes=10)


def test_shard_writer_removes_stale_shards_only(tmp_path):
    state = _stand_in_state()
    save_sharded_safetensors(state, tmp_path, max_shard_bytes=1)  # one shard per tensor
    (tmp_path / "notes.txt").write_text("keep me")
    index = save_sharded_safetensors(state, tmp_path, max_shard_bytes=10**9)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [shard_file_name(1, 1)]
    assert set(index["weight_map"].values()) == {shard_file_name(1, 1)}
    assert (tmp_path / "notes.txt").exists()


# ---------------------------------------------------------------------------- weight scheme


def test_draw_parameters_scheme_and_determinism():
    shapes = {
        "model.wte.weight": (16, 8),
        "b.conv.weight": (4, 2, 3, 3),
        "b.conv.bias": (4,),
        "a.norm.weight": (8,),
    }
    named = [(k, torch.empty(s)) for k, s in shapes.items()]
    first = dict(draw_parameters(named, seed=3, pad_token_id=2))
    again = dict(draw_parameters(list(reversed(named)), seed=3, pad_token_id=2))
    assert list(first) == sorted(shapes)  # drawn in sorted-name order whatever the input order
    assert all(torch.equal(first[k], again[k]) for k in shapes)
    assert not torch.equal(first["b.conv.weight"], dict(draw_parameters(named, seed=4))["b.conv.weight"])
    assert torch.count_nonzero(first["model.wte.weight"][2]) == 0
    assert torch.count_nonzero(first["model.wte.weight"][1]) == 8
    assert (first["a.norm.weight"] - 1).abs().max() < 1.0
    assert first["b.conv.bias"].abs().max() < 0.5
    # stream check: the first tensor in sorted order is N(0,1) of its shape, scaled
    ref = torch.randn(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first["a.norm.weight"], 1.0 + 0.1 * ref)


# ------------------------------------------------------------------------ full checkpoint (needs the model)


def _model_available() -> bool:
    pkg = "diffgentor.engine.models.hunyuan_image_3"
    names = (f"{pkg}.model", f"{pkg}.weights")
    return all(importlib.util.find_spec(n) is not None for n in names)


@pytest.mark.skipif(not _model_available(), reason="model class / qkv converter not written yet")
@pytest.mark.parametrize("distil", [False, True])
def test_make_tiny_full_checkpoint(tmp_path, distil):
    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM

    rng_before = torch.random.get_rng_state()
    a = make_tiny(tmp_path / "a", distil=distil, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone
    b = make_tiny(tmp_path / "b", distil=distil, seed=0)
    assert _files(a) == _files(b)
    c = make_tiny(tmp_path / "c", distil=distil, seed=1)
    assert _files(c)["config.json"] == _files(a)["config.json"]

    index = json.loads((a / INDEX_FILE).read_text())
    shards = sorted(p.name for p in a.glob("model-*.safetensors"))
    assert len(shards) >= 2 and shards == [shard_file_name(i, len(shards)) for i in range(1, len(shards) + 1)]
    cfg = HunyuanImage3Config.from_pretrained(a)
    with torch.random.fork_rng(devices=[]):
        model = HunyuanImage3ForCausalMM(cfg)
    keys = set(model.state_dict())
    assert set(index["weight_map"]) == keys
    loaded: dict[str, torch.Tensor] = {}
    for f in shards:
        loaded.update(load_file(str(a / f)))
    assert set(loaded) == keys
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    assert all(t.dtype == torch.float32 for t in loaded.values() if t.is_floating_point())
    pad = Tokenizer.from_file(str(a / "tokenizer.json")).token_to_id("<pad>")
    assert torch.count_nonzero(loaded["model.wte.weight"][pad]) == 0
    assert loaded["model.wte.weight"].shape[0] == cfg.vocab_size
    # every parameter holds the documented draw (qkv only re-ordered into the official layout)
    for name, value in draw_parameters(model.named_parameters(), seed=0, pad_token_id=pad):
        if name.endswith(".self_attn.qkv_proj.weight"):
            same_values = torch.equal(loaded[name].flatten().sort().values, value.flatten().sort().values)
            assert same_values and loaded[name].shape == value.shape, name
        else:
            assert torch.equal(loaded[name], value), name
    assert ("guidance_emb.mlp.0.weight" in keys) is distil
    assert ("timestep_r_emb.mlp.0.weight" in keys) is distil
    assert any(k.endswith("self_attn.qkv_proj.weight") for k in keys)
