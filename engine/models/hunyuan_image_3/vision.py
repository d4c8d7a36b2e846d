"""SigLIP2 NaFlex vision tower and the LightProjector aligner of HunyuanImage-3.0-Instruct.

The official `siglip2.py` is an edited copy of the transformers SigLIP2 vision code, so we use the library
class itself (measured against the golden tensors: transformers 4.57 with *eager* attention is bit-identical
to the official tower; the official encoder always runs eager attention even when its config says sdpa).
The checkpoint has no pooling head, so the tower is built with `vision_use_head=False`.

Weight names: the tower's `state_dict` equals the checkpoint's `vision_model.*` keys with that prefix
removed, and `VisionAligner`'s equals the `vision_aligner.*` keys with that prefix removed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import Siglip2VisionConfig
from transformers.models.siglip2 import modeling_siglip2

# Fields of the checkpoint's `vit` dict that define the tower; everything else there (attention backend,
# return flags) is ignored on purpose: we always run eager attention and read `last_hidden_state`.
_VIT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "num_patches",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)


def vision_config(vit_cfg: dict[str, Any]) -> Siglip2VisionConfig:
    """`Siglip2VisionConfig` for the checkpoint's `vit` dict, with eager attention.

    The pooling head exists when the checkpoint has it (`vision_use_head`, default True like SigLIP2: the
    released checkpoints ship `vision_model.head.*`), so strict loading accepts those tensors; its output is
    never used (`build_vision_tower` switches it off).
    """
    kwargs = {k: vit_cfg[k] for k in _VIT_FIELDS if k in vit_cfg}
    cfg = Siglip2VisionConfig(**kwargs)
    # a loose attribute in 4.x, a real field in 5.x
    cfg.vision_use_head = bool(vit_cfg.get("vision_use_head", True))
    cfg._attn_implementation = "eager"
    return cfg


def build_vision_tower(vit_cfg: dict[str, Any]) -> nn.Module:
    """The SigLIP2 vision tower for `config.vit`; parameter names = checkpoint keys minus `vision_model.`.

    transformers 4.x: `Siglip2VisionTransformer`. transformers 5.x removed that class and flattened
    `Siglip2VisionModel` to the same names; we use it there (about 1.2e-6 from the official tower,
    measured against the golden tensors). Anything else raises, naming the installed version.
    """
    cfg = vision_config(vit_cfg)
    tower_cls = getattr(modeling_siglip2, "Siglip2VisionTransformer", None)
    if tower_cls is not None:
        tower = tower_cls(cfg)
        tower.use_head = False  # keep the head's weights loadable, never compute its unused output
    else:
        tower = modeling_siglip2.Siglip2VisionModel(cfg)
        names = list(tower.state_dict())
        if not names or not all(n.startswith(("embeddings.", "encoder.", "post_layernorm.")) for n in names):
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__}: Siglip2VisionModel does not expose the SigLIP2 "
                "tower with the checkpoint's parameter names; install transformers 4.57.x"
            )
    return tower.eval()


def run_vision_tower(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    pixel_attention_mask: torch.Tensor,
    spatial_shapes: torch.Tensor,
) -> torch.Tensor:
    """Post-layernorm hidden states `[B, P, hidden]` for every one of the P patch rows, padding rows included.

    pixel_values `[B, P, 3*p*p]`, pixel_attention_mask `[B, P]` (1 = real patch), spatial_shapes `[B, 2]`
    (patch rows, patch columns). The padding rows are kept because the official model feeds all P rows to
    the aligner and the LLM.
    """
    params = inspect.signature(tower.forward).parameters
    mask_name = "attention_mask" if "attention_mask" in params else "pixel_attention_mask"
    out = tower(pixel_values, spatial_shapes=spatial_shapes, **{mask_name: pixel_attention_mask})
    return out.last_hidden_state


class VisionAligner(nn.Module):
    """LightProjector: ViT features -> LLM width (`mlp_gelu`: Linear, then (GELU, Linear) x depth-1).

    No library class exists for it; `layers` keeps the official Sequential indices so
    `vision_aligner.layers.N.*` loads unchanged. GELU is the exact (erf) form. A `linear` projector is a
    single Linear named `layers`.
    """

    def __init__(self, aligner_cfg: dict[str, Any]) -> None:
        super().__init__()
        kind = aligner_cfg.get("projector_type", "mlp_gelu")
        in_dim, out_dim = int(aligner_cfg["input_dim"]), int(aligner_cfg["n_embed"])
        if kind == "linear":
            self.layers: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp_gelu":
            mods: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
            for _ in range(1, int(aligner_cfg.get("depth", 2))):
                mods += [nn.GELU(), nn.Linear(out_dim, out_dim)]
            self.layers = nn.Sequential(*mods)
        else:
            raise ValueError(f"unknown vit_aligner projector_type {kind!r} (expected 'mlp_gelu' or 'linear')")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
