"""The host heap policy (engine/allocator.py): with heap reuse a repeated large CPU tensor is served without page
faults, the freed memory kept resident is bounded by the ceiling, an idle driver hands it back once, and the
setting flows from the flag / env var into `EngineConfig`.

The allocator tests run in fresh processes: the policy is process-wide and this test process has its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from diffgentor.engine import allocator
from diffgentor.engine.allocator import IdleRelease
from diffgentor.engine.config import DEFAULT_HEAP_REUSE_BYTES, CacheConfig, EngineConfig, EnvVarError

glibc = pytest.mark.skipif(allocator._LIBC is None or not hasattr(allocator._LIBC, "mallinfo2"),
                           reason="needs Linux glibc >= 2.33")

PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from diffgentor.engine import allocator
    on = allocator.configure_heap(int(sys.argv[1]))  # after torch is loaded, as in an engine process
    n = 10 << 20  # 40 MiB of float32: above glibc's largest mmap threshold (32 MiB)
    faults = []
    for _ in range(32):  # glibc < 2.38 reuses a freed block for a 64-byte-aligned request only once blocks coalesce
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(n).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    x = torch.ones(64 << 20)  # 256 MiB, then freed: kept resident for reuse (with heap reuse on)
    del x
    held = allocator.held_free_bytes()
    rss = allocator.resident_bytes()
    kept_under_1g = allocator.trim_if_over(1 << 30)
    trimmed_over_128m = allocator.trim_if_over(128 << 20)
    print(json.dumps(dict(on=on, faults=faults, held=held, kept_under_1g=kept_under_1g,
                          trimmed_over_128m=trimmed_over_128m, held_after=allocator.held_free_bytes(),
                          rss_drop=rss - allocator.resident_bytes())))
""")


def _probe(reuse_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(reuse_bytes)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.splitlines()[-1])


@glibc
def test_heap_reuse_serves_a_repeated_large_tensor_without_page_faults_and_keeps_at_most_the_ceiling():
    pages = (40 << 20) // 4096
    default = _probe(0)
    assert default["on"] is False
    assert min(default["faults"][-4:]) > 0.9 * pages  # glibc's defaults: mapped and faulted in on every call
    assert default["kept_under_1g"] is False and default["trimmed_over_128m"] is False  # nothing to bound

    reuse = _probe(DEFAULT_HEAP_REUSE_BYTES)
    assert reuse["on"] is True
    assert sum(reuse["faults"][-4:]) < 0.02 * pages, reuse  # a freed block is reused, already resident
    assert reuse["held"] >= 200 << 20, reuse  # the freed 256 MiB stays resident...
    assert reuse["kept_under_1g"] is False  # ... while under the ceiling
    assert reuse["trimmed_over_128m"] is True and reuse["held_after"] < 32 << 20  # over it: handed back
    assert reuse["rss_drop"] >= 200 << 20, reuse


THREAD_PROBE = textwrap.dedent("""
    import json, resource, sys, threading
    import torch
    from diffgentor.engine import allocator
    allocator.configure_heap(int(sys.argv[1]))
    faults = []

    def encode_like():  # what the encode thread does: tensors larger than a thread arena's 64 MiB heap
        for _ in range(24):  # glibc < 2.38 reuses a block once its neighbours coalesce (see PROBE)
            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            torch.empty(24 << 20).fill_(1.0)  # 96 MiB
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)

    t = threading.Thread(target=encode_like)
    t.start()
    t.join()
    print(json.dumps(faults))
""")


