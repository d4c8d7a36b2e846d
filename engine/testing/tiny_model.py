"""A tiny, deterministic HunyuanImage-3.0-Instruct(-Distil) checkpoint in the official folder layout.

Tests, the CLI (`diffgentor make-tiny`) and benchmarks need a checkpoint that exercises every feature of
the real one (MoE with per-layer lists, GQA, shared expert, VAE + ViT condition path, Distil switches)
but loads in well under a second on a CPU. It is written file for file like the real checkpoint folder
(config.json, generation_config.json, tokenizer files, system_prompt.py, sharded safetensors + index), so
it goes through exactly the loading code a real checkpoint does. Every byte depends only on the arguments.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# ----------------------------------------------------------------------------------------------- sizes

TOKENIZER_REAL_VOCAB = 400
"""Ordinary tokens (4 base specials + 256 byte symbols + learned merges); added specials come after."""

VOCAB_SIZE = 512
"""Embedding rows; larger than the tokenizer like the real model (rows past the tokenizer are padding)."""

NUM_LAYERS = 2

BASE_SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftext|>", "<pad>", "<unk>")
"""ids 0..3: eos, bos, pad, unk."""

IMAGE_SIZE_TOKENS = tuple(f"<img_size_{s}>" for s in (256, 512, 1024))
IMAGE_RATIO_TOKENS = tuple(f"<img_ratio_{k}>" for k in range(37))

ADDED_SPECIAL_TOKENS = (
    "<boi>", "<eoi>", "<boa>", "<eoa>", "<bov>", "<eov>", "<audio>", "<video>", "<cfg>",
    "<timestep>", "<timestep_r>", "<guidance>", "<joint_img_sep>", "<answer>", "</answer>",
    "<think>", "</think>", "<recaption>", "</recaption>", "<ref>", "</ref>", "<quad>", "</quad>",
    *IMAGE_SIZE_TOKENS, *IMAGE_RATIO_TOKENS, "<img>",
)
"""Special tokens the code looks up by name, numbered from TOKENIZER_REAL_VOCAB on."""

# A small English text to learn the BPE merges from: prompts, captions and reasoning like the model sees.
_CORPUS = """\
A red cube sits on a wooden table next to a glass of water.
A small house stands by the lake under a clear blue sky.
The cat sleeps on the window sill while the rain falls outside.
Put the object of the first image on the background of the second image.
Make the sky purple and add a bright moon above the mountains.
Replace the dog with a white horse and keep the green field unchanged.
Remove the people from the street and leave the shop windows as they are.
Turn the photo into a watercolor painting with soft edges and warm colors.
A close-up portrait of an old man with a gray beard, lit by the morning sun.
A wide shot of a city at night, with neon signs reflected in the wet road.
Two children play with a yellow kite on a sandy beach at sunset.
A bowl of fresh fruit: apples, oranges, and a bunch of grapes on a white plate.
The subject is a young woman reading a book in a quiet library.
The composition places the tree on the left and the river on the right.
The lighting is soft and comes from a window behind the camera.
The color palette is calm, with muted greens, blues and light browns.
The style is a realistic photograph with fine detail and sharp focus.
Text on the sign reads "OPEN" in large black letters.
First think about the scene, then describe the image in clear words.
Describe what is in the picture, where it is, and how it looks.
A white boat floats on the calm sea, and the water shines in the light.
The mountains in the background are covered with snow and thin clouds.
A blue car is parked in front of the old stone house near the road.
The table is made of dark wood, and the cup on it is full of hot tea.
A bird sits on the branch of a tall tree in the green forest.
The image shows a quiet street in the morning with long shadows.
Change the color of the car to red and add a person walking on the left.
Keep the face the same, but make the hair short and the shirt blue.
The picture is bright and clear, with a simple and clean background.
An orange cat and a black dog rest together on a soft gray sofa.
User: draw a red apple on a table.
Assistant: <think> The user wants a simple still life.
User: make the image brighter and add a small bird.
Assistant: The image shows a bright room with a small bird.
"""


# ----------------------------------------------------------------------------------------------- tokenizer


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_merges(words: Counter[str], num_new_tokens: int) -> list[tuple[str, str]]:
    """Plain BPE merge learning with fixed tie-breaking (highest count, then smallest pair).

    Done here rather than with the tokenizers trainer so the result never depends on hash-map order.
    Stops once `num_new_tokens` distinct new tokens exist or no pair occurs twice.
    """
    split = {tuple(w): n for w, n in sorted(words.items())}
    merges: list[tuple[str, str]] = []
    produced: set[str] = set()
    while len(produced) < num_new_tokens:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in split.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < 2:
            break
        pair = best[0]
        merges.append(pair)
        produced.add(pair[0] + pair[1])
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in split.items():
            key = _merge_word(symbols, pair)
            merged[key] = merged.get(key, 0) + n
        split = merged
    return merges


def build_tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE over the embedded corpus: TOKENIZER_REAL_VOCAB ordinary tokens, then the specials."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[str] = Counter()
    for line in _CORPUS.splitlines(keepends=True):
        words.update(piece for piece, _ in pre.pre_tokenize_str(line))
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(BASE_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges = _learn_merges(words, TOKENIZER_REAL_VOCAB - len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) != TOKENIZER_REAL_VOCAB:
        raise RuntimeError(f"embedded corpus gave {len(vocab)} tokens, expected {TOKENIZER_REAL_VOCAB}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*BASE_SPECIAL_TOKENS, *ADDED_SPECIAL_TOKENS)]
    )
    return tok


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "additional_special_tokens": list(ADDED_SPECIAL_TOKENS),
    }


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "HunyuanImage3TokenizerFast",
        **_special_tokens_map(),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "auto_map": {"AutoTokenizer": [None, "tokenization_hunyuan_image_3.HunyuanImage3TokenizerFast"]},
    }


# -------------------------------------------------------------------------------------------- system prompts

_SYSTEM_PROMPT_PY = '''\
"""System prompts of the diffgentor tiny HunyuanImage-3.0 checkpoint.

