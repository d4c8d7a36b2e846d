"""The memory plan's transient terms against a MEASUREMENT: the real modules run at the real shapes on the meta device
under `engine.testing.meta_memory.MetaMemoryTracker` (every new storage counted, CUDA's fp16 VAE autocast and its
memory-efficient SDPA kernel emulated). Each planned term must be within 10% of the measured peak, for H100x8 bf16,
H100x4 FP8 and H200x1 FP8, on the steps of a 1024x1024 edit carrying 1 and 3 condition images.

Speed: the decoder stack is measured on TWO real-width layers (a layer's temporaries are freed before the next
starts, so the peak of 2 layers is the peak of 32: the second layer is the first one that sees the previous layer's
output beside the step's input); the VAE runs whole (the meta device computes nothing).
"""

from __future__ import annotations

import pytest
import torch

from diffgentor.engine.config import EngineConfig, ModelConfig, ParallelConfig
from diffgentor.engine.memory_plan import (
    GPUS,
    attention_bytes,
    attention_peak,
    forward_bytes,
    kv_block_bytes,
    moe_bytes,
    moe_peak,
    plan_for,
    vae_decode_bytes,
    vae_encode_bytes,
)
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.parallel import ParallelContext
from diffgentor.engine.testing.meta_memory import MetaMemoryTracker
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk, plan_sdpa_groups
from diffgentor.kernels.quantization import Fp8Weight, attach_fp8

from helpers import PUBLISHED_INSTRUCT_CONFIG

LAYOUTS = [("h100", 8, "none"), ("h100", 4, "fp8"), ("h200", 1, "fp8")]  # gpu, tensor parallel, quantization
IMAGE_BLOCK = 64 * 64 + 1024 + 6  # one 1024x1024 condition image: VAE tokens + ViT tokens + its specials
GEN_BLOCK = 64 * 64 + 3  # the generated image's block with its <timestep> / <guidance> / <timestep_r> slots
SYSTEM, TEXT, THINK = 300, 120, 64  # prompt text around the images and the reasoning tokens before the image
BLOCK_SIZE = 16
TOLERANCE = 0.10


def within(planned: int, measured: int) -> bool:
    return abs(planned - measured) <= TOLERANCE * measured


@pytest.fixture(scope="module")
def real_cfg():
    return HunyuanImage3Config.from_dict(PUBLISHED_INSTRUCT_CONFIG)


def _two_layer_model(real_cfg, parallel: ParallelContext, quant: str, impl: str):
    """The real-width model with 2 decoder layers on the meta device, bf16, FP8 experts when `quant` asks."""
    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM

    raw = dict(real_cfg.raw, num_hidden_layers=2)
    for f in ("moe_topk", "num_shared_expert", "moe_intermediate_size"):
        raw[f] = raw[f][:2]
    with torch.device("meta"):
        model = HunyuanImage3ForCausalMM(HunyuanImage3Config.from_dict(raw), attn_backend="sdpa",
                                         parallel=parallel).to(torch.bfloat16)
    for layer in model.model.layers:
        mlp = layer.mlp
        if quant != "none":
            for expert in [*mlp._expert_list(), mlp.shared_mlp]:
                for lin in (expert.gate_and_up_proj, expert.down_proj):
                    shape = lin.weight.shape
                    attach_fp8(lin, Fp8Weight(torch.empty(shape, dtype=torch.float8_e4m3fn, device="meta"),
                                              torch.empty(shape[0], device="meta")))
        mlp._impl = impl
        mlp._stacked()
    return model


def edit_steps(images: int) -> list[tuple[str, list[tuple[int, int, int, list[tuple[int, int]]]]]]:
    """The forwards of a 1024x1024 edit with `images` condition images: prefill chunks of at most 8192 rows that
    never split an image block (a masked group where text precedes the block in the chunk), then a CFG denoising
    step (two sequences, the image block at the end of each: every row sees every key, no mask). Each chunk:
    (first row, end, kv_len, bidirectional spans)."""
    steps = []
    start = 0
    for i in range(images):
        block = (SYSTEM + i * IMAGE_BLOCK, SYSTEM + (i + 1) * IMAGE_BLOCK)
        end = block[1] + (TEXT if i == images - 1 else 0)
        steps.append((f"prefill image {i + 1}", [(start, end, end, [block])]))
        start = end
    ctx = start + THINK
    gen = (ctx, ctx + GEN_BLOCK)
    steps.append(("CFG denoising step", [(ctx, gen[1], gen[1], [gen]), (ctx, gen[1], gen[1], [gen])]))
    return steps


