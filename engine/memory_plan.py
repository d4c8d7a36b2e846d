"""Per-rank GPU memory plan of a HunyuanImage-3.0 checkpoint: does it fit, and how many KV blocks are left.

Why: the real model is 83 B parameters (~166 GB in bf16); whether a layout (card, tensor parallel size, expert
parallel, FP8 experts) fits must be known before a multi-minute load, and the engine sizes its KV cache from the same
numbers on a GPU (`kv_blocks_for`). Everything here is computed from `config.json` alone:

* weights: the model is BUILT ON THE META DEVICE with the rank's `ParallelContext` (so the byte counts are the
  module's own shapes, shards included) and every tensor is priced at its load dtype: the activation dtype (bf16 on a
  GPU), fp32 for the routers and the VAE (`keep_fp32_for_model`), and with `--quantization fp8` / `fp8_block` 1 byte
  per routed / shared expert weight plus its fp32 scales (per output row / per 128x128 block). Grouped by part:
  experts, attention, embeddings (wte + lm_head), ViT (+ aligner), VAE, other (norms, routers, image heads).
* transients, one phase of a step at a time (encode, forward, VAE decode run one after another): the forward of the
  largest step the scheduler may issue (max(`max_num_batched_tokens`, a 1024x1024 denoising step with its CFG row),
  over the model's maximum length of keys): the residual stream plus the larger of ONE layer's attention (the kernel
  CUDA runs: flash, or memory-efficient with a mask; never math) and MoE temporaries (per implementation: the
  grouped bf16 path, the FP8 scaled paths with `quantize_rows_fp8`'s fp32 copies at 4 bytes per element, the
  per-layer dequantisation where FP8 has no fast path); and the VAE budget: at least one 1024x1024 decode (the
  decoder runs 4 frames at full size, fp16 convs and fp32 GroupNorm under CUDA autocast, plus autocast's fp16 copy
  of the decoder weights) or encode. The worker sizes its VAE calls to that budget.
* resident besides weights and KV: the encoder cache budget, the CUDA-graph pool (the widest static decode
  forward), workspace: the CUDA context, cuBLAS, the FlashInfer attention workspace, with FlashInfer's fused MoE
  its one reused workspace (`flashinfer_moe_workspace_bytes`), NCCL buffers under tensor parallel.
* KV cache: gpu_memory_utilization x total memory - every term above, in blocks of
  2 (K, V) x layers x block_size x local KV heads x head_dim x 2 bytes; it must hold at least one request at the
  model's maximum length with its CFG row (2 x max_position_embeddings tokens).
Every transient term is checked against a measurement of the real modules at the real shapes on the meta device
(tests/test_memory_plan_measured.py, `engine.testing.meta_memory`); bench/gpu_check.sh compares the plan with
torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffgentor.engine.config import CFG_ROWS, EngineConfig
from diffgentor.engine.models.hunyuan_image_3 import HunyuanImage3Config, image_tokens, latent_grid
from diffgentor.engine.parallel import ParallelContext
from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.engine.vae_budget import VaeBudget
from diffgentor.kernels.impl_names import MOE_IMPLS, QUANTIZATIONS
from diffgentor.kernels.kv_cache import kv_block_bytes as cache_block_bytes
from diffgentor.kernels.moe import moe_impl_on
from diffgentor.kernels.quantization import FP8_BLOCK, fp8_layout
from diffgentor.kernels.ulysses import UlyssesHeads

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    name: str
    total_bytes: int
    """The card's memory as nvidia-smi reports it (MiB totals); what torch sees is the same."""
    capability: tuple[int, int]


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("H100 SXM 80GB", 81559 * MiB, (9, 0)),
    "h200": GpuSpec("H200 141GB", 143771 * MiB, (9, 0)),
    "b200": GpuSpec("B200 180GB", 183359 * MiB, (10, 0)),
    "a100-80g": GpuSpec("A100 SXM 80GB", 81920 * MiB, (8, 0)),
}

CUDA_CONTEXT_BYTES = 640 * MiB
"""CUDA context + loaded kernel modules (lazy loading), outside torch's allocator; typical for CUDA 12 on sm90."""
ATTENTION_WORKSPACE_BYTES = 128 * MiB
"""kernels.flashinfer_attention.WORKSPACE_BYTES: one float workspace shared by the planned wrappers."""
CUBLAS_WORKSPACE_BYTES = 2 * (32 + 1) * MiB
"""cuBLAS (32 MiB on sm90, PyTorch's default CUBLAS_WORKSPACE_CONFIG) plus cuBLASLt (1 MiB) per stream that runs a
GEMM: the compute stream and the CUDA-graph warm-up stream (engine/cuda_graph.py)."""
FLASHINFER_MOE_GEMM_WORKSPACE_BYTES = 64 * MiB
"""The grouped GEMMs' own workspaces inside FlashInfer's fused-MoE workspace (TMA descriptors, split-K scratch: a few
MiB at these shapes; a round margin)."""
FLASHINFER_DECODE_INT_WORKSPACE_BYTES = 8 * MiB
"""The int workspace FlashInfer's decode wrapper allocates on the device (one per graph-mode wrapper, i.e. per batch
bucket of engine/cuda_graph.py)."""
NCCL_BYTES = 512 * MiB
"""NCCL communicator buffers and its streams' workspace under tensor parallel (per rank, a conservative figure)."""
IMAGE_SIDE = 1024
IMAGE_EXTRA_SLOTS = 3  # <timestep>, <guidance>, <timestep_r> recomputed with the image block each step
VAE_BYTES_PER_ELEMENT = 12
"""Bytes per element of the VAE's full-resolution level ([c0 channels, ft frames, H, W]: the decoder's last level,
the encoder's first) at its peak under CUDA's fp16 autocast: a ResnetBlock's fp16 input and the previous block's
output still referenced (2 + 2), GroupNorm's fp32 output (4), its fp16 cast for the convolution (2) and the
convolution's fp16 output (2). Measured on the meta device at the real shapes (tests/test_memory_plan.py)."""
FP8_QUANT_BYTES_PER_ELEMENT = 12
"""`kernels.quantization.quantize_rows_fp8` holds three fp32 [rows, K] tensors at once: the fp32 copy, x / scale
and its clamp (the fp8 result comes after the division is freed)."""


