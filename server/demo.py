"""`diffgentor demo` (what `make demo` runs): build the embedded tiny model and edit one image with it.

Everything is local: the tiny checkpoint is written by `make_tiny`, the input image is drawn here, and the
edit goes through the served path: `diffgentor serve` on 127.0.0.1 (API server + engine-core process over
ZeroMQ), one `images.edit` call from the official `openai` client (condition image through ViT and VAE,
think/recaption text phase, diffusion over the reused KV pages, VAE decode), then the server is stopped.
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(out: str | Path, max_new_tokens: int = 24, num_inference_steps: int = 2) -> int:
    """Build the tiny Distil model, `diffgentor serve` it on loopback, send one edit of the sample image through
    the official `openai` client, save the result and stop the server."""
    import base64
    import io
    import os
    import subprocess
    import sys

    import httpx
    from openai import OpenAI

    from diffgentor.engine.testing.tiny_model import make_tiny

    out = Path(out)
    ckpt = out / "tiny-HunyuanImage-3.0-Instruct-Distil"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_tiny(ckpt, distil=True)
    print(f"built the tiny Distil checkpoint in {ckpt} ({time.perf_counter() - t0:.1f} s)")
    src = sample_image()
    src_path = out / "input.png"
    src.save(src_path)

    port = _free_port()
    log_path = out / "server.log"
    cmd = [sys.executable, "-m", "diffgentor.server.cli", "serve", str(ckpt), "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--num-kv-blocks", "2048"]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    print(log_path.read_text())
                    print(f"the server exited with status {proc.returncode}")
                    return 1
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > 300:
                    print("the server did not become healthy in 300 s")
                    return 1
                time.sleep(0.3)
            print(f"server up on {base} ({time.perf_counter() - t0:.1f} s); sending one edit via the openai client")
            client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=600, max_retries=0)
            t0 = time.perf_counter()
            with open(src_path, "rb") as f:
                resp = client.images.edit(
                    image=f, prompt="make the sky purple and add a moon", size="auto",
                    extra_body={"seed": 42, "max_new_tokens": max_new_tokens,
                                "num_inference_steps": num_inference_steps},
                )
            elapsed = time.perf_counter() - t0
            out_path = out / "edited.png"
            out_path.write_bytes(base64.b64decode(resp.data[0].b64_json))
            from PIL import Image

            summary = {
                "input": str(src_path),
                "output": str(out_path),
                "output_size": list(Image.open(io.BytesIO(out_path.read_bytes())).size),
                "revised_prompt": resp.data[0].revised_prompt,
                "usage": resp.usage.model_dump() if resp.usage else None,
                "request_seconds": round(elapsed, 3),
                "server": base,
            }
            (out / "result.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary, indent=2))
            print(f"edited image written to {out_path}")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0
