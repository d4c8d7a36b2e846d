"""CUDA graphs for decode-only steps: what can be proven on CPU, plus the GPU capture test.

* the static decode attention equals the paged reference (GQA, several pages, padding rows on a scratch block);
* the static decode forward is `torch.compile(fullgraph=True)`-clean: no host syncs, no data-dependent shapes;
* on a real mixed engine run the static path gives the eager forward's hidden states and K/V;
* which steps are graph-eligible, bucket choice and padding, and that CPU / --enforce-eager never capture;
* (gpu) capture + replay equals eager.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffgentor.engine.config import EngineConfig, ModelConfig, add_engine_args
from diffgentor.engine.cuda_graph import (
    DecodeGraphRunner,
    batch_buckets,
    cuda_graphs_allowed,
    decode_batch,
    pick_bucket,
    width_buckets,
)
from diffgentor.engine.models.hunyuan_image_3.prompt import BuiltPrompt, ImageSlot
from diffgentor.engine.models.hunyuan_image_3.sampling import SamplingParams
from diffgentor.engine.offline import Engine
from diffgentor.engine.scheduler_output import Chunk, SampleSpec
from diffgentor.engine.testing.tiny_model import make_tiny, size_overrides
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk, paged_attention_reference
from diffgentor.kernels.decode_attention import StaticDecodeAttention, StaticDecodeMetadata
from diffgentor.kernels.kv_cache import PagedKVCache

BASE = dict(infer_align_image_size=False, output_type="latent", num_inference_steps=3, image_size="256x256")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.Distil-3.0", distil=True)


@pytest.fixture(scope="module")
def tiny_one_layer(tmp_path_factory):
    """One decoder layer (a MoE layer, like every tiny layer): dynamo traces half as much."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny1.Distil-3.0", distil=True,
                     config_overrides=size_overrides(layers=1))


def _engine(path, **kw) -> Engine:
    args = dict(num_kv_blocks=128, device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=2048)
    return Engine.from_pretrained(path, environ={}, **{**args, **kw})


# ------------------------------------------------------------------------------------------------ attention


