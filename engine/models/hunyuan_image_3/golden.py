"""`diffgentor verify-golden DIR`: recompute every tensor of a golden set and compare.

A golden set (see `shared/golden/README.md`) is `checkpoint/` + `manifest.json` + safetensors files
made by running the official implementation. Each file is recognised by the tensors it holds (text
logits, one denoiser call, a whole generation, stage-machine prompts); every tensor present is
recomputed from the manifest's inputs through our model and reported with its max abs error. A tensor
the verifier does not know how to recompute is reported as an error, never skipped.

With a tensor-parallel size above 1 the same verification runs in that many rank processes (gloo on CPU), each
holding only its shard of the model; the collectives make every rank compute the full outputs, so every rank
checks every tensor and all ranks' reports must be identical. Rank 0's report is the result.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from diffgentor.engine.config import HunyuanImage3Env
from diffgentor.engine.parallel import ParallelContext, init_distributed
from diffgentor.kernels.rope import rope_cos_sin

from .flow_match import cfg_combine, guidance_value
from .prompt import BuiltPrompt
from .reference_pipeline import (
    HunyuanImage3Pipeline,
    ImageRequest,
    _Part,
    _Seq,
)
from .sampling import SamplingParams, make_generator, warp_logits
from .stage_machine import StageMachine
from .vision import run_vision_tower

BOS_TEXT = "<|startoftext|>"


@dataclass
class Line:
    file: str
    name: str
    ok: bool
    err: float | None = None
    tol: float | None = None
    note: str = ""
    info: bool = False
    """Informational (does not gate the exit code); shown as `info`."""

    def render(self) -> str:
        status = "info" if self.info else ("ok  " if self.ok else "FAIL")
        err = "" if self.err is None else f" max_abs_err={self.err:.3e}"
        tol = "" if self.tol is None else f" (tol {self.tol:g})"
        note = f"  {self.note}" if self.note else ""
        return f"{status} {self.file}:{self.name}{err}{tol}{note}"


@dataclass
class Report:
    golden_dir: str
    lines: list[Line] = field(default_factory=list)
    parallel: str = ""
    """How the model ran, e.g. "tensor parallel 2"; empty for the single-process model."""

    @property
    def ok(self) -> bool:
        gating = [line for line in self.lines if not line.info]
        return bool(gating) and all(line.ok for line in gating)

    def render(self) -> str:
        gating = [line for line in self.lines if not line.info]
        bad = sum(not line.ok for line in gating)
        body = "\n".join(line.render() for line in self.lines)
        tail = f"{len(gating) - bad} passed, {bad} failed"
        where = f"{self.golden_dir} ({self.parallel})" if self.parallel else self.golden_dir
        return f"{body}\n{where}: {tail}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Report:
        d = json.loads(text)
        return cls(d["golden_dir"], [Line(**line) for line in d["lines"]], d.get("parallel", ""))


class _Checker:
    """Collects comparison lines for one file and tracks which stored tensors were recomputed."""

    def __init__(self, report: Report, file: str, tensors: dict[str, Tensor], atol: float) -> None:
        self.report, self.file, self.tensors, self.atol = report, file, tensors, atol
        self.done: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def add(self, name: str, ok: bool, err: float | None = None, tol: float | None = None, note: str = "") -> None:
        self.report.lines.append(Line(self.file, name, ok, err, tol, note))

    def close(self, name: str, ours: Tensor, note: str = "") -> None:
        """Float tensor within atol."""
        if name not in self.tensors:
            return
        ref = self.tensors[name]
        self.done.add(name)
        ours = ours.detach().float().cpu().reshape(ref.shape) if ours.numel() == ref.numel() else ours
        if tuple(ours.shape) != tuple(ref.shape):
            self.add(name, False, note=f"shape {tuple(ours.shape)} != golden {tuple(ref.shape)}")
            return
        err = float((ours.float() - ref.float()).abs().max()) if ref.numel() else 0.0
        self.add(name, err <= self.atol, err, self.atol, note)

    def exact(self, name: str, ours: Any, note: str = "") -> None:
        """Ids, masks, indexes: equal element for element."""
        if name not in self.tensors:
            return
        ref = self.tensors[name]
        self.done.add(name)
        ours_t = torch.as_tensor(ours).to(ref.dtype).reshape(ref.shape) if torch.as_tensor(ours).numel() == \
            ref.numel() else torch.as_tensor(ours)
        if tuple(ours_t.shape) != tuple(ref.shape):
            self.add(name, False, note=f"shape {tuple(ours_t.shape)} != golden {tuple(ref.shape)}")
            return
        diff = int((ours_t != ref).sum())
        self.add(name, diff == 0, note="exact" if diff == 0 else f"{diff} elements differ")

    def image(self, name: str, ours: np.ndarray) -> None:
        """uint8 image: may differ by 1 in a few values (rounding boundaries)."""
        if name not in self.tensors:
            return
        self.done.add(name)
        ref = self.tensors[name].numpy().astype(np.int32)
        d = np.abs(ours.astype(np.int32).reshape(ref.shape) - ref)
        n = int((d > 0).sum())
        ok = int(d.max()) <= 1 and n <= max(8, d.size // 1000)
        self.add(name, ok, float(d.max()), 1.0, f"{n} of {d.size} values differ")

    def finish(self) -> None:
        for name in sorted(set(self.tensors) - self.done):
            self.add(name, False, note="no recomputation known for this tensor")


# ---------------------------------------------------------------------------------------------- inputs
def _system_prompt(entry: dict[str, Any]) -> str:
    """The system prompt text as the official run used it, from the decoded sequence in the manifest."""
    for key in ("decoded", "decoded_collapsed", "decoded_row0"):
        text = entry.get(key)
        if isinstance(text, str):
            break
    else:
        return ""
    text = text[len(BOS_TEXT):] if text.startswith(BOS_TEXT) else text
    if text.startswith("User: ") or "\n\nUser: " not in text:
        return ""
    return text[: text.index("\n\nUser: ")]


def _image_files(entry: dict[str, Any]) -> list[str]:
    if isinstance(entry.get("images"), list):
        return [str(x) for x in entry["images"]]
    if isinstance(entry.get("cond_image"), str):
        return [entry["cond_image"].split()[0]]
    m = re.search(r"image=\[([^\]]*)\]", str(entry.get("call", "")))
    if m:
        return [x.strip().strip("'\"") for x in m.group(1).split(",") if x.strip()]
    return []


def _call_arg(entry: dict[str, Any], name: str) -> str | None:
    m = re.search(rf"{name}=['\"]([^'\"]*)['\"]", str(entry.get("call", "")))
    return m.group(1) if m else None


def _seeded_latents(entry: dict[str, Any], shape: tuple[int, ...]) -> Tensor:
    m = re.search(r"manual_seed\((\d+)\)", str(entry.get("latents_seed", "")))
    if not m:
        raise ValueError("manifest entry has no latents_seed with manual_seed(N)")
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(m.group(1))))


def _cond_prefix(i: int, n: int) -> str:
    return "" if n == 1 else f"cond{i}_"


# Every manifest input key this verifier reads or knowingly ignores (notes, values it recomputes and compares
# elsewhere). A key outside this set is an input it cannot read: the entry is refused, naming the key, instead
# of being rebuilt without it (e.g. an edit whose images are listed under an unknown key would run with none).
KNOWN_INPUT_KEYS = frozenset({
    "batch_rows", "bot_task", "call", "cfg_factor", "cond_image", "cond_latent_note", "cond_vae_shapes", "cot_text",
    "decoded", "decoded_collapsed", "decoded_row0", "decoded_row1", "first_step", "flow_shift", "full_attn_blocks",
    "greedy_new_tokens_no_cache_full_reforward", "greedy_new_tokens_official_generate", "guidance_bf16",
    "guidance_requested", "guidance_scale", "image_size", "images", "latent_shape", "latents_seed",
    "mask_equals_causal_or_blocks", "mode", "model_calls", "note", "position_ids", "prompt", "rope_image_info",
    "runs", "sampling", "seed", "seq_len", "sequence_template", "sigmas", "steps", "system_prompt",
    "system_prompt_chars", "system_prompt_token_count", "timestep", "timestep_r", "timesteps", "token_ids",
    "tokenizer_output", "vae_cond_image_size", "vit_spatial_shapes",
})


def unknown_input_keys(entry: Any) -> list[str]:
    """The keys of a manifest entry that this verifier cannot read (see `KNOWN_INPUT_KEYS`)."""
    if not isinstance(entry, dict):
        return ["<entry is not an object>"]
    return sorted(k for k in entry if k not in KNOWN_INPUT_KEYS)


# ---------------------------------------------------------------------------------------------- checks
class GoldenVerifier:
    """One process's verification. parallel: its tensor-parallel rank (every rank of the group must run it)."""

    def __init__(self, golden_dir: str | Path, atol: float = 1e-4, parallel: ParallelContext | None = None) -> None:
        self.dir = Path(golden_dir)
        self.atol = atol
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self.pipe = HunyuanImage3Pipeline.from_pretrained(self.dir / "checkpoint", parallel=parallel)
        mode = ""
        if parallel is not None and parallel.is_parallel:
            mode = f"{'expert' if parallel.expert_parallel else 'tensor'} parallel {parallel.tp_size}"
        self.report = Report(str(self.dir), parallel=mode)

    def run(self) -> Report:
        files: dict[str, Any] = self.manifest.get("files", {})
        for name, entry in files.items():
            unknown = unknown_input_keys(entry)
            if unknown:
                self.report.lines.append(Line(name, "<manifest>", False, note=(
                    f"unknown input key(s) {', '.join(unknown)}: this verifier cannot read them, so it does not "
                    "rebuild this entry (known keys: engine/models/hunyuan_image_3/golden.py KNOWN_INPUT_KEYS)")))
                continue
            if name == "text_stage_runs":
                continue
            tensors = load_file(str(self.dir / name))
            chk = _Checker(self.report, name, tensors, self.atol)
            try:
                with torch.inference_mode():
                    self._dispatch(chk, entry, tensors)
            except Exception as e:  # noqa: BLE001 - a crash is one failed line, the rest still runs
                chk.add("<error>", False, note=f"{type(e).__name__}: {e}")
            chk.finish()
        if "text_stage_runs" in files and not unknown_input_keys(files["text_stage_runs"]):
            with torch.inference_mode():
                self._stage_runs(files["text_stage_runs"])
        return self.report

    def _dispatch(self, chk: _Checker, entry: dict[str, Any], t: dict[str, Tensor]) -> None:
        if "logits" in t:
            self._text(chk, entry)
        elif "step_preds" in t or "step_cfg_preds" in t:
            self._generation(chk, entry)
        elif "pred" in t or "pred_cond_uncond" in t:
            self._step(chk, entry)
        else:
            chk.add("<file>", False, note="unknown golden file kind")

    # ------------------------------------------------------------------ shared pieces
    def _load_images(self, chk: _Checker, entry: dict[str, Any]) -> list[Image.Image]:
        names = _image_files(entry)
        images = []
        for i, fname in enumerate(names):
            img = Image.open(self.dir / fname).convert("RGB")
            images.append(img)
            p = _cond_prefix(i, len(names))
            for key in (f"{p}input_uint8_hwc", f"{p}input_image_uint8_hwc"):
                if key in chk.tensors and (len(names) == 1 or key.startswith("cond")):
                    chk.exact(key, torch.from_numpy(np.array(img)))
        return images

    def _check_layout(self, chk: _Checker, built: BuiltPrompt, rows: list[list[int]]) -> None:
        chk.exact("input_ids", rows)
        n = len(rows)
        chk.exact("attention_mask_4d", built.attention_mask()[None, None].expand(n, 1, -1, -1).to(torch.uint8))
        length = len(built)
        for name, kinds in (("gen_image_mask", ("gen",)), ("vae_image_mask", ("cond_vae",)),
                            ("vit_image_mask", ("cond_vit",))):
            mask = torch.zeros(length, dtype=torch.uint8)
            for slot in built.image_slots:
                if slot.kind in kinds:
                    mask[slot.start : slot.end] = 1
            chk.exact(name, mask[None].expand(n, -1))
        chk.exact("timesteps_index", torch.tensor([[built.gen_timestep_index]] * n))
        if chk.has("rope_cos"):
            cos, sin = rope_cos_sin(built.positions, self.pipe.config.head_dim, self.pipe.config.rope_theta)
            chk.close("rope_cos", cos[None])
            chk.close("rope_sin", sin[None])

    def _check_conds(self, chk: _Checker, conds: list, rows: int) -> None:
        model = self.pipe.model
        n = len(conds)
        for i, c in enumerate(conds):
            p = _cond_prefix(i, n)
            chk.close(f"{p}vae_pixels", c.vae.pixels)
            if chk.has(f"{p}vae_posterior_mean") or chk.has(f"{p}vae_posterior_logvar"):
                post = model.encode_condition_vae(c.vae.pixels[None])
                chk.close(f"{p}vae_posterior_mean", post.mean)
                chk.close(f"{p}vae_posterior_logvar", post.logvar)
            # one image: `cond_vae_latents_sampled_scaled`; several: `cond{i}_vae_latents_sampled_scaled` (the
            # golden sets' spelling) or `cond{i}_cond_vae_latents_sampled_scaled` (the prefixed single-image name)
            names = ["cond_vae_latents_sampled_scaled"] if n == 1 else [
                f"{p}vae_latents_sampled_scaled", f"{p}cond_vae_latents_sampled_scaled"]
            for name in names:
                lat = c.latents[None]
                ref = chk.tensors.get(name)
                if ref is not None and ref.dim() == 3:
                    lat = c.latents
                elif ref is not None and ref.shape[0] != 1:
                    lat = lat.expand(ref.shape[0], -1, -1, -1)
                chk.close(name, lat)
            if c.vit is not None:
                chk.exact(f"{p}vit_pixel_attention_mask", c.vit.pixel_attention_mask)
                chk.exact(f"{p}vit_spatial_shapes", c.vit.spatial_shapes)
                chk.close(f"{p}vit_pixel_values", c.vit.pixel_values)
                if n > 1 and (chk.has(f"{p}vit_last_hidden_state") or chk.has(f"{p}vit_aligned")):
                    feats = run_vision_tower(model.vision_model, c.vit.pixel_values[None],
                                             c.vit.pixel_attention_mask[None], c.vit.spatial_shapes[None])
                    chk.close(f"{p}vit_last_hidden_state", feats)
                    chk.close(f"{p}vit_aligned", c.vit_tokens)
        if conds and conds[0].vit is not None:
            if n > 1:
                chk.close("vit_pixel_values", torch.stack([c.vit.pixel_values for c in conds]))
            if chk.has("vit_last_hidden_state"):
                feats = [
                    run_vision_tower(model.vision_model, c.vit.pixel_values[None], c.vit.pixel_attention_mask[None],
                                     c.vit.spatial_shapes[None])[0]
                    for c in conds
                ]
                chk.close("vit_last_hidden_state", torch.stack(feats))
            chk.close("vit_aligned", torch.stack([c.vit_tokens for c in conds]))
        chk.close("cond_timesteps", torch.zeros(len(conds)))

    def _request_basics(self, entry: dict[str, Any]) -> tuple[str, int]:
        size = entry.get("image_size") or _call_arg(entry, "image_size") or "auto"
        if isinstance(size, list):
            size = f"{size[0]}x{size[1]}"
        ratio, _ = self.pipe.builder.resolution.parse_size(str(size))
        return str(size), ratio

    # ------------------------------------------------------------------ (a) text
    def _text(self, chk: _Checker, entry: dict[str, Any]) -> None:
        pipe = self.pipe
        built = pipe.builder.text_prompt(
            entry["prompt"], task=entry.get("bot_task", "auto") if entry.get("bot_task") in
            ("think", "recaption", "img_ratio") else "auto", system_prompt=entry.get("system_prompt") or "",
        )
        ids = list(built.token_ids)
        chk.exact("input_ids", [ids])
        chk.exact("attention_mask_4d", built.attention_mask()[None, None].to(torch.uint8))
        kv, pool = pipe.new_cache(len(ids) + 64)
        seq = _Seq()
        emb = pipe.embed(built, ids, [], 0, len(ids))
        (hidden,) = pipe.forward(kv, pool, [_Part(seq, ids, 0, len(ids), emb, built.positions, [])])
        chk.close("logits", pipe.model.logits(hidden)[None])

        n_new = len(entry.get("greedy_new_tokens_no_cache_full_reforward") or [])
        ours = self._greedy(ids, n_new)
        want = entry.get("greedy_new_tokens_no_cache_full_reforward")
        if want is not None:
            self.report.lines.append(Line(chk.file, "greedy_new_tokens_no_cache_full_reforward", ours == want,
                                          note=f"ours {ours}"))
        # The official cached `generate` routes a lone decode token without renormalising its top-k
        # weights (docs/decisions.md: MoE: dropless). Emulating that quirk reproduces the official cached tokens/logits.
        if chk.has("generated_ids") or chk.has("generate_step_logits"):
            n_off = chk.tensors["generated_ids"].shape[1] - len(ids) if chk.has("generated_ids") else n_new
            toks, step_logits = self._greedy(ids, n_off, official_decode_quirk=True, return_logits=True)
            chk.exact("generated_ids", [ids + toks], note="official single-token MoE quirk emulated")
            chk.close("generate_step_logits", torch.stack(step_logits),
                      note="official single-token MoE quirk emulated")

    @contextmanager
    def _no_renorm(self):
        blocks = [layer.mlp for layer in self.pipe.model.model.layers if hasattr(layer.mlp, "renormalize")]
        saved = [b.renormalize for b in blocks]
        for b in blocks:
            b.renormalize = False
        try:
            yield
        finally:
            for b, s in zip(blocks, saved):
                b.renormalize = s

    @contextmanager
    def _official_single_token_routing(self):
        """The official MoE skips the top-k renormalisation for a lone token (batch 1, one position): the
        cached decode steps of the official text phase. Emulated here only to replay golden traces."""
        blocks = [layer.mlp for layer in self.pipe.model.model.layers if hasattr(layer.mlp, "renormalize")]
        originals = [(b, b.renormalize) for b in blocks]

        def wrap(block, keep):
            cls_forward = type(block).forward

            def forward(x):
                block.renormalize = keep and x.shape[0] != 1
                return cls_forward(block, x)

            return forward

        for b, keep in originals:
            b.forward = wrap(b, keep)
        try:
            yield
        finally:
            for b, keep in originals:
                del b.forward
                b.renormalize = keep

    def _greedy(self, ids: list[int], n: int, official_decode_quirk: bool = False, return_logits: bool = False):
        pipe = self.pipe
        ids = list(ids)
        kv, pool = pipe.new_cache(len(ids) + n + 16)
        seq = _Seq()
        pos = torch.arange(len(ids)).unsqueeze(1).expand(-1, 2)
        emb = pipe.model.embed_tokens(torch.tensor(ids))
        (hidden,) = pipe.forward(kv, pool, [_Part(seq, ids, 0, len(ids), emb, pos, [])])
        last = hidden[-1:]
        out, logits_seen = [], []
        for _ in range(n):
            logits = pipe.model.logits(last)[0]
            logits_seen.append(logits)
            tok = int(torch.argmax(logits))
            out.append(tok)
            ids.append(tok)
            k = len(ids) - 1
            emb = pipe.model.embed_tokens(torch.tensor([tok]))
            part = _Part(seq, ids, k, k + 1, emb, torch.tensor([[k, k]]), [])
            if official_decode_quirk:
                with self._no_renorm():
                    (last,) = pipe.forward(kv, pool, [part])
            else:
                (last,) = pipe.forward(kv, pool, [part])
        return (out, logits_seen) if return_logits else out

    # ------------------------------------------------------------------ (b/c) one denoiser call
    def _step(self, chk: _Checker, entry: dict[str, Any]) -> None:
        pipe = self.pipe
        t = chk.tensors
        images = self._load_images(chk, entry)
        _, ratio = self._request_basics(entry)
        seed = int(entry.get("seed", 42))
        conds = pipe.prepare_conditions(images, make_generator(seed, pipe.model.device), align=False)
        rows_n = int(t["input_ids"].shape[0]) if "input_ids" in t else 1
        built = pipe.builder.image_prompt(
            entry["prompt"], ratio_index=ratio, system_prompt=_system_prompt(entry),
            cond_images=[c.layout for c in conds], cfg=rows_n == 2,
        )
        rows = [list(built.token_ids)] + ([list(built.uncond_token_ids)] if rows_n == 2 else [])
        self._check_layout(chk, built, rows)
        self._check_conds(chk, conds, rows_n)

        shape = tuple(t["latents_in"].shape) if "latents_in" in t else (1, pipe.config.latent_channels,
                                                                          *built.slots("gen")[0].grid)
        latents = _seeded_latents(entry, shape)
        chk.close("latents_in", latents)
        tval = float(entry["timestep"])
        chk.close("timestep", torch.tensor([tval]))
        r = entry.get("timestep_r")
        chk.close("timestep_r", torch.tensor([float(r)]) if r is not None else torch.zeros(0))
        g = None
        if pipe.config.cfg_distilled:
            g = guidance_value(float(entry.get("guidance_requested", 1000 * pipe.defaults.diff_guidance_scale))
                               / 1000.0)
            chk.close("guidance_bf16_as_f32", torch.tensor([g]))

        def call(r_value: float | None) -> list[Tensor]:
            kv, pool = pipe.new_cache(2 * len(built) + 16)
            seqs = [(_Seq(), built, row) for row in rows]
            return pipe.denoise(seqs, conds, latents[0], tval, r_value, g, kv, pool, first_step=True)

        preds = call(float(r) if r is not None else None)
        if rows_n == 2:
            chk.close("pred_cond_uncond", torch.stack(preds))
            chk.close("pred_cfg", cfg_combine(preds[0], preds[1], float(entry["guidance_scale"]))[None])
        else:
            chk.close("pred", preds[0][None])
            if chk.has("pred_with_r_equal_t"):
                chk.close("pred_with_r_equal_t", call(tval)[0][None])

    # ------------------------------------------------------------------ whole generation
    def _generation(self, chk: _Checker, entry: dict[str, Any]) -> None:
        pipe = self.pipe
        images = self._load_images(chk, entry)
        size, _ = self._request_basics(entry)
        system = _system_prompt(entry)
        req = ImageRequest(
            prompt=entry["prompt"], images=images, seed=int(entry["seed"]), image_size=size,
            bot_task=_call_arg(entry, "bot_task") or "image",
            use_system_prompt="custom" if system else "None", system_prompt=system or None,
            num_inference_steps=int(entry["steps"]), guidance_scale=float(entry["guidance_scale"]),
            flow_shift=float(entry.get("flow_shift", pipe.defaults.flow_shift)),
        )
        res = pipe.generate(req, trace=True)
        tr = res.trace
        built = pipe.builder.image_prompt(
            req.prompt, ratio_index=res.ratio_index, system_prompt=system,
            cond_images=[c.layout for c in tr["conds"]], cfg=False,
        )
        self._check_layout(chk, built, [tr["image_prompt_ids"]])
        self._check_conds(chk, tr["conds"], 1)
        chk.close("init_latents_bf16_as_f32", tr["init_latents"][None])
        for name in ("step_cfg_preds", "step_preds"):
            chk.close(name, torch.stack(tr["step_preds"])[:, None])
        chk.close("step_latents", torch.stack(tr["step_latents"])[:, None])
        chk.close("final_latents", tr["final_latents"][None])
        z = tr["final_latents"][None] / pipe.config.vae_scaling_factor
        chk.close("vae_decoder_input", z[:, :, None])
        if chk.has("vae_decoder_output"):
            chk.close("vae_decoder_output", pipe.model.vae.decode(z[:, :, None], autocast_dtype=None))
        chk.close("vae_decoder_output_lastframe", tr["decoded"])
        chk.image("image_uint8_hwc", tr["image_uint8"])

    # ------------------------------------------------------------------ (3) stage machine runs
    def _stage_runs(self, entry: dict[str, Any]) -> None:
        pipe = self.pipe
        file = "text_stage_runs"
        images = [Image.open(self.dir / f).convert("RGB") for f in entry.get("images", [])]
        seed = int(entry.get("seed", 42))
        # The official text phase calls prepare_model_inputs without a seed after random.seed(seed):
        # its condition latents come from a seed drawn by Python's random module.
        text_seed = random.Random(seed).randint(0, 10_000_000)
        conds = pipe.prepare_conditions(images, make_generator(text_seed, pipe.model.device), align=False)
        layouts = [c.layout for c in conds]
        system = self._stage_system_prompt()
        s = entry.get("sampling", {})
        sampling = SamplingParams(do_sample=bool(s.get("do_sample", True)), temperature=float(s.get("temperature", 1)),
                                  top_k=int(s.get("top_k", 0)), top_p=float(s.get("top_p", 1)))
        prompts_file = self.dir / "text_stage_prompts.safetensors"
        stored = load_file(str(prompts_file)) if prompts_file.is_file() else {}
        chk = _Checker(self.report, prompts_file.name, stored, self.atol)
        for task, key in (("think", "think_recaption"), ("recaption", "recaption"), ("img_ratio", "image_img_ratio")):
            built = pipe.builder.text_prompt(entry["prompt"], task=task, system_prompt=system, cond_images=layouts)
            chk.exact(f"text_prompt_ids_{key}", [built.token_ids])
        chk.finish()

        for run in entry.get("runs", []):
            name = f"{run['name']}"
            try:
                self._stage_run(file, name, run, entry["prompt"], conds, layouts, system, sampling, seed)
            except Exception as e:  # noqa: BLE001
                self.report.lines.append(Line(file, name, False, note=f"{type(e).__name__}: {e}"))

    def _stage_system_prompt(self) -> str:
        for e in self.manifest["files"].values():
            if isinstance(e, dict) and "decoded_collapsed" in e:
                return _system_prompt(e)
        return ""

    def _stage_run(self, file, name, run, prompt, conds, layouts, system, sampling, seed) -> None:
        """Teacher-forced replay of one official run (gating) plus a free sampled run (informational).

        Replay: the official tokens are fed through our model, bias hook, stage machine and warpers; every
        forced token must equal the official one and every free token must lie in our warped support.
        The free run samples with the request generator like the official code; with random tiny weights
        the logits are nearly flat, so a draw can land on a neighbouring token when logits differ by 1e-6.
        """
        pipe = self.pipe
        size = run.get("image_size_arg", "auto")
        bias = run.get("bias") or {}
        rules = [tuple(r) for r in bias.get("rules", [])]

        def machine_and_prompt():
            m = StageMachine.for_request(
                pipe.tok, bot_task=run["bot_task"], image_size=size, base_size=pipe.config.image_base_size,
                template=pipe.defaults.sequence_template, max_new_tokens=run.get("max_new_tokens"),
            )
            b = pipe.builder.text_prompt(prompt, task=m.prompt_task, system_prompt=system, cond_images=layouts)
            return m, b

        want = list(run["generated_ids"])
        if run["bot_task"] == "image":  # the official slice processor yields the ratio index itself
            want = [pipe.tok.special.ratio[i] for i in want]
        official_failed = str(run.get("outcome", "")).startswith("EXCEPTION")

        machine, built = machine_and_prompt()
        problem = self._replay(built, conds, machine, sampling, want, rules, bias.get("first"))
        budget = machine.needs_close or machine.truncated
        note = "teacher-forced: forced tokens and support match"
        if budget:
            note += "; budget reached: official " + ("raises" if official_failed else "wraps in <answer>") + \
                f", we close with {machine.close()}"
        self.report.lines.append(Line(file, f"{name}.replay", problem is None, note=problem or note))

        free, built_f = machine_and_prompt()
        kv, pool = pipe.new_cache(len(built_f) + 2 * (int(run.get("max_new_tokens") or 1) + 8))
        hook = _BiasHook(pipe.tok, bias.get("first"), rules) if rules else None
        with self._official_single_token_routing():
            pipe.text_phase(built_f, conds, free, sampling, make_generator(seed, pipe.model.device), kv, pool, _Seq(),
                            logits_hook=hook)
        got = list(free.tokens)[: len(want)]
        same = got == want
        diverge = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
        self.report.lines.append(Line(
            file, f"{name}.free_run", same, note="sampled tokens equal the official run" if same else
            f"sampled run differs from step {diverge} (near-flat logits of random weights); ours {got}",
            info=not same,
        ))

        phase = run.get("image_phase")
        if phase and not official_failed:
            ratio = machine.ratio_index if size == "auto" else pipe.builder.resolution.parse_size(size)[0]
            h, w = pipe.builder.resolution.get(ratio)
            ok = [h, w] == list(phase["image_size"]) and ratio == phase["ratio_index"]
            self.report.lines.append(Line(file, f"{name}.image_size", ok, note=f"ours {h}x{w} ratio {ratio}"))
            cot = run.get("cot_text_to_image_phase")
            if cot and not budget:
                ours = pipe.tok.decode(machine.cot_ids)
                self.report.lines.append(Line(file, f"{name}.cot_text", ours == cot[0], note=repr(ours)[:60]))
            if cot:
                img = pipe.builder.image_prompt(prompt, ratio_index=ratio, system_prompt=system,
                                                cond_images=layouts, cot_text=cot[0])
                self.report.lines.append(Line(file, f"{name}.image_phase_seq_len", len(img) == phase["seq_len"],
                                              note=f"official re-tokenized cot: {len(img)} tokens"))

    def _replay(self, built, conds, machine, sampling, tokens, rules, first) -> str | None:
        pipe = self.pipe
        ids = list(built.token_ids)
        kv, pool = pipe.new_cache(len(ids) + 2 * len(tokens) + 16)
        seq = _Seq()
        hook = _BiasHook(pipe.tok, first, rules) if rules else None
        emb = pipe.embed(built, ids, conds, 0, len(ids))
        last_token = None
        with self._official_single_token_routing():
            (hidden,) = pipe.forward(kv, pool, [_Part(seq, ids, 0, len(ids), emb, built.positions,
                                                      built.full_attn_spans)])
            last = hidden[-1:]
            for step, tok in enumerate(tokens):
                if machine.finished or machine.needs_close:
                    return f"our stage machine stopped before official step {step}"
                logits = pipe.model.logits(last)[0]
                if hook is not None:
                    hook(logits, last_token)
                forced = machine.forced_token
                machine.constrain(logits)
                support = torch.isfinite(warp_logits(logits, sampling)) if not sampling.greedy else None
                if forced is not None and tok != forced:
                    return f"step {step}: official token {tok}, our stage machine forces {forced}"
                if support is not None and not bool(support[tok]):
                    return f"step {step}: official token {tok} is outside our top-k/top-p support"
                machine.feed(tok)
                last_token = tok
                ids.append(tok)
                last = pipe._decode_one(kv, pool, seq, built, ids)
        return None