Same module shape and constant names as the official checkpoints' system_prompt.py, with short texts of
our own. Serving code reads the string constants with `ast`; this file is never imported or executed.
"""

t2i_system_prompt_en_vanilla = """
You are an image generation model. Draw one clear, faithful picture of what the user describes.
"""

t2i_system_prompt_en_recaption = """
You rewrite a short image request into one precise, detailed description of the picture.
Put the rewritten description between <recaption> and </recaption>.
"""

t2i_system_prompt_en_think_recaption = """
First reason about the subject, layout, light and style inside <think> and </think>.
Then write the final picture description inside <recaption> and </recaption>.
"""

t2i_system_prompts = {
    "en_vanilla": [t2i_system_prompt_en_vanilla],
    "en_recaption": [t2i_system_prompt_en_recaption],
    "en_think_recaption": [t2i_system_prompt_en_think_recaption],
}

unified_system_prompt_en = (
    "You are a multimodal model that answers with text or draws and edits images. "
    "Start with <think> to reason before the description, or with <recaption> to write it directly."
)
'''


# ----------------------------------------------------------------------------------------------- config


def tiny_config_dict(tokenizer: Tokenizer, distil: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """config.json: every field of the official config, tiny sizes; special ids taken from the tokenizer."""
    ids = {t: tokenizer.token_to_id(t) for t in (*BASE_SPECIAL_TOKENS, "<boi>", "<eoi>", "<img>")}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "add_classification_head": False,
        "anyres_pooling_size": 2,
        "anyres_vit_max_image_size": None,
        "anyres_vit_two_views": False,
        "architectures": ["HunyuanImage3ForCausalMM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_head_dim": 16,
        "auto_map": {
            "AutoConfig": "configuration_hunyuan_image_3.HunyuanImage3Config",
            "AutoModel": "modeling_hunyuan_image_3.HunyuanImage3Model",
            "AutoModelForCausalLM": "modeling_hunyuan_image_3.HunyuanImage3ForCausalMM",
        },
        "bos_token_id": ids["<|startoftext|>"],
        "capacity_factor": 1.0,
        "cfg_distilled": distil,
        "cla_share_factor": 1,
        "class_num": 0,
        "cond_image_type": "vae_vit",
        "cond_token_attn_type": "joint_full",
        "dense_list": [64, 0],
        "dtype": dtype_name,
        "eod_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "group_limited_greedy": False,
        "hidden_act": "silu",
        "hidden_size": 64,
        "im_end_id": ids["<eoi>"],
        "im_newline_id": 11,
        "im_start_id": ids["<boi>"],
        "image_base_size": 256,
        "image_token_id": ids["<img>"],
        "img_proj_type": "unet",
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "kv_lora_rank": None,
        "mask_init_id": 12,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "hunyuan_image_3_moe",
        "model_version": "HunyuanImage-3.0-Instruct-Distil" if distil else "HunyuanImage-3.0-Instruct",
        "moe_drop_tokens": False,
        "moe_impl": "eager",
        "moe_intermediate_size": [32] * NUM_LAYERS,
        "moe_layer_num_skipped": 0,
        "moe_random_routing_dropped_token": False,
        "moe_topk": [2] * NUM_LAYERS,
        "n_group": None,
        "norm_topk_prob": True,
        "norm_type": "rms",
        "num_attention_heads": 4,
        "num_experts": 4,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": 2,
        "num_shared_expert": [1] * NUM_LAYERS,
        "pad_id": ids["<pad>"],
        "pad_token_id": ids["<pad>"],
        "patch_embed_hidden_dim": 32,
        "patch_size": 1,
        "pool_type": "last",
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": None,
        "qk_rope_head_dim": None,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 1.0, "type": "custom"},
        "rope_theta": 10000.0,
        "rope_type": "2d",
        "routed_scaling_factor": 1.0,
        "text_end_id": 7,
        "text_start_id": 6,
        "tie_word_embeddings": False,
        "topk_group": None,
        "torch_dtype": dtype_name,
        "transformers_version": "4.57.1",
        "use_cache": True,
        "use_cla": False,
        "use_meanflow": distil,
        "use_mixed_mlp_moe": True,
        "use_mla": False,
        "use_qk_norm": True,
        "use_rotary_pos_emb": True,
        "v_head_dim": None,
        "vae": {
            "_class_name": "AutoencoderKLConv3D",
            "block_out_channels": [32] * 5,
            "downsample_match_channel": True,
            "ffactor_spatial": 16,
            "ffactor_temporal": 4,
            "in_channels": 3,
            "latent_channels": 16,
            "layers_per_block": 1,
            "out_channels": 3,
            "sample_size": 256,
            "sample_tsize": 64,
            "scaling_factor": 0.562679178327931,
            "shift_factor": None,
            "upsample_match_channel": True,
        },
        "vae_autocast_dtype": "float16",
        "vae_downsample_factor": [16, 16],
        "vae_dtype": "float32",
        "vae_type": "hunyuan-image-vae-v1",
        "video_end_id": 10,
        "video_start_id": 9,
        "vit": {
            "_attn_implementation": "sdpa",
            "attention_dropout": 0.0,
            "attn_implementation": "sdpa",
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32,
            "intermediate_size": 64,
            "layer_norm_eps": 1e-06,
            "num_attention_heads": 2,
            "num_channels": 3,
            "num_hidden_layers": 2,
            "num_patches": 64,
            "output_attentions": False,
            "output_hidden_states": False,
            "patch_size": 16,
            "use_return_dict": True,
            "vision_use_head": False,
        },
        "vit_aligner": {"depth": 2, "input_dim": 32, "n_embed": 64, "projector_type": "mlp_gelu"},
        "vit_processor": {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Siglip2ImageProcessorFast",
            "image_std": [0.5, 0.5, 0.5],
            "max_num_patches": 64,
            "patch_size": 16,
            "resample": 2,
            "rescale_factor": 1 / 255,
        },
        "vit_type": "siglip2-so400m-patch16-naflex",
        "vocab_size": VOCAB_SIZE,
    }


def tiny_generation_config(tokenizer: Tokenizer, distil: bool = False) -> dict[str, Any]:
    """generation_config.json: Instruct defaults (think_recaption, en_unified, sampling), few steps."""
    return {
        "bos_token_id": tokenizer.token_to_id("<|startoftext|>"),
        "bot_task": "think_recaption",
        "diff_guidance_scale": 2.5,
        "diff_infer_steps": 8 if distil else 4,
        "do_sample": True,
        "drop_think": False,
        "eos_token_id": [tokenizer.token_to_id("<|endoftext|>")],
        "flow_shift": 3.0,
        "max_length": 8192,
        "max_new_tokens": 2048,
        "moe_impl": "eager",
        "pad_token_id": tokenizer.token_to_id("<pad>"),
        "sequence_template": "instruct",
        "temperature": 0.6,
        "top_k": 1024,
        "top_p": 0.95,
        "use_system_prompt": "en_unified",
    }


# ----------------------------------------------------------------------------------------------- weights


def _fan_in(shape: torch.Size) -> int:
    return math.prod(shape[1:])


def draw_parameters(
    named: Iterable[tuple[str, torch.Tensor]], seed: int, pad_token_id: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random values for every parameter, in sorted-name order from one seeded generator.

    The golden checkpoints' scheme, so no branch is zero: matrices and convs N(0,1)/sqrt(fan_in), biases
    0.05 N(0,1), other 1-D weights (norms) 1 + 0.1 N(0,1), and the `model.wte` pad row zero. Values are
    drawn in fp32 whatever the parameter dtype, so the stream does not depend on it.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for name, p in sorted(named, key=lambda kv: kv[0]):
        x = torch.randn(tuple(p.shape), generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            x = x / math.sqrt(_fan_in(p.shape))
        elif name.endswith("bias"):
            x = 0.05 * x
        else:
            x = 1.0 + 0.1 * x
        if name == "model.wte.weight" and pad_token_id is not None:
            x[pad_token_id] = 0.0
        yield name, x


def _tiny_state_dict(
    config_dir: Path, seed: int, pad_token_id: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Build our model class, fill it deterministically, and return its state in the official layout."""
    from diffgentor.engine.models.hunyuan_image_3.execution import (
        HunyuanImage3Config,
        HunyuanImage3ForCausalMM,
        qkv_ours_to_official,
    )

    cfg = HunyuanImage3Config.from_pretrained(config_dir)
    with torch.random.fork_rng(devices=[]):  # the module's own init must not move the global RNG
        model = HunyuanImage3ForCausalMM(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in draw_parameters(params.items(), seed, pad_token_id):
            params[name].copy_(value)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".self_attn.qkv_proj.weight"):
            tensor = qkv_ours_to_official(tensor, cfg)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def tiny_shard_limit(state: dict[str, torch.Tensor]) -> int:
    """About a third of the total, so the tiny checkpoint always has several shards like a real one."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    return total // 3 + 1


# ----------------------------------------------------------------------------------------------- writer


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


PER_LAYER_FIELDS = ("moe_topk", "num_shared_expert", "moe_intermediate_size")


def apply_config_overrides(config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Resize the tiny config (benchmark presets): per-layer fields given as scalars become per-layer lists."""
    if not overrides:
        return config
    subs = ("vae", "vit", "vit_aligner", "vit_processor")
    config = {**config, **{k: v for k, v in overrides.items() if k not in subs}}
    for sub in subs:
        if sub in overrides:
            config[sub] = {**config[sub], **overrides[sub]}
    n = int(config["num_hidden_layers"])
    for f in PER_LAYER_FIELDS:
        v = config[f]
        config[f] = [int(v)] * n if not isinstance(v, list) else (v * n if len(v) == 1 else v)[:n]
    config["dense_list"] = [config["hidden_size"], 0]
    config["vit_aligner"] = {**config["vit_aligner"], "n_embed": config["hidden_size"]}
    return config