class MemoryPlanError(ValueError):
    """The layout does not fit; the message says what does not."""


# ------------------------------------------------------------------------------------------------ weights
PARTS = ("experts", "attention", "embeddings", "vit", "vae", "other")


def weight_part(name: str) -> str:
    from diffgentor.engine.models.hunyuan_image_3.execution import is_expert_weight

    if name.startswith(("vision_model.", "vision_aligner.")):
        return "vit"
    if name.startswith("vae."):
        return "vae"
    if is_expert_weight(name):
        return "experts"
    if name.startswith("model.layers.") and ".self_attn." in name:
        return "attention"
    if name.startswith(("model.wte.", "lm_head.")):
        return "embeddings"
    return "other"


def _meta_model(model_config: HunyuanImage3Config, parallel: ParallelContext) -> torch.nn.Module:
    from diffgentor.engine.models.hunyuan_image_3.execution import HunyuanImage3ForCausalMM

    with torch.device("meta"):
        return HunyuanImage3ForCausalMM(model_config, parallel=parallel)


def _layer_signature(c: HunyuanImage3Config, i: int) -> tuple[Any, ...]:
    return c.moe_intermediate_size[i], c.moe_topk[i], c.num_shared_expert[i], c.is_moe_layer(i)


def _one_layer_config(c: HunyuanImage3Config) -> HunyuanImage3Config | None:
    """The same model with ONE decoder layer when all layers are alike (the real 32 are), else None.

    Building 32 layers x 65 experts of modules takes seconds (minutes on a busy CPU); one layer's byte counts times
    the layer count are exactly the same (tests/test_memory_plan.py compares both on a small config)."""
    if len({_layer_signature(c, i) for i in range(c.num_hidden_layers)}) != 1:
        return None
    raw = dict(c.raw, num_hidden_layers=1)
    for f in ("moe_topk", "num_shared_expert", "moe_intermediate_size"):
        if isinstance(raw.get(f), list):
            raw[f] = raw[f][:1]
    return HunyuanImage3Config.from_dict(raw)


def _fp8_bytes(shape: tuple[int, ...], layout: str) -> int:
    n, k = shape[-2:]
    lead = math.prod(shape[:-2])
    scales = n if layout == "channel" else math.ceil(n / FP8_BLOCK[0]) * math.ceil(k / FP8_BLOCK[1])
    return lead * (n * k + 4 * scales)


def weight_bytes_by_part(
    model_config: HunyuanImage3Config,
    parallel: ParallelContext,
    quantization: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    dedupe_layers: bool = True,
) -> dict[str, int]:
    """Bytes of this rank's parameters and buffers at their load dtypes, by part (see the module docstring).
    dedupe_layers: build one decoder layer and count it num_hidden_layers times when all layers are alike."""
    from diffgentor.engine.models.hunyuan_image_3.execution import keep_fp32_for_model

    layout = fp8_layout(quantization)
    one = _one_layer_config(model_config) if dedupe_layers else None
    model = _meta_model(one or model_config, parallel)
    repeat = model_config.num_hidden_layers if one is not None else 1
    out = dict.fromkeys(PARTS, 0)
    elem = torch.finfo(dtype).bits // 8
    for name, t in model.state_dict().items():
        part = weight_part(name)
        if part == "experts" and layout is not None:
            n = _fp8_bytes(tuple(t.shape), layout)
        elif not t.is_floating_point():
            n = t.numel() * t.element_size()
        else:
            n = t.numel() * (4 if keep_fp32_for_model(name) else elem)
        out[part] += n * (repeat if name.startswith("model.layers.") else 1)
    return out


# ------------------------------------------------------------------------------------------------ activations
def _denoising_block(model_config: HunyuanImage3Config) -> tuple[int, int]:
    """(latent side, tokens) of an `IMAGE_SIDE` square denoising step: its CFG rows' image blocks."""
    side, _ = latent_grid(IMAGE_SIDE, IMAGE_SIDE, model_config.latent_downsample)
    return side, CFG_ROWS * (image_tokens(IMAGE_SIDE, IMAGE_SIDE, model_config.latent_downsample) + IMAGE_EXTRA_SLOTS)


def largest_step_tokens(config: EngineConfig, model_config: HunyuanImage3Config) -> tuple[int, str]:
    """Tokens in the largest forward the scheduler may issue, and why."""
    sched = config.scheduler  # the step budgets are the scheduler's
    side, block = _denoising_block(model_config)
    if sched.max_num_image_tokens is not None:  # denoising blocks beside a full prefill budget
        images = max(block, sched.max_num_image_tokens)
        return sched.max_num_batched_tokens + images, (
            f"max_num_batched_tokens {sched.max_num_batched_tokens} + {images} denoising-block tokens "
            f"(max_num_image_tokens {sched.max_num_image_tokens}, at least one {IMAGE_SIDE}x{IMAGE_SIDE} step)")
    if block > sched.max_num_batched_tokens:
        return block, (f"a {IMAGE_SIDE}x{IMAGE_SIDE} denoising step: {CFG_ROWS} CFG rows x ({side}x{side} image + "
                       f"{IMAGE_EXTRA_SLOTS} slots) > max_num_batched_tokens {sched.max_num_batched_tokens}")
    return sched.max_num_batched_tokens, (f"max_num_batched_tokens (>= a {IMAGE_SIDE}x{IMAGE_SIDE} denoising step "
                                           f"of {block} tokens)")