class _BiasHook:
    """Reproduces the golden runs' forward wrapper: +50 on one logit after K tokens of a stage."""

    def __init__(self, tok, first: str | None, rules: list[tuple]) -> None:
        self.sp = tok.special
        self.stage = first
        self.n_in_stage = 0
        self.rules = rules

    def __call__(self, logits: Tensor, last_token: int | None) -> None:
        if last_token is not None:
            if last_token == self.sp.recaption:
                self.stage, self.n_in_stage = "recaption", 0
            else:
                self.n_in_stage += 1
        for stage, k, token in self.rules:
            if stage == self.stage and k == self.n_in_stage:
                logits[token] += 50.0


# ---------------------------------------------------------------------------------------------- tensor parallel
class GoldenParallelError(RuntimeError):
    """A rank of a tensor-parallel verification failed, died, hung, or reported differently from rank 0."""


def _rank_main(rank: int, world: int, golden_dir: str, atol: float, expert_parallel: bool, init_method: str,
               out_dir: str, parent_pid: int, num_threads: int, pg_timeout_s: float) -> None:
    """One rank: join the gloo group, load its shard, run the whole verification, write its report (or error)."""

    def orphan_watch() -> None:  # a parent killed outright cannot stop us: leave no rank behind
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=orphan_watch, daemon=True).start()
    out = Path(out_dir)
    try:
        import torch.distributed as dist

        torch.set_num_threads(num_threads)
        ctx = init_distributed("gloo", init_method, rank, world, expert_parallel=expert_parallel,
                               timeout_s=pg_timeout_s)
        report = GoldenVerifier(golden_dir, atol, parallel=ctx).run()
        dist.barrier()  # no rank leaves while a peer may still be in a collective with it
        (out / f"rank{rank}.part").write_text(report.to_json())
        (out / f"rank{rank}.part").rename(out / f"rank{rank}.json")
    except BaseException as e:  # noqa: BLE001 - report, then exit non-zero
        (out / f"rank{rank}.errpart").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        (out / f"rank{rank}.errpart").rename(out / f"rank{rank}.error")
        os._exit(1)
    os._exit(0)  # skip interpreter teardown: process-group destructors may block on a departed peer


