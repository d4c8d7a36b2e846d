"""`diffgentor demo` (what `make demo` runs): build the embedded tiny model and edit one image with it.

Everything is local and deterministic: the tiny checkpoint is written by `make_tiny`, the input image is
drawn here, and the edit runs the full path (condition image through ViT and VAE, think/recaption text
phase, diffusion over the reused KV pages, VAE decode). The serving issue turns this into an edit sent
through the OpenAI-compatible endpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image


def sample_image(width: int = 96, height: int = 64) -> Image.Image:
    """A small synthetic scene (sky gradient, ground, a sun) so the demo needs no files."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), dtype=np.float32)
    sky = y < height * 0.6
    img[..., 0] = np.where(sky, 80 + 100 * y / height, 60)
    img[..., 1] = np.where(sky, 140 + 80 * y / height, 120 + 40 * x / width)
    img[..., 2] = np.where(sky, 230, 50)
    sun = (x - width * 0.75) ** 2 + (y - height * 0.25) ** 2 < (height * 0.12) ** 2
    img[sun] = (255, 220, 90)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def run_demo(out: str | Path, max_new_tokens: int = 24) -> int:
    from diffgentor.engine.models.hunyuan_image_3.pipeline import HunyuanImage3Pipeline, ImageRequest
    from diffgentor.engine.tiny_model import make_tiny

    out = Path(out)
    ckpt = out / "tiny-HunyuanImage-3.0-Instruct-Distil"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_tiny(ckpt, distil=True)
    print(f"built the tiny Distil checkpoint in {ckpt} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    pipe = HunyuanImage3Pipeline.from_pretrained(ckpt)
    print(f"loaded it in {time.perf_counter() - t0:.2f} s")
    src = sample_image()
    src_path = out / "input.png"
    src.save(src_path)
    req = ImageRequest(prompt="make the sky purple and add a moon", images=[src], seed=42,
                       max_new_tokens=max_new_tokens)
    result = pipe.generate(req)
    out_path = out / "edited.png"
    result.image.save(out_path)
    summary = {
        "input": str(src_path),
        "output": str(out_path),
        "output_size": list(result.image.size),
        "ratio_index": result.ratio_index,
        "think_recaption_text": result.text,
        "truncated_think_budget": result.truncated,
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"edited image written to {out_path}")
    return 0