def denoising_step_tokens(config: EngineConfig, model_config: HunyuanImage3Config, tokens: int) -> int:
    """How many of the largest step's `tokens` are denoising image-block rows (what sequence parallel splits): the
    image budget beside a full prefill, the 1024x1024 CFG step when it is the largest, else none (a text step)."""
    _, block = _denoising_block(model_config)
    if config.scheduler.max_num_image_tokens is not None:
        return max(block, config.scheduler.max_num_image_tokens)
    return block if tokens == block else 0


def planned_moe_impl(quantization: str | None, moe_impl: str | None, capability: tuple[int, int]) -> str:
    """The MoE path `kernels.moe.resolve_moe_impl` takes on a CUDA card of `capability` (asked of the kernel's own
    rule, flashinfer assumed to import and build; if it does not, the engine falls back to the eager path, whose plan
    is the larger one), named "dequantized" where FP8 expert weights run dequantised (they cost more memory)."""
    impl = moe_impl_on(moe_impl, quantization, capability)
    return "dequantized" if fp8_layout(quantization) is not None and impl in ("grouped", "reference") else impl


def _widest_moe_layer(c: HunyuanImage3Config, parallel: ParallelContext) -> tuple[int, int, int]:
    """(top-k, this rank's expert width, this rank's experts) of the layer with the most routed work."""
    layer = max(range(c.num_hidden_layers), key=lambda i: c.moe_topk[i] * c.moe_intermediate_size[i])
    return (c.moe_topk[layer], c.moe_intermediate_size[layer] // parallel.expert_tp_size,
            len(parallel.expert_range(c.num_experts)))


def moe_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, tokens: int, impl: str,
              quantization: str | None = None, dtype_bytes: int = 2) -> dict[str, int]:
    """Transient bytes of one MoE block on `tokens` tokens by stage (`kernels/moe.py`'s sorted grouped path; the
    peak is the largest stage plus `routing`, which lives throughout):

    * routing: top-k ids (int64) and weights, the sort order (int64) of the T*k assignments;
    * router: the fp32 copy of the input and the fp32 logits and probabilities;
    * up: the T*k gathered rows, the [up; gate] GEMM output and SiLU-and-mul's two [T*k, I] tensors;
    * quantize (FP8 scaled paths): the gathered rows plus `quantize_rows_fp8`'s three fp32 copies (4 bytes each);
    * combine: the gathered rows, the sorted and un-permuted outputs (a third copy under expert parallel: the
      masked select), the weighted sum and one product;
    * dequantize (FP8 weights without a fast path): this layer's local experts dequantised in fp32 then cast, and
      the dense copies held through the layer.
    flashinfer's fused MoE is planned as the eager path too; its reused workspace is a resident term
    (`flashinfer_moe_workspace_bytes`)."""
    c = model_config
    k, inter, experts = _widest_moe_layer(c, parallel)
    t, h, b = tokens, c.hidden_size, dtype_bytes
    r = t * k
    rows = r * h * b
    out = {
        "routing": t * k * (8 + b) + r * 8 + 4 * experts,
        "router": t * h * 4 + 2 * t * c.num_experts * 4,
        "up": rows + r * 2 * inter * b + 2 * r * inter * b,
        "combine": rows * (4 if parallel.expert_parallel and parallel.is_parallel else 3) + 2 * t * h * b,
    }
    if impl in ("fp8_grouped", "fp8_scaled_mm"):
        out["quantize"] = rows + r * h * FP8_QUANT_BYTES_PER_ELEMENT + r * 4
    if impl == "dequantized":
        per_elem = 14 if fp8_layout(quantization) == "block" else 10  # fp32 copy, fp32 product(, scales), cast
        dense = experts * 3 * inter * h * b
        out["dequantize"] = experts * 2 * inter * h * per_elem
        out["up"] += dense
        out["combine"] += dense
    return out


def moe_peak(stages: dict[str, int]) -> int:
    return stages["routing"] + max(v for kk, v in stages.items() if kk != "routing")


def attention_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, rows: int, keys: int,
                    sequences: int = 1, masked: bool = False, dtype_bytes: int = 2, block_size: int = 16
                    ) -> dict[str, int]:
    """Transient bytes of one attention layer call on `rows` query rows of `sequences` equal sequences, each over
    `keys` keys (the torch SDPA path on CUDA, `kernels.attention.TorchPagedAttention`), by stage:

    * rope: the fused QKV output, RoPE's fp32 q and k and the q-norm's two fp32 temporaries;
    * o_proj: QKV, q and k, the attention output (as [rows, heads * head_dim]) and the projection's output;
    * sdpa: QKV, q and k cast back, the page-granular K/V gathers, and the kernel that runs on CUDA: without a mask
      flash (GQA in the kernel: output only); with a mask the K/V heads repeated to the query heads
      (`kernels.attention.expand_kv_heads`) and the memory-efficient kernel (the mask's additive copy in the query
      dtype padded to 16 keys, a fp32 log-sum-exp, the output), never the math kernel. The boolean mask [B, n, m]
      of a masked group lives through the whole forward (`mask`).
    tests/test_memory_plan_measured.py measures every stage on the meta device: a change of the torch attention
    path's temporaries shows there."""
    c = model_config
    d, b = c.head_dim, dtype_bytes
    hq = len(parallel.q_head_range(c.num_attention_heads))
    hkv = len(parallel.kv_head_range(c.num_key_value_heads))
    n = rows // sequences
    qkv = rows * (hq + 2 * hkv) * d * b
    mask = sequences * n * keys if masked else 0
    gathered = 2 * sequences * math.ceil(keys / block_size) * block_size * hkv * d * b
    qk = rows * (hq + hkv) * d * b
    kernel = rows * hq * d * b  # the output
    if masked:
        kernel += 2 * sequences * keys * hq * d * b + sequences * n * math.ceil(keys / 16) * 16 * b
        kernel += sequences * hq * math.ceil(n / 32) * 32 * 4
    return {
        "mask": mask,
        "rope": qkv + rows * hq * d * 4 * 3 + rows * hkv * d * 4,
        "sdpa": qkv + qk + gathered + kernel,
        "o_proj": qkv + qk + rows * hq * d * b + rows * c.hidden_size * b,
    }


