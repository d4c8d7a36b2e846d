"""`EngineConfig` is the one home of every setting: one sub-config per concern (model, cache, scheduler, parallel,
server) plus the env block, each setting in exactly one of them; flags land in their sub-config; and the parts that
run the engine take a sub-config, never a copy of its fields (engine/config.py)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

from diffgentor.engine import config as C
from diffgentor.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
)

ROOT = Path(__file__).resolve().parents[1]
SUB_CONFIGS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig,
               "server": ServerConfig}
CONFIG_CLASSES = {cls.__name__ for cls in SUB_CONFIGS.values()} | {"EngineConfig"}


def test_every_setting_lives_in_exactly_one_sub_config():
    top = {f.name for f in dataclasses.fields(EngineConfig)}
    assert top == set(SUB_CONFIGS) | {"env"}, f"flat settings beside the sub-configs: {sorted(top - set(SUB_CONFIGS))}"
    default = EngineConfig()
    homes: dict[str, list[str]] = {}
    for name, kind in SUB_CONFIGS.items():
        assert type(getattr(default, name)) is kind and kind.__dataclass_params__.frozen
        for f in dataclasses.fields(kind):
            homes.setdefault(f.name, []).append(name)
    assert not {k: v for k, v in homes.items() if len(v) > 1}, "a setting with two homes"
    routed = C.MODEL_KEYS + C.CACHE_KEYS + C.SCHEDULER_KEYS + C.PARALLEL_KEYS + C.SERVER_KEYS
    assert len(routed) == len(set(routed)), "a from_cli_and_env key routed to two sub-configs"


def test_flags_land_in_their_sub_config():
    from diffgentor.server.cli import build_parser

    args = build_parser().parse_args([
        "serve", "/m", "--block-size", "32", "--tensor-parallel-size", "2", "--max-step-ms", "50", "--seed", "3",
        "--max-num-seqs", "4", "--max-upload-bytes", "123", "--url-fetch-timeout-s", "5",
        "--max-request-cost-mib", "7", "--header-timeout-s", "4", "--allowed-url-fetch"])
    c = EngineConfig.from_cli_and_env(args, environ={"DG_HUNYUAN_IMAGE_3_EXPERT_PARALLEL": "1"})
    assert (c.model.checkpoint, c.model.seed, c.cache.block_size) == ("/m", 3, 32)
    assert (c.scheduler.max_num_seqs, c.scheduler.max_step_ms) == (4, 50)
    assert (c.parallel.tensor_parallel_size, c.parallel.expert_parallel) == (2, True)  # the env block fills None
    s = c.server
    assert (s.max_upload_bytes, s.fetch_deadline_s, s.request_fetch_deadline_s, s.head_timeout_s) == (123, 5, 10, 4)
    assert s.max_request_cost_bytes == 7 << 20 and s.allow_url_fetch is True


def test_the_executor_and_its_ranks_take_the_config_not_copies():
    from diffgentor.engine.tp.executor import MultiprocExecutor
    from diffgentor.engine.tp.messages import RankSetup

    assert list(inspect.signature(MultiprocExecutor.__init__).parameters) == ["self", "config", "layout"]
    assert not set(RankSetup.__struct_fields__) & {f.name for f in dataclasses.fields(ParallelConfig)}


def _py_files():
    for top in ("engine", "server", "bench"):
        yield from (p for p in (ROOT / top).rglob("*.py") if p != ROOT / "engine" / "config.py")


def test_no_module_keeps_a_copy_of_the_settings():
    """No second class holding settings (a `SchedulerConfig` of the scheduler's own, a `ServerLimits` of the API
    server's), and no sub-config built by copying another config's fields (``SchedulerConfig(max_num_seqs=
    config.max_num_seqs)``): a setting is passed as its sub-config."""
    copies, classes = [], []
    for path in _py_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ClassDef) and (node.name in CONFIG_CLASSES or node.name == "ServerLimits"):
                classes.append(f"{where} class {node.name}")
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in CONFIG_CLASSES:
                    copies += [f"{where} {name}({k.arg}=...{k.value.attr})" for k in node.keywords
                               if isinstance(k.value, ast.Attribute) and k.value.attr == k.arg
                               and _names_a_config(k.value.value)]
    assert not classes and not copies, classes + copies


def _names_a_config(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name.lower().endswith(("config", "cfg")) or name in SUB_CONFIGS