def test_static_decode_attention_matches_reference_and_padding_stays_on_scratch():
    torch.manual_seed(0)
    bs, hq, hkv, d, num_blocks = 4, 8, 2, 16, 24
    scratch = num_blocks - 1
    cache = PagedKVCache(1, num_blocks, bs, hkv, d)
    cache.kv[0].normal_()
    lens = [1, 6, 13, 16]  # 1 to 4 pages, the new token at the start, middle and end of a page
    pages = torch.randperm(scratch).tolist()  # scattered pages; the scratch block is never a sequence's
    tables, at = [], 0
    for n in lens:
        k = -(-n // bs)
        tables.append(pages[at : at + k])
        at += k
    bucket, max_blocks = 8, 5  # 4 padding rows, page tables wider than any sequence
    k_new, v_new = torch.randn(bucket, hkv, d), torch.randn(bucket, hkv, d)
    q = torch.randn(bucket, hq, d)
    slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)] + [scratch * bs] * 4
    md = StaticDecodeMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [scratch] * (max_blocks - len(t)) for t in tables]
                                  + [[scratch] * max_blocks] * 4),
        kv_lens=torch.tensor(lens + [1] * 4),
        block_size=bs,
        max_slot=cache.num_slots - 1,
    )
    before = cache.kv[0].clone()
    cache.store(0, md, k_new, v_new)
    changed = (cache.kv[0] != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted({*(s // bs for s in slots)})  # the rows' own pages and the scratch page only
    assert torch.equal(cache.kv[0][scratch, 0, 0], k_new[-1])  # padding rows wrote the scratch slot

    attn = StaticDecodeAttention(hq, hkv, d)
    attn.plan(md)
    out = attn.run(q, k_new, v_new, cache, 0)
    assert out.shape == q.shape and torch.isfinite(out).all()  # padding rows see 1 key: no all-masked softmax

    ref_md = AttentionMetadata.build(
        [SequenceChunk([n - 1], n, t, write_kv=False) for n, t in zip(lens, tables)], bs
    )
    ref = paged_attention_reference(q[:4], ref_md, cache, 0, d**-0.5)
    torch.testing.assert_close(out[:4], ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ selection


def _layout(n: int) -> BuiltPrompt:
    """Text tokens 0..n-1 with a condition image at [5, 9) (its <timestep> at 4) and bidirectional spans."""
    idx = torch.arange(n)
    return BuiltPrompt(
        token_ids=list(range(10, 10 + n)), positions=torch.stack([idx, idx], 1),
        image_slots=[ImageSlot("cond_vae", 5, 9, (2, 2), 0)], cond_timestep_indexes=[4], gen_timestep_index=None,
        guidance_index=None, timestep_r_index=None, full_attn_spans=[(5, 9), (20, 22)], text_slices=[],
        rope_image_info=[],
    )


def _decode_chunk(rid: str, at: int, table: list[int], n: int = 40) -> Chunk:
    layout = _layout(n)
    return Chunk(rid, rid, layout.token_ids + [7, 8, 9], layout, at, at + 1, table,
                 sample=SampleSpec(SamplingParams()))


def test_buckets_and_bucket_choice():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    b = batch_buckets(24)
    assert [pick_bucket(n, b) for n in (1, 2, 3, 5, 16, 17, 24, 25, 0)] == [1, 2, 4, 8, 16, 24, 24, None, None]
    assert width_buckets(8192, 16) == (32, 64, 128, 256, 512)  # pages for 512, 1024, ... 8192 keys
    assert width_buckets(1000, 16) == (32, 63)
    assert width_buckets(100, 16) == (7,)


def test_decode_batch_pads_to_the_bucket_with_the_scratch_block():
    bs, scratch = 4, 99
    widths = width_buckets(48, bs, min_tokens=16)
    assert widths == (4, 8, 12)
    chunks = [_decode_chunk("a", 9, [3, 4, 5, 6]), _decode_chunk("b", 40, list(range(30, 42))),
              _decode_chunk("c", 12, [20, 21, 22, 23])]
    batch = decode_batch(chunks, bs, widths, batch_buckets(8), scratch)
    assert batch is not None and (batch.bucket, batch.width, batch.num_rows) == (4, 12, 3)
    assert batch.token_ids == [19, 7, 22, 0]  # index 40 is past the layout: a decoded token
    assert batch.positions == [[9, 9], [40, 40], [12, 12], [0, 0]]
    assert batch.kv_lens == [10, 41, 13, 1]
    assert batch.slots == [5 * 4 + 1, 40 * 4 + 0, 23 * 4 + 0, scratch * 4]
    assert batch.block_tables == [[3, 4, 5] + [scratch] * 9, list(range(30, 41)) + [scratch],
                                  [20, 21, 22, 23] + [scratch] * 8, [scratch] * 12]
    short = decode_batch([chunks[0], chunks[2]], bs, widths, batch_buckets(8), scratch)  # 4 pages: the narrowest
    assert (short.bucket, short.width) == (2, 4)
    assert short.block_tables == [[3, 4, 5, scratch], [20, 21, 22, 23]]


@pytest.mark.parametrize("case", ["prefill", "no_sample", "diffusion", "image_slot", "cond_timestep", "bidir",
                                  "too_many_rows", "too_long", "short_table"])
def test_steps_that_run_eagerly(case):
    bs, scratch = 4, 99
    ok = _decode_chunk("a", 9, [3, 4, 5, 6])
    bad = {
        "prefill": dataclasses.replace(ok, start=8),
        "no_sample": dataclasses.replace(ok, sample=None),
        "diffusion": dataclasses.replace(ok, diffusion=True),
        "image_slot": dataclasses.replace(ok, start=6, end=7),
        "cond_timestep": dataclasses.replace(ok, start=4, end=5),
        "bidir": _decode_chunk("a", 20, list(range(6))),
        "too_long": _decode_chunk("a", 24, list(range(7))),  # 25 keys > 6 pages of 4
        "short_table": dataclasses.replace(ok, block_table=[3, 4]),
        "too_many_rows": ok,
    }[case]
    chunks = [ok, bad] + ([ok] * 7 if case == "too_many_rows" else [])
    assert decode_batch([ok, ok], bs, (3, 6), batch_buckets(8), scratch) is not None
    assert decode_batch(chunks, bs, (3, 6), batch_buckets(8), scratch) is None


def test_graphs_only_on_cuda_and_never_with_enforce_eager(tiny):
    """Tensor parallel no longer turns graphs off (tests/test_cuda_graph_tp.py proves the static forward there)."""
    assert cuda_graphs_allowed("cuda", enforce_eager=False) == (True, "ok")
    assert cuda_graphs_allowed("cuda:1", enforce_eager=True)[0] is False
    assert cuda_graphs_allowed("cpu", enforce_eager=False)[0] is False
    parser = add_engine_args(argparse.ArgumentParser())
    assert EngineConfig.from_cli_and_env(parser.parse_args([]), environ={}).model.enforce_eager is False
    assert EngineConfig.from_cli_and_env(parser.parse_args(["--enforce-eager"]), environ={}).model.enforce_eager is True
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(model=ModelConfig(enforce_eager="yes"))
    for flag in (False, True):  # CPU: never a graph runner, whatever the flag
        runner = _engine(tiny, enforce_eager=flag).core.executor.worker.runner
        assert runner.decode_graphs is None
        assert runner.kv_cache.num_blocks == 128 + 1 and runner.scratch_block == 128  # one page past the manager's


# ------------------------------------------------------------------------------------------------ the forward


class _AtenOps(TorchDispatchMode):
    """Records the aten ops a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_static_decode_forward_compiles_fullgraph(tiny_one_layer):
    """Dynamo traces the whole decode forward (embedding -> every layer, MoE included) without a graph break: no
    host syncs, no data-dependent shapes. bfloat16, the GPU dtype: torch's fake (meta) `_grouped_mm` accepts only
    bf16 although its CPU kernel also runs fp32, so an fp32 trace fails inside torch, not in our code."""
    runner = _engine(tiny_one_layer, dtype="bfloat16", num_kv_blocks=16).core.executor.worker.runner
    static = DecodeGraphRunner(runner.model, runner.kv_cache, runner.scratch_block, 4, max_context_tokens=64,
                               use_graphs=False)
    width = static.widths[-1]
    static.forward(2, width)  # resolves the MoE implementation and stacks the experts (like a capture's warm-up)
    with _AtenOps() as ops:
        eager = static.forward(2, width)
    # what a CUDA-graph capture cannot hold: tensors made from host data (a pageable host->device copy), host reads
    assert not ops.names & {"aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten.nonzero.default",
                            "aten._local_scalar_dense.default", "aten.item.default"}, ops.names
    torch._dynamo.reset()
    compiled = torch.compile(static.forward, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(2, width), eager, rtol=0, atol=0)


def test_static_decode_path_equals_eager_on_a_mixed_run(tiny):
    """Decode rows of think requests next to an image request: every pure-decode step runs the eager forward, then
    the static decode path on the same inputs; hidden states and the K/V it wrote must agree, and the engine goes
    on with the STATIC results (so later steps read the static path's K/V). Mixed steps must stay eager."""
    eng = _engine(tiny)
    core, runner = eng.core, eng.core.executor.worker.runner
    static = DecodeGraphRunner(runner.model, runner.kv_cache, runner.scratch_block, 4, max_context_tokens=2048,
                               use_graphs=False)
    eager_run = runner._run
    compared, eager_steps = [], []

    def run_both(chunks, step_of):
        hidden = eager_run(chunks, step_of)
        if static.select([c for _, c in chunks]) is None:
            eager_steps.append(sorted({"diffusion" if c.diffusion else "prefill" if c.end - c.start > 1 else "decode"
                                       for _, c in chunks}))
            return hidden
        bs = runner.block_size
        slots = torch.tensor([c.block_table[c.start // bs] * bs + c.start % bs for _, c in chunks])
        pages, offs = slots // bs, slots % bs
        kv_eager = [layer[pages, :, offs].clone() for layer in runner.kv_cache.kv]
        out = static.run([c for _, c in chunks])
        ref = torch.cat([hidden[i] for i, _ in chunks])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for layer, before in zip(runner.kv_cache.kv, kv_eager):  # the static path's own K/V writes
            torch.testing.assert_close(layer[pages, :, offs], before, rtol=1e-5, atol=1e-5)
        compared.append(len(chunks))
        return {i: out[r : r + 1] for r, (i, _) in enumerate(chunks)}

    runner._run = run_both
    for i, prompt in enumerate(["think about a cat", "think about a red car on a wet road", "a dog"]):
        eng.add_request(dict(request_id=f"think{i}", prompt=prompt, bot_task="think_recaption",
                             max_new_tokens=16, seed=i, **BASE))
    eng.add_request(dict(request_id="img", prompt="a cube", bot_task="image", seed=9, **BASE))
    results = {}
    for _ in range(40):
        results.update(core.step().finished)
        if len([n for n in compared if n == 3]) >= 3:
            break
    assert not [r.error for r in results.values() if r.error]
    assert compared.count(3) >= 3, (compared, eager_steps)  # three rows in bucket 4: one padding row
    assert ["decode", "diffusion"] in eager_steps or ["decode", "prefill"] in eager_steps, eager_steps


# ------------------------------------------------------------------------------------------------ FlashInfer


class _EmulatedGraphDecodeWrapper:
    """Stands in for FlashInfer's decode wrapper in CUDA-graph mode on a machine without it: the constructor keeps
    the fixed buffers it is given, plan() copies the host arrays into them (as FlashInfer does in that mode) and run()
    computes paged decode attention in torch from those buffers only, so a wrong buffer gives a wrong result."""

    def __init__(self, workspace, layout, calls: list, use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):
        assert use_cuda_graph and layout == "NHD"
        self.calls, self.indptr, self.indices = calls, paged_kv_indptr_buffer, paged_kv_indices_buffer
        self.last = paged_kv_last_page_len_buffer
        calls.append(("init", len(self.last), len(self.indptr), len(self.indices)))

    def plan(self, indptr, indices, last_page_len, hq, hkv, d, page_size, **kw):
        assert all(t.device.type == "cpu" and t.dtype == torch.int32 for t in (indptr, last_page_len))
        assert indices.device == self.indices.device and indices.dtype == torch.int32
        assert len(indptr) == len(self.indptr) and len(indices) <= len(self.indices)
        self.indptr.copy_(indptr)
        self.indices[: len(indices)].copy_(indices)
        self.last.copy_(last_page_len)
        self.page_size, self.scale = page_size, kw["sm_scale"]
        self.calls.append(("plan", len(last_page_len)))

    def run(self, q, paged):
        self.calls.append(("run", q.shape[0]))
        out = torch.empty_like(q)
        hq, hkv = q.shape[1], paged.shape[3]
        for b in range(q.shape[0]):
            lo, hi = int(self.indptr[b]), int(self.indptr[b + 1])
            pages = self.indices[lo:hi].long()
            n = (hi - lo - 1) * self.page_size + int(self.last[b])
            k = paged[pages, 0].reshape(-1, hkv, q.shape[2])[:n].repeat_interleave(hq // hkv, 1)
            v = paged[pages, 1].reshape(-1, hkv, q.shape[2])[:n].repeat_interleave(hq // hkv, 1)
            w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k.float()) * self.scale, -1)
            out[b] = torch.einsum("hn,nhd->hd", w, v.float()).to(q.dtype)
        return out


def test_flashinfer_backend_captures_its_graph_mode_decode_wrapper(tiny, monkeypatch):
    """attn_impl=flashinfer: graph steps run FlashInfer's decode wrapper in CUDA-graph mode (one per batch bucket, over
    fixed buffers [B + 1] / [B x widest pages] / [B], planned once per step on host int32 arrays before the forward),
    never torch attention; one page-table width serves every context. The wrapper's result from its buffers equals
    the eager forward."""
    import sys
    import types

    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
    from diffgentor.kernels import flashinfer_attention
    from diffgentor.kernels.sdpa_rules import record_sdpa_calls

    from helpers import static_and_eager_decode

    calls: list = []
    fake = types.ModuleType("flashinfer")
    fake.BatchDecodeWithPagedKVCacheWrapper = lambda ws, layout, **kw: _EmulatedGraphDecodeWrapper(ws, layout, calls,
                                                                                                    **kw)
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(flashinfer_attention, "flashinfer_attention_available", lambda device: (True, "ok"))
    model = HunyuanImage3ForCausalMM.from_pretrained(tiny)
    backbone = model.model
    fi = flashinfer_attention.FlashInferPagedAttention(backbone.num_local_heads, backbone.num_local_kv_heads,
                                                       model.config.head_dim)
    res = static_and_eager_decode(model, graph_attention=fi)
    runner = res["runner"]
    assert isinstance(runner.attn, flashinfer_attention.FlashInferGraphDecode) and runner.paged_kernel
    widest = -(-model.config.max_position_embeddings // 4)
    assert runner.widths == (widest,)
    layers = model.config.num_hidden_layers
    assert calls == [("init", 4, 5, 4 * widest), ("plan", 4)] + [("run", 4)] * layers, calls
    torch.testing.assert_close(res["static"], res["eager"], rtol=1e-5, atol=1e-5)
    with record_sdpa_calls() as rec:  # the same step again: no torch attention at all
        again = runner.run(res["chunks"])
    assert rec.calls == [] and torch.equal(again, res["static"])


def test_flashinfer_graph_plan_hands_the_page_indices_over_on_the_device(monkeypatch):
    """In CUDA-graph mode FlashInfer copies a HOST page-index array into its buffer with a blocking copy (a host sync
    per step): prepare() hands it the indices already on the device ("meta" here), and indptr / last-page lengths,
    which its planning reads on the host, as host arrays."""
    import sys
    import types

    from diffgentor.kernels import flashinfer_attention

    calls: list = []
    planned: list = []

    class Recording(_EmulatedGraphDecodeWrapper):
        def plan(self, indptr, indices, last_page_len, *args, **kw):
            planned.append((indptr.device.type, indices.device.type, last_page_len.device.type))

    fake = types.ModuleType("flashinfer")
    fake.BatchDecodeWithPagedKVCacheWrapper = lambda ws, layout, **kw: Recording(ws, layout, calls, **kw)
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(flashinfer_attention, "flashinfer_attention_available", lambda device: (True, "ok"))
    graph = flashinfer_attention.FlashInferPagedAttention(8, 2, 16).graph_decode("meta", (1, 2, 4), 6)
    graph.prepare([5, 17, 1, 1], [[3, 4], [7, 8, 9, 10, 11], [0], [0]], 4, torch.bfloat16, torch.bfloat16)
    assert calls == [("init", 4, 5, 24)] and planned == [("cpu", "meta", "cpu")]


def test_flashinfer_unavailable_graph_steps_use_the_torch_static_attention(tiny):
    """Where FlashInfer cannot run (here: CPU), the backend's graph steps fall back to the torch static attention,
    with every width bucket."""
    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM
    from diffgentor.kernels.flashinfer_attention import FlashInferPagedAttention

    from helpers import static_and_eager_decode

    model = HunyuanImage3ForCausalMM.from_pretrained(tiny)
    b = model.model
    res = static_and_eager_decode(model, graph_attention=FlashInferPagedAttention(
        b.num_local_heads, b.num_local_kv_heads, model.config.head_dim))
    assert isinstance(res["runner"].attn, StaticDecodeAttention) and len(res["runner"].widths) > 1
    torch.testing.assert_close(res["static"], res["eager"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("attn_impl", ["sdpa", "flashinfer"])
def test_gpu_decode_graph_replay_equals_eager(tiny, attn_impl):
    """On CUDA (bf16): every pure-decode step replays its bucket's graph; the replay equals the uncaptured static
    forward on the same inputs (same kernels) and the eager forward within bf16 rounding. With FlashInfer proven at
    start-up the graph holds its CUDA-graph-mode decode wrapper (one width), else the torch static attention."""
    eng = _engine(tiny, device="cuda", dtype="bfloat16", attn_impl=attn_impl)
    core, runner = eng.core, eng.core.executor.worker.runner
    graphs = runner.decode_graphs
    assert graphs is not None and graphs.use_graphs
    fi = runner.model.model.attn.name == "flashinfer"
    assert graphs.paged_kernel == fi and (graphs.attn.name == "flashinfer_graph_decode") == fi
    uncaptured = DecodeGraphRunner(runner.model, runner.kv_cache, runner.scratch_block, 4, use_graphs=False)
    eager_run = runner._run
    compared = []

    def run_both(chunks, step_of):
        runner.decode_graphs = None
        hidden = eager_run(chunks, step_of)  # eager, writes the step's K/V
        runner.decode_graphs = graphs
        replayed = graphs.run([c for _, c in chunks])
        if replayed is None:
            return hidden
        static = uncaptured.run([c for _, c in chunks])
        ref = torch.cat([hidden[i] for i, _ in chunks]).float()
        torch.testing.assert_close(replayed.float(), static.float(), rtol=1e-2, atol=1e-2)
        err = (replayed.float() - ref).norm() / ref.norm()  # other attention kernel, padded batch: bf16 rounding
        assert err < 5e-2, err
        compared.append(len(chunks))
        return {i: replayed[r : r + 1] for r, (i, _) in enumerate(chunks)}

    runner._run = run_both
    for i, prompt in enumerate(["think about a cat", "think about a red car on a wet road", "a dog"]):
        eng.add_request(dict(request_id=f"think{i}", prompt=prompt, bot_task="think_recaption",
                             max_new_tokens=16, seed=i, **BASE))
    results = {}
    for _ in range(40):
        results.update(core.step().finished)
        if len(compared) >= 6:
            break
    if torch.cuda.get_device_capability() >= (9, 0):  # torch._grouped_mm (sync-free MoE) needs sm90
        assert graphs.disabled_reason is None, graphs.disabled_reason
        assert compared and graphs.captured, (compared, graphs.captured)
    assert not [r.error for r in results.values() if r.error]
