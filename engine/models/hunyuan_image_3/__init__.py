"""HunyuanImage-3.0 (base / Instruct / Instruct-Distil), loaded from the official checkpoint layout.

The package's face to the engine's request side (input processing, request state, the scheduler's plan): its
config, tokenizer, prompts, image preprocessing, sampling settings, stage machine and request logic, none of which
loads a weight or the model's modules. The worker side reads `execution` (the model, its embeddings and sampler);
the engine imports nothing else from this package (tests/test_import_graph.py)."""

from .config import GenerationDefaults, HunyuanImage3Config
from .image_processing import ImageProcessor, VaeCondImage, VitCondImage
from .prompt import BuiltPrompt, PromptBuilder, common_prefix_len, cond_layout
from .request_logic import HunyuanImage3RequestLogic
from .resolution import image_tokens, latent_grid
from .sampling import SamplingParams
from .stage_machine import StageMachine
from .system_prompt import SystemPrompts, choose_system_prompt
from .tokenizer import HunyuanTokenizer

__all__ = [
    "BuiltPrompt",
    "GenerationDefaults",
    "HunyuanImage3Config",
    "HunyuanImage3RequestLogic",
    "HunyuanTokenizer",
    "ImageProcessor",
    "PromptBuilder",
    "SamplingParams",
    "StageMachine",
    "SystemPrompts",
    "VaeCondImage",
    "VitCondImage",
    "choose_system_prompt",
    "common_prefix_len",
    "cond_layout",
    "image_tokens",
    "latent_grid",
]
