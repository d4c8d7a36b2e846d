"""Peak memory of real modules at real shapes, measured on the `meta` device (no FLOPs, no memory).

Why: the GPU memory plan (`engine.memory_plan`) is arithmetic from shapes; this is what checks it on a machine
without a GPU. `MetaMemoryTracker` is a TorchDispatchMode that sees every aten op run inside it, counts the
bytes of each NEW storage an op returns (views and in-place results share their input's storage and cost
nothing) and frees them when the storage dies (a weak reference on the storage), so `peak` is the high-water
mark of the bytes allocated inside the mode, exactly as a caching allocator without fragmentation would see them.

`cuda_autocast=torch.float16` emulates CUDA autocast as the VAE runs it (torch/csrc/autograd autocast lists):
convolutions and SDPA cast their floating inputs to fp16 (parameters that require grad are cast once per region
and the copy kept, autocast's weight cache), group norms cast to fp32. `sdpa="efficient"` replaces
`scaled_dot_product_attention`'s meta computation (which is the math kernel's) by the allocations of CUDA's
memory-efficient kernel: the output, a fp32 log-sum-exp and, with a boolean mask, its additive copy in the query
dtype (padded to 16 key columns), exactly what that kernel allocates; "math" keeps the math kernel's temporaries.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_FP16_FUNCS = (torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.scaled_dot_product_attention)
_FP32_FUNCS = (torch.nn.functional.group_norm, torch.group_norm)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _StorageCounter(TorchDispatchMode):
    def __init__(self, tracker: MetaMemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        before = {_storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage_key(t) not in before:
                self.tracker.record(t)
        return out


class _CudaEmulation(TorchFunctionMode):
    def __init__(self, tracker: MetaMemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tr = self.tracker
        if tr.cuda_autocast is not None and func in _FP16_FUNCS:
            args, kwargs = tree_map(lambda a: tr.cast(a, tr.cuda_autocast), (args, kwargs))
        elif tr.cuda_autocast is not None and func in _FP32_FUNCS:
            args, kwargs = tree_map(lambda a: tr.cast(a, torch.float32), (args, kwargs))
        if func is torch.nn.functional.scaled_dot_product_attention and tr.sdpa == "efficient":
            return tr.efficient_sdpa(args, kwargs)
        return func(*args, **kwargs)


class MetaMemoryTracker:
    """Live and peak bytes of the storages created inside `with tracker:` (see the module docstring)."""

    def __init__(self, cuda_autocast: torch.dtype | None = None, sdpa: str = "efficient") -> None:
        if sdpa not in ("efficient", "math"):
            raise ValueError(f"sdpa must be 'efficient' or 'math', got {sdpa!r}")
        self.cuda_autocast = cuda_autocast
        self.sdpa = sdpa
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, int] = {}
        self._described: dict[int, str] = {}
        self.at_peak: list[str] = []
        """What was live at the peak: one 'shape dtype bytes' line per storage (to explain a plan term)."""
        self._weight_cache: dict[int, torch.Tensor] = {}
        self._modes: list[Any] = []

    def __enter__(self) -> MetaMemoryTracker:
        self._modes = [_CudaEmulation(self), _StorageCounter(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._weight_cache.clear()  # autocast drops its weight cache when its region ends

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int) -> None:
        self.live -= self._tracked.pop(key, 0)
        self._described.pop(key, None)

    def record(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._tracked:
            return
        n = st.nbytes()
        self._tracked[key] = n
        self._described[key] = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} {n}"
        self.live += n
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = list(self._described.values())
        weakref.finalize(st, self._free, key)

    def cast(self, a: Any, dtype: torch.dtype) -> Any:
        """Autocast's cast of one argument (parameters requiring grad: once per region, the copy kept)."""
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype == dtype:
            return a
        cacheable = a.requires_grad and a.is_leaf and dtype == self.cuda_autocast
        if cacheable and id(a) in self._weight_cache:
            return self._weight_cache[id(a)]
        out = a.to(dtype)
        if cacheable:
            self._weight_cache[id(a)] = out
        return out

    def efficient_sdpa(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """What CUDA's memory-efficient SDPA kernel allocates: output, fp32 log-sum-exp (rows padded to 32) and, for
        a boolean mask, its additive copy in the query dtype with the key columns padded to 16."""
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        bias = None
        if mask is not None and mask.dtype == torch.bool:
            bias = torch.empty((*mask.shape[:-1], math.ceil(k.shape[-2] / 16) * 16), dtype=q.dtype, device=q.device)
        lse = torch.empty((*q.shape[:-2], math.ceil(q.shape[-2] / 32) * 32), dtype=torch.float32, device=q.device)
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        del bias, lse  # both live until the kernel returns
        return out
