"""Whole-engine run of a random-weight model with the REAL layer shapes but few layers; extrapolates to 32 layers.

    python -m diffgentor.bench.engine_run --out run.json                 # GPU: real shapes, 2 of 32 layers
    python -m diffgentor.bench.engine_run --shapes tiny --device cpu     # CPU smoke of the same code path

Why: no real checkpoint fits a short GPU slot (166 GB), but the per-layer cost at the real shapes is what decides
seconds per image. The model is built straight on the device (meta -> empty -> seeded normal values / sqrt(fan_in),
norms 1, routers and VAE in fp32, the rest in the run dtype; optionally FP8 experts), so no checkpoint is written;
only the tiny model's metadata (tokenizer, configs, system prompts) goes to a temp folder with the real sizes in
its config.json. One request (think_recaption, 1024x1024, `--think-tokens` reasoning tokens, `--steps` diffusion
steps) runs through `Engine` after one warm-up request. CUDA events around every decoder layer give the layers' own
device time; seconds per image for N layers = wall time + (N - layers) x the mean time of one layer over the
request (every other cost, VAE decode included, does not grow with the layer count).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REAL_SHAPES: dict[str, Any] = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, attention_head_dim=128, vocab_size=133120,
    intermediate_size=3072, num_experts=64, moe_topk=8, moe_intermediate_size=3072, num_shared_expert=1,
    patch_embed_hidden_dim=1024, image_base_size=1024, max_position_embeddings=22800, rms_norm_eps=1e-5,
    rope_theta=10000.0, norm_type="hf_rms", cla_share_factor=2, vae_autocast_dtype="float16",
    vae={"latent_channels": 32, "block_out_channels": [128, 256, 512, 1024, 1024], "layers_per_block": 2,
         "ffactor_spatial": 16, "ffactor_temporal": 4, "sample_size": 384, "sample_tsize": 96,
         "scaling_factor": 0.562679178327931},
    vit={"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16, "intermediate_size": 4304,
         "num_patches": 256, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
         "vision_use_head": True},
    vit_aligner={"input_dim": 1152, "depth": 2, "projector_type": "mlp_gelu"},
    vit_processor={"patch_size": 16, "max_num_patches": 1024},
)
"""The published HunyuanImage-3.0-Instruct config.json values (the full model has num_hidden_layers=32):
the ViT sees up to 1024 patches (1024 tokens per condition image) and ships its pooling head."""
REAL_NUM_LAYERS = 32


def write_real_config(out_dir: str | Path, layers: int = REAL_NUM_LAYERS) -> Path:
    """A checkpoint folder without weights whose config.json has the real sizes (for plan-memory and this run)."""
    from diffgentor.engine.testing.tiny_model import write_tiny_metadata

    return write_tiny_metadata(out_dir, dtype=torch.bfloat16,
                               config_overrides=dict(REAL_SHAPES, num_hidden_layers=layers))


def build_random_model(ckpt_dir: Path, device: str, dtype: torch.dtype, quantization: str | None, seed: int,
                       attn_impl: str, moe_impl: str) -> Any:
    """The model of `ckpt_dir/config.json` on `device` with seeded random weights (no checkpoint read); each meta
    parameter is replaced by its device tensor in turn, so the peak is the model plus one fp32 tensor."""
    from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM, keep_fp32_for_model
    from diffgentor.engine.models.hunyuan_image_3.weights import fp8_expert_quantizer
    from diffgentor.kernels.quantization import attach_fp8, quantize_fp8

    cfg = HunyuanImage3Config.from_pretrained(ckpt_dir)
    with torch.device("meta"):
        model = HunyuanImage3ForCausalMM(cfg, attn_backend=attn_impl, moe_impl=moe_impl)
    if any(True for _ in model.buffers()):
        raise RuntimeError("the model has buffers; initialise them before using this builder")
    quantize = fp8_expert_quantizer(quantization)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            target = torch.float32 if keep_fp32_for_model(name) else dtype
            if p.ndim >= 2:
                x = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
                x.div_(math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("bias"):
                x = 0.05 * torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
            else:
                x = torch.ones(p.shape, device=device)
            owner, _, attr = name.rpartition(".")
            layout = quantize(name) if quantize is not None else None
            if layout is not None:
                attach_fp8(model.get_submodule(owner), quantize_fp8(x, layout))
            else:
                setattr(model.get_submodule(owner), attr, torch.nn.Parameter(x.to(target), requires_grad=False))
            del x
    for layer in model.model.layers:
        stack = getattr(layer.mlp, "_stacked", None)
        if stack is not None:
            stack()
    return model.eval()


class LayerTimer:
    """CUDA events around every decoder layer: the layers' device time (read once at the end, no per-call sync)."""

    def __init__(self, layers: Any) -> None:
        self.pairs: list[tuple[Any, Any]] = []
        self._open: list[Any] = []
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._pre))
            self.handles.append(layer.register_forward_hook(self._post))

    def _pre(self, module: Any, args: Any) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self._open.append(e)

    def _post(self, module: Any, args: Any, out: Any) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pairs.append((self._open.pop(), e))

    def total_s(self) -> float:
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0

    def reset(self) -> None:
        self.pairs.clear()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffgentor.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from diffgentor.engine.core import EngineCore
    from diffgentor.engine.executor import UniProcExecutor
    from diffgentor.engine.input_processor import load_processor_context
    from diffgentor.engine.offline import Engine
    from diffgentor.engine.request import GenerationRequest
    from diffgentor.engine.testing.tiny_model import write_tiny_metadata
    from diffgentor.engine.worker import Worker

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    overrides = dict(REAL_SHAPES) if args.shapes == "real" else {}
    overrides["num_hidden_layers"] = args.layers
    result: dict[str, Any] = {"device": args.device, "shapes": args.shapes, "layers": args.layers,
                              "quantization": args.quantization or "none", "image_size": args.size,
                              "think_tokens": args.think_tokens, "steps": args.steps}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_metadata(Path(tmp) / "ckpt", config_overrides=overrides)
        t0 = time.perf_counter()
        model = build_random_model(ckpt, args.device, dtype, args.quantization, args.seed, args.attn_impl,
                                   args.moe_impl)
        if cuda:
            torch.cuda.synchronize()
        result["build_s"] = time.perf_counter() - t0
        result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        config = EngineConfig(
            model=ModelConfig(checkpoint=str(ckpt), device=args.device, dtype=str(dtype).removeprefix("torch."),
                              attn_impl=args.attn_impl, moe_impl=args.moe_impl,
                              quantization=args.quantization or "none",
                              enforce_eager=True),  # LayerTimer's per-layer hooks cannot time CUDA-graph replays
            cache=CacheConfig(num_kv_blocks=args.kv_blocks), scheduler=SchedulerConfig(max_num_seqs=2))
        core = EngineCore(load_processor_context(ckpt, config), config,
                          UniProcExecutor(Worker(model, config, args.kv_blocks)))
        engine = Engine(core)
        timer = LayerTimer(model.model.layers) if cuda else None

        def one(i: int, think: int, steps: int) -> float:
            req = GenerationRequest(request_id=f"run{i}", prompt="a lighthouse on a cliff at dawn, oil painting",
                                    image_size=args.size, bot_task="think_recaption", max_new_tokens=think,
                                    num_inference_steps=steps, seed=i, output_type="pil")
            t = time.perf_counter()
            (res,) = engine.generate([req])
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            if getattr(res, "error", None):
                raise RuntimeError(f"request failed: {res.error}")
            return dt

        if cuda:  # first-use kernel selection / JIT / allocator growth stay out of the measured request
            result["warmup_s"] = one(0, min(8, args.think_tokens), 1)
            timer.reset()
            torch.cuda.reset_peak_memory_stats()
        wall = one(1, args.think_tokens, args.steps)
        result["seconds_per_image"] = wall
        if cuda:
            layers_s = timer.total_s()
            per_layer = layers_s / args.layers
            result.update(layers_s=layers_s, per_layer_s=per_layer, extrapolated_layers=REAL_NUM_LAYERS,
                          extrapolated_seconds_per_image=wall + (REAL_NUM_LAYERS - args.layers) * per_layer)
            result.update(_activation_check(model, config, args.kv_blocks))
    return result


def _activation_check(model: Any, config: Any, kv_blocks: int) -> dict[str, int]:
    """The measured peak beyond weights and KV cache vs engine.memory_plan's activation estimate (same model)."""
    from diffgentor.engine.memory_plan import activation_peak_bytes, kv_block_bytes, largest_step_tokens
    from diffgentor.engine.parallel import ParallelContext

    par = ParallelContext()
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    kv = kv_blocks * kv_block_bytes(model.config, par, config.cache.block_size)
    peak = torch.cuda.max_memory_allocated()
    tokens, _ = largest_step_tokens(config, model.config)
    quant = None if config.model.quantization == "none" else config.model.quantization
    estimate, _ = activation_peak_bytes(model.config, par, tokens, config.scheduler.max_num_seqs, 2, quant)
    return {"max_memory_allocated": peak, "measured_activation_peak": peak - weights - kv,
            "planned_activation_peak": estimate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", choices=("real", "tiny"), default="real")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--think-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quantization", default=None, choices=(None, "fp8", "fp8_block"))
    ap.add_argument("--attn-impl", default="flashinfer" if torch.cuda.is_available() else "sdpa")
    ap.add_argument("--moe-impl", default="eager")
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
