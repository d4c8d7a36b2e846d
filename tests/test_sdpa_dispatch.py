"""No SDPA call of an engine step may leave CUDA only the math kernel (`kernels.sdpa_rules`).

The engine run follows the path the CUDA dispatch takes with `attn_impl=sdpa` (FlashInfer absent or failed): the
flat forward through `TorchPagedAttention` for prefill chunks and diffusion steps, and the static decode forward
of `engine.cuda_graph` (what a captured graph replays) for decode-only steps. Every recorded call is checked with
the CUDA eligibility rules at the dtype CUDA computes in (bf16)."""

from __future__ import annotations

import pytest
import torch

from diffgentor.engine.cuda_graph import DecodeGraphRunner
from diffgentor.engine.offline import Engine
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.kernels.attention import expand_kv_heads
from diffgentor.kernels.sdpa_rules import SdpaCall, fused_kernels, record_sdpa_calls

from helpers import random_png


@pytest.fixture(scope="module")
def tiny_distil(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.Distil-3.0", distil=True)


def test_rules_at_the_real_shapes():
    """The rules' verdicts for the three call shapes that matter (meta tensors: no memory)."""
    b, hq, hkv, n, m, d = 1, 32, 8, 4099, 10700, 128
    q = torch.empty(b, n, hq, d, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.empty(b, m, hkv, d, device="meta", dtype=torch.bfloat16)
    mask = torch.empty(b, 1, n, m, device="meta", dtype=torch.bool)
    masked_gqa = SdpaCall.of(q, k.transpose(1, 2), k.transpose(1, 2), mask, enable_gqa=True)
    assert masked_gqa.masked_gqa and "flash" not in fused_kernels(masked_gqa)
    assert "efficient" not in fused_kernels(masked_gqa)
    ke, ve = expand_kv_heads(k, k, hq // hkv)
    expanded = SdpaCall.of(q, ke.transpose(1, 2), ve.transpose(1, 2), mask)
    assert "efficient" in fused_kernels(expanded) and not expanded.masked_gqa
    unmasked = SdpaCall.of(q, k.transpose(1, 2), k.transpose(1, 2), enable_gqa=True)
    assert "flash" in fused_kernels(unmasked)
    causal_rect = SdpaCall.of(q, ke.transpose(1, 2), ve.transpose(1, 2), is_causal=True)
    assert "flash" not in fused_kernels(causal_rect)  # flash's is_causal needs n == m


def test_expanded_heads_equal_enable_gqa_bitwise_on_cpu():
    torch.manual_seed(0)
    b, hq, hkv, n, m, d = 2, 8, 2, 19, 53, 32
    q = torch.randn(b, hq, n, d)
    k, v = torch.randn(b, m, hkv, d), torch.randn(b, m, hkv, d)
    mask = (torch.arange(m) < torch.randint(1, m + 1, (b, n, 1))).unsqueeze(1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                                           enable_gqa=True)
    ke, ve = expand_kv_heads(k, v, hq // hkv)
    got = torch.nn.functional.scaled_dot_product_attention(q, ke.transpose(1, 2), ve.transpose(1, 2), attn_mask=mask)
    assert torch.equal(ref, got)


def test_no_engine_step_leaves_cuda_only_the_math_kernel(tiny_distil):
    eng = Engine.from_pretrained(tiny_distil, environ={}, device="cpu", dtype="float32", num_kv_blocks=256,
                                 max_num_seqs=4, max_num_batched_tokens=1024, attn_impl="sdpa")
    core = eng.core
    runner = core.executor.worker.runner
    # follow CUDA's dispatch: decode rows batched across lengths (no batch-invariance rule) and decode-only steps
    # through the static forward a captured graph replays (graphs are off on CPU)
    runner.model.model.attn.batch_invariant = False
    assert runner.decode_graphs is None
    runner.decode_graphs = DecodeGraphRunner(runner.model, runner.kv_cache, runner.scratch_block, 4,
                                             use_graphs=False)
    base = dict(num_inference_steps=3, seed=1, image_size="256x256", output_type="latent", max_new_tokens=8,
                infer_align_image_size=False)
    edit = dict(base, request_id="edit", prompt="make it night", images=[random_png(32, 32, 1)],
                bot_task="think_recaption")
    later = [dict(base, request_id="t2i", prompt="a red cube", bot_task="think_recaption", seed=2),
             dict(base, request_id="img", prompt="a blue ball", bot_task="image", seed=3)]
    steps: list[tuple[dict[str, int], list[SdpaCall]]] = []
    eng.add_request(edit)
    results = {}
    while core.has_unfinished_requests():
        if later and len(steps) in (2, 8):
            eng.add_request(later.pop(0))
        before = dict(core.stats.phase_tokens)
        with record_sdpa_calls() as rec:
            results.update(core.step().finished)
        kinds = {k: core.stats.phase_tokens[k] - before[k] for k in before}
        steps.append((kinds, rec.calls))
    assert all(results[r].error is None for r in ("edit", "t2i", "img"))
    calls = [c for _, cs in steps for c in cs]
    bad = [c.describe() for c in calls if c.masked_gqa or not {"flash", "efficient"} & set(
        fused_kernels(c, torch.bfloat16))]
    assert not bad, f"{len(bad)} of {len(calls)} SDPA calls leave CUDA only the math kernel: {bad[:3]}"
    assert any(c.mask_shape is not None for c in calls)  # image blocks were attended (masked groups ran)
    mixed = [k for k, _ in steps if k["prefill"] and k["decode"] and k["diffuse"]]
    decode_only = [cs for k, cs in steps if k["decode"] and not k["prefill"] and not k["diffuse"]]
    assert mixed, "; ".join(str(tuple(k.values())) for k, _ in steps)
    # the decode rows of a mixed step: one padded group, each KV head's 2 query heads folded into 2 query rows
    folded = [c for k, cs in steps if k["decode"] > 1 and k["prefill"] for c in cs
              if c.q_shape[1] == c.k_shape[1] and c.q_shape[2] == 2 and c.mask_shape and c.mask_shape[2] == 1]
    assert folded
    assert decode_only and all(c.mask_shape is not None and not c.enable_gqa for cs in decode_only for c in cs)
