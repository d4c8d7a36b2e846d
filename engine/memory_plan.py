"""Per-rank GPU memory plan of a HunyuanImage-3.0 checkpoint: does it fit, and how many KV blocks are left.

Why: the real model is 83 B parameters (~166 GB in bf16); whether a layout (card, tensor parallel size, expert
parallel, FP8 experts) fits must be known before a multi-minute load, and the engine sizes its KV cache from the same
numbers on a GPU (`kv_blocks_for`). Everything here is computed from `config.json` alone:

* weights: the model is BUILT ON THE META DEVICE with the rank's `ParallelContext` (so the byte counts are the
  module's own shapes, shards included) and every tensor is priced at its load dtype: the activation dtype (bf16 on a
  GPU), fp32 for the routers and the VAE (`keep_fp32_for_model`), and with `--quantization fp8` / `fp8_block` 1 byte
  per routed / shared expert weight plus its fp32 scales (per output row / per 128x128 block). Grouped by part:
  experts, attention, embeddings (wte + lm_head), ViT (+ aligner), VAE, other (norms, routers, image heads).
* activations: the largest step the scheduler may issue is max(`max_num_batched_tokens`, one denoising step of a
  1024x1024 image: (64x64 image tokens + its <timestep>/<guidance>/<timestep_r> slots) x the CFG rows), because a
  diffusion step's image blocks are scheduled atomically even past the token budget. Its peak is the residual stream
  plus the larger of the attention and the MoE temporaries of ONE layer (layers run one after another; the sorted
  grouped-GEMM MoE holds [tokens*top_k, H] gathers and [tokens*top_k, 2I] intermediates), or the VAE decode of a
  1024x1024 image when that is larger. An estimate from shapes, meant to be checked by the GPU run
  (bench/gpu_check.sh compares it to torch.cuda.max_memory_allocated at the real layer shapes).
* workspace: the CUDA context, the FlashInfer attention workspace, NCCL buffers under tensor parallel.
* KV cache: gpu_memory_utilization x total memory - weights - activations - workspace, in blocks of
  2 (K, V) x layers x block_size x local KV heads x head_dim x 2 bytes; it must hold at least one request at the
  model's maximum length with its CFG row (2 x max_position_embeddings tokens).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffgentor.engine.config import EngineConfig
from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.parallel import ParallelContext
from diffgentor.kernels.quantization import FP8_BLOCK, fp8_layout

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
NCCL_BYTES = 512 * MiB
"""NCCL communicator buffers and its streams' workspace under tensor parallel (per rank, a conservative figure)."""
CFG_ROWS = 2
IMAGE_SIDE = 1024
IMAGE_EXTRA_SLOTS = 3  # <timestep>, <guidance>, <timestep_r> recomputed with the image block each step
VAE_DECODE_LIVE_MAPS = 8
"""Live full-resolution feature maps (first VAE level, fp16 autocast) at the decoder's peak: a residual block's input,
two convolution outputs, GroupNorm's fp32 copy (2x) and the upsampled output; an estimate."""


class MemoryPlanError(ValueError):
    """The layout does not fit; the message says what does not."""


# ------------------------------------------------------------------------------------------------ weights
PARTS = ("experts", "attention", "embeddings", "vit", "vae", "other")


def weight_part(name: str) -> str:
    from diffgentor.engine.models.hunyuan_image_3.weights import is_expert_weight

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
    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM

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
    from diffgentor.engine.models.hunyuan_image_3.model import keep_fp32_for_model

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
def largest_step_tokens(config: EngineConfig, model_config: HunyuanImage3Config) -> tuple[int, str]:
    """Tokens in the largest forward the scheduler may issue, and why."""
    side = IMAGE_SIDE // model_config.latent_downsample
    block = CFG_ROWS * (side * side + IMAGE_EXTRA_SLOTS)
    if block > config.max_num_batched_tokens:
        return block, (f"a {IMAGE_SIDE}x{IMAGE_SIDE} denoising step: {CFG_ROWS} CFG rows x ({side}x{side} image + "
                       f"{IMAGE_EXTRA_SLOTS} slots) > max_num_batched_tokens {config.max_num_batched_tokens}")
    return config.max_num_batched_tokens, (f"max_num_batched_tokens (>= a {IMAGE_SIDE}x{IMAGE_SIDE} denoising step "
                                           f"of {block} tokens)")


