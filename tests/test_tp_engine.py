"""The tensor-parallel engine (engine/tp/) on CPU / gloo: TP=2 and EP=2 worker ranks executing the one scheduler's
plans give the single-process engine's generated ids and latents; a rank killed mid-run fails the in-flight requests
quickly and leaves no child process behind."""

from __future__ import annotations

import io
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffgentor.engine.executor import ExecutorError
from diffgentor.engine.offline import Engine
from diffgentor.engine.os_process import vm_hwm_kb
from diffgentor.engine.request import FinishReason
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.engine.tp.executor import MultiprocExecutor

from helpers import alive_pids, kill_rank_mid_run

ENGINE_ARGS = dict(num_kv_blocks=512, device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=4096)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tp-engine") / "tiny.Distil-3.0", distil=True)


def _img(h: int, w: int, seed: int) -> bytes:
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _requests(steps: int = 2) -> list[dict]:
    base = dict(max_new_tokens=5, num_inference_steps=steps, output_type="latent", infer_align_image_size=False)
    specs = [
        dict(bot_task="think_recaption", image_size="256x256", images=[_img(64, 96, 1)], seed=1),
        dict(bot_task="image", image_size="256x256", images=[], seed=2),
        dict(bot_task="image", image_size="208x304", images=[_img(80, 80, 3)], seed=3),
        dict(bot_task="think_recaption", image_size="256x256", images=[], seed=4),
    ]
    return [dict(request_id=f"r{i}", prompt=f"make variant {i} of this", **base, **s) for i, s in enumerate(specs)]


@pytest.fixture(scope="module")
def single(ckpt):
    torch.manual_seed(0)
    return Engine.from_pretrained(ckpt, environ={}, **ENGINE_ARGS).generate(_requests())


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "ep2"])
def test_tp_engine_matches_single_process(ckpt, single, ep):
    with Engine.from_pretrained(ckpt, environ={}, tensor_parallel_size=2, expert_parallel=ep,
                                **ENGINE_ARGS) as eng:
        ex = eng.core.executor
        assert isinstance(ex, MultiprocExecutor) and ex.expert_parallel is ep
        # the ranks report what they run and their VAE budget (None on CPU), and the one scheduler plans with it
        assert set(ex.kernel_impls) >= {"attention", "moe"}, ex.kernel_impls
        assert eng.core.scheduler.vae_budget is ex.vae_budget is None
        pids = list(ex.rank_pids)
        got = eng.generate(_requests())
        hwm = list(ex.rank_vm_hwm_kb)
    assert not alive_pids(pids)
    print(f"\n{'ep' if ep else 'tp'}=2 peak RSS per rank (VmHWM) {[h // 1024 for h in hwm]} MiB; "
          f"this (single-process) test process {vm_hwm_kb() // 1024} MiB")
    for a, b in zip(got, single):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert a.finish_reason == b.finish_reason == FinishReason.IMAGE
        assert a.generated_ids == b.generated_ids, a.request_id
        assert a.latents is not None and a.latents.shape == b.latents.shape
        err = (a.latents - b.latents).abs().max().item()
        assert err <= 1e-4, (a.request_id, err)
    assert any(r.generated_ids for r in got)  # the think_recaption requests did decode text


def test_killed_rank_fails_in_flight_requests(ckpt):
    eng = Engine.from_pretrained(ckpt, environ={}, tensor_parallel_size=2, poll_s=0.1,
                                 **ENGINE_ARGS)
    try:
        took = kill_rank_mid_run(eng, _requests(steps=50), rank=1)
        print(f"\nkilled rank noticed and all requests failed in {took:.2f} s")
    finally:
        eng.close()


def test_rank_startup_failure_is_reported(ckpt, tmp_path):
    """A rank that cannot load (the checkpoint's metadata is readable, its weights are gone) is reported with its
    error and no rank is left running."""
    broken = shutil.copytree(ckpt, tmp_path / "no-weights")
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ExecutorError, match="rank .* failed"):
        Engine.from_pretrained(broken, environ={}, tensor_parallel_size=2,
                               ready_timeout_s=300, **ENGINE_ARGS)