def sequence_parallel_attention_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, rows: int,
                                      keys: int, dtype_bytes: int = 2, block_size: int = 16) -> dict[str, int]:
    """`attention_bytes` of a denoising step's `rows` split over `parallel.sp_size` ranks (kernels/ulysses.py), by
    the same stages: RoPE and o_proj on this rank's ceil(rows / sp) rows with every head; the kernel on every row
    with the rank's query heads / sp and the KV heads they read (no mask: whole image blocks), plus the all-to-all
    buffers (the packed q/k/v sent and received, the output sent back and received). Derived, not measured: the
    collectives do not run on the meta device."""
    c = model_config
    d, b = c.head_dim, dtype_bytes
    hq = len(parallel.q_head_range(c.num_attention_heads))
    hkv = len(parallel.kv_head_range(c.num_key_value_heads))
    u = UlyssesHeads(hq, hkv, parallel.sp_size)
    hq_s, hkv_s = u.local_qo_heads, u.local_kv_heads
    per = -(-rows // parallel.sp_size)
    padded = per * parallel.sp_size
    qkv = per * (hq + 2 * hkv) * d * b
    qk = per * (hq + hkv) * d * b
    packed = 2 * padded * (hq_s + 2 * hkv_s) * d * b
    gathered = 2 * math.ceil(keys / block_size) * block_size * hkv_s * d * b
    out_back = 2 * padded * hq_s * d * b
    return {
        "mask": 0,
        "rope": qkv + per * hq * d * 4 * 3 + per * hkv * d * 4,
        "sdpa": qkv + qk + packed + gathered + rows * hq_s * d * b,
        "o_proj": qkv + qk + out_back + per * hq * d * b + per * c.hidden_size * b,
    }


def attention_peak(stages: dict[str, int]) -> int:
    return stages["mask"] + max(v for k, v in stages.items() if k != "mask")


def residual_bytes(model_config: HunyuanImage3Config, tokens: int, dtype_bytes: int = 2) -> int:
    """What a decoder layer's temporaries sit on: the step's input embeddings and the previous layer's output (both
    referenced by the backbone's loop), the layer's post-attention stream and its normed copy, and RoPE's fp32
    cos / sin tables."""
    return 4 * tokens * model_config.hidden_size * dtype_bytes + 2 * tokens * model_config.head_dim * 4


def vae_decoder_cache_bytes(model_config: HunyuanImage3Config) -> int:
    """Autocast's fp16 copies of the decoder's weights, kept for the whole decode (the VAE's parameters require grad,
    so CUDA autocast caches their casts for its region)."""
    from diffgentor.engine.models.hunyuan_image_3.execution import AutoencoderKLConv3D

    with torch.device("meta"):
        vae = AutoencoderKLConv3D(model_config.vae)
    return sum(p.numel() * 2 for p in vae.decoder.parameters() if p.is_floating_point())


def vae_limits(model_config: HunyuanImage3Config, budget_bytes: int = 0) -> VaeBudget:
    """The VAE's cost rule on this model (`VaeBudget`: per-pixel bytes, the decoder's weight cache, the latent
    factor) under a budget of `budget_bytes`. Peak bytes ONE image adds to a VAE decode or encode (fp16 autocast):
    its full-resolution level of c0 channels x ft frames at VAE_BYTES_PER_ELEMENT per pixel."""
    v = model_config.vae
    c0, ft = int(v["block_out_channels"][0]), int(v.get("ffactor_temporal", 4))
    return VaeBudget(budget_bytes, VAE_BYTES_PER_ELEMENT * c0 * ft, vae_decoder_cache_bytes(model_config),
                     model_config.latent_downsample)


def vae_decode_bytes(model_config: HunyuanImage3Config, height: int, width: int, images: int = 1) -> int:
    return vae_limits(model_config).decode_call_bytes(height, width, images)


def vae_encode_bytes(model_config: HunyuanImage3Config, height: int, width: int, images: int = 1) -> int:
    return vae_limits(model_config).encode_call_bytes(height, width, images)


def forward_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, tokens: int, moe_impl: str,
                  attention: dict[str, int], quantization: str | None = None, dtype_bytes: int = 2) -> int:
    """Peak of a whole forward on `tokens` tokens: the residual plus the larger of one layer's attention and MoE
    (layers run one after another and free their temporaries)."""
    moe = moe_peak(moe_bytes(model_config, parallel, tokens, moe_impl, quantization, dtype_bytes))
    return residual_bytes(model_config, tokens, dtype_bytes) + max(attention_peak(attention), attention["mask"] + moe)


