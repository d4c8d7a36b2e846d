"""What a request gets for each field it leaves unset, resolved once per engine in one place.

Three sources, in this order (docs/decisions.md, "Request defaults"): a ``DG_HUNYUAN_IMAGE_3_*`` variable or a
flag that was set explicitly (`EngineConfig`), then the checkpoint's ``generation_config.json`` (its one reader is
`GenerationDefaults.from_pretrained`), then the documented default (the env block's field default). Input
processing (`engine/input_processor.py`), the engine's request state (`engine/request_state.py`) and the HTTP API
read the result; none of them combines sources itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffgentor.engine.config import CHECKPOINT_REQUEST_KEYS

if TYPE_CHECKING:
    from diffgentor.engine.config import EngineConfig
    from diffgentor.engine.models.hunyuan_image_3.config import GenerationDefaults

OFFLINE_DEFAULT_SEED = 42
"""The seed of a seedless request in the offline engine when no ``--seed`` is set (the served API draws one per
request instead)."""


@dataclass(frozen=True)
class RequestDefaults:
    bot_task: str
    use_system_prompt: str
    max_new_tokens: int
    infer_align_image_size: bool
    use_taylor_cache: bool
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    """None: no ``--seed``; the offline engine uses `OFFLINE_DEFAULT_SEED`, the served API a random seed."""


def resolve_request_defaults(generation: GenerationDefaults, config: EngineConfig | None = None) -> RequestDefaults:
    """The defaults of every request field, from the engine's settings and the checkpoint's generation config.

    Without an engine config (tools and tests that build requests on a bare checkpoint) the checkpoint's values
    apply, with no image-size alignment, no Taylor cache and no default seed."""
    if config is None:
        return RequestDefaults(
            bot_task=generation.bot_task, use_system_prompt=generation.use_system_prompt,
            max_new_tokens=generation.max_new_tokens, infer_align_image_size=False, use_taylor_cache=False,
            num_inference_steps=generation.diff_infer_steps, guidance_scale=generation.diff_guidance_scale,
            flow_shift=generation.flow_shift, do_sample=generation.do_sample, temperature=generation.temperature,
            top_k=generation.top_k, top_p=generation.top_p, seed=None)
    env = config.env

    def env_or_checkpoint(key: str):
        # an explicit variable or flag wins; then the checkpoint's value; then the documented default
        if key in env.explicit or key not in CHECKPOINT_REQUEST_KEYS or generation.raw.get(key) is None:
            return getattr(env, key)
        return getattr(generation, key)

    return RequestDefaults(
        bot_task=env_or_checkpoint("bot_task"), use_system_prompt=env_or_checkpoint("use_system_prompt"),
        max_new_tokens=env_or_checkpoint("max_new_tokens"),
        infer_align_image_size=env.infer_align_image_size, use_taylor_cache=env.use_taylor_cache,
        num_inference_steps=config.model.default_num_inference_steps or generation.diff_infer_steps,
        guidance_scale=(generation.diff_guidance_scale if config.model.default_guidance_scale is None
                        else config.model.default_guidance_scale),
        flow_shift=generation.flow_shift, do_sample=generation.do_sample, temperature=generation.temperature,
        top_k=generation.top_k, top_p=generation.top_p, seed=config.model.seed)


__all__ = ["OFFLINE_DEFAULT_SEED", "RequestDefaults", "resolve_request_defaults"]
