"""The instance launcher: GPU slices per DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL, CPU instances, child processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from diffgentor.server import launcher as L

GPUS8 = [str(i) for i in range(8)]


def test_visible_gpus():
    assert L.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, device_count=8) == GPUS8
    assert L.visible_gpus({"CUDA_VISIBLE_DEVICES": "4, 5"}, device_count=2) == ["4", "5"]
    assert L.visible_gpus({}, device_count=3) == ["0", "1", "2"]
    assert L.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, device_count=0) == []
    assert L.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}, device_count=1) == ["2"]
    # GPUs named but no CUDA: CPU
    assert L.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, device_count=0) == []


def test_plan_instances_gpu_slices():
    assert L.plan_instances(0, GPUS8) == [GPUS8]  # 0 = one instance on all visible GPUs
    assert L.plan_instances(4, GPUS8) == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert L.plan_instances(2, GPUS8) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert L.plan_instances(1, ["3", "5"]) == [["3"], ["5"]]
    assert L.plan_instances(3, GPUS8) == [["0", "1", "2"], ["3", "4", "5"]]  # GPUs 6,7 idle (warned)
    assert L.plan_instances(2, GPUS8, num_instances=2) == [["0", "1"], ["2", "3"]]
    with pytest.raises(ValueError, match="GPUS_PER_MODEL=16 but only 8"):
        L.plan_instances(16, GPUS8)


def test_plan_instances_cpu():
    assert L.plan_instances(0, []) == [[]]
    assert L.plan_instances(4, [], num_instances=2) == [[], []]
    with pytest.raises(ValueError):
        L.plan_instances(0, [], num_instances=0)


def test_split_and_env():
    assert L.split_contiguous(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert L.split_contiguous([1], 2) == [[1], []]
    env = L.instance_env({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "X": "1"}, ["2", "3"], 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["X"] == "1"
    cpu = L.instance_env({}, [], 2)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and int(cpu["OMP_NUM_THREADS"]) >= 1


def _inst(tmp_path: Path, rank: int, code: str) -> L.Instance:
    return L.Instance(rank, [], [sys.executable, "-c", code], L.instance_env({"PATH": "/usr/bin:/bin"}, [], 2),
                      tmp_path / f"instance{rank}.log")


def test_run_instances_return_codes_and_logs(tmp_path):
    insts = [_inst(tmp_path, 0, "print('hello')"), _inst(tmp_path, 1, "import sys; sys.exit(3)")]
    polls = []
    L.run_instances(insts, poll=lambda: polls.append(1), interval=0.05)
    assert [i.returncode for i in insts] == [0, 3]
    assert "hello" in L.log_tail(insts[0].log_path)
    assert polls


def test_interrupt_terminates_and_reaps_children(tmp_path):
    insts = [_inst(tmp_path, r, "import time; time.sleep(60)") for r in range(2)]
    t0 = time.monotonic()

    def poll():
        if time.monotonic() - t0 > 0.3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.run_instances(insts, poll=poll, interval=0.05)
    for i in insts:  # terminated and reaped: no zombie, no survivor
        assert i.proc.returncode is not None and i.returncode == i.proc.returncode
    assert time.monotonic() - t0 < 15