SIZE_FIELDS: dict[str, str] = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "attention_head_dim",
    "experts": "num_experts",
    "topk": "moe_topk",
    "expert_width": "moe_intermediate_size",
    "shared_experts": "num_shared_expert",
    "intermediate": "intermediate_size",
}
"""Short size names (`diffgentor make-tiny --layers ...`, benchmark presets) -> the config.json fields they set."""


def size_overrides(**sizes: int | None) -> dict[str, Any]:
    """Config overrides for a resized tiny checkpoint from short size names (`SIZE_FIELDS`); None = keep the default.

    Checked here so a bad size is a clear error instead of a shape mismatch deep in the model build."""
    unknown = sorted(set(sizes) - set(SIZE_FIELDS))
    if unknown:
        raise ValueError(f"unknown size names {unknown}; known: {sorted(SIZE_FIELDS)}")
    given = {k: int(v) for k, v in sizes.items() if v is not None}
    for k, v in given.items():
        if v < (0 if k == "shared_experts" else 1):
            raise ValueError(f"{k} must be {'>= 0' if k == 'shared_experts' else 'positive'}, got {v}")
    if "topk" in given and given["topk"] > given.get("experts", 4):
        raise ValueError(f"topk ({given['topk']}) must be <= experts ({given.get('experts', 4)})")
    heads, kv_heads = given.get("heads", 4), given.get("kv_heads", 2)
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return {SIZE_FIELDS[k]: v for k, v in given.items()}


