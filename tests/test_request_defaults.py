"""Request defaults: resolved once per engine by `resolve_request_defaults` (engine/request_defaults.py) from the
engine config and the checkpoint's generation_config.json, which has one reader (`GenerationDefaults`). An unset
variable never overrides the checkpoint's value; an explicit one does. Input processing, the engine's request state,
the HTTP API and the batch CLI all read the one result."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from diffgentor.engine.config import EngineConfig, HunyuanImage3Env, ModelConfig
from diffgentor.engine.input_processor import load_processor_context, process_request
from diffgentor.engine.models.hunyuan_image_3.config import GenerationDefaults
from diffgentor.engine.request import GenerationRequest
from diffgentor.engine.request_defaults import resolve_request_defaults
from diffgentor.engine.request_state import state_from_processed
from diffgentor.engine.testing.tiny_model import make_tiny

P = "DG_HUNYUAN_IMAGE_3_"
REPO = Path(__file__).resolve().parents[1]


def _checkpoint(tmp_path, generation_config: dict) -> str:
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return str(tmp_path)


def _defaults(config: EngineConfig):
    return resolve_request_defaults(GenerationDefaults.from_pretrained(config.model.checkpoint), config)


def test_unset_variables_leave_the_checkpoint_values(tmp_path):
    model = _checkpoint(tmp_path, {"use_system_prompt": "None", "bot_task": "image", "diff_infer_steps": 7})
    d = _defaults(EngineConfig.from_cli_and_env({"model": model}, environ={}))
    assert d.use_system_prompt == "None" and d.bot_task == "image"  # the checkpoint's values apply
    assert d.max_new_tokens == 2048  # the checkpoint says nothing: the documented default
    assert d.infer_align_image_size is True and d.use_taylor_cache is False
    assert d.num_inference_steps == 7 and d.seed is None


def test_explicit_variables_and_flags_win_over_the_checkpoint(tmp_path):
    model = _checkpoint(tmp_path, {"use_system_prompt": "None", "bot_task": "image", "max_new_tokens": 99,
                                   "diff_infer_steps": 7, "diff_guidance_scale": 5.0})
    env = {P + "USE_SYSTEM_PROMPT": "en_unified", P + "MAX_NEW_TOKENS": "2048"}  # equal to the defaults: still set
    config = EngineConfig.from_cli_and_env({"model": model, "bot_task": "recaption", "num_inference_steps": 3,
                                            "guidance_scale": 1.5, "seed": 11}, environ=env)
    d = _defaults(config)
    assert d.use_system_prompt == "en_unified" and d.max_new_tokens == 2048 and d.bot_task == "recaption"
    assert d.num_inference_steps == 3 and d.guidance_scale == 1.5 and d.seed == 11


def test_values_given_in_code_count_as_explicit(tmp_path):
    model = _checkpoint(tmp_path, {"bot_task": "image"})
    think = EngineConfig(model=ModelConfig(checkpoint=model), env=HunyuanImage3Env(bot_task="think"))
    assert _defaults(think).bot_task == "think"
    assert _defaults(EngineConfig(model=ModelConfig(checkpoint=model))).bot_task == "image"


def test_no_checkpoint_file_means_every_default(tmp_path):
    d = _defaults(EngineConfig(model=ModelConfig(checkpoint=str(tmp_path))))
    assert d.bot_task == "think_recaption" and d.use_system_prompt == "en_unified"
    assert d.num_inference_steps == 50 and d.guidance_scale == 2.5


def test_env_variables_reach_the_defaults(tmp_path):
    env = {P + "BOT_TASK": "image", P + "USE_SYSTEM_PROMPT": "None", P + "INFER_ALIGN_IMAGE_SIZE": "0",
           P + "MAX_NEW_TOKENS": "64", P + "USE_TAYLOR_CACHE": "1"}
    d = _defaults(EngineConfig.from_cli_and_env({"model": str(tmp_path)}, environ=env))
    assert (d.bot_task, d.use_system_prompt, d.infer_align_image_size, d.max_new_tokens, d.use_taylor_cache) == (
        "image", "None", False, 64, True)


def test_generation_config_has_one_reader():
    """Only the model package's `GenerationDefaults` opens generation_config.json (engine/config.py read it too)."""
    readers = []
    for sub in ("engine", "server", "kernels", "bench"):
        for path in sorted((REPO / sub).rglob("*.py")):
            if "testing" in path.parts:  # the tiny checkpoints write the file
                continue
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.Constant) and n.value == "generation_config.json" for n in ast.walk(tree)):
                readers.append(str(path.relative_to(REPO)))
    assert readers == ["engine/models/hunyuan_image_3/config.py"], readers


def test_batch_flags_are_the_engine_config_and_reach_each_request(tmp_path):
    """`diffgentor edit`'s --num_inference_steps, --guidance_scale and --seed set the same EngineConfig fields as
    `serve`'s flags, and a request that leaves them unset gets them through the request defaults."""
    from diffgentor.server.batch.rows import engine_config
    from diffgentor.server.cli import build_parser

    ckpt = make_tiny(tmp_path / "tiny")
    args = build_parser().parse_args(["edit", "--model_name", str(ckpt), "--input", "x.csv", "--output_dir",
                                      str(tmp_path / "out"), "--num_inference_steps", "3", "--guidance_scale",
                                      "4.5", "--seed", "9"])
    config = engine_config(args, environ={})
    m = config.model
    assert (m.default_num_inference_steps, m.default_guidance_scale, m.seed) == (3, 4.5, 9)
    ctx = load_processor_context(ckpt, config)
    st = state_from_processed(ctx, process_request(ctx, GenerationRequest(request_id="r", prompt="a cube",
                                                                          bot_task="image")))
    assert (st.num_steps, st.seed) == (3, 9)
    assert st.guidance_scale == 4.5


def test_seed_flag_is_the_default_seed_of_seedless_requests(tmp_path):
    """`--seed` (ModelConfig.seed) seeds every request that gives none; a request's own seed wins; unset, the
    offline default stays 42 (the served API draws a random one per request instead)."""
    ckpt = make_tiny(tmp_path / "tiny")

    def seed_of(config: EngineConfig, **fields) -> int:
        ctx = load_processor_context(ckpt, config)
        req = GenerationRequest(request_id="r", prompt="a cube", bot_task="image", **fields)
        return state_from_processed(ctx, process_request(ctx, req)).seed

    seeded = EngineConfig.from_cli_and_env({"model": str(ckpt), "seed": 7}, environ={})
    assert seed_of(seeded) == 7 and seed_of(seeded, seed=3) == 3
    assert seed_of(EngineConfig(model=ModelConfig(checkpoint=str(ckpt)))) == 42
