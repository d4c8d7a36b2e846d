"""``diffgentor edit --executor ray`` on a local two-CPU Ray cluster (started here) and the tiny model: the same
images and results CSV as the local launcher, a replica killed mid-run, a driver killed and rerun."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import VENV_BIN, cli_env, free_port, read_csv, write_csv, write_img

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(sys.platform != "linux", reason="the Ray tests use /proc to find replicas"),
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="Ray is not installed (pip install -e '.[ray]')")]

GOOD = [0, 1, 2, 3, 5, 6, 8, 9, 11]
BAD = {4: "not found", 7: "4 input images", 10: "empty instruction"}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node with 2 CPUs and no GPU, in its own process group (stopped by killing that group)."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    # Ray's session files, sockets and its "current cluster" record go to a fresh folder of this run (short: unix
    # socket paths are limited to 107 bytes), never to the machine's shared default, so no dead cluster is left there
    ray_tmp = Path(tempfile.mkdtemp(prefix="dgray-"))
    env = cli_env(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(ray_tmp))
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                                 "--num-gpus", "0", f"--port={port}", "--include-dashboard=false",
                                 "--disable-usage-stats", "--node-ip-address=127.0.0.1"],
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """12 rows: 0-2 input images, 3 bad rows (a missing file, 4 images, an empty instruction)."""
    write_img(tmp_path / "data" / "a.png")
    write_img(tmp_path / "data" / "b.png", (64, 64), (10, 10, 200))
    rows = []
    for i in range(12):
        images = [["a.png"], [], ["a.png", "b.png"]][i % 3]
        rows.append({"index": str(i), "input_images": json.dumps(images), "instruction": f"a red cube number {i}"})
    rows[4]["input_images"] = json.dumps(["missing.png"])
    rows[7]["input_images"] = json.dumps(["a.png", "a.png", "b.png", "b.png"])
    rows[10]["instruction"] = ""
    return write_csv(tmp_path / "data" / "data.csv", rows)


def _cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffgentor.server.cli", "edit", "--model_name", str(model), "--input", str(data),
            "--output_dir", str(out), "--num_inference_steps", "1", "--image_size", "256x256", "--seed", "3",
            "--no_progress", "--num-kv-blocks", "256", *extra]


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def _pngs(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.png"))


def _results(out: Path) -> dict[int, dict[str, str]]:
    rows = read_csv(out / "results.csv")
    by_index = {int(r["index"]): {**r, "output_image": r["output_image"].replace(str(out), "OUT")} for r in rows}
    assert len(by_index) == len(rows), "a row appears twice in the results CSV"
    return by_index


def _check_complete(out: Path) -> dict[int, dict[str, str]]:
    assert _pngs(out) == [f"{i:06d}.png" for i in GOOD]
    res = _results(out)
    assert sorted(res) == list(range(12))
    for i in GOOD:
        assert res[i]["error"] == "" and res[i]["output_image"] == f"OUT/{i:06d}.png"
    for i, text in BAD.items():
        assert text in res[i]["error"] and res[i]["output_image"] == ""
    assert not list(out.glob(".*.tmp"))
    return res


def _replica_pids() -> list[int]:
    """Processes of this machine's Ray replicas (Ray titles an actor process ``ray::<Class>...``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if cmdline.startswith(b"ray::") and b"MapWorker" in cmdline and b"Replica" in cmdline:
            pids.append(int(d.name))
    return pids


def test_two_replicas_match_the_local_launcher(tmp_path, tiny_distil, dataset, ray_cluster):
    local, remote = tmp_path / "local", tmp_path / "ray"
    r = _run(_cmd(tiny_distil, dataset, local, "--batch_size", "2"))
    assert r.returncode == 1, r.stderr[-3000:]
    r = _run(_cmd(tiny_distil, dataset, remote, "--batch_size", "2", "--executor", "ray", "--ray-address",
                  ray_cluster))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Ray: 2 replica(s) of 1 CPU each on 1 node(s)" in r.stderr
    assert "9 generated, 0 skipped (already done), 3 failed of 12 row(s)" in r.stderr
    assert "3 row(s) have an error" in r.stderr
    assert _check_complete(remote) == _check_complete(local)
    for name in _pngs(local):
        with Image.open(local / name) as a, Image.open(remote / name) as b:
            # a CPU replica runs torch on its one CPU (Ray sets OMP_NUM_THREADS=1), the local run on two: float sums
            # in another order round a few pixels differently (measured: at most 1 level on < 0.01% of pixels)
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())
            assert a.text == b.text, name
    assert len(list((remote / "logs").glob("*/ray-replica-*.log"))) == 2

    r = _run(_cmd(tiny_distil, dataset, remote, "--executor", "ray", "--ray-address", ray_cluster))
    assert r.returncode == 1 and "9 already done (skipped), 3 to generate" in r.stderr, r.stderr[-3000:]


