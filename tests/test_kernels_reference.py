"""Reference kernels: RMSNorm numerics, 2-D RoPE vs golden, SwiGLU order, MoE vs dense, paged attention."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from diffgentor.kernels.activation import silu_and_mul
from diffgentor.kernels.attention import (
    AttentionMetadata,
    SequenceChunk,
    paged_attention_reference,
)
from diffgentor.kernels.attention_select import get_attention_backend
from diffgentor.kernels.kv_cache import PagedKVCache
from diffgentor.kernels.moe import (
    fused_experts_reference,
    moe_forward_reference,
    select_experts,
)
from diffgentor.kernels.norm import RMSNorm, rms_norm
from diffgentor.kernels.rope import apply_rope, positions_2d, rope_cos_sin

# ------------------------------------------------------------------------------------------------ RMSNorm


def test_rms_norm_fp32_matches_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    w = 1 + 0.1 * torch.randn(64, generator=g)
    want = w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(rms_norm(x, w, 1e-5), want, atol=1e-6, rtol=1e-6)


def test_rms_norm_bf16_casts_before_weight_multiply():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 128, generator=g).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(128, generator=g)).to(torch.bfloat16)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, w * normed)
    m = RMSNorm(128, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(w)
    assert torch.equal(m(x), out)


# ------------------------------------------------------------------------------------------------ RoPE


def test_rope_matches_golden_cos_sin(golden_distil):
    manifest = json.loads((golden_distil / "manifest.json").read_text())
    blocks = manifest["files"]["gen.safetensors"]["rope_image_info"][0]
    with safe_open(str(golden_distil / "gen.safetensors"), "pt") as f:
        cos_g, sin_g = f.get_tensor("rope_cos")[0], f.get_tensor("rope_sin")[0]
    pos = positions_2d(cos_g.shape[0], blocks)
    cos, sin = rope_cos_sin(pos, head_dim=cos_g.shape[1], theta=10000.0)
    assert (cos - cos_g).abs().max().item() <= 1e-6
    assert (sin - sin_g).abs().max().item() <= 1e-6


def test_positions_2d_centred_grid_and_padding():
    # block of 64 tokens at 10 with a 6x9 grid: 54 grid tokens, 10 padded tokens keep their 1-D index
    pos = positions_2d(80, [(10, 74, 6, 9)])
    assert pos[:10].tolist() == [[i, i] for i in range(10)]
    assert pos[10].tolist() == [10 + (54 - 6) // 2, 10 + (54 - 9) // 2]  # (34, 32): 22.5 truncated to 22
    assert pos[10 + 9].tolist() == [35, 32]  # row 1, col 0
    assert pos[10 + 53].tolist() == [34 + 5, 32 + 8]
    assert pos[64:].tolist() == [[i, i] for i in range(64, 80)]
    with pytest.raises(ValueError):
        positions_2d(20, [(10, 15, 2, 3)])


def test_rope_text_is_relative_1d():
    # y == x == p is plain 1-D RoPE: q.k depends on the position difference only
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 32, generator=g).expand(6, 1, 32)
    k = torch.randn(1, 1, 32, generator=g).expand(6, 1, 32)
    pos = positions_2d(6)
    cos, sin = rope_cos_sin(pos, 32, 10000.0)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    d1 = (qr[3] * kr[1]).sum()
    d2 = (qr[5] * kr[3]).sum()
    torch.testing.assert_close(d1, d2, atol=1e-5, rtol=1e-5)
    # and slot 0 rotates dims (0, D/2) by angle p * theta_0 = p
    x = torch.zeros(6, 1, 32)
    x[:, 0, 0] = 1.0
    r = apply_rope(x, cos, sin)
    torch.testing.assert_close(r[:, 0, 0], torch.cos(torch.arange(6.0)))
    torch.testing.assert_close(r[:, 0, 16], torch.sin(torch.arange(6.0)))


def test_rope_y_on_even_x_on_odd_slots():
    pos = torch.tensor([[3, 7]])
    cos, _ = rope_cos_sin(pos, 16, 10000.0)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ang = torch.where(torch.arange(8) % 2 == 0, 3 * inv, 7 * inv)
    torch.testing.assert_close(cos[0], torch.cos(torch.cat([ang, ang])))


# ------------------------------------------------------------------------------------------------ activation


def test_silu_and_mul_silu_on_second_half():
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    want = torch.tensor([[2.0 * F.silu(torch.tensor(0.5)), -1.0 * F.silu(torch.tensor(3.0))]])
    torch.testing.assert_close(silu_and_mul(x), want)


# ------------------------------------------------------------------------------------------------ MoE


def _moe_weights(e: int, h: int, i: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    router = torch.randn(e, h, generator=g) / h**0.5
    shared13 = torch.randn(2 * i, h, generator=g) / h**0.5
    shared2 = torch.randn(h, i, generator=g) / i**0.5
    return router, w13, w2, shared13, shared2


def _dense_moe(x, router, w13, w2, top_k, shared13, shared2):
    """Independent math: every expert on every token, combined with a dense renormalised top-k matrix."""
    probs = torch.softmax(x.double() @ router.double().T, dim=-1)
    kth = probs.topk(top_k, dim=-1).values[:, -1:]
    dense_w = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    dense_w = dense_w / dense_w.sum(-1, keepdim=True)
    xd = x.double()
    out = torch.zeros_like(xd)
    for e in range(w13.shape[0]):
        gu = xd @ w13[e].double().T
        up, gate = gu.chunk(2, dim=-1)
        out += dense_w[:, e : e + 1] * ((up * F.silu(gate)) @ w2[e].double().T)
    gu = xd @ shared13.double().T
    up, gate = gu.chunk(2, dim=-1)
    return (out + (up * F.silu(gate)) @ shared2.double().T).float()


@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_moe_loop_matches_dense(tokens):
    router, w13, w2, s13, s2 = _moe_weights(8, 32, 16, seed=tokens)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(100 + tokens))
    got = moe_forward_reference(x, router, w13, w2, 3, s13, s2)
    torch.testing.assert_close(got, _dense_moe(x, router, w13, w2, 3, s13, s2), atol=1e-5, rtol=1e-5)
    # per-expert sequences give the same result as stacked tensors
    got_list = moe_forward_reference(x, router, list(w13), list(w2), 3, s13, s2)
    torch.testing.assert_close(got_list, got, atol=0, rtol=0)


def test_select_experts_renormalises_every_path_and_routes_in_fp32():
    router, *_ = _moe_weights(8, 32, 16, seed=3)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    # a single decode token is renormalised too (docs/decisions.md: MoE: dropless)
    w, ids = select_experts(x, router, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(1))
    assert ids.dtype == torch.long and ids.shape == (1, 2)
    xb = x.to(torch.bfloat16)
    wb, idb = select_experts(xb, router, 2)
    assert wb.dtype == torch.bfloat16
    want_logits = xb.float() @ router.T  # fp32 input upcast and fp32 router
    assert idb.tolist() == want_logits.softmax(-1).topk(2).indices.tolist()
    wn, _ = select_experts(x, router, 2, renormalize=False, routed_scaling_factor=2.0)
    torch.testing.assert_close(wn, 2.0 * torch.softmax(x @ router.T, -1).topk(2).values)


def test_fused_experts_empty_and_unused_experts():
    _, w13, w2, _, _ = _moe_weights(4, 16, 8, seed=5)
    x = torch.randn(3, 16)
    ids = torch.tensor([[0, 2], [2, 0], [0, 2]])
    w = torch.full((3, 2), 0.5)
    out = fused_experts_reference(x, w, ids, w13, w2)
    want = torch.zeros_like(x)
    for t in range(3):
        for e in (0, 2):
            up, gate = (x[t] @ w13[e].T).chunk(2)
            want[t] += 0.5 * ((up * F.silu(gate)) @ w2[e].T)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    assert fused_experts_reference(x[:0], w[:0], ids[:0], w13, w2).shape == (0, 16)


# ------------------------------------------------------------------------------------------------ attention

HQ, HKV, D = 4, 2, 16


def _qkv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HQ, D, generator=g), torch.randn(n, HKV, D, generator=g),
            torch.randn(n, HKV, D, generator=g))


def _dense_official(q, k, v, spans):
    """Whole-sequence SDPA with the official 4-D mask: tril | block x block for each full-attention span."""
    n = q.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for a, b in spans:
        mask[a:b, a:b] = True
    kk = k.repeat_interleave(HQ // HKV, dim=1)
    vv = v.repeat_interleave(HQ // HKV, dim=1)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=mask
    )
    return o.transpose(0, 1)


def _pages(n_tokens: int, block_size: int, pool: list[int]) -> list[int]:
    need = -(-n_tokens // block_size)
    return [pool.pop() for _ in range(need)]


def _run_chunks(cache, layer, q, k, v, plan, block_size):
    """plan: list of (chunks, token index lists) -> attention output per step (K/V written first)."""
    outs = []
    for chunks, rows in plan:
        md = AttentionMetadata.build(chunks, block_size)
        idx = torch.tensor([i for r in rows for i in r], dtype=torch.long)
        cache.write(layer, md.slot_mapping, k[idx], v[idx])
        outs.append(paged_attention_reference(q[idx], md, cache, layer, D**-0.5))
    return outs


def _pool(num_blocks: int, seed: int) -> list[int]:
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)  # non-contiguous page ids
    return ids


@pytest.mark.parametrize("spans", [[], [(5, 21), (22, 30)], [(3, 40)]])
def test_paged_full_prefill_equals_dense_official_mask(spans):
    n, bs = 45, 4
    q, k, v = _qkv(n, seed=len(spans))
    cache = PagedKVCache(2, 32, bs, HKV, D)
    table = _pages(n, bs, _pool(32, 0))
    (out,) = _run_chunks(cache, 1, q, k, v, [([SequenceChunk(range(n), n, table, spans)], [range(n)])], bs)
    torch.testing.assert_close(out, _dense_official(q, k, v, spans), atol=1e-5, rtol=1e-5)


def test_paged_chunked_prefill_then_decode_equals_full_forward():
    n, bs = 40, 4
    spans = [(6, 18), (19, 27)]
    q, k, v = _qkv(n, seed=7)
    dense = _dense_official(q, k, v, spans)
    cache = PagedKVCache(1, 16, bs, HKV, D)
    table = _pages(n, bs, _pool(16, 1))
    plan = []
    # chunk boundaries never split a bidirectional block: [0, 5), [5, 19), [19, 33), then decode one by one
    for a, b in [(0, 5), (5, 19), (19, 33)] + [(i, i + 1) for i in range(33, n)]:
        plan.append(([SequenceChunk(range(a, b), b, table, spans)], [range(a, b)]))
    outs = _run_chunks(cache, 0, q, k, v, plan, bs)
    torch.testing.assert_close(torch.cat(outs), dense, atol=1e-5, rtol=1e-5)


def test_paged_diffusion_step_rewrites_image_block_in_place():
    # after a prefill, a later step re-runs only [timestep, image block] at their original KV indices
    n, bs = 30, 4
    spans = [(11, 27)]
    q, k, v = _qkv(n, seed=8)
    cache = PagedKVCache(1, 16, bs, HKV, D)
    table = _pages(n, bs, _pool(16, 2))
    _run_chunks(cache, 0, q, k, v, [([SequenceChunk(range(n), n, table, spans)], [range(n)])], bs)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    fresh = _qkv(n, seed=9)
    for t, f in zip((q2, k2, v2), fresh):
        t[10:27] = f[10:27]
    (out,) = _run_chunks(cache, 0, q2, k2, v2, [([SequenceChunk(range(10, 27), n, table, spans)],
                                                  [range(10, 27)])], bs)
    torch.testing.assert_close(out, _dense_official(q2, k2, v2, spans)[10:27], atol=1e-5, rtol=1e-5)


def test_paged_flat_batch_of_sequences_equals_each_alone():
    bs = 4
    lens = [13, 30, 1, 22]
    spans = [[], [(4, 20)], [], [(2, 9), (10, 21)]]
    data = [_qkv(n, seed=20 + s) for s, n in enumerate(lens)]
    pool = _pool(40, 3)
    tables = [_pages(n, bs, pool) for n in lens]
    cache = PagedKVCache(1, 40, bs, HKV, D)
    # step 1: sequences 0, 1, 3 prefill (3 in part) in one flat batch; step 2: 0 decodes, 2 prefills, 3 rest
    steps = [
        [(0, 0, 12), (1, 0, 30), (3, 0, 10)],
        [(0, 12, 13), (2, 0, 1), (3, 10, 22)],
    ]
    got: dict[int, list[torch.Tensor]] = {s: [] for s in range(len(lens))}
    for step in steps:
        chunks = [SequenceChunk(range(a, b), b, tables[s], spans[s]) for s, a, b in step]
        md = AttentionMetadata.build(chunks, bs)
        q = torch.cat([data[s][0][a:b] for s, a, b in step])
        k = torch.cat([data[s][1][a:b] for s, a, b in step])
        v = torch.cat([data[s][2][a:b] for s, a, b in step])
        cache.write(0, md.slot_mapping, k, v)
        be = get_attention_backend("torch", HQ, HKV, D, D**-0.5)
        be.plan(md)
        out = be.run(q, k, v, cache, 0)
        for j, (s, _, _) in enumerate(step):
            got[s].append(out[md.qo_indptr[j] : md.qo_indptr[j + 1]])
    for s in range(len(lens)):
        want = _dense_official(*data[s], spans[s])
        torch.testing.assert_close(torch.cat(got[s]), want, atol=1e-5, rtol=1e-5)


def test_metadata_builder_fields():
    md = AttentionMetadata.build(
        [SequenceChunk([4, 5, 6], 7, [3, 1], [(5, 7)]), SequenceChunk([2], 3, [0], write_kv=False)], 4
    )
    assert md.qo_indptr.tolist() == [0, 3, 4]
    assert md.kv_lens.tolist() == [7, 3]
    assert md.block_tables.tolist() == [[3, 1], [0, -1]]
    assert md.slot_mapping.tolist() == [1 * 4 + 0, 1 * 4 + 1, 1 * 4 + 2, -1]
    assert md.query_kv_index.tolist() == [4, 5, 6, 2]
    assert md.bidir_start.tolist() == [0, 5, 5, 0]
    assert md.bidir_end.tolist() == [0, 7, 7, 0]
    assert md.num_seqs == 2 and md.num_tokens == 4
    with pytest.raises(ValueError):
        AttentionMetadata.build([SequenceChunk([8], 8, [0, 1])], 4)  # query beyond kv_len
    with pytest.raises(ValueError):
        AttentionMetadata.build([SequenceChunk([0], 9, [0, 1])], 4)  # table too short
    with pytest.raises(ValueError):
        AttentionMetadata.build([SequenceChunk([0], 4, [0], [(0, 3), (2, 4)])], 4)  # overlapping spans


def test_kv_cache_skips_unwritten_slots_and_gathers_in_order():
    cache = PagedKVCache(1, 4, 2, 1, 3)
    k = torch.arange(9.0).reshape(3, 1, 3)
    cache.write(0, torch.tensor([5, -1, 0]), k, -k)
    assert cache.layer(0).abs().sum() == (k[0].abs().sum() + k[2].abs().sum()) * 2
    kk, vv = cache.gather(0, torch.tensor([2, 0, -1]), 3)  # slots 4, 5, 0
    assert torch.equal(kk[1], k[0]) and torch.equal(kk[2], k[2]) and torch.equal(vv[2], -k[2])
    with pytest.raises(IndexError):
        cache.write(0, torch.tensor([8]), k[:1], k[:1])


def test_attention_backend_selection(monkeypatch):
    from diffgentor.kernels.attention import TorchPagedAttention

    for name in ("torch", "sdpa", "SDPA"):
        be = get_attention_backend(name, HQ, HKV, D)
        assert isinstance(be, TorchPagedAttention) and be.variant == "mask"
    # kernels read no environment: the default is sdpa whatever the env var says, None is refused
    monkeypatch.setenv("DG_HUNYUAN_IMAGE_3_ATTN_IMPL", "flashinfer")
    assert isinstance(get_attention_backend(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D), TorchPagedAttention)
    with pytest.raises(ValueError):
        get_attention_backend(None, HQ, HKV, D)
    with pytest.raises(ValueError):
        get_attention_backend("nope")
