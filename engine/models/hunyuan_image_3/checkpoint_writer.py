"""Write a state dict as sharded safetensors in the Hugging Face layout the official checkpoints use.

Shards are named `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` maps every key to
its shard, so anything we write loads through the same path as a real checkpoint. The output depends only
on the tensors and their order, so equal inputs give byte-identical files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def shard_file_name(index: int, count: int) -> str:
    """The official 1-based, 5-digit shard name, e.g. model-00001-of-00003.safetensors."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _plan_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in the dict's order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors, copying any that share memory (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_sharded_safetensors(
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_bytes: int,
) -> dict[str, Any]:
    """Save `state` as shards of at most `max_shard_bytes` each (unless one tensor is larger) plus the index.

    Returns the index dict written to model.safetensors.index.json: metadata.total_size (bytes of tensor
    data), metadata.total_parameters, and weight_map (key -> shard file name, keys sorted). Shard files
    of an earlier save into the same folder that this save does not rewrite are removed, so a loader
    scanning the folder never sees a stale shard.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not state:
        raise ValueError("refusing to write a checkpoint with no tensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan_shards(state, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(plan, start=1):
        file_name = shard_file_name(i, len(plan))
        save_file(_storable({n: state[n] for n in names}), str(out / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in names})
    index: dict[str, Any] = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in state.values()),
            "total_size": sum(t.numel() * t.element_size() for t in state.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    written = set(weight_map.values())
    for stale in out.iterdir():
        if _SHARD_RE.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    return index