def activation_peak_bytes(
    model_config: HunyuanImage3Config,
    parallel: ParallelContext,
    tokens: int,
    max_num_seqs: int,
    dtype_bytes: int = 2,
    quantization: str | None = None,
    fp8_dequantized: bool = False,
) -> tuple[int, dict[str, int]]:
    """(peak bytes, breakdown) of one forward of `tokens` tokens on this rank, or of the VAE decode if larger.
    fp8_dequantized: FP8 experts without a fast path on this card are dequantised one layer at a time, so one
    layer's local experts in the activation dtype are a transient of the MoE."""
    c = model_config
    n, h, d = tokens, c.hidden_size, c.head_dim
    q_heads = len(parallel.q_head_range(c.num_attention_heads))
    kv_heads = len(parallel.kv_head_range(c.num_key_value_heads))
    layer = max(range(c.num_hidden_layers), key=lambda i: c.moe_topk[i] * c.moe_intermediate_size[i])
    k = c.moe_topk[layer]
    inter = c.moe_intermediate_size[layer] // parallel.expert_tp_size
    shared = c.moe_intermediate_size[layer] * c.num_shared_expert[layer] // parallel.tp_size
    b = dtype_bytes
    residual = 3 * n * h * b  # the stream, the normed input, the block output
    attention = (n * (q_heads + 2 * kv_heads) * d * b  # fused qkv
                 + n * (q_heads + kv_heads) * d * 4  # RoPE / qk-norm in fp32
                 + n * q_heads * d * b + n * h * b)  # attention output, o_proj output
    rows = n * k
    fp8 = rows * (h + inter) if quantization else 0  # per-token FP8 copies of the GEMM inputs (fast paths)
    moe = (2 * n * c.num_experts * 4  # router logits and probabilities (fp32)
           + max(rows * (h + 3 * inter) * b, 3 * rows * h * b)  # gathered rows + [up; gate] + act | 3 x [rows, H]
           + fp8 + n * h * b + n * 2 * shared * b)  # routed output held while the shared expert runs
    if fp8_dequantized:
        moe += len(parallel.expert_range(c.num_experts)) * 3 * inter * h * b
    heads = max_num_seqs * c.vocab_size * 4 * (2 if parallel.is_parallel else 1)  # fp32 logits (+ gather)
    forward = residual + max(attention, moe) + heads
    side = IMAGE_SIDE
    vae = VAE_DECODE_LIVE_MAPS * int(c.vae["block_out_channels"][0]) * side * side * 2
    detail = {"residual": residual, "attention": attention, "moe": moe, "logits": heads, "forward": forward,
              "vae_decode": vae}
    return max(forward, vae), detail


def kv_block_bytes(model_config: HunyuanImage3Config, parallel: ParallelContext, block_size: int,
                   dtype_bytes: int = 2) -> int:
    """One KV block on this rank across all layers: 2 (K, V) x layers x block_size x local KV heads x head_dim."""
    kv_heads = len(parallel.kv_head_range(model_config.num_key_value_heads))
    return 2 * model_config.num_hidden_layers * block_size * kv_heads * model_config.head_dim * dtype_bytes


