"""The package's face to the engine's worker side: the model, how a step's embeddings are assembled and condition
images encoded, the flow-matching sampler and Taylor cache a denoising step runs, token sampling, and the module and
weight facts the memory plan and the tiny-checkpoint writer read. The engine's worker, model runner, encode stage,
memory plan and tiny checkpoint import this package through here only (tests/test_import_graph.py)."""

from .backbone import StepRows
from .checkpoint_writer import save_sharded_safetensors
from .config import HunyuanImage3Config
from .embedding import CondImage, EncodedImage, GenInputs, assemble_embeddings, condition_from_encoded, encode_images
from .flow_match import FlowMatchSchedule, cfg_combine, euler_step, guidance_value, initial_noise
from .image_processing import to_uint8
from .model import HunyuanImage3ForCausalMM, keep_fp32_for_model
from .sampling import SamplingParams, constrain_batch, make_generator, sample_batch
from .taylor_cache import TaylorCache, TaylorCacheConfig
from .vae import AutoencoderKLConv3D
from .weights import is_expert_weight, qkv_ours_to_official

__all__ = [
    "AutoencoderKLConv3D",
    "CondImage",
    "EncodedImage",
    "FlowMatchSchedule",
    "GenInputs",
    "HunyuanImage3Config",
    "HunyuanImage3ForCausalMM",
    "SamplingParams",
    "StepRows",
    "TaylorCache",
    "TaylorCacheConfig",
    "assemble_embeddings",
    "cfg_combine",
    "condition_from_encoded",
    "constrain_batch",
    "encode_images",
    "euler_step",
    "guidance_value",
    "initial_noise",
    "is_expert_weight",
    "keep_fp32_for_model",
    "make_generator",
    "qkv_ours_to_official",
    "sample_batch",
    "save_sharded_safetensors",
    "to_uint8",
]
