"""The full-size HunyuanImage-3.0 module tree (built on the meta device) has exactly the official keys.

The official Instruct-Distil index has 5169 tensors (4096 expert tensors, 448 ViT incl. its unused pooling
head, 280 VAE); Instruct has 8 fewer (no guidance / timestep_r embedders). Shapes are the official checkpoint index's.
"""

from __future__ import annotations

import functools

import pytest
import torch

from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.model import HunyuanImage3ForCausalMM

from helpers import PUBLISHED_INSTRUCT_CONFIG

REAL_DISTIL = dict(PUBLISHED_INSTRUCT_CONFIG, cfg_distilled=True, use_meanflow=True)


@functools.lru_cache(maxsize=2)
def _state(distil: bool) -> dict[str, torch.Tensor]:
    d = dict(REAL_DISTIL, cfg_distilled=distil, use_meanflow=distil)
    with torch.device("meta"):
        return HunyuanImage3ForCausalMM(HunyuanImage3Config.from_dict(d)).state_dict()


@pytest.mark.parametrize("distil,count", [(True, 5169), (False, 5161)])
def test_real_key_count(distil, count):
    sd = _state(distil)
    assert len(sd) == count
    assert sum(k.startswith("model.layers.") and ".mlp.experts." in k for k in sd) == 4096
    assert sum(k.startswith("vision_model.") for k in sd) == 448
    assert sum(k.startswith("vae.") for k in sd) == 280


def test_real_shapes_and_size():
    sd = _state(True)
    shapes = {
        "model.wte.weight": (133120, 4096),
        "model.layers.0.self_attn.qkv_proj.weight": (6144, 4096),
        "model.layers.31.self_attn.o_proj.weight": (4096, 4096),
        "model.layers.0.self_attn.query_layernorm.weight": (128,),
        "model.layers.0.mlp.gate.wg.weight": (64, 4096),
        "model.layers.0.mlp.shared_mlp.gate_and_up_proj.weight": (6144, 4096),
        "model.layers.0.mlp.experts.63.down_proj.weight": (4096, 3072),
        "lm_head.weight": (133120, 4096),
        "patch_embed.model.0.weight": (1024, 32, 3, 3),
        "patch_embed.model.1.in_layers.2.weight": (4096, 1024, 3, 3),
        "patch_embed.model.1.emb_layers.1.weight": (8192, 4096),
        "final_layer.model.0.emb_layers.1.weight": (2048, 4096),
        "final_layer.model.1.2.weight": (32, 1024, 3, 3),
        "timestep_r_emb.mlp.0.weight": (4096, 256),
        "vision_model.embeddings.patch_embedding.weight": (1152, 768),
        "vision_model.head.attention.in_proj_weight": (3456, 1152),
        "vision_aligner.layers.2.weight": (4096, 4096),
        "vae.encoder.down.0.downsample.conv.weight": (64, 128, 3, 3, 3),
        "vae.decoder.up.0.upsample.conv.weight": (8192, 1024, 3, 3, 3),
        "vae.encoder.conv_out.weight": (64, 1024, 3, 3, 3),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    total = sum(t.numel() for t in sd.values())
    assert 83.0e9 < total < 83.1e9  # the published size: about 83.05 B for Distil


def _differences(published: dict, written: dict, path: str = "") -> list[str]:
    out = []
    for key, want in published.items():
        got = written.get(key, "<missing>")
        if isinstance(want, dict) and isinstance(got, dict):
            out += _differences(want, got, f"{path}{key}.")
        elif got != want:
            out.append(f"{path}{key}: written {got!r}, published {want!r}")
    return out


def test_real_config_writer_has_the_published_values(tmp_path):
    """bench/engine_run.write_real_config (the config plan-memory and the GPU check run on) carries every published
    config.json value, the ViT's 1024 patches per condition image and its pooling head included."""
    import json

    from PIL import Image

    from diffgentor.bench.engine_run import write_real_config
    from diffgentor.engine.models.hunyuan_image_3.image_processing import ImageProcessor
    from diffgentor.engine.models.hunyuan_image_3.vision import build_vision_tower


    ckpt = write_real_config(tmp_path / "real")
    written = json.loads((ckpt / "config.json").read_text())
    assert _differences(PUBLISHED_INSTRUCT_CONFIG, written) == []
    cfg = HunyuanImage3Config.from_pretrained(ckpt)
    vit = ImageProcessor(cfg).vit_image(Image.new("RGB", (1024, 1024)))
    assert tuple(vit.pixel_values.shape) == (1024, 3 * 16 * 16) and tuple(vit.spatial_shapes.tolist()) == (32, 32)
    with torch.device("meta"):
        assert len(build_vision_tower(cfg.vit).state_dict()) == 448  # the official ViT keys, head included
