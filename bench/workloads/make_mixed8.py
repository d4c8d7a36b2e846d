"""Write the mixed acceptance workload (bench/README.md): `mixed_t2i_edit_8.jsonl` and its four condition images.

4 text-to-image + 4 edit requests (one 128x96, 4:3 condition image each, all different), 256x256 output,
think_recaption, 32 think tokens, 8 steps; prompts in English and Chinese. The pictures are drawn here (a
gradient sky, ground, a sun and a house-like block in per-image colours), so the files are deterministic and
small, and a rerun of this script rewrites them byte for byte: `python bench/workloads/make_mixed8.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = (128, 96)  # width x height: 4:3, maps to the engine's 1024x768 condition bucket

PALETTES = [  # (sky top, sky bottom, ground, sun, block)
    ((40, 90, 200), (170, 210, 250), (60, 140, 60), (250, 220, 60), (180, 60, 50)),
    ((250, 120, 60), (250, 210, 150), (120, 100, 70), (255, 250, 200), (60, 60, 120)),
    ((10, 20, 60), (60, 70, 140), (30, 40, 40), (230, 230, 250), (200, 180, 60)),
    ((120, 200, 230), (230, 245, 250), (220, 200, 150), (255, 200, 80), (40, 130, 130)),
]

T2I_PROMPTS = [
    "A red cube sits on a wooden table next to a glass of water, soft morning light.",
    "一只橙色的猫在窗台上睡觉，窗外正在下雨。",
    "A wide shot of a city at night, with neon signs reflected in the wet road.",
    "雪山下的湖边有一座小木屋，天空晴朗。",
]
EDIT_PROMPTS = [
    "Make the sky purple and add a bright moon above the house.",
    "把房子的颜色改成白色，并在左边加一棵树。",
    "Turn the photo into a watercolor painting with soft edges and warm colors.",
    "Remove the sun and add two birds flying over the roof.",
]


def condition_image(index: int) -> Image.Image:
    """A simple landscape: vertical sky gradient, ground strip, a sun disc and a block with a roof."""
    top, bottom, ground, sun, block = PALETTES[index % len(PALETTES)]
    w, h = SIZE
    img = Image.new("RGB", SIZE)
    horizon = int(h * 0.68)
    for y in range(horizon):
        t = y / max(horizon - 1, 1)
        img.paste(tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)), (0, y, w, y + 1))
    d = ImageDraw.Draw(img)
    d.rectangle((0, horizon, w, h), fill=ground)
    cx = 20 + 28 * index
    d.ellipse((cx, 8, cx + 18, 26), fill=sun)
    bx = 70 - 14 * index
    d.rectangle((bx, horizon - 24, bx + 36, horizon + 4), fill=block)
    d.polygon([(bx - 4, horizon - 24), (bx + 18, horizon - 40), (bx + 40, horizon - 24)], fill=(90, 50, 40))
    d.rectangle((bx + 14, horizon - 10, bx + 22, horizon + 4), fill=(40, 30, 20))
    return img


def requests() -> list[dict]:
    common = dict(image_size="256x256", bot_task="think_recaption", max_new_tokens=32, num_inference_steps=8,
                  use_system_prompt="en_unified")
    out = []
    for i, (t2i, edit) in enumerate(zip(T2I_PROMPTS, EDIT_PROMPTS)):
        out.append(dict(prompt=t2i, seed=100 + i, **common))
        out.append(dict(prompt=edit, images=[f"mixed8/cond{i}.png"], seed=200 + i, **common))
    return out


def main() -> None:
    (HERE / "mixed8").mkdir(exist_ok=True)
    for i in range(len(EDIT_PROMPTS)):
        condition_image(i).save(HERE / "mixed8" / f"cond{i}.png", optimize=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in requests()]
    (HERE / "mixed_t2i_edit_8.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