def activation_peak_bytes(
    model_config: HunyuanImage3Config,
    parallel: ParallelContext,
    tokens: int,
    max_num_seqs: int,
    dtype_bytes: int = 2,
    quantization: str | None = None,
    moe_impl: str = "grouped",
    max_num_batched_tokens: int = 8192,
    block_size: int = 16,
    image_tokens: int = 0,
) -> tuple[int, dict[str, int]]:
    """(peak bytes, breakdown) of the largest forward on this rank: the larger of a masked prefill chunk of
    max_num_batched_tokens rows and a CFG denoising step of `tokens` rows, each over the model's maximum length of
    keys, plus the fp32 logits of a full batch (under tensor parallel also their gather).
    Sequence parallel (`parallel.sp_size` > 1): the step's `image_tokens` denoising rows are split over the ranks,
    so every per-token term of the step (residual, MoE) counts this rank's share and its attention is
    `sequence_parallel_attention_bytes`; text rows (the prefill) run whole on every rank."""
    c = model_config
    keys = c.max_position_embeddings
    prefill = attention_bytes(c, parallel, max_num_batched_tokens, keys, 1, True, dtype_bytes, block_size)
    rows = tokens  # the step's rows on this rank
    if parallel.sp_size > 1 and image_tokens:
        rows = tokens - image_tokens + -(-image_tokens // parallel.sp_size)
        step = sequence_parallel_attention_bytes(c, parallel, image_tokens, keys, dtype_bytes, block_size)
    else:
        step = attention_bytes(c, parallel, tokens, keys, CFG_ROWS, False, dtype_bytes, block_size)
    attn = max((prefill, step), key=attention_peak)
    moe = moe_peak(moe_bytes(c, parallel, max(rows, max_num_batched_tokens), moe_impl, quantization, dtype_bytes))
    heads = max_num_seqs * c.vocab_size * 4 * (2 if parallel.is_parallel else 1)
    forward = max(forward_bytes(c, parallel, n, moe_impl, a, quantization, dtype_bytes)
                  for n, a in ((max_num_batched_tokens, prefill), (rows, step))) + heads
    detail = {"residual": residual_bytes(c, max(rows, max_num_batched_tokens), dtype_bytes),
              "attention": attention_peak(attn), "moe": moe, "logits": heads, "forward": forward}
    return forward, detail


def graph_pool_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, max_num_seqs: int,
                     block_size: int, moe_impl: str, quantization: str | None, dtype_bytes: int = 2,
                     attn_impl: str = "sdpa") -> int:
    """The CUDA-graph pool (engine/cuda_graph.py): the peak of the widest static decode forward it captures
    (max_num_seqs rows, page tables up to max_position_embeddings keys), which the pool keeps reserved: one layer's
    attention or MoE temporaries on max_num_seqs tokens. The torch static attention holds the key mask and the
    [B, keys] K/V page gathers of its widest table; FlashInfer's graph-mode decode wrapper reads the pages in place
    (its output only) and holds, per batch bucket, its int workspace (FLASHINFER_DECODE_INT_WORKSPACE_BYTES) and its
    fixed page-table buffers."""
    from diffgentor.engine.cuda_graph import batch_buckets, width_buckets

    c = model_config
    pages = width_buckets(c.max_position_embeddings, block_size)[-1]
    keys = pages * block_size
    n, d, b = max_num_seqs, c.head_dim, dtype_bytes
    hq = len(parallel.q_head_range(c.num_attention_heads))
    hkv = len(parallel.kv_head_range(c.num_key_value_heads))
    rope = attention_bytes(c, parallel, n, keys, n, False, b, block_size)["rope"]
    qkv = n * (hq + 2 * hkv) * d * b + n * (hq + hkv) * d * b  # QKV, q and k cast back
    moe = moe_peak(moe_bytes(c, parallel, n, moe_impl, quantization, b))
    if attn_impl == "flashinfer":
        buckets = batch_buckets(max_num_seqs)
        wrappers = sum(FLASHINFER_DECODE_INT_WORKSPACE_BYTES + 4 * (2 * bk + 1 + bk * pages) for bk in buckets)
        return residual_bytes(c, n, b) + max(rope, qkv + n * hq * d * b, moe) + wrappers
    # StaticDecodeAttention: the [B, keys] K/V gathers, the masked kernel's additive mask, the output
    static = qkv + 2 * n * keys * hkv * d * b + n * math.ceil(keys / 16) * 16 * b + n * hq * d * b
    return n * keys + residual_bytes(c, n, b) + max(rope, static, moe)


def flashinfer_moe_workspace_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, tokens: int,
                                   quantization: str | None = None, dtype_bytes: int = 2) -> int:
    """The one reused workspace of FlashInfer's fused MoE (`kernels.moe.reserve_flashinfer_moe_workspace`) for calls
    of up to `tokens` tokens on this rank's experts: its buffer list for the gated bf16 / block-scale FP8 runner
    (FlashInfer 0.6.17, docs/flashinfer.md), each 128-byte aligned: the T*k permutation maps and routing scales, the
    per-expert token maps, the overlapped GEMM inputs (permuted rows, GEMM2 output, the FP8 path's GEMM1 result) and
    outputs (the [up; gate] GEMM1 result), with block-scale FP8 its activation quantisation (fp8 rows and fp32 scales
    per 128 columns) for the larger GEMM, plus FLASHINFER_MOE_GEMM_WORKSPACE_BYTES for the grouped GEMMs' own
    workspaces. bench/gpu_check.py compares it with FlashInfer's size query on a GPU."""
    c = model_config
    k, inter, experts = _widest_moe_layer(c, parallel)
    t, h, b = tokens, c.hidden_size, dtype_bytes
    r = t * k
    al = lambda n: -(-n // 128) * 128  # noqa: E731
    maps = 3 * al(r * 4) + al(experts * t * 4) + 2 * al(experts * t * 4) + al((experts + 1) * 8)
    inputs = max(r * h * b, r * inter * b)
    outputs = max(2 * r * inter * b, r * h * b)
    quant = 0
    if fp8_layout(quantization) == "block":
        quant = max(r * h + (r + 32 * experts) * math.ceil(h / 128) * 4,
                    r * inter + (r + 32 * experts) * math.ceil(inter / 128) * 4)
    return maps + al(inputs) + al(outputs) + al(quant) + FLASHINFER_MOE_GEMM_WORKSPACE_BYTES


def kv_block_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, block_size: int,
                   dtype_bytes: int = 2) -> int:
    """One KV block on this rank across all layers (`kernels.kv_cache.kv_block_bytes`, the cache's own page shape)
    with this rank's KV heads."""
    kv_heads = len(parallel.kv_head_range(model_config.num_key_value_heads))
    return cache_block_bytes(model_config.num_hidden_layers, block_size, kv_heads, model_config.head_dim, dtype_bytes)