def test_replica_killed_mid_run(tmp_path, tiny_distil, dataset, ray_cluster):
    out = tmp_path / "out"
    cmd = _cmd(tiny_distil, dataset, out, "--batch_size", "1", "--executor", "ray", "--ray-address", ray_cluster)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _pngs(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victims = _replica_pids()
        assert len(victims) == 2 and proc.poll() is None, victims
        os.kill(victims[0], signal.SIGKILL)
        err = proc.communicate(timeout=900)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "9 generated, 0 skipped (already done), 3 failed of 12 row(s)" in err
    _check_complete(out)
    assert victims[0] not in _replica_pids()


def test_driver_killed_and_rerun(tmp_path, tiny_distil, dataset, ray_cluster):
    out = tmp_path / "out"
    cmd = _cmd(tiny_distil, dataset, out, "--batch_size", "1", "--executor", "ray", "--ray-address", ray_cluster)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while len(_pngs(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray ends the dead driver's replicas; wait for them so none writes behind the rerun's back
    deadline = time.monotonic() + 60
    while _replica_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    before = _pngs(out)
    assert 2 <= len(before) < len(GOOD), before
    r = _run(cmd)
    assert r.returncode == 1, r.stderr[-3000:]
    skipped = len(before)
    assert f"{skipped} already done (skipped), {12 - skipped} to generate" in r.stderr
    assert f"{len(GOOD) - skipped} generated, {skipped} skipped (already done), 3 failed of 12 row(s)" in r.stderr
    _check_complete(out)


def test_pool_size_from_cluster_resources():
    from diffgentor.server.batch.ray_executor import pool_size, replica_resources
    from diffgentor.server.batch.rows import FatalError

    assert replica_resources(0, []) == {"num_cpus": 1} == replica_resources(4, [0, 0])
    assert replica_resources(0, [8, 4]) == {"num_gpus": 8}  # 0: every GPU of the largest node
    assert replica_resources(4, [8, 8]) == {"num_gpus": 4}
    with pytest.raises(FatalError, match="cannot span nodes"):
        replica_resources(16, [8, 8])
    gpu4 = {"num_gpus": 4}
    assert pool_size(gpu4, [64] * 8, [8] * 8, None, 1000) == 16  # 8 nodes x 8 GPUs, 4 per replica
    assert pool_size(gpu4, [64, 64], [8, 6], None, 1000) == 3  # 6 GPUs hold one replica of 4
    assert pool_size(gpu4, [64] * 8, [8] * 8, 5, 1000) == 5  # --num_instances
    assert pool_size({"num_cpus": 1}, [2, 4], [0, 0], None, 1000) == 6
    assert pool_size({"num_cpus": 1}, [2, 4], [0, 0], None, 2) == 2  # never more replicas than batches
    with pytest.raises(FatalError, match="num_instances"):
        pool_size(gpu4, [64], [8], 0, 10)


def test_t2i_on_ray(tmp_path, tiny_distil, ray_cluster):
    out = tmp_path / "out"
    r = _run([sys.executable, "-m", "diffgentor.server.cli", "t2i", "--model_name", str(tiny_distil), "--prompt",
              "a red cube", "--prompt", "a blue ball", "--num_images_per_prompt", "2", "--output_dir", str(out),
              "--num_inference_steps", "1", "--height", "256", "--width", "256", "--batch_size", "2", "--no_progress",
              "--num-kv-blocks", "256", "--executor", "ray", "--ray-address", ray_cluster])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 generated, 0 skipped (already done), 0 failed of 4 row(s)" in r.stderr
    assert _pngs(out) == ["000000_00.png", "000000_01.png", "000001_00.png", "000001_01.png"]
    rows = read_csv(out / "results.csv")
    assert sorted((r["index"], r["image_num"]) for r in rows) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all(r["error"] == "" and r["output_image"] for r in rows)
    with Image.open(out / "000000_01.png") as im:
        assert im.size == (256, 256) and im.text["diffgentor:seed"] == "43"  # seed SEED + k
