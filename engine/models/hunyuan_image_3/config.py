"""HunyuanImage-3.0 configuration, read from an official checkpoint folder unchanged.

`config.json` carries the backbone, image and sub-model settings; `generation_config.json` carries the
sampling and diffusion defaults. Both are parsed into plain frozen dataclasses; fields the official class
keeps but no code path uses are still kept in `raw` so nothing in the file is lost.
Per-layer values (`moe_topk`, `num_shared_expert`, `moe_intermediate_size`) may be a scalar or a list of
one value per layer (the real checkpoints use lists); `layer_value()` resolves both forms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint configuration that cannot describe a HunyuanImage-3.0 model."""


def _per_layer(value: Any, num_layers: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(int(value[0]) for _ in range(num_layers))
        if len(value) != num_layers:
            raise ConfigError(f"{name} has {len(value)} entries but num_hidden_layers is {num_layers}")
        return tuple(int(v) for v in value)
    return tuple(int(value) for _ in range(num_layers))


@dataclass(frozen=True)
class HunyuanImage3Config:
    # backbone
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    use_qk_norm: bool
    num_experts: int
    moe_topk: tuple[int, ...]
    moe_intermediate_size: tuple[int, ...]
    num_shared_expert: tuple[int, ...]
    use_mixed_mlp_moe: bool
    norm_topk_prob: bool
    routed_scaling_factor: float
    moe_layer_num_skipped: int
    intermediate_size: int
    tie_word_embeddings: bool
    moe_drop_tokens: bool
    capacity_factor: float
    # special ids from config (the tokenizer is the ground truth; these are kept for reference)
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    image_token_id: int | None
    # image side
    img_proj_type: str
    patch_size: int
    patch_embed_hidden_dim: int
    image_base_size: int
    vae_downsample_factor: tuple[int, int]
    cond_image_type: str
    cond_token_attn_type: str
    cfg_distilled: bool
    use_meanflow: bool
    vae: dict[str, Any]
    vae_autocast_dtype: str
    vit: dict[str, Any]
    vit_processor: dict[str, Any]
    vit_aligner: dict[str, Any]
    model_version: str
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    # ------------------------------------------------------------------ derived values
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_out_features(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def latent_downsample(self) -> int:
        # The official VAEInfo uses vae_downsample_factor[0] for both axes.
        return int(self.vae_downsample_factor[0])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae["scaling_factor"])

    @property
    def vae_shift_factor(self) -> float | None:
        v = self.vae.get("shift_factor")
        return None if v is None else float(v)

    @property
    def has_vision(self) -> bool:
        return "vit" in self.cond_image_type

    @property
    def has_vae_cond(self) -> bool:
        return "vae" in self.cond_image_type

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.moe_layer_num_skipped

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanImage3Config:
        try:
            n_layers = int(d["num_hidden_layers"])
            hidden = int(d["hidden_size"])
            n_heads = int(d["num_attention_heads"])
            head_dim = int(d.get("attention_head_dim") or hidden // n_heads)
            n_kv = int(d.get("num_key_value_heads") or n_heads)
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None
        if n_heads % n_kv:
            raise ConfigError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
        if d.get("use_mla") or d.get("use_cla"):
            raise ConfigError("MLA / cross-layer attention are not used by HunyuanImage-3.0 and not supported")
        if d.get("img_proj_type", "unet") != "unet":
            raise ConfigError(f"img_proj_type {d.get('img_proj_type')!r} is not supported (only 'unet')")
        dsf = d.get("vae_downsample_factor", [16, 16])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", 22800)),
            use_qk_norm=bool(d.get("use_qk_norm", True)),
            num_experts=int(d.get("num_experts", 1)),
            moe_topk=_per_layer(d.get("moe_topk", 1), n_layers, "moe_topk"),
            moe_intermediate_size=_per_layer(
                d.get("moe_intermediate_size", d.get("intermediate_size")), n_layers, "moe_intermediate_size"
            ),
            num_shared_expert=_per_layer(d.get("num_shared_expert", 0), n_layers, "num_shared_expert"),
            use_mixed_mlp_moe=bool(d.get("use_mixed_mlp_moe", False)),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0) or 1.0),
            moe_layer_num_skipped=int(d.get("moe_layer_num_skipped", 0) or 0),
            intermediate_size=int(d.get("intermediate_size", 0) or 0),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            moe_drop_tokens=bool(d.get("moe_drop_tokens", False)),
            capacity_factor=float(d.get("capacity_factor", 1.0) or 1.0),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id", d.get("pad_id")),
            image_token_id=d.get("image_token_id"),
            img_proj_type=d.get("img_proj_type", "unet"),
            patch_size=int(d.get("patch_size", 1)),
            patch_embed_hidden_dim=int(d.get("patch_embed_hidden_dim", 1024)),
            image_base_size=int(d.get("image_base_size", 1024)),
            vae_downsample_factor=(int(dsf[0]), int(dsf[1])),
            cond_image_type=str(d.get("cond_image_type") or "vae_vit"),
            cond_token_attn_type=str(d.get("cond_token_attn_type") or "full"),
            cfg_distilled=bool(d.get("cfg_distilled", False)),
            use_meanflow=bool(d.get("use_meanflow", False)),
            vae=dict(d.get("vae") or {}),
            vae_autocast_dtype=str(d.get("vae_autocast_dtype", "float16")),
            vit=dict(d.get("vit") or {}),
            vit_processor=dict(d.get("vit_processor") or {}),
            vit_aligner=dict(d.get("vit_aligner") or {}),
            model_version=str(d.get("model_version", "HunyuanImage-3.0-Instruct")),
            raw=dict(d),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HunyuanImage3Config:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p} not found: not a HunyuanImage-3.0 checkpoint folder")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        return cls.from_dict(d)


@dataclass(frozen=True)
class GenerationDefaults:
    """`generation_config.json`: sampling and diffusion defaults of a checkpoint."""

    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 1024
    max_new_tokens: int = 2048
    max_length: int = 22800
    diff_infer_steps: int = 50
    diff_guidance_scale: float = 2.5
    flow_shift: float = 3.0
    bot_task: str = "think_recaption"
    use_system_prompt: str = "en_unified"
    sequence_template: str = "instruct"
    drop_think: bool = False
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationDefaults:
        base = cls()
        kw: dict[str, Any] = {}
        for f in (
            "do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "max_length",
            "diff_infer_steps", "diff_guidance_scale", "flow_shift", "bot_task", "use_system_prompt",
            "sequence_template", "drop_think",
        ):
            if d.get(f) is not None:
                kw[f] = type(getattr(base, f))(d[f])
        return cls(**kw, raw=dict(d))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GenerationDefaults:
        p = Path(path) / "generation_config.json"
        if not p.is_file():
            return cls()
        return cls.from_dict(json.loads(p.read_text()))
