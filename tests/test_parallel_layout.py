"""The rank grid tp x cfg x sp (engine/parallel_layout.py): its coordinates and groups, the config's flags and
validation, the process groups each rank makes (gloo), `plan-memory` and `/metrics` knowing the layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffgentor.engine.config import EngineConfig, ModelConfig, ParallelConfig, add_engine_args
from diffgentor.engine.parallel import init_distributed
from diffgentor.engine.parallel_layout import ParallelLayout


@pytest.mark.parametrize("tp,cfg,sp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 2, 2), (4, 2, 1), (1, 2, 3)])
def test_groups_partition_the_world(tp, cfg, sp):
    lay = ParallelLayout(tp=tp, cfg=cfg, sp=sp)
    world = set(range(lay.world_size))
    assert lay.world_size == tp * cfg * sp
    for groups, size in ((lay.tp_groups(), tp), (lay.cfg_groups(), cfg), (lay.sp_groups(), sp)):
        assert all(len(g) == size for g in groups)
        flat = [r for g in groups for r in g]
        assert sorted(flat) == sorted(world)  # every rank in exactly one group of each kind
    for r in world:
        c = lay.coords(r)
        assert lay.rank_of(c.tp_rank, c.sp_rank, c.cfg_rank) == r
        tpg = next(g for g in lay.tp_groups() if r in g)
        cfgg = next(g for g in lay.cfg_groups() if r in g)
        assert {lay.coords(x).cfg_rank for x in tpg} == {c.cfg_rank}  # a TP group lies inside one CFG group
        assert {lay.coords(x).tp_rank for x in cfgg} == {c.tp_rank}  # CFG peers share the TP shard
    assert lay.group_leaders() == [c * tp * sp for c in range(cfg)]
    # tensor parallel innermost: the ranks of a TP group are neighbours
    assert lay.tp_groups()[0] == list(range(tp))


@pytest.mark.parametrize("kw,match", [
    (dict(cfg_parallel_size=3), "--cfg-parallel-size must be 1 or 2"),
    (dict(cfg_parallel_size=0), "--cfg-parallel-size must be an integer >= 1"),
    (dict(sequence_parallel_size=0), "--sequence-parallel-size must be an integer >= 1"),
])
def test_config_refuses_bad_layouts(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(parallel=ParallelConfig(**kw), model=ModelConfig(device="cpu"))


def test_config_flags_and_resolution():
    p = add_engine_args(argparse.ArgumentParser())
    args = p.parse_args(["--tensor-parallel-size", "2", "--cfg-parallel-size", "2"])
    cfg = EngineConfig.from_cli_and_env(args, environ={})
    assert cfg.parallel_layout().as_dict() == {"tp": 2, "cfg": 2, "sp": 1, "world": 4}
    assert cfg.resolve_world_size() == 4 and cfg.ranks_per_instance == 4
    # GPUs: tp 0 takes the visible devices left over by the other dimensions; too few devices is an error
    auto = EngineConfig(model=ModelConfig(device="cuda"),
                        parallel=ParallelConfig(tensor_parallel_size=0, cfg_parallel_size=2))
    assert auto.parallel_layout(num_visible_devices=8).tp == 4
    assert auto.num_instances(8) == 1
    tp2_cfg2 = ParallelConfig(tensor_parallel_size=2, cfg_parallel_size=2)
    with pytest.raises(ValueError, match="needs one GPU per rank, but only 2"):
        EngineConfig(parallel=tp2_cfg2, model=ModelConfig(device="cuda")).parallel_layout(2)
    assert EngineConfig(parallel=tp2_cfg2, model=ModelConfig(device="cuda")).num_instances(8) == 2
    # external ranks: the layout's rank count decides the ports, and a single rank has nothing to connect
    with pytest.raises(ValueError, match="layout of >= 2 ranks"):
        ParallelConfig(tensor_parallel_size=1, rank_endpoint="127.0.0.1:29500")
    ParallelConfig(tensor_parallel_size=1, cfg_parallel_size=2, rank_endpoint="127.0.0.1:29500")
    with pytest.raises(ValueError, match="4 ranks is past 65535"):
        ParallelConfig(tensor_parallel_size=2, cfg_parallel_size=2, rank_endpoint="h:65533")


def _group_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    lay = ParallelLayout(tp=2, cfg=2)
    ctx = init_distributed("gloo", f"file://{init_file}", rank, lay)
    try:
        t = torch.tensor([float(10 ** rank)])
        tp_sum = ctx.all_reduce(t.clone())
        cfg_sum = ctx.cfg_all_reduce(t.clone())
        smallest = ctx.world_min(100 + rank)
        torch.save({"tp": tp_sum, "cfg": cfg_sum, "min": smallest, "rank": ctx.rank, "leader": ctx.is_group_leader,
                    "coords": (ctx.tp_rank, ctx.cfg_rank, ctx.sp_rank)}, Path(out_dir) / f"r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_process_groups_tp2_cfg2(tmp_path):
    """Four gloo ranks of tp2 x cfg2: a TP all-reduce sums the two ranks of one model copy, a CFG all-reduce the two
    copies' ranks holding the same shard, and the KV-size agreement spans all four."""
    mp.spawn(_group_rank, args=(str(tmp_path / "rdv"), str(tmp_path)), nprocs=4, join=True)
    got = [torch.load(tmp_path / f"r{r}.pt") for r in range(4)]
    for r, g in enumerate(got):
        assert g["rank"] == r and g["min"] == 100
        tp_peer, cfg_peer = r ^ 1, r ^ 2  # rank = cfg * 2 + tp
        assert g["tp"].item() == 10 ** r + 10 ** tp_peer, (r, g)
        assert g["cfg"].item() == 10 ** r + 10 ** cfg_peer, (r, g)
        assert g["leader"] == (r in (0, 2))
        assert g["coords"] == (r % 2, r // 2, 0)


def test_plan_memory_knows_the_layout(tmp_path, capsys):
    from diffgentor.engine.memory_plan import add_parser, run
    from diffgentor.engine.testing.tiny_model import make_tiny

    ckpt = make_tiny(tmp_path / "tiny")
    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    plans = {}
    for cfg in (1, 2):
        args = parser.parse_args([str(ckpt), "--gpu", "h100", "--tensor-parallel-size", "2",
                                  "--cfg-parallel-size", str(cfg), "--json"])
        assert run(args) == 0
        import json

        plans[cfg] = json.loads(capsys.readouterr().out)
    one, two = plans[1], plans[2]
    assert two["cfg_parallel_size"] == 2
    assert two["weight_bytes"] == one["weight_bytes"]  # each CFG group holds a full TP-sharded copy
    assert two["min_kv_blocks"] * 2 == one["min_kv_blocks"]  # one of the two rows per group
    args = parser.parse_args([str(ckpt), "--gpu", "h100", "--tensor-parallel-size", "2", "--cfg-parallel-size", "2"])
    assert run(args) == 0
    text = capsys.readouterr().out
    assert "tp2 x cfg2 x sp1 (4 ranks)" in text and "rank 0 of 4" in text
    bad = parser.parse_args([str(ckpt), "--gpu", "h100", "--cfg-parallel-size", "3"])
    assert run(bad) == 2
    assert "--cfg-parallel-size must be 1 or 2" in capsys.readouterr().out


def test_metrics_show_the_layout():
    from diffgentor.server.http.metrics import ServerMetrics

    m = ServerMetrics("m")
    m.on_engine_ready(0, 10, {"attention": "sdpa"}, ParallelLayout(tp=2, cfg=2).as_dict())
    text = m.render().decode()
    for dim, size in (("tp", 2), ("cfg", 2), ("sp", 1), ("world", 4)):
        assert f'diffgentor:parallel_layout{{dim="{dim}",engine="0",model_name="m"}} {size}.0' in text, text
