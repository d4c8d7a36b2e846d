"""The golden verifier refuses manifest entries it cannot read (naming the key) and recomputes the per-image
`cond{i}_` version of every single-image tensor of a multi-image edit set (golden README, "common layout")."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffgentor.engine.models.hunyuan_image_3.golden import GoldenVerifier, _Checker, unknown_input_keys


@pytest.fixture(scope="module")
def distil_set(golden_root):
    return golden_root / "tiny_distil"


def _copy_set(src, dst, files: dict) -> None:
    """A golden set in `dst` sharing `src`'s checkpoint and images, with its own manifest `files`."""
    dst.mkdir()
    for name in os.listdir(src):
        if name != "manifest.json":
            (dst / name).symlink_to(src / name)
    manifest = json.loads((src / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**manifest, "files": files}))


def test_unknown_input_key_is_refused_by_name(distil_set, tmp_path):
    entry = dict(json.loads((distil_set / "manifest.json").read_text())["files"]["gen.safetensors"])
    entry["cond_images"] = ["cond0_64x96.png", "cond1_112x48.png", "cond0_64x96.png"]
    assert unknown_input_keys(entry) == ["cond_images"]
    _copy_set(distil_set, tmp_path / "set", {"gen.safetensors": entry})
    report = GoldenVerifier(tmp_path / "set").run()
    assert not report.ok
    (line,) = report.lines  # refused before anything is rebuilt: no shape mismatches, one clear line
    assert line.name == "<manifest>" and "cond_images" in line.note


def test_every_condition_image_gets_its_own_tensors(distil_set):
    """Per-image versions of the batched ViT tensors, cut from the set's own (official) values, are recomputed."""
    verifier = GoldenVerifier(distil_set)
    stored = load_file(str(distil_set / "gen.safetensors"))
    per_image = {}
    for i in range(2):
        for name in ("vit_pixel_values", "vit_last_hidden_state", "vit_aligned"):
            per_image[f"cond{i}_{name}"] = stored[name][i]
        for name in ("vae_pixels", "vit_pixel_attention_mask", "vit_spatial_shapes"):
            per_image[f"cond{i}_{name}"] = stored[f"cond{i}_{name}"]
    chk = _Checker(verifier.report, "gen.safetensors", per_image, atol=1e-4)
    images = verifier.pipe.load_images([distil_set / "cond0_64x96.png", distil_set / "cond1_112x48.png"])
    with torch.inference_mode():
        conds = verifier.pipe.prepare_conditions(images, torch.Generator().manual_seed(42), align=False)
        verifier._check_conds(chk, conds, rows=1)
    chk.finish()
    by_name = {line.name: line for line in verifier.report.lines}
    assert set(by_name) == set(per_image), sorted(set(per_image) ^ set(by_name))
    bad = [f"{n}: {line.note} {line.err}" for n, line in by_name.items() if not line.ok]
    assert not bad, bad