def workspace_bytes(parallel: ParallelContext) -> dict[str, int]:
    out = {"cuda_context": CUDA_CONTEXT_BYTES, "attention_workspace": ATTENTION_WORKSPACE_BYTES}
    if parallel.is_parallel:
        out["nccl"] = NCCL_BYTES
    return out


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class MemoryPlan:
    """One rank's memory budget (rank 0: the largest vocabulary slice, so the worst rank)."""

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
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(weight_bytes=self.weight_bytes, usable_bytes=self.usable_bytes, kv_bytes=self.kv_bytes,
                 fits=self.fits)
        return d

    def render(self) -> str:
        g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
        par = f"tensor parallel {self.tensor_parallel_size}" + (" + expert parallel" if self.expert_parallel else "")
        lines = [
            f"{self.gpu} ({self.total_bytes / GiB:.1f} GiB), {par}, quantization {self.quantization}, "
            f"gpu_memory_utilization {self.gpu_memory_utilization:.2f}",
            f"per rank (rank 0 of {self.tensor_parallel_size}):",
            f"  weights          {g(self.weight_bytes)}",
        ]
        lines += [f"    {p:<14} {g(v)}" for p, v in self.weights.items()]
        lines += [
            f"  activation peak  {g(self.activation_peak)}   largest step {self.largest_step_tokens} tokens: "
            f"{self.largest_step_reason}",
            f"    forward {self.activations['forward'] / GiB:.2f} GiB (moe {self.activations['moe'] / GiB:.2f}, "
            f"attention {self.activations['attention'] / GiB:.2f}), VAE decode "
            f"{self.activations['vae_decode'] / GiB:.2f} GiB",
            f"  workspace        {g(sum(self.workspace.values()))}   "
            + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in self.workspace.items()),
            f"  usable           {g(self.usable_bytes)}   ({self.gpu_memory_utilization:.2f} x total)",
            f"  KV cache         {g(self.kv_bytes)}   {self.kv_blocks} blocks x {self.block_size} tokens "
            f"({self.kv_block_bytes / MiB:.3f} MiB per block) = {self.kv_blocks * self.block_size} tokens",
        ]
        if self.fits:
            lines.append(f"fits: the KV cache holds {self.kv_blocks / self.min_kv_blocks:.1f} requests at the maximum "
                         f"length with their CFG row ({self.min_kv_blocks} blocks each)")
        else:
            lines.append("does NOT fit:")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def plan_memory(
    model_config: HunyuanImage3Config,
    config: EngineConfig,
    parallel: ParallelContext,
    total_memory_bytes: int,
    gpu_name: str = "GPU",
    capability: tuple[int, int] = (9, 0),
) -> MemoryPlan:
    """The plan of `parallel`'s rank on a card of `total_memory_bytes` (dtype: the config's, bf16 when auto) and
    compute `capability` (which FP8 MoE path runs: `kernels.moe.resolve_moe_impl`'s rules)."""
    dtype = getattr(torch, config.resolve_dtype(cuda_available=True))
    elem = torch.finfo(dtype).bits // 8
    quant = config.quantization if config.quantization != "none" else None
    weights = weight_bytes_by_part(model_config, parallel, quant, dtype)
    tokens, why = largest_step_tokens(config, model_config)
    layout = fp8_layout(quant)
    fast = (layout == "channel" and capability >= (8, 9)) or \
        (layout == "block" and config.moe_impl == "flashinfer" and capability[0] == 9)
    act, detail = activation_peak_bytes(model_config, parallel, tokens, config.max_num_seqs, elem, quant,
                                        fp8_dequantized=layout is not None and not fast)
    ws = workspace_bytes(parallel)
    per_block = kv_block_bytes(model_config, parallel, config.block_size, elem)
    min_blocks = CFG_ROWS * math.ceil(model_config.max_position_embeddings / config.block_size)
    plan = MemoryPlan(
        gpu=gpu_name, total_bytes=total_memory_bytes, tensor_parallel_size=parallel.tp_size,
        expert_parallel=parallel.expert_parallel, quantization=config.quantization,
        gpu_memory_utilization=config.gpu_memory_utilization, weights=weights, activation_peak=act,
        activations=detail, largest_step_tokens=tokens, largest_step_reason=why, workspace=ws,
        kv_block_bytes=per_block, block_size=config.block_size, min_kv_blocks=min_blocks,
    )
    left = plan.usable_bytes - plan.weight_bytes - act - sum(ws.values())
    plan.kv_blocks = max(0, left // per_block)
    if left < 0:
        plan.problems.append(
            f"weights {plan.weight_bytes / GiB:.2f} GiB + activations {act / GiB:.2f} GiB + workspace "
            f"{sum(ws.values()) / GiB:.2f} GiB exceed the usable {plan.usable_bytes / GiB:.2f} GiB "
            f"({config.gpu_memory_utilization:.2f} x {total_memory_bytes / GiB:.1f} GiB) by {-left / GiB:.2f} GiB; "
            f"the experts alone are {weights['experts'] / GiB:.2f} GiB: raise --tensor-parallel-size"
            + ("" if quant else " or use --quantization fp8"))
    elif plan.kv_blocks < min_blocks:
        plan.problems.append(
            f"the KV cache left ({left / GiB:.2f} GiB = {plan.kv_blocks} blocks) holds less than one request at the "
            f"maximum length with its CFG row ({min_blocks} blocks of {config.block_size} tokens, "
            f"{min_blocks * per_block / GiB:.2f} GiB); lower --max-num-batched-tokens, raise "
            f"--gpu-memory-utilization or --tensor-parallel-size")
    return plan


def kv_blocks_for(
    config: EngineConfig,
    model_config: HunyuanImage3Config,
    parallel: ParallelContext | None,
    total_memory_bytes: int | None = None,
) -> int:
    """KV blocks this rank may allocate on its GPU (`EngineCore.from_config` on CUDA); MemoryPlanError with the
    plan's explanation when the layout does not fit. total_memory_bytes defaults to the current CUDA device's."""
    parallel = parallel or ParallelContext()
    name, cap = "GPU", (9, 0)
    if total_memory_bytes is None:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        total_memory_bytes, name, cap = int(props.total_memory), props.name, (props.major, props.minor)
    plan = plan_memory(model_config, config, parallel, total_memory_bytes, name, cap)
    if not plan.fits:
        raise MemoryPlanError(plan.render())
    return plan.kv_blocks


# ------------------------------------------------------------------------------------------------ CLI
def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("plan-memory", help="per-rank GPU memory plan of a checkpoint (weights, activations, KV)")
    p.add_argument("model_dir", help="checkpoint folder (only config.json is read)")
    p.add_argument("--gpu", required=True, choices=sorted(GPUS))
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--expert-parallel", action="store_true", help="whole experts per rank instead of width shards")
    p.add_argument("--quantization", default="none", type=lambda s: s.strip().lower().replace("-", "_"),
                   choices=("none", "fp8", "fp8_block"))
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--moe-impl", default=None, choices=("eager", "flashinfer"),
                   help="fp8_block experts run fused only with flashinfer (else dequantised per layer)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 when it fits, 1 when it does not, 2 on bad input."""
    try:
        model_config = HunyuanImage3Config.from_pretrained(Path(args.model_dir))
        keys = ("quantization", "gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs", "block_size",
                "tensor_parallel_size", "moe_impl")
        config = EngineConfig.from_cli_and_env({k: getattr(args, k) for k in keys}, environ={})
        parallel = ParallelContext(args.tensor_parallel_size, 0, expert_parallel=args.expert_parallel)
        gpu = GPUS[args.gpu]
        plan = plan_memory(model_config, config, parallel, gpu.total_bytes, gpu.name, gpu.capability)
    except (ValueError, OSError) as e:
        print(f"plan-memory: {e}")
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render())
    return 0 if plan.fits else 1