SMALL_SIZES: dict[str, int] = dict(layers=4, hidden=256, heads=8, kv_heads=2, head_dim=32, experts=16, topk=4,
                                   expert_width=256, shared_experts=1, intermediate=512)
"""The `small` benchmark shape: a checkpoint measured with the official code (4 layers, hidden 256, 16 experts
top-4; bench/README.md), with our choice of the sizes that measurement does not name (heads, widths)."""


def write_tiny_metadata(
    out_dir: str | Path, distil: bool = False, dtype: torch.dtype = torch.float32,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Everything but the weights: configs, tokenizer files and system_prompt.py."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = apply_config_overrides(tiny_config_dict(tokenizer, distil, dtype), config_overrides)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", tiny_generation_config(tokenizer, distil))
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(config["max_position_embeddings"]))
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    (out / "system_prompt.py").write_text(_SYSTEM_PROMPT_PY)
    return out


def make_tiny(
    out_dir: str | Path, distil: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
    config_overrides: dict[str, Any] | None = None, shard_bytes: int | None = None,
) -> Path:
    """Write the tiny checkpoint (Instruct, or Instruct-Distil with `distil`) to `out_dir`; returns it.

    `config_overrides` resizes it (e.g. the benchmark presets: more layers, wider, more experts); `shard_bytes`
    caps the shard size (default: a third of the total), e.g. to give a widened model a real checkpoint's
    proportion of shard to model (~5 GB shards of a 166 GB model: 3%)."""
    from diffgentor.engine.models.hunyuan_image_3.execution import save_sharded_safetensors

    out = write_tiny_metadata(out_dir, distil, dtype, config_overrides)
    pad_id = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<pad>")
    state = _tiny_state_dict(out, seed, pad_id, dtype)
    save_sharded_safetensors(state, out, shard_bytes or tiny_shard_limit(state))
    return out
