"""FP8 expert weights vs the unquantised model: logits, denoiser predictions, greedy tokens, parameter bytes.

    python -m diffgentor.bench.fp8_accuracy --out bench/results/cpu-fp8-accuracy.json

Two random checkpoints from the tiny-model writer: the default tiny model (hidden 64, 4 experts of width 32) and a
small one (`SMALL_OVERRIDES`: hidden 512, 16 experts top-4 of width 512). Each is loaded twice on the CPU in fp32:
as written, and with `quantization="fp8"` (and "fp8_block"): routed + shared experts stored as float8_e4m3fn and
dequantised by the reference path. Both copies then see the same inputs:

- logits: a seeded random prompt of text tokens, prefilled at once; relative L2 and cosine of the fp32 logits over
  every position, and the share of positions whose argmax agrees (teacher-forced top-1 agreement);
- greedy tokens: each model decodes greedily on its own from the same prompt; the share of equal tokens and the
  length of the common prefix;
- denoiser: the prompt followed by one bidirectional block of image tokens (random latents at t = 500), velocity
  relative L2 and cosine;
- parameter bytes of the whole model and of the expert weights (FP8 payload + fp32 scales).
The figures are ratios of two runs of the same code, so they do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SMALL_OVERRIDES: dict[str, Any] = dict(
    num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, attention_head_dim=64,
    num_experts=16, moe_topk=4, moe_intermediate_size=512, num_shared_expert=1, intermediate_size=512,
)
"""4 layers, hidden 512, 16 experts top-4 of width 512 + a shared expert: ~54 M parameters, 96% of them experts."""

PROMPT_TOKENS = 48
DECODE_TOKENS = 24
IMAGE_GRID = (8, 8)


def rel_l2(a: Tensor, ref: Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def cosine(a: Tensor, ref: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), ref.double().flatten(), dim=0))


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer, and of the expert weights (+ scales) alone."""
    from diffgentor.engine.models.hunyuan_image_3.weights import is_expert_weight

    total = experts = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        n = t.numel() * t.element_size()
        total += n
        if is_expert_weight(name) or is_expert_weight(name.removesuffix("_scale")):
            experts += n
    return {"total": total, "experts": experts}


