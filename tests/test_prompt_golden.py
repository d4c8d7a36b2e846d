"""Prompt builder, tokenizer and system prompts against the golden manifests (exact ids and layouts)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffgentor.engine.models.hunyuan_image_3.config import HunyuanImage3Config
from diffgentor.engine.models.hunyuan_image_3.prompt import CondImageLayout, PromptBuilder
from diffgentor.engine.models.hunyuan_image_3.resolution import ResolutionGroup
from diffgentor.engine.models.hunyuan_image_3.stage_machine import StageMachine
from diffgentor.engine.models.hunyuan_image_3.system_prompt import (
    SystemPromptError,
    SystemPrompts,
    read_constants,
    resolve_system_prompt,
)
from diffgentor.engine.models.hunyuan_image_3.tokenizer import HunyuanTokenizer, TokenizerError

REF_SYSTEM_PROMPT = Path(__file__).resolve().parents[2] / "ref" / "hunyuan_image_3" / "system_prompt.py"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_manifest(golden_tiny):
    return json.loads((golden_tiny / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def distil_manifest(golden_distil):
    return json.loads((golden_distil / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def tiny_tok(golden_tiny):
    return HunyuanTokenizer.from_pretrained(golden_tiny / "checkpoint")


@pytest.fixture(scope="module")
def distil_tok(golden_distil):
    return HunyuanTokenizer.from_pretrained(golden_distil / "checkpoint", require_distil_tokens=True)


@pytest.fixture(scope="module")
def tiny_builder(tiny_tok, golden_tiny):
    cfg = HunyuanImage3Config.from_pretrained(golden_tiny / "checkpoint")
    return PromptBuilder.from_config(tiny_tok, cfg)


@pytest.fixture(scope="module")
def distil_builder(distil_tok, golden_distil):
    cfg = HunyuanImage3Config.from_pretrained(golden_distil / "checkpoint")
    return PromptBuilder.from_config(distil_tok, cfg)


@pytest.fixture(scope="module")
def distil_system(distil_manifest):
    """The en_unified text as the golden run used it (between <bos> and the user turn)."""
    dc = distil_manifest["gen.safetensors"]["decoded_collapsed"]
    return dc[len("<|startoftext|>") : dc.index("\n\nUser: ")]


@pytest.fixture(scope="module")
def distil_conds(distil_builder, golden_distil):
    sizes = [Image.open(golden_distil / n).size for n in ("cond0_64x96.png", "cond1_112x48.png")]
    return [distil_builder.cond_image_layout(w, h, vit_max_patches=64) for w, h in sizes]


def _slices(xs):
    return [tuple(x) for x in xs]


def _collapse(text: str) -> str:
    return re.sub(r"(<img>)+", lambda m: f"[<img>x{len(m.group(0)) // 5}]", text)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_special_ids_by_name(tiny_tok, distil_tok):
    sp = tiny_tok.special
    assert (sp.eos, sp.bos, sp.pad) == (0, 1, 2)
    assert (sp.boi, sp.eoi, sp.cfg, sp.timestep) == (400, 401, 408, 409)
    assert (sp.joint_img_sep, sp.answer, sp.end_answer) == (412, 413, 414)
    assert (sp.think, sp.end_think, sp.recaption, sp.end_recaption) == (415, 416, 417, 418)
    assert sp.img == 463
    assert sp.ratio == tuple(range(426, 463))
    assert tiny_tok.size_token_id(256) == 423
    assert (sp.guidance, sp.timestep_r) == (411, 410)  # present, though not required here
    assert distil_tok.guidance_id == 411 and distil_tok.timestep_r_id == 410
    assert sp.ratio_index(455) == 29 and sp.ratio_index(400) is None
    with pytest.raises(TokenizerError, match="<img_size_4096>"):
        tiny_tok.size_token_id(4096)


def _tokenizer_without(tmp_path, golden_tiny, names):
    data = json.loads((golden_tiny / "checkpoint" / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in names]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return tmp_path


def test_missing_special_tokens_are_named(tmp_path, golden_tiny):
    ck = _tokenizer_without(tmp_path, golden_tiny, {"<cfg>", "<img_ratio_35>", "<guidance>"})
    with pytest.raises(TokenizerError, match=r"<cfg>.*<img_ratio_35>"):
        HunyuanTokenizer.from_pretrained(ck)


def test_distil_tokens_only_required_for_distil(tmp_path, golden_tiny):
    ck = _tokenizer_without(tmp_path, golden_tiny, {"<guidance>", "<timestep_r>"})
    tok = HunyuanTokenizer.from_pretrained(ck)
    assert tok.special.guidance is None
    with pytest.raises(TokenizerError, match="<guidance>"):
        _ = tok.guidance_id
    with pytest.raises(TokenizerError, match="<guidance>, <timestep_r>"):
        HunyuanTokenizer.from_pretrained(ck, require_distil_tokens=True)
    with pytest.raises(TokenizerError, match="<guidance>"):
        PromptBuilder(tok, base_size=256, add_guidance_token=True)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        HunyuanTokenizer.from_pretrained(tmp_path / "nowhere")


def test_encode_decode(tiny_tok, distil_manifest):
    assert tiny_tok.encode("User: ") == [318, 264, 29, 224]  # no BOS added
    assert tiny_tok.encode("Assistant: <think>") == tiny_tok.encode("Assistant: ") + [415]
    assert tiny_tok.decode([508, 509, 10**6, -1]) == ""  # padding rows of the embedding
    for run in distil_manifest["text_stage_runs"]["runs"]:
        if run["bot_task"] == "image":
            continue
        text = tiny_tok.decode(run["generated_ids"])
        assert text == run["generated_text"], run["name"]


# ------------------------------------------------------------------------------------------ system prompts
def test_system_prompt_read_without_executing(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / "system_prompt.py").write_text(
        "import os\n"
        f"open({str(marker)!r}, 'w').write('x')\n"
        "raise SystemExit('must not run')\n"
        "t2i_system_prompt_en_vanilla = '''\\nVanilla prompt.\\n'''\n"
        "t2i_system_prompt_en_recaption = '\\nRecap' + 'tion prompt\\n'\n"
        "t2i_system_prompt_en_think_recaption = ('Think '\n    'recaption prompt\\n')\n"
        "t2i_system_prompts = {\n"
        "    'en_vanilla': [t2i_system_prompt_en_vanilla],\n"
        "    'en_recaption': [t2i_system_prompt_en_recaption],\n"
        "    'en_think_recaption': [t2i_system_prompt_en_think_recaption],\n"
        "}\n"
        "unified_system_prompt_en = f'{os.getcwd()}'\n"
        "unified_system_prompt_en = '  Unified prompt  '\n"
        "def get_system_prompt(*a):\n    raise RuntimeError\n"
    )
    consts = read_constants(tmp_path / "system_prompt.py")
    assert consts["t2i_system_prompt_en_recaption"] == "\nRecaption prompt\n"
    sp = SystemPrompts.from_pretrained(tmp_path)
    assert not marker.exists()
    assert sp.resolve("en_unified", "think_recaption") == "Unified prompt"
    assert sp.resolve("en_vanilla", "image") == "Vanilla prompt."
    assert sp.resolve("en_recaption", "image") == "Recaption prompt"
    assert sp.resolve("en_think_recaption", "image") == "Think recaption prompt"
    assert sp.resolve("dynamic", "think") == "Think recaption prompt"
    assert sp.resolve("dynamic", "recaption") == "Recaption prompt"
    assert sp.select_raw("dynamic", "image") == "Vanilla prompt."  # newlines stripped
    assert sp.resolve("dynamic", "think_recaption") == ""  # quirk: falls back to the custom prompt
    assert sp.resolve("dynamic", "think_recaption", " mine ") == "mine"
    assert sp.resolve("None", "image", "ignored") == "" and sp.resolve(None, "image") == ""
    assert sp.resolve("custom", "image", "\n my system\n") == "my system"
    assert sp.resolve("custom", "image") == ""
    with pytest.raises(SystemPromptError, match="unknown use_system_prompt"):
        sp.resolve("en_other", "image")


def test_checkpoint_without_system_prompt_file(golden_tiny):
    sp = SystemPrompts.from_pretrained(golden_tiny / "checkpoint")
    assert sp.stored == {}
    assert sp.resolve("None", "think_recaption") == ""
    assert sp.resolve("custom", "image", "abc") == "abc"
    assert sp.resolve("dynamic", "auto", "abc") == "abc"
    for kind in ("en_unified", "en_vanilla", "en_recaption", "en_think_recaption"):
        with pytest.raises(SystemPromptError, match=f"{kind}.*no system_prompt.py"):
            sp.resolve(kind, "think_recaption")
    with pytest.raises(SystemPromptError, match="en_vanilla"):
        sp.resolve("dynamic", "image")


@pytest.mark.skipif(not REF_SYSTEM_PROMPT.is_file(), reason="official system_prompt.py not available")
def test_official_system_prompt_file(tmp_path, distil_system):
    shutil.copy(REF_SYSTEM_PROMPT, tmp_path / "system_prompt.py")
    sp = SystemPrompts.from_pretrained(tmp_path)
    assert {k: len(v) for k, v in sp.stored.items()} == {
        "en_unified": 5674,
        "en_vanilla": 326,
        "en_recaption": 3793,
        "en_think_recaption": 4412,
    }
    assert resolve_system_prompt(tmp_path, "en_unified", "image") == distil_system
    assert len(distil_system) == 5673


# ---------------------------------------------------------------------------------------------- tiny set
def test_tiny_text_prompt(tiny_builder, tiny_manifest, golden_tiny):
    entry = tiny_manifest["text.safetensors"]
    p = tiny_builder.text_prompt(entry["prompt"], task="auto")
    assert p.token_ids == entry["token_ids"]
    assert p.token_ids == load_file(golden_tiny / "text.safetensors")["input_ids"][0].tolist()
    assert torch.equal(p.positions, torch.arange(25).unsqueeze(1).repeat(1, 2))
    assert p.image_slots == [] and p.full_attn_spans == [] and p.gen_timestep_index is None


def test_tiny_image_step(tiny_builder, tiny_manifest, golden_tiny):
    entry = tiny_manifest["image_step.safetensors"]
    out = entry["tokenizer_output"]
    ratio, _ = tiny_builder.resolution.parse_size(entry["image_size"])
    p = tiny_builder.image_prompt(entry["prompt"], ratio_index=ratio, cfg=True)
    t = load_file(golden_tiny / "image_step.safetensors")
    assert [p.token_ids, p.uncond_token_ids] == out["tokens"] == t["input_ids"].tolist()
    assert p.text_slices == _slices(out["text_slices"][0])
    assert [(s.start, s.end) for s in p.slots("gen")] == _slices(out["gen_image_slices"][0])
    assert [p.gen_timestep_index] == out["gen_timestep_scatter_index"][0] == t["timesteps_index"][0].tolist()
    assert [list(r) for r in p.rope_image_info] == entry["rope_image_info"][0]
    assert p.guidance_index is None and p.timestep_r_index is None and p.cond_timestep_indexes == []
    assert p.gen_image_size == (256, 256)
    for row in range(2):
        assert torch.equal(p.attention_mask(), t["attention_mask_4d"][row, 0].bool())
    gen_mask = torch.zeros(len(p), dtype=torch.uint8)
    gen_mask[p.slots("gen")[0].start : p.slots("gen")[0].end] = 1
    assert torch.equal(gen_mask, t["gen_image_mask"][0])


def test_tiny_edit_step(tiny_builder, tiny_manifest, golden_tiny):
    entry = tiny_manifest["edit_step.safetensors"]
    out = entry["tokenizer_output"]
    t = load_file(golden_tiny / "edit_step.safetensors")
    w, h = Image.open(golden_tiny / "edit_input.png").size
    lay = tiny_builder.cond_image_layout(w, h, vit_max_patches=64)
    assert lay == CondImageLayout(ratio_index=13, vae_grid=(13, 19), vit_grid=(6, 9), vit_tokens=64)
    assert list(lay.vit_grid) == t["vit_spatial_shapes"].tolist() == entry["vit_spatial_shapes"]
    p = tiny_builder.image_prompt(entry["prompt"], ratio_index=16, cond_images=[lay], cfg=True)
    assert len(p) == 606
    assert [p.token_ids, p.uncond_token_ids] == out["tokens"] == t["input_ids"].tolist()
    assert p.text_slices == _slices(out["text_slices"][0])
    assert [(s.start, s.end) for s in p.slots("cond_vae")] == _slices(out["vae_image_slices"][0])
    assert [(s.start, s.end) for s in p.slots("cond_vit")] == _slices(out["vit_image_slices"][0])
    assert [(s.start, s.end) for s in p.slots("gen")] == _slices(out["gen_image_slices"][0])
    assert [(s.start, s.end) for s in p.image_slots] == _slices(out["all_image_slices"][0])
    assert p.cond_timestep_indexes == out["cond_timestep_scatter_index"][0]
    assert [p.gen_timestep_index] == out["gen_timestep_scatter_index"][0]
    assert [list(r) for r in p.rope_image_info] == entry["rope_image_info"][0]
    for row in range(2):
        assert torch.equal(p.attention_mask(), t["attention_mask_4d"][row, 0].bool())
    for kind, key in (
        ("cond_vae", "vae_image_mask"),
        ("cond_vit", "vit_image_mask"),
        ("gen", "gen_image_mask"),
    ):
        mask = torch.zeros(len(p), dtype=torch.uint8)
        for s in p.slots(kind):
            mask[s.start : s.end] = 1
        assert torch.equal(mask, t[key][0]), key
    # ViT padding rows keep their 1-D index; the 6x9 grid is centred in [257, 311)
    vit = p.slots("cond_vit")[0]
    assert torch.equal(
        p.positions[vit.start + 54 : vit.end], torch.arange(311, 321).unsqueeze(1).repeat(1, 2)
    )
    assert p.positions[vit.start].tolist() == [257 + (54 - 6) // 2, 257 + (54 - 9) // 2]


# ---------------------------------------------------------------------------------------------- distil set
def test_distil_step(distil_builder, distil_manifest, golden_distil):
    entry = distil_manifest["step.safetensors"]
    out = entry["tokenizer_output"]
    t = load_file(golden_distil / "step.safetensors")
    p = distil_builder.image_prompt(entry["prompt"], ratio_index=16, cfg=False)
    assert p.token_ids == entry["token_ids"] == t["input_ids"][0].tolist()
    assert p.uncond_token_ids is None
    assert p.text_slices == _slices(out["text_slices"][0])
    assert [p.gen_timestep_index] == out["gen_timestep_scatter_index"][0]
    assert [p.guidance_index] == out["guidance_scatter_index"][0]
    assert [p.timestep_r_index] == out["gen_timestep_r_scatter_index"][0]
    assert [list(r) for r in p.rope_image_info] == entry["rope_image_info"][0]
    assert [list(s) for s in p.full_attn_spans] == entry["full_attn_blocks"]
    assert torch.equal(p.attention_mask(), t["attention_mask_4d"][0, 0].bool())


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    pos = positions.float()
    angles = torch.stack([pos[:, j % 2] * freqs[j] for j in range(head_dim // 2)], dim=1)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


def test_distil_gen_two_condition_images(
    distil_builder, distil_manifest, golden_distil, distil_system, distil_conds
):
    entry = distil_manifest["gen.safetensors"]
    out = entry["tokenizer_output"]
    t = load_file(golden_distil / "gen.safetensors")
    assert [list(c.vit_grid) for c in distil_conds] == entry["vit_spatial_shapes"]
    assert [c.vit_grid for c in distil_conds] == [
        tuple(t[f"cond{i}_vit_spatial_shapes"].tolist()) for i in (0, 1)
    ]
    assert [c.ratio_index for c in distil_conds] == [13, 22]
    p = distil_builder.image_prompt(
        entry["prompt"], ratio_index=16, system_prompt=distil_system, cond_images=distil_conds
    )
    assert len(p) == 5180
    assert p.token_ids == t["input_ids"][0].tolist()
    assert p.text_slices == _slices(out["text_slices"][0])
    assert [(s.start, s.end) for s in p.slots("cond_vae")] == _slices(out["vae_image_slices"][0])
    assert [(s.start, s.end) for s in p.slots("cond_vit")] == _slices(out["vit_image_slices"][0])
    assert [s.cond_index for s in p.slots("cond_vit")] == [0, 1]
    assert p.cond_timestep_indexes == out["cond_timestep_scatter_index"][0] == [4269, 4586]
    assert (p.gen_timestep_index, p.guidance_index, p.timestep_r_index) == (4917, 4918, 4919)
    assert [list(r) for r in p.rope_image_info] == entry["rope_image_info"][0]
    assert [list(s) for s in p.full_attn_spans] == entry["full_attn_blocks"]
    for kind, key in (
        ("cond_vae", "vae_image_mask"),
        ("cond_vit", "vit_image_mask"),
        ("gen", "gen_image_mask"),
    ):
        mask = torch.zeros(len(p), dtype=torch.uint8)
        for s in p.slots(kind):
            mask[s.start : s.end] = 1
        assert torch.equal(mask, t[key][0]), key
    cos, sin = _rope_cos_sin(p.positions, head_dim=16, theta=10000.0)
    torch.testing.assert_close(cos, t["rope_cos"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, t["rope_sin"][0], atol=1e-6, rtol=0)


def test_distil_text_stage_prompts(
    distil_builder, distil_manifest, golden_distil, distil_system, distil_conds
):
    prompt = distil_manifest["text_stage_runs"]["prompt"]
    t = load_file(golden_distil / "text_stage_prompts.safetensors")
    for task, key in (
        ("think", "think_recaption"),
        ("recaption", "recaption"),
        ("img_ratio", "image_img_ratio"),
    ):
        p = distil_builder.text_prompt(
            prompt, task=task, system_prompt=distil_system, cond_images=distil_conds
        )
        assert p.token_ids == t[f"text_prompt_ids_{key}"][0].tolist(), key
        assert len(p.full_attn_spans) == 4 and p.gen_timestep_index is None


def test_official_cot_retokenization(
    distil_builder, distil_tok, distil_manifest, distil_system, distil_conds
):
    """The image-phase prompt from the decoded CoT, as the official code rebuilds it (all quirks)."""
    runs = distil_manifest["text_stage_runs"]
    checked = 0
    for run in runs["runs"]:
        phase = run["image_phase"]
        if not phase:
            continue
        cot = run["cot_text_to_image_phase"]
        p = distil_builder.image_prompt(
            runs["prompt"],
            ratio_index=phase["ratio_index"],
            system_prompt=distil_system,
            cond_images=distil_conds,
            cot_text=cot[0] if cot else None,
        )
        assert len(p) == phase["seq_len"], run["name"]
        decoded = _collapse(distil_tok.decode(p.token_ids))
        assert decoded.endswith(phase["decoded_collapsed_tail"]), run["name"]
        assert list(p.gen_image_size) == phase["image_size"]
        checked += 1
    assert checked == 9


def test_cot_ids_extend_the_text_phase(
    distil_builder, distil_tok, distil_manifest, distil_system, distil_conds
):
    """KV reuse (docs/decisions.md): with the CoT kept as ids, the image phase extends the text-phase sequence
    verbatim."""
    runs = distil_manifest["text_stage_runs"]
    text = distil_builder.text_prompt(
        runs["prompt"], task="think", system_prompt=distil_system, cond_images=distil_conds
    )
    t5 = next(r for r in runs["runs"] if r["name"].startswith("T5_"))
    sm = StageMachine.for_request(distil_tok, bot_task="think_recaption", base_size=256, max_new_tokens=40)
    for tok in t5["generated_ids"]:
        sm.feed(tok)
    assert sm.finished and sm.ratio_index == 29
    # the CoT starts with the prompt's trailing <think>, so the image prompt re-uses the text prompt minus it
    p = distil_builder.image_prompt(
        runs["prompt"],
        ratio_index=sm.ratio_index,
        system_prompt=distil_system,
        cond_images=distil_conds,
        cot_ids=sm.cot_ids,
        cfg=True,
    )
    seq = text.token_ids + t5["generated_ids"]
    assert p.token_ids[: len(seq)] == seq
    assert p.token_ids[len(seq)] == distil_tok.special.timestep
    assert p.gen_image_size == (464, 128)
    assert p.slots("gen")[0].grid == (29, 8)
    assert p.cot_span == (len(text.token_ids) - 1, len(text.token_ids) - 1 + len(sm.cot_ids))
    # CFG row: tags kept, CoT contents and user text become <cfg>
    sp = distil_tok.special
    s, e = p.cot_span
    expect = [
        t if t in (sp.think, sp.end_think, sp.recaption, sp.end_recaption) else sp.cfg
        for t in p.token_ids[s:e]
    ]
    assert p.uncond_token_ids[s:e] == expect
    assert p.uncond_token_ids[e:] == p.token_ids[e:]
    user = p.text_slices[[i for i, sl in enumerate(p.text_slices) if sl[0] == 4873][0]]
    assert set(p.uncond_token_ids[user[0] : user[1]]) == {sp.cfg}
    assert p.uncond_token_ids[:4873] == p.token_ids[:4873]  # system, role strings, images kept


# ---------------------------------------------------------------------------------------------- variants
def test_cond_token_attn_types(tiny_tok):
    lay = CondImageLayout(ratio_index=13, vae_grid=(13, 19), vit_grid=(6, 9), vit_tokens=64)
    spans = {}
    rope = {}
    for kind in ("full", "joint_full", "full_causal", "causal"):
        b = PromptBuilder(tiny_tok, base_size=256, cond_token_attn_type=kind)
        p = b.image_prompt("x", ratio_index=16, cond_images=[lay])
        spans[kind], rope[kind] = p.full_attn_spans, [r[:2] for r in p.rope_image_info]
        gen = p.slots("gen")[0]
        assert spans[kind][-1] == (gen.start, gen.end)
    assert spans["full"][:2] == [(9, 256), (257, 321)]
    assert spans["joint_full"][:1] == [(9, 321)]
    assert spans["full_causal"][:1] == [(9, 256)]
    assert len(spans["causal"]) == 1
    assert rope["full"][:2] == rope["joint_full"][:2] == [(9, 256), (257, 321)]
    assert rope["full_causal"][:1] == [(9, 256)] and len(rope["full_causal"]) == 2
    assert len(rope["causal"]) == 1
    with pytest.raises(ValueError, match="cond_token_attn_type"):
        PromptBuilder(tiny_tok, base_size=256, cond_token_attn_type="bidirectional")


def test_pretrain_template(tiny_tok):
    b = PromptBuilder(tiny_tok, base_size=256, template="pretrain")
    sp = tiny_tok.special
    p = b.image_prompt("a cat", ratio_index=16, cfg=True)
    block = [sp.boi, 423, sp.ratio[16], sp.timestep] + [sp.img] * 256 + [sp.eoi]
    assert p.token_ids == [sp.bos] + tiny_tok.encode("a cat") + block
    assert p.uncond_token_ids == [sp.bos] + [sp.cfg] * len(tiny_tok.encode("a cat")) + block
    assert b.text_prompt("a cat", task="img_ratio").token_ids == [sp.bos] + tiny_tok.encode("a cat") + [
        sp.boi,
        423,
    ]
    assert b.text_prompt("a cat", task="think").token_ids[-1] == sp.think
    with pytest.raises(ValueError, match="template"):
        PromptBuilder(tiny_tok, base_size=256, template="chat")


def test_builder_errors(tiny_builder):
    with pytest.raises(ValueError, match="text-phase task"):
        tiny_builder.text_prompt("x", task="image")
    with pytest.raises(ValueError, match="either"):
        tiny_builder.image_prompt("x", ratio_index=16, cot_ids=[1], cot_text="a")
    with pytest.raises(ValueError, match="out of range"):
        tiny_builder.image_prompt("x", ratio_index=40)
    with pytest.raises(ValueError, match="more patches"):
        CondImageLayout(ratio_index=1, vae_grid=(2, 2), vit_grid=(9, 9), vit_tokens=64)


def test_cond_layout_for_real_sizes():
    lay = CondImageLayout.for_image(1024, 1024, ResolutionGroup(1024))
    assert lay == CondImageLayout(ratio_index=16, vae_grid=(64, 64), vit_grid=(32, 32), vit_tokens=1024)
    # one 1024^2 condition image = 4096 + 1024 + 6 tokens
    assert 4096 + lay.vit_tokens + 6 == 5126
