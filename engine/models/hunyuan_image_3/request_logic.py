"""HunyuanImage-3's answers to the scheduler about a request (engine/model_interface.py, `ModelRequestLogic`): the
image-phase sequence a request switches to when its text phase ends, which denoising steps the Taylor cache
lets skip the backbone, and what an image encode or decode costs (image_flops.py). The scheduler calls these
without importing this package."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from diffgentor.engine.request_contract import RequestError

from .config import HunyuanImage3Config
from .image_flops import vae_decode_flops, vae_encode_flops, vit_flops
from .prompt import BuiltPrompt, PromptBuilder, cond_layout
from .taylor_cache import TaylorCacheConfig, full_step_schedule


class HunyuanImage3RequestLogic:
    def __init__(self, config: HunyuanImage3Config, builder: PromptBuilder) -> None:
        self.config = config
        self.builder = builder

    def image_phase_layout(self, st: Any) -> BuiltPrompt:
        """The image-phase sequence of `st` (an engine `RequestState`): its prompt, condition images and the think /
        recaption text it generated (as token ids), then the image of its bucket; CFG adds the unconditional row."""
        layouts = [cond_layout(v, t, self.config.latent_downsample) for v, t in zip(st.vae_images, st.vit_images)]
        layout = self.builder.image_prompt(
            st.req.prompt, ratio_index=st.ratio_index, system_prompt=st.system_prompt, cond_images=layouts,
            cot_ids=st.machine.cot_ids or None, cfg=st.use_cfg,
        )
        limit = self.config.max_position_embeddings
        if len(layout) > limit:
            raise RequestError(f"the image-phase sequence needs {len(layout)} tokens (the prompt, its condition "
                               f"images, {len(st.machine.cot_ids or [])} think/recaption tokens and the image); the "
                               f"model allows {limit}: lower max_new_tokens, shorten the prompt or use fewer "
                               "condition images")
        return layout

    def encode_flops(self, height: int, width: int, vit_patches: int) -> float:
        """One condition image's encode: the VAE at `height` x `width` pixels and the vision tower over its
        `vit_patches` patch rows (0: no ViT branch), as image_flops.py counts them."""
        cfg = self.config
        vae = vae_encode_flops(cfg.vae, height, width) if cfg.has_vae_cond else 0.0
        return vae + (vit_flops(cfg.vit, vit_patches) if vit_patches and cfg.has_vision else 0.0)

    def decode_flops(self, height: int, width: int) -> float:
        """One generated image's VAE decode at `height` x `width` pixels."""
        return vae_decode_flops(self.config.vae, height, width)

    def runs_backbone(self, st: Any, step: int) -> bool:
        """Every step without the Taylor cache; with it, the steps its schedule computes in full."""
        return not st.use_taylor_cache or _taylor_schedule(st.num_steps)[step]


@lru_cache(maxsize=64)
def _taylor_schedule(num_steps: int) -> tuple[bool, ...]:
    return tuple(full_step_schedule(TaylorCacheConfig(), num_steps))
