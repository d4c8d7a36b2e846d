"""Host lists to tensors without stalling the device: the one way per-step index arrays leave the host.

A pageable host-to-device copy makes the host wait for the copy (and the stream before it) to finish; a copy from
pinned memory with `non_blocking=True` is queued and the host goes on. Planning arrays that a kernel library reads
on the host (FlashInfer's `plan()`) stay host tensors, pinned on CUDA so the library's own upload is asynchronous.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_tensor(values: Sequence[int] | Sequence[float], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A CPU tensor of `values`, in pinned memory when `pin` (only for a CUDA consumer)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory() if pin else t


def to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` on `device`: on CUDA a pinned host tensor and an asynchronous copy (no host sync)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return host_tensor(values, dtype, cuda).to(device, non_blocking=cuda)
