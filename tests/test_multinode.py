"""Multi-node tensor parallel on one machine: two torchrun "nodes" (static rendezvous over loopback, one rank each,
gloo) run `diffgentor tp-worker`, connect to a frontend started with ``--rank-endpoint``, and give the
single-process engine's ids and latents; killing one rank mid-run fails the in-flight request quickly and leaves
no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from diffgentor.engine.offline import Engine
from diffgentor.engine.request import FinishReason
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.engine.tp.executor import MultiprocExecutor

from helpers import free_port_block

ARGS = dict(num_kv_blocks=256, device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=4096)
LAT = dict(image_size="256x256", output_type="latent", infer_align_image_size=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("multinode") / "tiny.Distil", distil=True)


def _start_nodes(tmp_path, master_port: int, endpoint_port: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(master_port),
             "-m", "diffgentor.server.cli", "tp-worker", "--connect", f"127.0.0.1:{endpoint_port}"],
            stdout=open(tmp_path / f"node{i}.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        for i in range(2)
    ]


def _reap(nodes: list[subprocess.Popen], timeout: float = 30.0) -> list[int | None]:
    deadline = time.time() + timeout
    codes = []
    for p in nodes:
        try:
            codes.append(p.wait(max(0.1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            codes.append(None)
    return codes


def _pids_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _requests() -> list[dict]:
    return [dict(request_id="a", prompt="a cat", bot_task="image", num_inference_steps=2, seed=1, **LAT),
            dict(request_id="b", prompt="a dog", bot_task="think_recaption", max_new_tokens=5, num_inference_steps=2,
                 seed=2, **LAT)]


def test_two_torchrun_nodes_match_single_process(ckpt, tmp_path):
    master, endpoint = free_port_block(1), free_port_block(3)
    nodes = _start_nodes(tmp_path, master, endpoint)
    try:
        with Engine.from_pretrained(ckpt, environ={}, tensor_parallel_size=2, rank_endpoint=f"127.0.0.1:{endpoint}",
                                    ready_timeout_s=600, **ARGS) as eng:
            assert isinstance(eng.core.executor, MultiprocExecutor) and eng.core.executor.endpoint is not None
            got = eng.generate(_requests())
        codes = _reap(nodes)
    finally:
        _reap(nodes, timeout=1)
    logs = "".join((tmp_path / f"node{i}.log").read_text()[-1500:] for i in range(2))
    assert codes == [0, 0], logs  # a clean shutdown ends both torchrun agents with status 0
    ref = Engine.from_pretrained(ckpt, environ={}, **ARGS).generate(_requests())
    for a, b in zip(got, ref):
        assert a.error is None and a.finish_reason == b.finish_reason == FinishReason.IMAGE, a.error
        assert a.generated_ids == b.generated_ids
        assert (a.latents - b.latents).abs().max().item() <= 1e-4
    assert got[1].generated_ids  # the think_recaption request decoded text across the two nodes


# slow (CI runs it: make test-slow): ~24 s; killed ranks:
#   tests/test_tp_engine.py::test_killed_rank_fails_in_flight_requests runs by default
@pytest.mark.slow
def test_killed_remote_rank_fails_in_flight_request(ckpt, tmp_path):
    master, endpoint = free_port_block(1), free_port_block(3)
    nodes = _start_nodes(tmp_path, master, endpoint)
    try:
        eng = Engine.from_pretrained(ckpt, environ={}, tensor_parallel_size=2, rank_endpoint=f"127.0.0.1:{endpoint}",
                                     ready_timeout_s=600, **ARGS)
        core = eng.core
        rank_pids = list(core.executor.rank_pids)
        eng.add_request(dict(request_id="long", prompt="a long one", bot_task="image",
                             num_inference_steps=200, seed=3, **LAT))
        core.step()  # prefill done: the request is in flight on both nodes
        os.kill(rank_pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        events, results = [], {}
        while core.has_unfinished_requests() and time.monotonic() - t0 < 30:
            outputs = core.step()
            events += outputs.events
            results.update(outputs.finished)
        took = time.monotonic() - t0
        assert core.failed is not None and "rank" in core.failed
        assert any(e.request_id == "long" and e.kind == "error" for e in events)
        assert results["long"].finish_reason == FinishReason.ERROR
        assert took < 10, took
        eng.close()
        codes = _reap(nodes)
    finally:
        _reap(nodes, timeout=1)
    assert all(c not in (0, None) for c in codes), codes  # both torchrun agents report the failure
    assert not _pids_alive(rank_pids + [p.pid for p in nodes])