def agreed_report(reports: list[Report]) -> Report:
    """Rank 0's report if every rank's lines equal it exactly (the collectives give every rank the same outputs)."""
    lead = reports[0]
    for r, rep in enumerate(reports[1:], start=1):
        if rep.lines != lead.lines:
            a, b = next(((x, y) for x, y in zip(lead.lines, rep.lines) if x != y), (None, None))
            detail = f"rank 0 `{a.render()}` vs rank {r} `{b.render()}`" if a is not None else \
                f"rank 0 has {len(lead.lines)} lines, rank {r} {len(rep.lines)}"
            raise GoldenParallelError(f"tensor-parallel rank {r}'s report differs from rank 0's: {detail}")
    return lead


class ParallelGoldenRun:
    """The rank processes of one tensor-parallel verification: started on construction, `wait()` returns rank 0's
    report once every rank has finished and all reports agree, and stops every rank whatever happens."""

    def __init__(self, golden_dir: str | Path, atol: float = 1e-4, tensor_parallel_size: int = 2,
                 expert_parallel: bool | None = None, timeout_s: float = 3600.0, poll_s: float = 0.2) -> None:
        if tensor_parallel_size < 2:
            raise ValueError(f"a parallel run needs at least 2 ranks, got {tensor_parallel_size}")
        if not (Path(golden_dir) / "manifest.json").is_file():
            raise FileNotFoundError(f"{golden_dir}: no manifest.json (not a golden set)")
        self.world = tensor_parallel_size
        self.timeout_s, self.poll_s = timeout_s, poll_s
        ep = HunyuanImage3Env.from_environ().expert_parallel if expert_parallel is None else bool(expert_parallel)
        self._dir = Path(tempfile.mkdtemp(prefix="dg-verify-tp-"))
        threads = max(1, (os.cpu_count() or 1) // self.world)
        spawn = multiprocessing.get_context("spawn")
        self.procs = [
            spawn.Process(target=_rank_main, name=f"dg-verify-rank{r}", daemon=True,
                          args=(r, self.world, str(golden_dir), atol, ep, f"file://{self._dir}/rendezvous",
                                str(self._dir), os.getpid(), threads, timeout_s))
            for r in range(self.world)
        ]
        try:
            for p in self.procs:
                p.start()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def wait(self) -> Report:
        try:
            reports = self._collect()
        finally:
            self.close()
        return agreed_report(reports)

    def _collect(self) -> list[Report]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._failures():
                time.sleep(0.5)  # a peer's death usually makes the other ranks fail too: name the cause first
                raise GoldenParallelError("tensor-parallel verify-golden failed: " + "; ".join(self._failures()))
            if all(p.exitcode == 0 for p in self.procs):
                return [Report.from_json((self._dir / f"rank{r}.json").read_text()) for r in range(self.world)]
            if time.monotonic() > deadline:
                late = [r for r, p in enumerate(self.procs) if p.exitcode is None]
                raise GoldenParallelError(f"tensor-parallel verify-golden: rank(s) {late} did not finish within "
                                          f"{self.timeout_s:g} s (hung?)")
            time.sleep(self.poll_s)

    def _failures(self) -> list[str]:
        """One line per failed rank: died (exit code / signal) first, then those that reported an error."""
        died, failed = [], []
        for r, p in enumerate(self.procs):
            err = self._dir / f"rank{r}.error"
            if err.is_file():
                failed.append(f"rank {r} failed: {err.read_text().splitlines()[0]}")
            elif p.exitcode is not None and (p.exitcode != 0 or not (self._dir / f"rank{r}.json").is_file()):
                how = f"was killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exited with code {p.exitcode}"
                died.append(f"rank {r} (pid {p.pid}) {how} without a report")
        return died + failed

    def close(self) -> None:
        """Stop every rank still running (terminate, then kill) and join it; remove the scratch folder."""
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                p.terminate()
        for p in self.procs:
            if p.pid is not None:
                p.join(3.0)
                if p.is_alive():
                    p.kill()
                    p.join(3.0)
        shutil.rmtree(self._dir, ignore_errors=True)


def verify_golden_set(golden_dir: str | Path, atol: float = 1e-4, tensor_parallel_size: int = 1,
                      expert_parallel: bool | None = None, timeout_s: float = 3600.0) -> Report:
    """Verify one golden set, single-process or over `tensor_parallel_size` rank processes (expert_parallel None:
    $DG_HUNYUAN_IMAGE_3_EXPERT_PARALLEL). Raises GoldenParallelError when a rank fails or the ranks disagree."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size == 1:
        return GoldenVerifier(golden_dir, atol).run()
    return ParallelGoldenRun(golden_dir, atol, tensor_parallel_size, expert_parallel, timeout_s).wait()