@glibc
def test_heap_reuse_also_serves_large_tensors_made_on_other_threads():
    """The asynchronous encode runs on its own thread: its VAE activations are reused too (a thread arena would map
    anything above 64 MiB afresh, whatever M_MMAP_MAX says)."""
    pages = (96 << 20) // 4096
    out = subprocess.run([sys.executable, "-c", THREAD_PROBE, str(DEFAULT_HEAP_REUSE_BYTES)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    faults = json.loads(out.splitlines()[-1])
    assert sum(faults[-4:]) < 0.02 * pages, faults


def test_idle_release_hands_the_heap_back_once_after_the_idle_time(monkeypatch):
    released = []
    monkeypatch.setattr(allocator, "release_free_heap", lambda: released.append(1))
    now = [0.0]
    idle = IdleRelease(1.0, clock=lambda: now[0])
    assert not idle.poll()  # never busy: nothing to give back
    idle.busy()
    now[0] = 0.9
    assert not idle.poll() and not released
    now[0] = 1.0
    assert idle.poll() and len(released) == 1
    now[0] = 5.0
    assert not idle.poll() and len(released) == 1  # once per idle period
    idle.busy()
    now[0] = 5.5
    idle.busy()  # a step resets the timer
    now[0] = 6.4
    assert not idle.poll()
    now[0] = 6.5
    assert idle.poll() and len(released) == 2


def test_release_after_idle_runs_on_a_timer_unless_the_driver_is_busy_first(monkeypatch):
    released = threading.Event()
    monkeypatch.setattr(allocator, "release_free_heap", released.set)
    idle = IdleRelease(0.3)
    idle.release_after_idle()
    idle.busy()  # the next batch started: no release under it
    assert not released.wait(0.6)
    idle.release_after_idle()
    t0 = time.monotonic()
    assert released.wait(10.0) and time.monotonic() - t0 >= 0.25


def test_heap_reuse_config_from_flag_and_env():
    assert EngineConfig().cache.heap_reuse_bytes == DEFAULT_HEAP_REUSE_BYTES == 4 << 30
    flag = EngineConfig.from_cli_and_env({"heap_reuse_memory": "512MiB"}, environ={})
    assert flag.cache.heap_reuse_bytes == 512 << 20
    env = {"DG_HUNYUAN_IMAGE_3_HEAP_REUSE_MEMORY": "0"}
    assert EngineConfig.from_cli_and_env({}, environ=env).cache.heap_reuse_bytes == 0
    assert EngineConfig.from_cli_and_env({"heap_reuse_memory": "1GiB"}, environ=env).cache.heap_reuse_bytes == 1 << 30
    with pytest.raises(EnvVarError, match="HEAP_REUSE_MEMORY"):
        EngineConfig.from_cli_and_env({}, environ={"DG_HUNYUAN_IMAGE_3_HEAP_REUSE_MEMORY": "lots"})
    with pytest.raises(ValueError, match="heap_reuse_bytes"):
        EngineConfig(cache=CacheConfig(heap_reuse_bytes=-1))
    with pytest.raises(ValueError, match="heap_idle_release_s"):
        EngineConfig(cache=CacheConfig(heap_idle_release_s=-1.0))


SEEDED = textwrap.dedent("""
    import hashlib, io, json, sys
    from diffgentor.engine.offline import Engine
    sys.path.insert(0, sys.argv[3])
    from helpers import random_png
    eng = Engine.from_pretrained(sys.argv[1], environ={}, device="cpu", dtype="float32", num_kv_blocks=256,
                                 max_num_seqs=4, heap_reuse_memory=sys.argv[2])
    reqs = [dict(prompt="a red cube", seed=3, bot_task="image", image_size="64x64", num_inference_steps=2),
            dict(prompt="make it blue", images=[random_png(96, 96, 1)], seed=4, bot_task="image",
                 image_size="64x64", num_inference_steps=2)]
    runs = []
    for _ in range(2):  # the second batch runs on memory the first one freed (with heap reuse)
        pngs = [io.BytesIO() for _ in reqs]
        for r, buf in zip(eng.generate(reqs), pngs):
            r.image.save(buf, format="PNG")
        runs.append([hashlib.sha256(buf.getvalue()).hexdigest() for buf in pngs])
    print(json.dumps(runs))
""")


# slow (CI runs it: make test-slow): ~21 s; the allocator's own tests and the golden sets run by default
@pytest.mark.slow
@glibc
def test_seeded_requests_give_the_same_png_bytes_with_and_without_heap_reuse(tmp_path):
    from pathlib import Path

    from diffgentor.engine.testing.tiny_model import make_tiny

    ckpt = make_tiny(tmp_path / "tiny", distil=True)
    tests_dir = str(Path(__file__).resolve().parent)
    out = {}
    for reuse in ("0", "4GiB"):
        proc = subprocess.run([sys.executable, "-c", SEEDED, str(ckpt), reuse, tests_dir], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[reuse] = json.loads(proc.stdout.splitlines()[-1])
    # batch by batch (the second batch hits the first one's prefix cache, so it may round differently from it)
    assert out["0"] == out["4GiB"], out