class _Runner:
    """Flat forwards of one model over its own paged cache (one sequence; the torch attention backend)."""

    def __init__(self, model: Any, capacity: int, block_size: int = 16) -> None:
        self.model = model
        self.block_size = block_size
        self.blocks = -(-capacity // block_size) + 1
        self.kv = model.make_kv_cache(self.blocks, block_size)

    def forward(self, embeds: Tensor, positions: Tensor, start: int, spans: tuple = ()) -> Tensor:
        from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk

        end = start + embeds.shape[0]
        chunk = SequenceChunk(range(start, end), end, list(range(self.blocks)), spans)
        meta = AttentionMetadata.build([chunk], self.block_size, device=self.model.device)
        with torch.no_grad():
            return self.model(embeds, positions, meta, self.kv)


def _text_positions(start: int, end: int) -> Tensor:
    p = torch.arange(start, end, dtype=torch.long)
    return torch.stack([p, p], dim=1)


def _prompt(vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, min(vocab, 400), (PROMPT_TOKENS,), generator=g).tolist()


def logits_and_greedy(model: Any, prompt: list[int]) -> tuple[Tensor, list[int]]:
    """Prompt logits [L, V] (fp32) and DECODE_TOKENS greedy tokens."""
    run = _Runner(model, len(prompt) + DECODE_TOKENS)
    ids = torch.tensor(prompt)
    hidden = run.forward(model.embed_tokens(ids), _text_positions(0, len(prompt)), 0)
    with torch.no_grad():
        logits = model.logits(hidden)
    out: list[int] = []
    last = logits[-1]
    n = len(prompt)
    for _ in range(DECODE_TOKENS):
        tok = int(last.argmax())
        out.append(tok)
        h = run.forward(model.embed_tokens(torch.tensor([tok])), _text_positions(n, n + 1), n)
        n += 1
        with torch.no_grad():
            last = model.logits(h)[0]
    return logits, out


def velocity(model: Any, prompt: list[int], seed: int) -> Tensor:
    """The denoiser's prediction for random latents after the prompt (one bidirectional image block)."""
    h, w = IMAGE_GRID
    g = torch.Generator().manual_seed(seed + 1)
    c = model.config.vae_latent_channels if hasattr(model.config, "vae_latent_channels") else \
        int(model.config.raw["vae"]["latent_channels"])
    latents = torch.randn(1, c, h, w, generator=g)
    t = torch.tensor([500.0])
    n = len(prompt)
    run = _Runner(model, n + h * w)
    with torch.no_grad():
        img = model.image_tokens(latents, t)[0]
    embeds = torch.cat([model.embed_tokens(torch.tensor(prompt)), img])
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_pos = torch.stack([yy.flatten(), xx.flatten()], dim=1) + n
    positions = torch.cat([_text_positions(0, n), img_pos])
    hidden = run.forward(embeds, positions, 0, spans=((n, n + h * w),))
    with torch.no_grad():
        return model.velocity(hidden[n:][None], (h, w), t)[0]


def compare(ckpt: str | Path, quantization: str = "fp8", seed: int = 0) -> dict[str, Any]:
    """Every figure of the module docstring for one checkpoint and one quantization."""
    from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM

    torch.manual_seed(seed)
    ref = HunyuanImage3ForCausalMM.from_pretrained(ckpt, moe_impl="eager")
    q = HunyuanImage3ForCausalMM.from_pretrained(ckpt, moe_impl="eager", quantization=quantization)
    prompt = _prompt(ref.config.vocab_size, seed)
    l_ref, g_ref = logits_and_greedy(ref, prompt)
    l_q, g_q = logits_and_greedy(q, prompt)
    v_ref, v_q = velocity(ref, prompt, seed), velocity(q, prompt, seed)
    prefix = next((i for i, (a, b) in enumerate(zip(g_ref, g_q)) if a != b), len(g_ref))
    b_ref, b_q = parameter_bytes(ref), parameter_bytes(q)
    return {
        "quantization": quantization,
        "logits_rel_l2": rel_l2(l_q, l_ref),
        "logits_cosine": cosine(l_q, l_ref),
        "top1_agreement": float((l_q.argmax(-1) == l_ref.argmax(-1)).float().mean()),
        "greedy_token_agreement": sum(a == b for a, b in zip(g_ref, g_q)) / len(g_ref),
        "greedy_common_prefix": prefix,
        "greedy_tokens": len(g_ref),
        "velocity_rel_l2": rel_l2(v_q, v_ref),
        "velocity_cosine": cosine(v_q, v_ref),
        "param_bytes_unquantized": b_ref,
        "param_bytes_quantized": b_q,
        "expert_bytes_ratio": b_q["experts"] / b_ref["experts"],
    }


def main(argv: list[str] | None = None) -> int:
    from diffgentor.engine.testing.tiny_model import make_tiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/cpu-fp8-accuracy.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"torch": torch.__version__, "device": "cpu", "activations": "float32",
                              "small_overrides": SMALL_OVERRIDES, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("tiny", None), ("small", SMALL_OVERRIDES)):
            ckpt = make_tiny(Path(tmp) / name, config_overrides=overrides)
            result["models"][name] = {
                quant: [compare(ckpt, quant, seed) for seed in args.seeds] for quant in ("fp8", "fp8_block")
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, per in result["models"].items():
        for quant, runs in per.items():
            keys = ("logits_rel_l2", "logits_cosine", "top1_agreement", "greedy_token_agreement", "velocity_rel_l2",
                    "velocity_cosine", "expert_bytes_ratio")
            print(name, quant, {k: round(max(r[k] for r in runs) if "l2" in k or "ratio" in k else
                                         min(r[k] for r in runs), 4) for k in keys})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
