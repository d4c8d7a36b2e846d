"""Token sequences of HunyuanImage-3.0 requests, with everything the model needs to read them.

The official tokenizer builds a list of sections (texts and image blocks), tokenizes every text section
on its own (no BPE merge across a boundary) and concatenates them with special ids. This module builds
the same sections and returns, besides the ids, what the model consumes (`BuiltPrompt`): 2-D RoPE
positions, image slots, the indexes of `<timestep>` / `<guidance>` / `<timestep_r>`, the bidirectional
attention spans, text slices, and for CFG the unconditional row.

Layouts (instruct template; the pretrain template drops role strings, separators and `<answer>`):
  <bos> [system "\n\n"] "User: " [cond blocks] user "\n\n" "Assistant: " TAIL
  cond block:  <boi><img_size_N><img_ratio_k><timestep><img>*h*w<joint_img_sep><img>*P<eoi>
  gen block:   <boi><img_size_N><img_ratio_k><timestep>[<guidance><timestep_r>]<img>*h*w<eoi>
Text-phase TAIL: "" (free answer), "<think>", "<recaption>" or "<answer><boi><img_size_N>" (ratio pick).
Image-phase TAIL: [CoT] "<answer>" gen-block "</answer>" "\n\n".

The CoT of the image phase is taken as generated token ids (docs/decisions.md: KV reuse; the think/recaption KV
is reused,
so the image-phase sequence must extend the text-phase one). `cot_text=` instead reproduces the official
re-tokenization of the decoded CoT, including its section parsing quirks, for verification.

CFG unconditional row: same length; the user text and CoT contents become `<cfg>` runs; system prompt,
role strings, separators, tag tokens and all image blocks are kept. (With `cot_text`, the official rule
applies as is: a CoT without a complete tag pair is one `<answer>...</answer>` text and fully masked.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .resolution import ResolutionGroup, latent_grid
from .tokenizer import HunyuanTokenizer

if TYPE_CHECKING:
    from .config import HunyuanImage3Config
    from .image_processing import VaeCondImage, VitCondImage

TEMPLATES = ("instruct", "pretrain")
TEXT_TASKS = ("auto", "think", "recaption", "img_ratio")
COND_ATTN_TYPES = ("full", "joint_full", "full_causal", "causal")


@dataclass(frozen=True)
class CondImageLayout:
    """What the image processor decided for one condition image; fixes its token block."""

    ratio_index: int
    """VAE resolution bucket of the image (its `<img_ratio_k>`)."""
    vae_grid: tuple[int, int]
    """(h, w) VAE token grid = bucket size / latent downsample."""
    vit_grid: tuple[int, int]
    """(h, w) SigLIP2 patch grid of the resized image (`spatial_shapes`)."""
    vit_tokens: int
    """ViT tokens in the sequence: the padded patch count (`max_num_patches`), >= h*w of `vit_grid`."""

    def __post_init__(self) -> None:
        if self.vit_grid[0] * self.vit_grid[1] > self.vit_tokens:
            raise ValueError(
                f"ViT grid {self.vit_grid} has more patches than the {self.vit_tokens} ViT tokens"
            )
        if min(self.vae_grid) <= 0 or min(self.vit_grid) <= 0:
            raise ValueError(f"empty token grid: vae {self.vae_grid}, vit {self.vit_grid}")

    @classmethod
    def for_image(
        cls,
        width: int,
        height: int,
        resolution: ResolutionGroup,
        *,
        latent_downsample: int = 16,
        vit_patch_size: int = 16,
        vit_max_patches: int = 1024,
    ) -> CondImageLayout:
        """Layout of a width x height input image: nearest VAE bucket and the SigLIP2 NaFlex grid."""
        # The NaFlex resize rule is transformers' own; calling it keeps the grid identical by construction.
        from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

        k, (bh, bw) = resolution.nearest(width, height)
        th, tw = get_image_size_for_max_num_patches(height, width, vit_patch_size, vit_max_patches)
        return cls(
            ratio_index=k,
            vae_grid=latent_grid(bh, bw, latent_downsample),
            vit_grid=(th // vit_patch_size, tw // vit_patch_size),
            vit_tokens=vit_max_patches,
        )


def cond_layout(vae: VaeCondImage, vit: VitCondImage | None, latent_downsample: int) -> CondImageLayout:
    """The layout of a preprocessed condition image (its VAE bucket and SigLIP2 grid)."""
    bh, bw = vae.size_hw
    return CondImageLayout(
        ratio_index=vae.ratio_index,
        vae_grid=latent_grid(bh, bw, latent_downsample),
        vit_grid=tuple(int(v) for v in vit.spatial_shapes) if vit is not None else (1, 1),
        vit_tokens=int(vit.pixel_values.shape[0]) if vit is not None else 1,
    )


@dataclass(frozen=True)
class ImageSlot:
    """One `<img>` run of the sequence: [start, end) and the grid it carries."""

    kind: str
    """"gen" (the image being generated), "cond_vae" or "cond_vit"."""
    start: int
    end: int
    grid: tuple[int, int]
    """(h, w); for "cond_vit" the real patch grid, h*w may be < end - start (padding rows)."""
    cond_index: int | None = None


@dataclass
class BuiltPrompt:
    """A request's sequence and its layout. Positions and slots are shared by the CFG rows."""

    token_ids: list[int]
    positions: torch.Tensor
    """LongTensor [L, 2]: (y, x) RoPE positions; text tokens have y = x = index."""
    image_slots: list[ImageSlot]
    cond_timestep_indexes: list[int]
    gen_timestep_index: int | None
    guidance_index: int | None
    timestep_r_index: int | None
    full_attn_spans: list[tuple[int, int]]
    """[start, end) blocks with bidirectional attention (on top of causal), in the official order."""
    text_slices: list[tuple[int, int]]
    """[start, end) of every text section (empty ones included), as the official tokenizer reports."""
    rope_image_info: list[tuple[int, int, int, int]]
    """(start, end, h, w) of every slot with 2-D positions, in sequence order."""
    uncond_token_ids: list[int] | None = None
    gen_ratio_index: int | None = None
    gen_image_size: tuple[int, int] | None = None
    """(height, width) in pixels of the generated image."""
    cot_span: tuple[int, int] | None = None
    """[start, end) of the CoT tokens in the image-phase sequence (None without CoT)."""

    def __len__(self) -> int:
        return len(self.token_ids)

    def slots(self, kind: str) -> list[ImageSlot]:
        return [s for s in self.image_slots if s.kind == kind]

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """RoPE positions [end - start, 2] for tokens [start, end); past the layout (generated text), text
        positions y = x = index."""
        n = self.positions.shape[0]
        parts = []
        if start < n:
            parts.append(self.positions[start : min(end, n)])
        if end > n:
            idx = torch.arange(max(start, n), end, dtype=torch.long)
            parts.append(torch.stack([idx, idx], dim=1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def attention_mask(self) -> torch.Tensor:
        """Dense bool [L, L] (True = may attend): causal plus the full-attention spans (reference use)."""
        n = len(self.token_ids)
        mask = torch.ones(n, n, dtype=torch.bool).tril_()
        for s, e in self.full_attn_spans:
            mask[s:e, s:e] = True
        return mask


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class _Text:
    ids: list[int]
    uncond: bool = False  # becomes <cfg> run in the unconditional row
    is_cot: bool = False


@dataclass
class _Cond:
    layout: CondImageLayout
    index: int


@dataclass
class _Gen:
    ratio_index: int
    grid: tuple[int, int]


_Section = _Text | _Cond | _Gen


class PromptBuilder:
    """Builds text-phase and image-phase sequences for one checkpoint (tokenizer + layout settings)."""

    def __init__(
        self,
        tokenizer: HunyuanTokenizer,
        *,
        base_size: int,
        template: str = "instruct",
        cond_token_attn_type: str = "joint_full",
        add_guidance_token: bool = False,
        add_timestep_r_token: bool = False,
        latent_downsample: int = 16,
        resolution: ResolutionGroup | None = None,
    ) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"sequence template {template!r} is not one of {TEMPLATES}")
        if cond_token_attn_type not in COND_ATTN_TYPES:
            raise ValueError(f"cond_token_attn_type {cond_token_attn_type!r} is not one of {COND_ATTN_TYPES}")
        self.tok = tokenizer
        self.sp = tokenizer.special
        self.base_size = base_size
        self.template = template
        self.cond_token_attn_type = cond_token_attn_type
        self.add_guidance_token = add_guidance_token
        self.add_timestep_r_token = add_timestep_r_token
        self.latent_downsample = latent_downsample
        self.resolution = resolution or ResolutionGroup(base_size)
        self.size_id = tokenizer.size_token_id(base_size)
        if add_guidance_token:
            tokenizer.guidance_id  # noqa: B018 - raises a clear error when missing
        if add_timestep_r_token:
            tokenizer.timestep_r_id  # noqa: B018
        instruct = template == "instruct"
        self._sys_suffix = "\n\n" if instruct else ""
        self._user_prefix = "User: " if instruct else ""
        self._user_suffix = "\n\n" if instruct else ""
        self._bot_prefix = "Assistant: " if instruct else ""
        self._bot_suffix = "\n\n" if instruct else ""
        self._answer_prefix = "<answer>" if instruct else ""
        self._answer_suffix = "</answer>" if instruct else ""

    @classmethod
    def from_config(
        cls, tokenizer: HunyuanTokenizer, config: HunyuanImage3Config, template: str = "instruct"
    ) -> PromptBuilder:
        """Settings from a `HunyuanImage3Config`.

        cfg_distilled adds `<guidance>`, use_meanflow adds `<timestep_r>` to the generated-image block.
        """
        return cls(
            tokenizer,
            base_size=config.image_base_size,
            template=template,
            cond_token_attn_type=config.cond_token_attn_type,
            add_guidance_token=config.cfg_distilled,
            add_timestep_r_token=config.use_meanflow,
            latent_downsample=config.latent_downsample,
        )

    def cond_image_layout(
        self, width: int, height: int, *, vit_patch_size: int = 16, vit_max_patches: int = 1024
    ) -> CondImageLayout:
        return CondImageLayout.for_image(
            width, height, self.resolution, latent_downsample=self.latent_downsample,
            vit_patch_size=vit_patch_size, vit_max_patches=vit_max_patches,
        )

    # ------------------------------------------------------------------------------------- public
    def text_prompt(
        self,
        prompt: str,
        *,
        task: str,
        system_prompt: str = "",
        cond_images: Sequence[CondImageLayout] = (),
    ) -> BuiltPrompt:
        """Prompt of the text phase; `task` picks the tail after "Assistant: ".

        "auto": nothing (a free text answer), "think": `<think>`, "recaption": `<recaption>`,
        "img_ratio": `<answer><boi><img_size_N>` (the next token is the greedy ratio pick).
        """
        if task not in TEXT_TASKS:
            raise ValueError(f"text-phase task {task!r} is not one of {TEXT_TASKS}")
        sections = self._head(prompt, system_prompt, cond_images)
        tail = {
            "auto": self._bot_prefix,
            "think": self._bot_prefix + "<think>",
            "recaption": self._bot_prefix + "<recaption>",
            "img_ratio": f"{self._bot_prefix}{self._answer_prefix}<boi><img_size_{self.base_size}>",
        }[task]
        sections.append(_Text(self.tok.encode(tail)))
        return self._assemble(sections, cfg=False)

    def image_prompt(
        self,
        prompt: str,
        *,
        ratio_index: int,
        system_prompt: str = "",
        cond_images: Sequence[CondImageLayout] = (),
        cot_ids: Sequence[int] | None = None,
        cot_text: str | None = None,
        cfg: bool = False,
    ) -> BuiltPrompt:
        """Prompt of the image phase (diffusion) for bucket `ratio_index`.

        `cot_ids`: the CoT as generated (start tag included, e.g. `<think> ... </recaption>`), placed
        verbatim after "Assistant: ". `cot_text`: the official path, the decoded CoT re-tokenized.
        `cfg=True` also builds the unconditional row.
        """
        if cot_ids is not None and cot_text is not None:
            raise ValueError("pass the CoT either as token ids or as text, not both")
        h, w = self.resolution.get(ratio_index)
        grid = latent_grid(h, w, self.latent_downsample)
        sections = self._head(prompt, system_prompt, cond_images)
        bot: list[_Section] = []
        if cot_ids is not None and len(cot_ids) > 0:
            bot.extend(self._cot_id_sections([int(t) for t in cot_ids]))
        elif cot_text:
            if self._has_pair(cot_text):
                bot.extend(self._cot_text_sections(cot_text))
            else:
                bot.append(_Text(self.tok.encode(f"{self._answer_prefix}{cot_text}{self._answer_suffix}"),
                                 uncond=True, is_cot=True))
        bot.append(_Text(self.tok.encode(self._answer_prefix)))
        bot.append(_Gen(ratio_index, grid))
        bot.append(_Text(self.tok.encode(self._answer_suffix)))
        sections.append(_Text(self.tok.encode(self._bot_prefix)))
        sections.extend(bot)
        sections.append(_Text(self.tok.encode(self._bot_suffix)))
        built = self._assemble(sections, cfg=cfg)
        built.gen_ratio_index = ratio_index
        built.gen_image_size = (h, w)
        return built

    # ------------------------------------------------------------------------------------ sections
    def _head(
        self, prompt: str, system_prompt: str, cond_images: Sequence[CondImageLayout]
    ) -> list[_Section]:
        enc = self.tok.encode
        out: list[_Section] = []
        if system_prompt:
            # the official system role adds an empty prefix section, the text and its suffix
            out += [_Text(enc("")), _Text(enc(system_prompt)), _Text(enc(self._sys_suffix))]
        out.append(_Text(enc(self._user_prefix)))
        out.extend(_Cond(layout, i) for i, layout in enumerate(cond_images))
        out.append(_Text(enc(prompt), uncond=True))
        out.append(_Text(enc(self._user_suffix)))
        return out

    def _cot_id_sections(self, ids: list[int]) -> list[_Section]:
        """Generated CoT ids: each tag token its own section (kept in CFG), the runs between masked."""
        tags = {self.sp.think, self.sp.end_think, self.sp.recaption, self.sp.end_recaption}
        out: list[_Section] = []
        run: list[int] = []
        for t in ids:
            if t in tags:
                if run:
                    out.append(_Text(run, uncond=True, is_cot=True))
                    run = []
                out.append(_Text([t], is_cot=True))
            else:
                run.append(t)
        if run:
            out.append(_Text(run, uncond=True, is_cot=True))
        return out

    @staticmethod
    def _has_pair(text: str) -> bool:
        recaption = "<recaption>" in text and "</recaption>" in text
        return recaption or ("<think>" in text and "</think>" in text)

    def _cot_text_sections(self, text: str) -> list[_Section]:
        """The official CoT parsing (str.split semantics kept, so odd tag orders behave the same)."""
        if not text:
            return []
        for start, end in (("<think>", "</think>"), ("<recaption>", "</recaption>")):
            if start in text and end in text:
                before = text.split(start)[0]
                after = text.split(end)[1]
                inner = text.split(start)[1].split(end)[0]
                return (
                    self._cot_text_sections(before)
                    + [
                        _Text(self.tok.encode(start), is_cot=True),
                        _Text(self.tok.encode(inner), uncond=True, is_cot=True),
                        _Text(self.tok.encode(end), is_cot=True),
                    ]
                    + self._cot_text_sections(after)
                )
        return [_Text(self.tok.encode(text), uncond=True, is_cot=True)]

    # ------------------------------------------------------------------------------------ assembly
    def _assemble(self, sections: list[_Section], *, cfg: bool) -> BuiltPrompt:
        sp = self.sp
        ids: list[int] = [sp.bos]
        uncond: list[int] = [sp.bos]
        slots: list[ImageSlot] = []
        text_slices: list[tuple[int, int]] = []
        cond_ts: list[int] = []
        gen_ts = guidance = timestep_r = None
        cot_start: int | None = None
        cot_end: int | None = None

        def put(tokens: list[int]) -> None:
            ids.extend(tokens)
            uncond.extend(tokens)

        for sec in sections:
            if isinstance(sec, _Text):
                start = len(ids)
                ids.extend(sec.ids)
                uncond.extend([sp.cfg] * len(sec.ids) if sec.uncond else sec.ids)
                text_slices.append((start, len(ids)))
                if sec.is_cot:
                    cot_start = start if cot_start is None else cot_start
                    cot_end = len(ids)
            elif isinstance(sec, _Cond):
                lay = sec.layout
                put([sp.boi, self.size_id, sp.ratio[lay.ratio_index]])
                cond_ts.append(len(ids))
                put([sp.timestep])
                n_vae = lay.vae_grid[0] * lay.vae_grid[1]
                slots.append(ImageSlot("cond_vae", len(ids), len(ids) + n_vae, lay.vae_grid, sec.index))
                put([sp.img] * n_vae + [sp.joint_img_sep])
                vit_end = len(ids) + lay.vit_tokens
                slots.append(ImageSlot("cond_vit", len(ids), vit_end, lay.vit_grid, sec.index))
                put([sp.img] * lay.vit_tokens + [sp.eoi])
            else:
                if not 0 <= sec.ratio_index < len(sp.ratio):
                    raise ValueError(f"ratio index {sec.ratio_index} has no <img_ratio_k> token")
                put([sp.boi, self.size_id, sp.ratio[sec.ratio_index]])
                gen_ts = len(ids)
                put([sp.timestep])
                if self.add_guidance_token:
                    guidance = len(ids)
                    put([self.tok.guidance_id])
                if self.add_timestep_r_token:
                    timestep_r = len(ids)
                    put([self.tok.timestep_r_id])
                n = sec.grid[0] * sec.grid[1]
                slots.append(ImageSlot("gen", len(ids), len(ids) + n, sec.grid))
                put([sp.img] * n + [sp.eoi])

        rope_slots = [s for s in slots if self._is_2d(s)]
        positions = _positions(len(ids), rope_slots)
        return BuiltPrompt(
            token_ids=ids,
            positions=positions,
            image_slots=slots,
            cond_timestep_indexes=cond_ts,
            gen_timestep_index=gen_ts,
            guidance_index=guidance,
            timestep_r_index=timestep_r,
            full_attn_spans=self._full_attn_spans(slots),
            text_slices=text_slices,
            rope_image_info=[(s.start, s.end, s.grid[0], s.grid[1]) for s in rope_slots],
            uncond_token_ids=uncond if cfg else None,
            cot_span=None if cot_start is None else (cot_start, cot_end),
        )

    def _is_2d(self, slot: ImageSlot) -> bool:
        if slot.kind == "gen":
            return True
        kind = self.cond_token_attn_type
        return kind in ("full", "joint_full") or (kind == "full_causal" and slot.kind == "cond_vae")

    def _full_attn_spans(self, slots: list[ImageSlot]) -> list[tuple[int, int]]:
        vae = [(s.start, s.end) for s in slots if s.kind == "cond_vae"]
        vit = [(s.start, s.end) for s in slots if s.kind == "cond_vit"]
        kind = self.cond_token_attn_type
        if kind == "full":
            spans = vae + vit
        elif kind == "joint_full":
            spans = [(a[0], b[1]) for a, b in zip(vae, vit)]
        elif kind == "full_causal":
            spans = vae
        else:
            spans = []
        return spans + [(s.start, s.end) for s in slots if s.kind == "gen"]


def _positions(n: int, rope_slots: list[ImageSlot]) -> torch.Tensor:
    """(y, x) per token: 1-D index, except 2-D grids centred in their range (official truncation).

    A grid h x w starting at L gets y = L + floor((h*w - h)/2) + r, x = L + floor((h*w - w)/2) + c,
    which is the official float computation truncated to int. Slot tokens beyond h*w (ViT padding)
    keep their index.
    """
    pos = torch.arange(n, dtype=torch.long).unsqueeze(1).repeat(1, 2)
    for s in rope_slots:
        h, w = s.grid
        start = s.start
        r = torch.arange(h, dtype=torch.long).repeat_interleave(w)
        c = torch.arange(w, dtype=torch.long).repeat(h)
        pos[start:start + h * w, 0] = start + (h * w - h) // 2 + r
        pos[start:start + h * w, 1] = start + (h * w - w) // 2 + c
    return pos


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared token prefix: how much of a row's KV a new sequence for it can keep."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