def workspace_bytes(parallel: ParallelContext) -> dict[str, int]:
    out = {"cuda_context": CUDA_CONTEXT_BYTES, "cublas": CUBLAS_WORKSPACE_BYTES,
           "attention_workspace": ATTENTION_WORKSPACE_BYTES}
    if parallel.is_parallel:
        out["nccl"] = NCCL_BYTES
    return out


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class MemoryPlan:
    """One rank's memory budget (rank 0: the largest vocabulary slice, so the worst rank).

    Resident: weights, workspace, the encoder cache, the CUDA-graph pool and the KV cache. Transient: ONE of the
    step's phases at a time (the encode, the forward, the VAE decode run one after another), so the plan reserves
    `vae_budget` = the largest of the forward's peak and one 1024x1024 image's decode / encode; the worker sizes its
    VAE calls to that budget (`vae_images_per_call`)."""

    gpu: str
    total_bytes: int
    tensor_parallel_size: int
    expert_parallel: bool
    quantization: str
    gpu_memory_utilization: float
    weights: dict[str, int]
    activation_peak: int
    activations: dict[str, int]
    largest_step_tokens: int
    largest_step_reason: str
    workspace: dict[str, int]
    kv_block_bytes: int
    block_size: int
    min_kv_blocks: int
    moe_impl: str = "grouped"
    cfg_parallel_size: int = 1
    sequence_parallel_size: int = 1
    vae: dict[str, int] = field(default_factory=dict)
    encoder_cache_bytes: int = 0
    graph_pool_bytes: int = 0
    graph_keys: list[tuple[int, int]] = field(default_factory=list)
    """The (batch bucket, page-table width in pages) pairs decode steps may capture (engine/cuda_graph.py)."""
    kv_blocks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def usable_bytes(self) -> int:
        return int(self.total_bytes * self.gpu_memory_utilization)

    @property
    def kv_bytes(self) -> int:
        return self.kv_blocks * self.kv_block_bytes

    @property
    def transient_bytes(self) -> int:
        return max(self.activation_peak, self.vae.get("budget", 0))

    @property
    def fits(self) -> bool:
        return not self.problems

    def vae_budget(self) -> VaeBudget:
        """The worker's and the scheduler's VAE limits from this plan."""
        return VaeBudget(self.vae["budget"], self.vae["bytes_per_pixel"], self.vae["decoder_weight_cache"],
                         self.vae["latent_factor"])

    def terms(self) -> dict[str, int]:
        """Every planned term by name, in bytes (what a measurement is compared with)."""
        out = {f"weights.{k}": v for k, v in self.weights.items()}
        out.update({f"workspace.{k}": v for k, v in self.workspace.items()})
        out.update({f"activations.{k}": v for k, v in self.activations.items()})
        out.update({f"vae.{k}": v for k, v in self.vae.items()})
        out.update(encoder_cache=self.encoder_cache_bytes, graph_pool=self.graph_pool_bytes, kv_cache=self.kv_bytes,
                   transient=self.transient_bytes)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(weight_bytes=self.weight_bytes, usable_bytes=self.usable_bytes, kv_bytes=self.kv_bytes,
                 transient_bytes=self.transient_bytes, fits=self.fits)
        return d

    def _graph_line(self) -> str:
        if not self.graph_keys:
            return "no graphs (--enforce-eager)"
        batches = sorted({b for b, _ in self.graph_keys})
        keys = [w * self.block_size for w in sorted({w for _, w in self.graph_keys})]
        return (f"decode graphs for batches {', '.join(map(str, batches))} x contexts up to "
                f"{', '.join(map(str, keys))} keys")

    def render(self) -> str:
        g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
        par = f"tensor parallel {self.tensor_parallel_size}" + (" + expert parallel" if self.expert_parallel else "")
        layout = ParallelLayout(self.tensor_parallel_size, self.cfg_parallel_size, self.sequence_parallel_size)
        if layout.world_size > layout.tp:
            par += (f", layout {layout.describe()}: each of the {layout.cfg} CFG group(s) holds a full "
                    f"tensor-parallel copy of the weights")
            if layout.sp > 1:
                par += (f"; its {layout.sp} sequence-parallel ranks hold the same shard and KV (the whole prompt) and "
                        f"split each denoising step's image rows")
        a, v = self.activations, self.vae
        lines = [
            f"{self.gpu} ({self.total_bytes / GiB:.1f} GiB), {par}, quantization {self.quantization}, "
            f"gpu_memory_utilization {self.gpu_memory_utilization:.2f}",
            f"per rank (rank 0 of {layout.world_size}):",
            f"  weights          {g(self.weight_bytes)}",
        ]
        lines += [f"    {p:<14} {g(val)}" for p, val in self.weights.items()]
        lines += [
            f"  forward peak     {g(self.activation_peak)}   largest step {self.largest_step_tokens} tokens: "
            f"{self.largest_step_reason}",
            f"    moe ({self.moe_impl}) {a['moe'] / GiB:.2f} GiB, attention {a['attention'] / GiB:.2f} GiB, residual "
            f"{a['residual'] / GiB:.2f} GiB, logits {a['logits'] / GiB:.2f} GiB",
            f"  VAE budget       {g(v['budget'])}   decode {v['decode_images_per_call']} / encode "
            f"{v['encode_images_per_call']} images of {IMAGE_SIDE}x{IMAGE_SIDE} per call",
            f"    decode {v['decode_per_image'] / GiB:.2f} GiB per image + {v['decoder_weight_cache'] / GiB:.2f} GiB "
            f"fp16 weight cache, encode {v['encode_per_image'] / GiB:.2f} GiB per image (fp16 autocast)",
            f"  encoder cache    {g(self.encoder_cache_bytes)}",
            f"  CUDA-graph pool  {g(self.graph_pool_bytes)}   {self._graph_line()}",
            f"  workspace        {g(sum(self.workspace.values()))}   "
            + ", ".join(f"{k} {val / MiB:.0f} MiB" for k, val in self.workspace.items()),
            f"  usable           {g(self.usable_bytes)}   ({self.gpu_memory_utilization:.2f} x total)",
            f"  KV cache         {g(self.kv_bytes)}   {self.kv_blocks} blocks x {self.block_size} tokens "
            f"({self.kv_block_bytes / MiB:.3f} MiB per block) = {self.kv_blocks * self.block_size} tokens",
        ]
        if self.fits:
            rows = "with their CFG row" if self.cfg_parallel_size == 1 else "(each CFG group holds one of the two rows)"
            lines.append(f"fits: the KV cache holds {self.kv_blocks / self.min_kv_blocks:.1f} requests at the maximum "
                         f"length {rows} ({self.min_kv_blocks} blocks each)")
        else:
            lines.append("does NOT fit:")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def vae_plan(model_config: HunyuanImage3Config, forward_peak: int) -> dict[str, int]:
    """The VAE's budget (the forward's transient peak, or one 1024x1024 decode / encode when larger) and how many
    1024x1024 images one decode / encode call may carry within it (`VaeBudget`'s counts, the ones the worker and the
    scheduler use)."""
    rule = vae_limits(model_config)
    side = IMAGE_SIDE
    budget = max(forward_peak, rule.decode_call_bytes(side, side), rule.encode_call_bytes(side, side))
    limits = replace(rule, budget_bytes=budget)
    per = limits.image_bytes(side, side)
    return {"budget": budget, "decode_per_image": per, "encode_per_image": per,
            "decoder_weight_cache": limits.decode_fixed_bytes, "bytes_per_pixel": limits.bytes_per_pixel,
            "latent_factor": limits.latent_factor, "decode_images_per_call": limits.decode_images(side, side),
            "encode_images_per_call": limits.encode_images(side, side)}