# slow (CI runs it: make test-slow): ~11 s; a dead rank: test_killed_rank_fails_in_flight_requests runs by default
@pytest.mark.slow
def test_hung_rank_is_noticed_and_stopped(ckpt):
    """A rank that stops answering (SIGSTOP) fails the in-flight requests after step_timeout_s; no rank remains."""
    eng = Engine.from_pretrained(ckpt, environ={}, tensor_parallel_size=2,
                                 poll_s=0.1, step_timeout_s=3.0, **ENGINE_ARGS)
    ex = eng.core
    pids = list(ex.executor.rank_pids)
    try:
        # no condition image: its VAE encode can take longer than step_timeout_s on a loaded CPU
        reqs = [eng.make_request(r) for r in _requests(steps=50) if not r["images"]]
        for r in reqs:
            eng.add_request(r)
        ex.step()
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        events = []
        while ex.has_unfinished_requests():
            events += ex.step().events
        took = time.monotonic() - t0
        assert took < 10, took
        errors = {e.request_id: e.error for e in events if e.kind == "error"}
        assert set(errors) == {r.request_id for r in reqs}
        assert all("did not finish step" in msg for msg in errors.values()), errors
        assert not alive_pids(pids)
    finally:
        eng.close()


def _type_names(t, seen=None) -> set[str]:
    """Every struct / dataclass name reachable from a msgspec type."""
    import msgspec.inspect as mi

    seen = set() if seen is None else seen
    info = mi.type_info(t) if not isinstance(t, mi.Type) else t
    if isinstance(info, (mi.StructType, mi.DataclassType)):
        name = info.cls.__name__
        if name in seen:
            return seen
        seen.add(name)
        for f in info.fields:
            _type_names(f.type, seen)
    for attr in ("types", "item_type", "key_type", "value_type", "item_types"):
        sub = getattr(info, attr, None)
        for s in (sub if isinstance(sub, tuple) else [sub] if sub is not None else []):
            _type_names(s, seen)
    return seen


def test_ranks_receive_plans_not_requests(ckpt):
    """One scheduler: what a rank can receive is a plan (`SchedulerOutput`), never a request; and a bare
    MultiprocExecutor (no scheduler, no tokenizer on its side) replaying the plans a single-process engine scheduled
    gives that engine's sampled tokens and final latents."""
    from diffgentor.engine.tp.messages import RankInput, decoder, encoder

    names = _type_names(RankInput)
    assert "SchedulerOutput" in names
    assert not names & {"GenerationRequest", "ProcessedRequest", "RequestState"}, names

    eng = Engine.from_pretrained(ckpt, environ={}, **ENGINE_ARGS)
    ex = eng.core.executor
    recorded: list[tuple[bytes, object]] = []
    execute = ex.execute_model

    def record(plan):
        frame = encoder().encode(plan)  # now: later steps grow the token lists the plan shares
        out = execute(plan)
        recorded.append((frame, out))
        return out

    ex.execute_model = record
    reqs = [r for r in _requests() if r["bot_task"] == "think_recaption"]
    single = eng.generate(reqs)
    assert all(r.error is None for r in single) and any(r.generated_ids for r in single)
    assert any(out.sampled_tokens for _, out in recorded) and any(out.final_latents for _, out in recorded)

    from diffgentor.engine.config import EngineConfig
    from diffgentor.engine.scheduler_output import SchedulerOutput

    config = EngineConfig.from_cli_and_env({"model": str(ckpt), "tensor_parallel_size": 2, **ENGINE_ARGS}, environ={})
    with MultiprocExecutor(config) as tp:
        pids = list(tp.rank_pids)
        assert tp.num_blocks == ENGINE_ARGS["num_kv_blocks"]
        for frame, want in recorded:
            got = tp.execute_model(decoder(SchedulerOutput).decode(frame))
            assert got.sampled_tokens == want.sampled_tokens
            assert got.diffusion_steps_done == want.diffusion_steps_done and not got.failed
            assert set(got.final_latents) == set(want.final_latents)
            for rid, lat in want.final_latents.items():
                assert (got.final_latents[rid] - lat).abs().max().item() <= 1e-4
    assert not alive_pids(pids)


def test_rank_ready_carries_the_vae_budget_and_kernels():
    """On a GPU each rank's memory plan sets the VAE budget the one scheduler must plan with; it crosses the wire."""
    from diffgentor.engine.tp.messages import RankOutput, RankReady, decoder, encoder
    from diffgentor.engine.vae_budget import VaeBudget

    sent = RankReady(rank=0, pid=1, num_blocks=7, kernel_impls={"attention": "flashinfer", "moe": "fp8_grouped"},
                     vae_budget=VaeBudget(budget_bytes=8 << 30, bytes_per_pixel=6144, decode_fixed_bytes=1 << 30))
    got = decoder(RankOutput).decode(encoder().encode(sent))
    assert got == sent and isinstance(got.vae_budget, VaeBudget)
