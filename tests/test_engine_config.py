"""EngineConfig / HunyuanImage3Env: the DG_HUNYUAN_IMAGE_3_* contract, flags over env, sizes, KV sizing, validation."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from diffgentor.engine.config import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    CacheConfig,
    EngineConfig,
    EnvVarError,
    HunyuanImage3Env,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    add_engine_args,
    parse_bool,
    parse_size,
)

P = "DG_HUNYUAN_IMAGE_3_"
GiB = 1 << 30
MiB = 1 << 20

BOOL_VARS = ("MOE_DROP_TOKENS", "INFER_ALIGN_IMAGE_SIZE", "USE_TAYLOR_CACHE")
TRUE_SPELLINGS = ("true", "1", "yes", "on", "TRUE", "True", "Yes", "ON", " on ")
FALSE_SPELLINGS = ("false", "0", "no", "off", "FALSE", "Off", "NO", " 0\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p


# ------------------------------------------------------------------------------------------------ env defaults
def test_env_defaults_match_contract():
    e = HunyuanImage3Env.from_environ({})
    assert e.gpus_per_model == 0
    assert e.attn_impl == "sdpa"
    assert e.moe_impl == "eager"
    assert e.moe_drop_tokens is True
    assert e.use_system_prompt == "en_unified"
    assert e.bot_task == "think_recaption"
    assert e.infer_align_image_size is True
    assert e.max_new_tokens == 2048
    assert e.use_taylor_cache is False
    assert e == HunyuanImage3Env()


def test_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv(P + "BOT_TASK", "image")
    monkeypatch.setenv(P + "MAX_NEW_TOKENS", "77")
    e = HunyuanImage3Env.from_environ()
    assert e.bot_task == "image" and e.max_new_tokens == 77


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_empty_value_is_unset(value):
    env = {P + name: value for name in ("GPUS_PER_MODEL", "BOT_TASK", "MAX_NEW_TOKENS", *BOOL_VARS)}
    assert HunyuanImage3Env.from_environ(env) == HunyuanImage3Env()


def test_every_variable_read():
    env = {
        P + "GPUS_PER_MODEL": "4",
        P + "ATTN_IMPL": "flashinfer",
        P + "MOE_IMPL": "flashinfer",
        P + "MOE_DROP_TOKENS": "false",
        P + "USE_SYSTEM_PROMPT": "en_think_recaption",
        P + "BOT_TASK": "recaption",
        P + "INFER_ALIGN_IMAGE_SIZE": "off",
        P + "MAX_NEW_TOKENS": " 512 ",
        P + "USE_TAYLOR_CACHE": "yes",
    }
    e = HunyuanImage3Env.from_environ(env)
    assert e == HunyuanImage3Env(
        gpus_per_model=4,
        attn_impl="flashinfer",
        moe_impl="flashinfer",
        moe_drop_tokens=False,
        use_system_prompt="en_think_recaption",
        bot_task="recaption",
        infer_align_image_size=False,
        max_new_tokens=512,
        use_taylor_cache=True,
    )


# ------------------------------------------------------------------------------------------------ booleans
@pytest.mark.parametrize("var", BOOL_VARS)
@pytest.mark.parametrize("spelling", TRUE_SPELLINGS)
def test_bool_true_spellings(var, spelling):
    e = HunyuanImage3Env.from_environ({P + var: spelling})
    assert getattr(e, var.lower()) is True


@pytest.mark.parametrize("var", BOOL_VARS)
@pytest.mark.parametrize("spelling", FALSE_SPELLINGS)
def test_bool_false_spellings(var, spelling):
    e = HunyuanImage3Env.from_environ({P + var: spelling})
    assert getattr(e, var.lower()) is False


@pytest.mark.parametrize("var", BOOL_VARS)
@pytest.mark.parametrize("bad", ["maybe", "2", "y", "t", "enable", "-1"])
def test_bool_invalid_names_variable_and_allowed(var, bad):
    with pytest.raises(EnvVarError) as ei:
        HunyuanImage3Env.from_environ({P + var: bad})
    msg = str(ei.value)
    assert P + var in msg and repr(bad) in msg
    for s in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        assert s in msg
    assert isinstance(ei.value, ValueError)
    assert ei.value.name == P + var and ei.value.value == bad


def test_parse_bool_helper():
    assert parse_bool("On") is True and parse_bool("nO") is False
    with pytest.raises(ValueError):
        parse_bool("")


# ------------------------------------------------------------------------------------------------ enums and ints
def test_bot_task_error_message_exact():
    with pytest.raises(EnvVarError) as ei:
        HunyuanImage3Env.from_environ({P + "BOT_TASK": "foo"})
    assert (
        str(ei.value)
        == "DG_HUNYUAN_IMAGE_3_BOT_TASK='foo' is invalid; allowed: image, auto, recaption, think_recaption, think"
    )


@pytest.mark.parametrize(
    "var,bad,allowed",
    [
        ("ATTN_IMPL", "flash_attention_2", "sdpa, flashinfer"),
        ("MOE_IMPL", "triton", "eager, flashinfer"),
        (
            "USE_SYSTEM_PROMPT",
            "en_bogus",
            "None, dynamic, en_vanilla, en_recaption, en_think_recaption, en_unified, custom",
        ),
        ("BOT_TASK", "draw", "image, auto, recaption, think_recaption, think"),
        ("GPUS_PER_MODEL", "-1", "an integer >= 0"),
        ("GPUS_PER_MODEL", "abc", "an integer >= 0"),
        ("GPUS_PER_MODEL", "1.5", "an integer >= 0"),
        ("MAX_NEW_TOKENS", "0", "an integer >= 1"),
        ("MAX_NEW_TOKENS", "-5", "an integer >= 1"),
        ("MAX_NEW_TOKENS", "abc", "an integer >= 1"),
        ("MAX_NEW_TOKENS", "1e3", "an integer >= 1"),
    ],
)
def test_invalid_values(var, bad, allowed):
    with pytest.raises(EnvVarError) as ei:
        HunyuanImage3Env.from_environ({P + var: bad})
    assert str(ei.value) == f"{P}{var}={bad!r} is invalid; allowed: {allowed}"


@pytest.mark.parametrize("kind", ["None", "dynamic", "en_vanilla", "en_recaption", "en_think_recaption", "custom"])
def test_every_system_prompt_kind(kind):
    assert HunyuanImage3Env.from_environ({P + "USE_SYSTEM_PROMPT": kind}).use_system_prompt == kind


@pytest.mark.parametrize("task", ["image", "auto", "recaption", "think_recaption"])
def test_every_bot_task(task):
    assert HunyuanImage3Env.from_environ({P + "BOT_TASK": task}).bot_task == task


def test_enums_case_insensitive_and_canonical():
    e = HunyuanImage3Env.from_environ(
        {P + "USE_SYSTEM_PROMPT": "none", P + "BOT_TASK": " IMAGE ", P + "MOE_IMPL": "FlashInfer"}
    )
    assert e.use_system_prompt == "None" and e.bot_task == "image" and e.moe_impl == "flashinfer"


def test_unknown_variable_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="diffgentor.engine.config"):
        HunyuanImage3Env.from_environ({P + "BOT_TSAK": "image"})
    assert "DG_HUNYUAN_IMAGE_3_BOT_TSAK" in caplog.text


def test_env_direct_construction_validated():
    with pytest.raises(ValueError, match="bot_task"):
        HunyuanImage3Env(bot_task="foo")
    with pytest.raises(ValueError, match="max_new_tokens"):
        HunyuanImage3Env(max_new_tokens=0)
    with pytest.raises(ValueError, match="gpus_per_model"):
        HunyuanImage3Env(gpus_per_model=-1)
    with pytest.raises(ValueError, match="use_taylor_cache"):
        HunyuanImage3Env(use_taylor_cache="yes")


def test_env_is_frozen():
    e = HunyuanImage3Env()
    with pytest.raises(AttributeError):
        e.bot_task = "image"


# ------------------------------------------------------------------------------------------------ EngineConfig
def test_engine_defaults():
    c = EngineConfig.from_cli_and_env(parser().parse_args([]), environ={})
    assert c.model.checkpoint is None
    assert c.model.dtype == "auto" and c.model.device == "auto"
    assert c.scheduler.max_num_seqs == 16 and c.scheduler.max_num_batched_tokens == 8192 and c.cache.block_size == 16
    assert c.cache.num_kv_blocks is None and c.cache.kv_cache_memory_bytes is None
    assert c.cache.enable_prefix_caching is True and c.scheduler.max_waiting_requests == 1024
    assert c.scheduler == SchedulerConfig()  # the scheduler's settings live in one place
    assert c.model.seed is None and c.model.default_num_inference_steps is None
    assert c.model.attn_impl == "sdpa" and c.model.moe_impl == "eager" and c.parallel.tensor_parallel_size == 0
    assert c.env == HunyuanImage3Env()
    assert c == EngineConfig()


def test_impls_and_tp_come_from_env():
    env = {P + "ATTN_IMPL": "flashinfer", P + "MOE_IMPL": "flashinfer", P + "GPUS_PER_MODEL": "4"}
    c = EngineConfig.from_cli_and_env({}, environ=env)
    assert (c.model.attn_impl, c.model.moe_impl, c.parallel.tensor_parallel_size) == ("flashinfer", "flashinfer", 4)


def test_flags_override_env():
    env = {P + "ATTN_IMPL": "flashinfer", P + "MOE_IMPL": "flashinfer", P + "GPUS_PER_MODEL": "4"}
    args = parser().parse_args(["--attn-impl", "sdpa", "--moe-impl", "eager", "--tensor-parallel-size", "2"])
    c = EngineConfig.from_cli_and_env(args, environ=env)
    assert (c.model.attn_impl, c.model.moe_impl, c.parallel.tensor_parallel_size) == ("sdpa", "eager", 2)
    assert c.env.attn_impl == "flashinfer" and c.env.gpus_per_model == 4  # the env block keeps what env said


def test_request_field_keys_override_env():
    env = {P + "BOT_TASK": "image", P + "MAX_NEW_TOKENS": "100"}
    c = EngineConfig.from_cli_and_env({"bot_task": "auto", "max_new_tokens": "300", "use_taylor_cache": "on"}, env)
    assert c.env.bot_task == "auto" and c.env.max_new_tokens == 300 and c.env.use_taylor_cache is True
    with pytest.raises(ValueError, match="bot_task='nope' is invalid; allowed: image, auto"):
        EngineConfig.from_cli_and_env({"bot_task": "nope"}, {})


def test_all_flags_parsed():
    argv = [
        "--dtype", "bf16", "--device", "cuda:1", "--max-num-seqs", "8", "--max-num-batched-tokens", "4096",
        "--block-size", "32", "--num-kv-blocks", "100", "--kv-cache-memory", "512MiB",
        "--no-prefix-caching", "--max-waiting-requests", "10",
    ]  # fmt: skip
    args = parser().parse_args(argv)
    args.model_name = "/models/HunyuanImage-3-Instruct-Distil"
    args.seed = 7
    args.num_inference_steps = 8
    c = EngineConfig.from_cli_and_env(args, environ={})
    assert c.model.checkpoint == "/models/HunyuanImage-3-Instruct-Distil"
    assert c.model.dtype == "bfloat16" and c.model.device == "cuda:1"
    assert (c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens, c.cache.block_size) == (8, 4096, 32)
    assert c.cache.num_kv_blocks == 100 and c.cache.kv_cache_memory_bytes == 512 * MiB
    assert c.cache.enable_prefix_caching is False and c.scheduler.max_waiting_requests == 10
    assert c.model.seed == 7 and c.model.default_num_inference_steps == 8


def test_torch_dtype_alias_flag():
    assert parser().parse_args(["--torch_dtype", "bfloat16"]).dtype == "bfloat16"


def test_flag_choices_rejected(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--attn-impl", "flash"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--kv-cache-memory", "lots"])
    assert "invalid size 'lots'" in capsys.readouterr().err


def test_mapping_args_and_none_means_unset():
    c = EngineConfig.from_cli_and_env({"max_num_seqs": None, "block_size": 8, "kv_cache_memory": "1GiB"}, {})
    assert c.scheduler.max_num_seqs == 16 and c.cache.block_size == 8 and c.cache.kv_cache_memory_bytes == GiB


def test_invalid_env_surfaces_from_engine_config():
    with pytest.raises(EnvVarError, match="DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL='-2'"):
        EngineConfig.from_cli_and_env({}, environ={P + "GPUS_PER_MODEL": "-2"})


# ------------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize(
    "text,expected",
    [
        ("1073741824", GiB),
        (" 4096 ", 4096),
        (123, 123),
        ("2GiB", 2 * GiB),
        ("2gib", 2 * GiB),
        ("2 GiB", 2 * GiB),
        ("512MiB", 512 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("2G", 2 * GiB),
        ("64K", 64 << 10),
        ("1TiB", 1 << 40),
        ("4GB", 4 * 10**9),
        ("10MB", 10**7),
        ("100B", 100),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "2XB", "-1GiB", "1.5", "GiB", "1 2GiB", -1, True])
def test_parse_size_invalid(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


# ------------------------------------------------------------------------------------------------ KV sizing
def test_resolve_num_blocks_explicit_wins():
    c = EngineConfig(cache=CacheConfig(num_kv_blocks=77, kv_cache_memory_bytes=GiB))
    assert c.resolve_num_blocks(1024, cuda_available=True) == 77


def test_resolve_num_blocks_budget():
    c = EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=GiB))
    assert c.resolve_num_blocks(MiB, cuda_available=True) == 1024
    assert c.resolve_num_blocks(3 * MiB) == 341  # floor


def test_resolve_num_blocks_on_cuda_needs_a_size():
    """On CUDA the memory plan sizes the KV cache (under --gpu-memory-utilization); without it a size is needed."""
    with pytest.raises(ValueError, match="memory plan sizes the KV cache"):
        EngineConfig(model=ModelConfig(device="cuda:0")).resolve_num_blocks(MiB)
    with pytest.raises(ValueError, match="memory plan"):
        EngineConfig(model=ModelConfig(device="auto")).resolve_num_blocks(MiB, cuda_available=True)


def test_resolve_num_blocks_cpu_default():
    c = EngineConfig(model=ModelConfig(device="cpu"))
    assert c.resolve_num_blocks(MiB) == DEFAULT_CPU_KV_CACHE_BYTES // MiB == 2048
    assert EngineConfig().resolve_num_blocks(MiB, cuda_available=False) == 2048


def test_kv_cache_memory_fraction_is_gone():
    """The flag sized nothing (CUDA: the memory plan; CPU: --kv-cache-memory or 2 GiB): it is refused, not ignored."""
    with pytest.raises(SystemExit):
        parser().parse_args(["--kv-cache-memory-fraction", "0.5"])
    assert not hasattr(EngineConfig(), "kv_cache_memory_fraction")


def test_resolve_num_blocks_errors():
    c = EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=1000))
    with pytest.raises(ValueError, match="holds no block"):
        c.resolve_num_blocks(4096)
    with pytest.raises(ValueError, match="bytes_per_block"):
        c.resolve_num_blocks(0)


# ------------------------------------------------------------------------------------------------ device/dtype/tp
def test_resolve_device_and_dtype():
    c = EngineConfig()
    m = c.model
    assert m.resolve_device(cuda_available=True) == "cuda" and m.resolve_dtype(cuda_available=True) == "bfloat16"
    assert m.resolve_device(cuda_available=False) == "cpu" and m.resolve_dtype(cuda_available=False) == "float32"
    c = EngineConfig(model=ModelConfig(device="cuda:3", dtype="float16"))
    assert c.model.resolve_device() == "cuda:3" and c.model.resolve_dtype() == "float16"
    assert EngineConfig(model=ModelConfig(device="cpu")).model.resolve_dtype() == "float32"
    assert EngineConfig(model=ModelConfig(device="cuda")).model.resolve_dtype() == "bfloat16"
    import torch

    assert EngineConfig(model=ModelConfig(device="cpu")).model.torch_dtype() is torch.float32
    assert EngineConfig(model=ModelConfig(dtype="half")).model.torch_dtype() is torch.float16


def test_tensor_parallel_resolution():
    assert EngineConfig(model=ModelConfig(device="cuda")).resolve_tensor_parallel_size(8) == 8  # 0 = all visible
    c = EngineConfig(env=HunyuanImage3Env(gpus_per_model=4), model=ModelConfig(device="cuda"))
    assert c.parallel.tensor_parallel_size == 4
    assert c.resolve_tensor_parallel_size(8) == 4 and c.num_instances(8) == 2
    tp2 = EngineConfig(model=ModelConfig(device="cuda"), parallel=ParallelConfig(tensor_parallel_size=2))
    assert tp2.num_instances(8) == 4
    assert EngineConfig(model=ModelConfig(device="cuda")).num_instances(8) == 1
    with pytest.raises(ValueError, match="only 2 device"):
        c.resolve_tensor_parallel_size(2)
    assert EngineConfig(model=ModelConfig(device="cpu")).resolve_tensor_parallel_size() == 1


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
        ({"max_num_seqs": -3}, "max_num_seqs"),
        ({"max_num_seqs": 2.0}, "max_num_seqs"),
        ({"max_num_seqs": True}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"block_size": 0}, "block_size must be a positive"),
        ({"block_size": 24}, "block_size must be a power of two"),
        ({"block_size": 64, "max_num_batched_tokens": 32}, r"max_num_batched_tokens \(32\) must be >= block_size"),
        ({"max_num_seqs": 64, "max_num_batched_tokens": 32}, r"must be >= max_num_seqs"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"),
        ({"max_waiting_requests": 0}, "max_waiting_requests"),
        ({"seed": -1}, "seed"),
        ({"default_num_inference_steps": 0}, "default_num_inference_steps"),
        ({"dtype": "int8"}, "dtype='int8' is invalid; allowed: float32, bfloat16, float16, auto"),
        ({"device": "tpu"}, "device='tpu' is invalid"),
        ({"device": "cuda:x"}, "device='cuda:x' is invalid"),
        ({"attn_impl": "flash"}, "attn_impl='flash' is invalid; allowed: sdpa, flashinfer"),
        ({"moe_impl": "fused"}, "moe_impl='fused' is invalid; allowed: eager, flashinfer"),
        ({"tensor_parallel_size": -1}, "tensor_parallel_size"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_cli_and_env(kwargs, environ={})


def test_validation_via_flags():
    with pytest.raises(ValueError, match="power of two"):
        EngineConfig.from_cli_and_env(parser().parse_args(["--block-size", "12"]), environ={})
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig.from_cli_and_env(parser().parse_args(["--max-num-seqs", "0"]), environ={})


def test_engine_config_frozen():
    with pytest.raises(AttributeError):
        EngineConfig().cache.block_size = 3
    with pytest.raises(AttributeError):
        EngineConfig().scheduler.max_num_seqs = 3


# ---------------------------------------------- logging (request defaults: tests/test_request_defaults.py)
def test_describe_is_json_serialisable():
    c = EngineConfig(model=ModelConfig(checkpoint="/m"), cache=CacheConfig(kv_cache_memory_bytes=GiB))
    d = c.describe()
    json.dumps(d)
    assert d["model"]["checkpoint"] == "/m" and d["cache"]["kv_cache_memory_bytes"] == GiB
    assert d["model"]["attn_impl"] == "sdpa"
    assert d["env"]["bot_task"] == "think_recaption" and d["env"]["moe_drop_tokens"] is True
    assert d["moe_drop_tokens_effective"] is False


def test_cpu_default_kv_cache_is_sized_by_what_the_scheduler_can_use():
    """Without an explicit size, a CPU engine holds at most max_num_seqs requests at the model's length with a CFG
    row each (the tiny model's 8192 tokens: 1024 blocks of 16 per request), not the whole 2 GiB default budget."""
    c = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=4), model=ModelConfig(device="cpu"))
    assert c.resolve_num_blocks(1024, max_model_len=8192) == 4 * 2 * 512
    assert c.resolve_num_blocks(MiB, max_model_len=10**7) == DEFAULT_CPU_KV_CACHE_BYTES // MiB  # the budget caps it
    seven = EngineConfig(model=ModelConfig(device="cpu"), cache=CacheConfig(num_kv_blocks=7))
    assert seven.resolve_num_blocks(1024, max_model_len=8192) == 7
    explicit = EngineConfig(model=ModelConfig(device="cpu"), cache=CacheConfig(kv_cache_memory_bytes=64 * MiB))
    assert explicit.resolve_num_blocks(1024, max_model_len=8192) == 64 * 1024  # an explicit budget is all used
    gpu = EngineConfig(model=ModelConfig(device="cuda"), cache=CacheConfig(kv_cache_memory_bytes=GiB))
    assert gpu.resolve_num_blocks(MiB, max_model_len=16) == 1024  # CUDA: the given budget, not the CPU cap