def plan_memory(
    model_config: HunyuanImage3Config,
    config: EngineConfig,
    parallel: ParallelContext,
    total_memory_bytes: int,
    gpu_name: str = "GPU",
    capability: tuple[int, int] = (9, 0),
) -> MemoryPlan:
    """The plan of `parallel`'s rank on a card of `total_memory_bytes` (dtype: the config's, bf16 when auto) and
    compute `capability` (which MoE path runs: `planned_moe_impl`)."""
    m, cache, block = config.model, config.cache, config.cache.block_size
    dtype = getattr(torch, m.resolve_dtype(cuda_available=True))
    elem = torch.finfo(dtype).bits // 8
    quant = m.quantization if m.quantization != "none" else None
    weights = weight_bytes_by_part(model_config, parallel, quant, dtype)
    tokens, why = largest_step_tokens(config, model_config)
    impl = planned_moe_impl(quant, m.moe_impl, capability)
    sched = config.scheduler
    act, detail = activation_peak_bytes(model_config, parallel, tokens, sched.max_num_seqs, elem, quant, impl,
                                        sched.max_num_batched_tokens, block,
                                        denoising_step_tokens(config, model_config, tokens))
    vae = vae_plan(model_config, act)
    ws = workspace_bytes(parallel)
    if impl == "flashinfer":  # its one reused scratch buffer, sized for the largest step
        ws["flashinfer_moe"] = flashinfer_moe_workspace_bytes(model_config, parallel, tokens, quant, elem)
    attn = "flashinfer" if m.attn_impl == "flashinfer" else "sdpa"  # what the graphs capture (cuda_graph.py)
    pool = 0 if m.enforce_eager else graph_pool_bytes(model_config, parallel, sched.max_num_seqs, block, impl, quant,
                                                     elem, attn)
    from diffgentor.engine.cuda_graph import graph_keys

    keys = [] if m.enforce_eager else list(graph_keys(sched.max_num_seqs, model_config.max_position_embeddings,
                                                      block, attn == "flashinfer"))
    per_block = kv_block_bytes(model_config, parallel, block, elem)
    # under CFG parallel a request's conditional and unconditional rows live on different groups' caches
    min_blocks = CFG_ROWS // parallel.cfg_size * math.ceil(model_config.max_position_embeddings / block)
    plan = MemoryPlan(
        gpu=gpu_name, total_bytes=total_memory_bytes, tensor_parallel_size=parallel.tp_size,
        expert_parallel=parallel.expert_parallel, quantization=m.quantization,
        gpu_memory_utilization=cache.gpu_memory_utilization, weights=weights, activation_peak=act,
        activations=detail, largest_step_tokens=tokens, largest_step_reason=why, workspace=ws,
        kv_block_bytes=per_block, block_size=block, min_kv_blocks=min_blocks, moe_impl=impl, vae=vae,
        cfg_parallel_size=parallel.cfg_size, sequence_parallel_size=parallel.sp_size,
        encoder_cache_bytes=cache.encoder_cache_bytes, graph_pool_bytes=pool, graph_keys=keys,
    )
    fixed = plan.weight_bytes + plan.transient_bytes + sum(ws.values()) + plan.encoder_cache_bytes + pool
    left = plan.usable_bytes - fixed
    plan.kv_blocks = max(0, left // per_block)
    if left < 0:
        plan.problems.append(
            f"weights {plan.weight_bytes / GiB:.2f} GiB + transients {plan.transient_bytes / GiB:.2f} GiB + "
            f"workspace, encoder cache and graph pool {(fixed - plan.weight_bytes - plan.transient_bytes) / GiB:.2f} "
            f"GiB exceed the usable {plan.usable_bytes / GiB:.2f} GiB "
            f"({cache.gpu_memory_utilization:.2f} x {total_memory_bytes / GiB:.1f} GiB) by {-left / GiB:.2f} GiB; "
            f"the experts alone are {weights['experts'] / GiB:.2f} GiB: raise --tensor-parallel-size"
            + ("" if quant else " or use --quantization fp8"))
    elif plan.kv_blocks < min_blocks:
        plan.problems.append(
            f"the KV cache left ({left / GiB:.2f} GiB = {plan.kv_blocks} blocks) holds less than one request at the "
            f"maximum length with their CFG row ({min_blocks} blocks of {block} tokens, "
            f"{min_blocks * per_block / GiB:.2f} GiB); lower --max-num-batched-tokens, raise "
            f"--gpu-memory-utilization or --tensor-parallel-size")
    return plan


def plan_for(config: EngineConfig, model_config: HunyuanImage3Config, parallel: ParallelContext | None = None,
             gpu: str | GpuSpec = "h100") -> MemoryPlan:
    """The plan of `parallel`'s rank (default: one process) on a card named in GPUS or given as a GpuSpec."""
    spec = GPUS[gpu] if isinstance(gpu, str) else gpu
    return plan_memory(model_config, config, parallel or ParallelContext(), spec.total_bytes, spec.name,
                       spec.capability)


def device_plan(
    config: EngineConfig,
    model_config: HunyuanImage3Config,
    parallel: ParallelContext | None,
    total_memory_bytes: int | None = None,
    require_fit: bool = True,
) -> MemoryPlan:
    """This rank's plan on its GPU (`Worker.load` on CUDA: the KV blocks and the VAE budget); MemoryPlanError with
    the plan's explanation when the layout does not fit and `require_fit`. total_memory_bytes defaults to the current
    CUDA device's."""
    parallel = parallel or ParallelContext()
    name, cap = "GPU", (9, 0)
    if total_memory_bytes is None:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        total_memory_bytes, name, cap = int(props.total_memory), props.name, (props.major, props.minor)
    plan = plan_memory(model_config, config, parallel, total_memory_bytes, name, cap)
    if require_fit and not plan.fits:
        raise MemoryPlanError(plan.render())
    return plan


def kv_blocks_for(
    config: EngineConfig,
    model_config: HunyuanImage3Config,
    parallel: ParallelContext | None,
    total_memory_bytes: int | None = None,
) -> int:
    """KV blocks this rank may allocate on its GPU (`device_plan`'s)."""
    return device_plan(config, model_config, parallel, total_memory_bytes).kv_blocks


# ------------------------------------------------------------------------------------------------ CLI
def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("plan-memory", help="per-rank GPU memory plan of a checkpoint (weights, activations, KV)")
    p.add_argument("model_dir", help="checkpoint folder (only config.json is read)")
    p.add_argument("--gpu", required=True, choices=sorted(GPUS))
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--cfg-parallel-size", type=int, default=1,
                   help="CFG groups (1 or 2), each a full tensor-parallel copy of the weights")
    p.add_argument("--sequence-parallel-size", type=int, default=1)
    p.add_argument("--expert-parallel", action="store_true", help="whole experts per rank instead of width shards")
    p.add_argument("--quantization", default="none", type=lambda s: s.strip().lower().replace("-", "_"),
                   choices=QUANTIZATIONS)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--moe-impl", default=None, choices=MOE_IMPLS,
                   help="fp8_block experts run fused only with flashinfer (else dequantised per layer)")
    p.add_argument("--attn-impl", default=None, choices=("sdpa", "flashinfer"),
                   help="the attention decode graphs capture: flashinfer's paged kernel (one width) or the torch one")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 when it fits, 1 when it does not, 2 on bad input."""
    try:
        model_config = HunyuanImage3Config.from_pretrained(Path(args.model_dir))
        keys = ("quantization", "gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs", "block_size",
                "tensor_parallel_size", "cfg_parallel_size", "sequence_parallel_size", "moe_impl",
                "attn_impl")
        config = EngineConfig.from_cli_and_env({k: getattr(args, k) for k in keys}, environ={})
        layout = config.parallel_layout(num_visible_devices=config.ranks_per_instance or 1)
        parallel = ParallelContext(layout.tp, 0, expert_parallel=args.expert_parallel, cfg_size=layout.cfg,
                                   sp_size=layout.sp)
        gpu = GPUS[args.gpu]
        plan = plan_memory(model_config, config, parallel, gpu.total_bytes, gpu.name, gpu.capability)
    except (ValueError, OSError) as e:
        print(f"plan-memory: {e}")
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render())
    return 0 if plan.fits else 1
