"""An unset variable never overrides the checkpoint's own generation_config.json; an explicit one does.

`EngineConfig.request_defaults()` feeds the per-request resolution (`input_processor.resolve_params`: request field,
then these defaults, then the checkpoint's `GenerationDefaults`), so a key it leaves out falls to the checkpoint."""

from __future__ import annotations

import json

from diffgentor.engine.config import EngineConfig, HunyuanImage3Env
from diffgentor.engine.input_processor import load_processor_context, process_request
from diffgentor.engine.request import GenerationRequest
from diffgentor.engine.request_state import state_from_processed
from diffgentor.engine.testing.tiny_model import make_tiny

P = "DG_HUNYUAN_IMAGE_3_"


def _checkpoint(tmp_path, generation_config: dict) -> str:
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return str(tmp_path)


def test_unset_variables_leave_the_checkpoint_values(tmp_path):
    model = _checkpoint(tmp_path, {"use_system_prompt": "None", "bot_task": "image"})
    d = EngineConfig.from_cli_and_env({"model": model}, environ={}).request_defaults()
    assert "use_system_prompt" not in d and "bot_task" not in d  # the checkpoint's values apply
    assert d["max_new_tokens"] == 2048  # the checkpoint says nothing: the contract's default
    assert d["infer_align_image_size"] is True and d["use_taylor_cache"] is False


def test_explicit_variables_and_flags_win_over_the_checkpoint(tmp_path):
    model = _checkpoint(tmp_path, {"use_system_prompt": "None", "bot_task": "image", "max_new_tokens": 99})
    env = {P + "USE_SYSTEM_PROMPT": "en_unified", P + "MAX_NEW_TOKENS": "2048"}  # equal to the defaults: still set
    d = EngineConfig.from_cli_and_env({"model": model, "bot_task": "recaption"}, environ=env).request_defaults()
    assert d["use_system_prompt"] == "en_unified" and d["max_new_tokens"] == 2048 and d["bot_task"] == "recaption"


def test_values_given_in_code_count_as_explicit(tmp_path):
    model = _checkpoint(tmp_path, {"bot_task": "image"})
    assert EngineConfig(model=model, env=HunyuanImage3Env(bot_task="think")).request_defaults()["bot_task"] == "think"
    assert "bot_task" not in EngineConfig(model=model).request_defaults()


def test_no_checkpoint_file_means_every_default(tmp_path):
    d = EngineConfig(model=str(tmp_path)).request_defaults()
    assert d["bot_task"] == "think_recaption" and d["use_system_prompt"] == "en_unified"


def test_seed_flag_is_the_default_seed_of_seedless_requests(tmp_path):
    """`--seed` (EngineConfig.seed) seeds every request that gives none; a request's own seed wins; unset, the
    offline default stays 42 (the served API draws a random one per request instead)."""
    ckpt = make_tiny(tmp_path / "tiny")

    def seed_of(config: EngineConfig, **fields) -> int:
        ctx = load_processor_context(ckpt, config.request_defaults())
        req = GenerationRequest(request_id="r", prompt="a cube", bot_task="image", **fields)
        return state_from_processed(ctx, process_request(ctx, req)).seed

    seeded = EngineConfig.from_cli_and_env({"model": str(ckpt), "seed": 7}, environ={})
    assert seed_of(seeded) == 7 and seed_of(seeded, seed=3) == 3
    assert seed_of(EngineConfig(model=str(ckpt))) == 42
