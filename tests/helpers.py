"""Helpers shared by the test modules (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int) -> int:
    """A base port with `n` consecutive free ports (a tensor-parallel frontend binds its port and one per rank)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        socks = []
        try:
            for p in range(base, base + n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port block")


def random_png(h: int, w: int, seed: int = 0) -> bytes:
    """An h x w RGB PNG of seeded noise."""
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def start_server(ckpt: Path, log_path: Path, *flags: str, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`diffgentor serve CKPT` on a free loopback port with `flags`, waited for until /health answers 200; returns
    the process and its base URL (the caller stops it). Fails the test with the server's log if it never comes up."""
    import httpx
    import pytest

    port = free_port()
    log = open(log_path, "w+")  # noqa: SIM115 - the server writes it for its whole life
    cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(ckpt), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, Path(log_path).read_text()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not start:\n" + Path(log_path).read_text())


# The published HunyuanImage-3.0-Instruct config.json values the module tree and the memory plan depend on (typed
# from the released config; the Distil checkpoint differs only in cfg_distilled / use_meanflow).
_H, _L, _I = 4096, 32, 3072
PUBLISHED_INSTRUCT_CONFIG = {
    "architectures": ["HunyuanImage3ForCausalMM"], "model_type": "hunyuan_image_3_moe", "torch_dtype": "bfloat16",
    "hidden_size": _H, "num_hidden_layers": _L, "num_attention_heads": 32, "num_key_value_heads": 8,
    "attention_head_dim": 128, "vocab_size": 133120, "intermediate_size": _I, "moe_intermediate_size": [_I] * _L,
    "num_experts": 64, "moe_topk": [8] * _L, "num_shared_expert": [1] * _L, "use_mixed_mlp_moe": True,
    "moe_layer_num_skipped": 0, "norm_topk_prob": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_type": "2d", "max_position_embeddings": 22800, "use_qk_norm": True, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "use_cla": False, "cla_share_factor": 2, "use_mla": False,
    "norm_type": "hf_rms", "img_proj_type": "unet", "patch_size": 1, "patch_embed_hidden_dim": 1024,
    "image_base_size": 1024, "vae_downsample_factor": [16, 16], "vae_autocast_dtype": "float16",
    "cond_image_type": "vae_vit", "cond_token_attn_type": "joint_full", "cfg_distilled": False,
    "use_meanflow": False, "vit_type": "siglip2-so400m-patch16-naflex",
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 32,
            "block_out_channels": [128, 256, 512, 1024, 1024], "layers_per_block": 2, "ffactor_spatial": 16,
            "ffactor_temporal": 4, "sample_size": 384, "sample_tsize": 96, "scaling_factor": 0.562679178327931,
            "shift_factor": None, "downsample_match_channel": True, "upsample_match_channel": True},
    "vit": {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16, "intermediate_size": 4304,
            "patch_size": 16, "num_channels": 3, "num_patches": 256, "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh"},
    "vit_processor": {"patch_size": 16, "max_num_patches": 1024, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "vit_aligner": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 1152, "n_embed": 4096},
}


def static_and_eager_decode(model, lens=(5, 11, 18), block: int = 4, graph_attention=None,
                            use_graphs: bool = False) -> dict:
    """Prefill len(lens) text prompts eagerly, then ONE decode token each, run twice on the same inputs and cache:
    the static decode forward of `engine.cuda_graph` (what a CUDA graph captures; `use_graphs`: captured and replayed,
    CUDA only; `graph_attention`, when given, is the backbone backend it is built from) and the eager forward, on the
    model's device. Returns both hidden states, the runner and the cache's KV heads (tests/test_cuda_graph.py,
    tests/test_cuda_graph_tp.py)."""
    import torch

    from diffgentor.bench.decode import _text_layout
    from diffgentor.engine.cuda_graph import DecodeGraphRunner
    from diffgentor.engine.models.hunyuan_image_3.sampling import SamplingParams
    from diffgentor.engine.scheduler_output import Chunk, SampleSpec
    from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk

    layouts = [_text_layout(n + 1) for n in lens]
    tables, at = [], 0
    for n in lens:
        k = -(-(n + 1) // block)
        tables.append(list(range(at, at + k)))
        at += k
    cache = model.make_kv_cache(at + 1, block)  # + the scratch block padding rows write to
    dev = model.device
    with torch.no_grad():
        ids = torch.tensor([t for lay, n in zip(layouts, lens) for t in lay.token_ids[:n]], device=dev)
        pos = torch.cat([lay.positions[:n] for lay, n in zip(layouts, lens)]).to(dev)
        md = AttentionMetadata.build([SequenceChunk(range(n), n, t) for n, t in zip(lens, tables)], block, dev)
        model(model.embed_tokens(ids), pos, md, cache)
        chunks = [Chunk(f"r{i}", f"r{i}", lay.token_ids, lay, n, n + 1, t, sample=SampleSpec(SamplingParams()))
                  for i, (lay, n, t) in enumerate(zip(layouts, lens, tables))]
        shared = model.model.attn
        if graph_attention is not None:
            model.model.attn = graph_attention
        try:
            runner = DecodeGraphRunner(model, cache, at, max_num_seqs=4, use_graphs=use_graphs)
        finally:
            model.model.attn = shared
        static = runner.run(chunks)
        md1 = AttentionMetadata.build([SequenceChunk([n], n + 1, t) for n, t in zip(lens, tables)], block, dev)
        tok = torch.tensor([lay.token_ids[n] for lay, n in zip(layouts, lens)], device=dev)
        pos1 = torch.cat([lay.positions[n : n + 1] for lay, n in zip(layouts, lens)]).to(dev)
        eager = model(model.embed_tokens(tok), pos1, md1, cache)
    return {"static": static, "eager": eager, "kv_heads": torch.tensor(cache.num_kv_heads), "runner": runner,
            "chunks": chunks}


def flashinfer_autotune_recorder(rec):
    """A stand-in for `flashinfer.autotune` that sets `rec.tuning` inside the block (tests of the fused-MoE tuning)."""
    import contextlib

    @contextlib.contextmanager
    def autotune(tune_mode: bool = True):
        rec.tuning = tune_mode
        try:
            yield
        finally:
            rec.tuning = False

    return autotune


def alive_pids(pids: list[int]) -> list[int]:
    """The given pids that still exist at all (running, stopped or an unreaped zombie: for rank processes, a leak)."""
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def kill_rank_mid_run(eng, requests: list, rank: int, limit_s: float = 10.0) -> float:
    """Admit `requests` into a multi-rank `Engine`, run three lockstep steps, SIGKILL rank `rank` and step until every
    request has ended. Asserts that each failed naming the rank and its exit, that the engine then refuses new work
    naming the rank, and that no rank process is left; returns how long the requests took to fail."""
    import signal

    import pytest

    from diffgentor.engine.executor import ExecutorError
    from diffgentor.engine.request import FinishReason

    core = eng.core
    pids = list(core.executor.rank_pids)
    reqs = [eng.make_request(r) for r in requests]
    events, results = [], {}
    for r in reqs:
        eng.add_request(r)
    for _ in range(3):
        events += core.step().events
    assert core.has_unfinished_requests()
    os.kill(pids[rank], signal.SIGKILL)
    t0 = time.monotonic()
    while core.has_unfinished_requests():
        outputs = core.step()
        events += outputs.events
        results.update(outputs.finished)
        assert time.monotonic() - t0 < limit_s
    took = time.monotonic() - t0
    errors = {e.request_id: e.error for e in events if e.kind == "error"}
    assert set(errors) == {r.request_id for r in reqs}, events
    assert all(f"rank {rank}" in msg and "exit" in msg for msg in errors.values()), errors
    assert all(results[r.request_id].finish_reason == FinishReason.ERROR for r in reqs)
    with pytest.raises(ExecutorError, match=f"rank {rank}"):
        eng.generate(requests[:1])
    deadline = time.monotonic() + 5
    while alive_pids(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive_pids(pids)
    return took