def _metadata(chunks):
    seqs, base = [], 0
    for q0, q1, kv_len, spans in chunks:
        pages = list(range(base, base + -(-kv_len // BLOCK_SIZE)))
        base += len(pages)
        seqs.append(SequenceChunk(range(q0, q1), kv_len, pages, spans))
    return AttentionMetadata.build(seqs, BLOCK_SIZE, device="meta"), base


@pytest.mark.parametrize("gpu,tp,quant", LAYOUTS)
def test_forward_terms_match_the_meta_measurement(real_cfg, gpu, tp, quant, monkeypatch):
    monkeypatch.setattr(ParallelContext, "all_reduce", lambda self, t: t)  # in place: no allocation either way
    parallel = ParallelContext(tp, 0)
    config = EngineConfig(model=ModelConfig(quantization=quant), parallel=ParallelConfig(tensor_parallel_size=tp))
    plan = plan_for(config, real_cfg, parallel, gpu)
    q = None if quant == "none" else quant
    backbone = _two_layer_model(real_cfg, parallel, quant, plan.moe_impl).model
    assert plan.fits and plan.moe_impl == ("grouped" if quant == "none" else "fp8_grouped")
    largest = 0
    for images in (1, 3):
        for name, chunks in edit_steps(images):
            md, pages = _metadata(chunks)
            masked = any(g.kind == "mask" for g in plan_sdpa_groups(md))
            kv = backbone.make_kv_cache(pages, BLOCK_SIZE, device="meta")
            rows = sum(q1 - q0 for q0, q1, _, _ in chunks)
            keys = max(c[2] for c in chunks)
            attn = attention_bytes(real_cfg, parallel, rows, keys, len(chunks), masked, 2, BLOCK_SIZE)
            planned = forward_bytes(real_cfg, parallel, rows, plan.moe_impl, attn, q)
            tracker = MetaMemoryTracker()
            with torch.no_grad(), tracker:
                x = torch.empty(rows, real_cfg.hidden_size, dtype=torch.bfloat16, device="meta")
                backbone(x, torch.zeros(rows, 2, dtype=torch.long, device="meta"), md, kv)
            where = f"{gpu}x{tp} {quant}, {images} image(s), {name}"
            assert within(planned, tracker.peak), (where, planned, tracker.peak, tracker.at_peak)
            largest = max(largest, tracker.peak)
            # the two terms on their own: one attention call (its plan included) and one MoE block
            layer = backbone.layers[1]
            h = torch.empty(rows, real_cfg.hidden_size, dtype=torch.bfloat16, device="meta")
            from diffgentor.engine.models.hunyuan_image_3.backbone import rope_cos_sin

            cos, sin = rope_cos_sin(torch.zeros(rows, 2, dtype=torch.long, device="meta"), real_cfg.head_dim,
                                    real_cfg.rope_theta)
            tracker = MetaMemoryTracker()
            with torch.no_grad(), tracker:
                backbone.attn.plan(md, q_dtype=h.dtype, kv_dtype=kv.dtype)
                layer.self_attn(h, cos, sin, md, kv)
            assert within(attention_peak(attn), tracker.peak), (where, "attention", attention_peak(attn),
                                                                tracker.peak, tracker.at_peak)
            tracker = MetaMemoryTracker()
            with torch.no_grad(), tracker:
                layer.mlp(h)
            moe = moe_peak(moe_bytes(real_cfg, parallel, rows, plan.moe_impl, q))
            assert within(moe, tracker.peak), (where, "moe", moe, tracker.peak, tracker.at_peak)
    # the plan's forward term bounds every measured step (it assumes the model's maximum length of keys)
    assert largest <= plan.activations["forward"] - plan.activations["logits"]
    # and the KV block the plan prices is the cache's own
    kv = backbone.make_kv_cache(1, BLOCK_SIZE, device="meta")
    per_layer = sum(t.numel() * t.element_size() for t in (kv.layer(0),))
    assert per_layer * real_cfg.num_hidden_layers == kv_block_bytes(real_cfg, parallel, BLOCK_SIZE)


@pytest.fixture(scope="module")
def meta_vae(real_cfg):
    from diffgentor.engine.models.hunyuan_image_3.vae import AutoencoderKLConv3D

    with torch.device("meta"):
        return AutoencoderKLConv3D(real_cfg.vae)


def _measure(fn) -> int:
    tracker = MetaMemoryTracker(cuda_autocast=torch.float16)
    with torch.no_grad(), tracker:
        fn()
    return tracker.peak


@pytest.mark.parametrize("images,height,width", [(1, 1024, 1024), (2, 1024, 1024), (1, 768, 1360), (1, 1360, 768)])
def test_vae_terms_match_the_meta_measurement(real_cfg, meta_vae, images, height, width, monkeypatch):
    """Decode (the decoder runs 4 frames at full size) and encode, fp16 convs and fp32 GroupNorm as CUDA autocast
    runs them; the plan's per-image terms and the decoder's fp16 weight cache. Off CPU every norm is torch's
    GroupNorm (autocast's fp32), never the CPU's chunked channels-last statistics."""
    from diffgentor.engine.models.hunyuan_image_3 import vae as vae_module

    def cpu_only(*args):
        raise AssertionError("the chunked channels-last GroupNorm ran off CPU")

    monkeypatch.setattr(vae_module, "_group_norm_channels_last", cpu_only)
    z = torch.empty(images, real_cfg.latent_channels, 1, height // 16, width // 16, device="meta")
    decode = _measure(lambda: meta_vae.decoder(z))
    assert within(vae_decode_bytes(real_cfg, height, width, images), decode), (decode, images, height, width)
    x = torch.empty(images, 3, 1, height, width, device="meta")
    encode = _measure(lambda: meta_vae.encoder(x, repeat_frames=4))
    assert within(vae_encode_bytes(real_cfg, height, width, images), encode), (encode, images, height, width)


def test_vae_budget_of_the_h200_fp8_plan(real_cfg):
    """What plan-memory prints for one H200 with FP8 experts: the VAE budget holds one 1024x1024 decode (its fp16
    weight cache included) and the KV blocks are what is left after every term."""
    plan = plan_for(EngineConfig(model=ModelConfig(quantization="fp8")), real_cfg, None, "h200")
    v = plan.vae
    assert v["budget"] >= vae_decode_bytes(real_cfg, 1024, 1024) and v["decode_images_per_call"] >= 1
    assert v["budget"] < vae_decode_bytes(real_cfg, 1024, 1024, v["decode_images_per_call"] + 1)
    resident = plan.weight_bytes + sum(plan.workspace.values()) + plan.encoder_cache_bytes + plan.graph_pool_bytes
    assert plan.kv_blocks == (plan.usable_bytes - resident - plan.transient_bytes) // plan.kv_block_bytes
    assert plan.graph_pool_bytes > 0 and plan.workspace["cublas"] > 0
    assert GPUS["h200"].name in plan.render()


def test_graph_pool_matches_the_meta_measurement(real_cfg):
    """The CUDA-graph pool holds the peak of the widest static decode forward (max_num_seqs rows over the widest
    page table), measured here on the real-width model."""
    from diffgentor.engine.cuda_graph import DecodeGraphRunner

    config = EngineConfig(model=ModelConfig(quantization="fp8"))
    plan = plan_for(config, real_cfg, None, "h200")
    model = _two_layer_model(real_cfg, ParallelContext(), "fp8", plan.moe_impl)
    runner = DecodeGraphRunner(model, model.make_kv_cache(2, BLOCK_SIZE), 1, config.scheduler.max_num_seqs,
                               use_graphs=False)
    tracker = MetaMemoryTracker()
    with torch.no_grad(), tracker:
        runner.forward(runner.buckets[-1], runner.widths[-1])
    assert within(plan.graph_pool_bytes, tracker.peak), (plan.graph_pool_bytes, tracker.peak, tracker.at_peak)
