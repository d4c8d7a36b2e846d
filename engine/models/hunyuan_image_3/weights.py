"""Strict loader for official HunyuanImage-3.0 safetensors checkpoints (sharded with an index, or one file).

Loading 160 GB and finding a problem halfway leaves a half-initialised model, so the loader has two phases:
1. validate everything from the shard headers alone (no tensor data read): every shard present and intact
   (header parses, offsets consistent, file exactly covered, i.e. not truncated), every index key present in
   its shard, checkpoint keys == module keys, shapes equal. All problems go into ONE `CheckpointError`;
2. read every tensor (memory-mapped via `safe_open`) into fresh tensors of the target dtype/device, apply
   the key transforms (our fused-QKV row order), and only then assign them all into the module at once.
Module keys are `module.state_dict()` names, so the same function loads the backbone alone, a test harness or
the whole top-level model. Nothing is ever imported from the checkpoint folder, so any folder name works.

Tensor / expert parallel ranks pass a `ShardPlan` (`hunyuan_shard_plan`): phase 1 then checks every sharded
tensor against its FULL shape from the header, and phase 2 reads only this rank's rows / columns through
`safe_open(...).get_slice` (the memory map), so no rank ever materialises a big tensor whole; only the small
fused QKV is read whole, re-laid and sliced. Under expert parallel the other ranks' experts are checkpoint keys
this rank does not hold: they are still required and shape-checked (against this rank's experts), never read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import Tensor, nn

from diffgentor.engine.parallel import ParallelContext
from diffgentor.kernels.quantization import Fp8Weight, attach_fp8, fp8_layout, quantize_fp8

from .backbone import keep_fp32_param
from .config import HunyuanImage3Config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_FLOAT_DTYPES = {"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the module; lists every problem found, not just the first."""

    def __init__(
        self,
        where: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        bad_shards: Sequence[str] = (),
        other: Sequence[str] = (),
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.bad_shards = list(bad_shards)
        self.other = list(other)
        lines = [f"checkpoint {where} cannot be loaded:"]
        if self.bad_shards:
            lines.append(f"  bad shard files ({len(self.bad_shards)}):")
            lines += [f"    {s}" for s in self.bad_shards]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(f"  mis-shaped tensors ({len(self.mismatched)}):")
            lines += [f"    {n}: expected {list(e)}, found {list(f)}" for n, e, f in self.mismatched]
        if self.other:
            lines += [f"  {o}" for o in self.other]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class TensorInfo:
    """What a shard header says about one tensor."""

    shard: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class KeyTransform:
    """A tensor rewrite applied at load to every key ending in `suffix` (must keep the shape)."""

    suffix: str
    fn: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TensorShard:
    """How one rank reads its part of a checkpoint tensor: the full shape the header must show, and a reader
    (safe_open handle, key) -> this rank's slice, already in our layout (key transforms are the reader's job)."""

    full_shape: tuple[int, ...]
    read: Callable[[Any, str], Tensor]


class ShardPlan(Protocol):
    def shard(self, name: str, local: Tensor) -> TensorShard | None:
        """The rule for module key `name` (local tensor, meta ok), or None when it is replicated (read whole)."""

    def peer(self, ckpt_key: str) -> str | None:
        """For a checkpoint key another rank holds: the module key of the same shape here (else None)."""


class _HeadLayout(Protocol):
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


# ---------------------------------------------------------------------------------------------- QKV layout
def qkv_official_to_ours(w: Tensor, cfg: _HeadLayout) -> Tensor:
    """Official rows (per KV group g: its q heads, then k_g, then v_g) -> ours [all q; all k; all v].

    Works for the weight [rows, in] and a bias [rows].
    """
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    q_per_kv = cfg.num_attention_heads // n_kv
    rest = tuple(w.shape[1:])
    g = w.reshape(n_kv, q_per_kv + 2, d, *rest)
    q = g[:, :q_per_kv].reshape(n_kv * q_per_kv * d, *rest)
    k = g[:, q_per_kv].reshape(n_kv * d, *rest)
    v = g[:, q_per_kv + 1].reshape(n_kv * d, *rest)
    return torch.cat([q, k, v], dim=0)


def qkv_ours_to_official(w: Tensor, cfg: _HeadLayout) -> Tensor:
    """Inverse of `qkv_official_to_ours` (used to write checkpoints in the official layout)."""
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    q_per_kv = cfg.num_attention_heads // n_kv
    rest = tuple(w.shape[1:])
    nq_rows = n_kv * q_per_kv * d
    q = w[:nq_rows].reshape(n_kv, q_per_kv, d, *rest)
    k = w[nq_rows : nq_rows + n_kv * d].reshape(n_kv, 1, d, *rest)
    v = w[nq_rows + n_kv * d :].reshape(n_kv, 1, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(w.shape)


def hunyuan_key_transforms(cfg: HunyuanImage3Config) -> list[KeyTransform]:
    """The load-time rewrites of the official checkpoint: the fused-QKV row order (weight and bias)."""
    fn = lambda w: qkv_official_to_ours(w, cfg)
    return [KeyTransform("self_attn.qkv_proj.weight", fn), KeyTransform("self_attn.qkv_proj.bias", fn)]


# ---------------------------------------------------------------------------------------- tensor parallel
_EXPERT_RE = re.compile(r"^(.*layers\.\d+\.mlp\.experts\.)(\d+)(\.(?:gate_and_up_proj|down_proj)\.weight)$")
_WIDTH_UP_RE = re.compile(r"(?:^|\.)layers\.\d+\.mlp\.(?:shared_mlp\.)?gate_and_up_proj\.weight$")
_WIDTH_DOWN_RE = re.compile(r"(?:^|\.)layers\.\d+\.mlp\.(?:shared_mlp\.)?down_proj\.weight$")


def _read_rows(lo: int, hi: int) -> Callable[[Any, str], Tensor]:
    return lambda f, key: f.get_slice(key)[lo:hi]


def _read_cols(lo: int, hi: int) -> Callable[[Any, str], Tensor]:
    return lambda f, key: f.get_slice(key)[:, lo:hi]


def _read_up_gate(rank: int, size: int, two_i: int) -> Callable[[Any, str], Tensor]:
    """[up; gate] rows -> this rank's [up_shard; gate_shard] (each half sliced on its own, as `shard_w13_tp`)."""
    i = two_i // 2
    n = i // size

    def read(f: Any, key: str) -> Tensor:
        sl = f.get_slice(key)
        return torch.cat([sl[rank * n : (rank + 1) * n], sl[i + rank * n : i + (rank + 1) * n]], dim=0)

    return read


@dataclass(frozen=True)
class HunyuanShardPlan:
    """The tensor / expert parallel slicing of HunyuanImage-3.0 (see backbone's module docstring)."""

    cfg: HunyuanImage3Config
    parallel: ParallelContext

    def _qkv(self, f: Any, key: str) -> Tensor:
        cfg, par = self.cfg, self.parallel
        d, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        w = qkv_official_to_ours(f.get_tensor(key), cfg)  # small: read whole, re-lay, slice
        qh, kvh = par.q_head_range(nq), par.kv_head_range(nkv)
        q = w[qh.start * d : qh.stop * d]
        k = w[nq * d + kvh.start * d : nq * d + kvh.stop * d]
        v = w[(nq + nkv) * d + kvh.start * d : (nq + nkv) * d + kvh.stop * d]
        return torch.cat([q, k, v], dim=0)

    def shard(self, name: str, local: Tensor) -> TensorShard | None:
        cfg, par = self.cfg, self.parallel
        shape = tuple(local.shape)
        rest = shape[1:]
        if name.endswith("wte.weight") or name.endswith("lm_head.weight"):
            r = par.vocab_range(cfg.vocab_size)
            return TensorShard((cfg.vocab_size, *rest), _read_rows(r.start, r.stop))
        if name.endswith("self_attn.qkv_proj.weight") or name.endswith("self_attn.qkv_proj.bias"):
            return TensorShard((cfg.qkv_out_features, *rest), self._qkv)
        if name.endswith("self_attn.o_proj.weight"):
            r = par.q_head_range(cfg.num_attention_heads)
            d = cfg.head_dim
            return TensorShard((shape[0], cfg.num_attention_heads * d), _read_cols(r.start * d, r.stop * d))
        m = _EXPERT_RE.match(name)
        if m is not None:  # routed expert: width-sharded (TP) or whole (EP)
            size, rank = par.expert_tp_size, par.expert_tp_rank
        elif _WIDTH_UP_RE.search(name) or _WIDTH_DOWN_RE.search(name):  # shared expert / dense MLP
            size, rank = par.tp_size, par.tp_rank
        else:
            return None  # replicated: norms, router, image modules, ViT, VAE
        if size == 1:
            return None
        if name.endswith("gate_and_up_proj.weight"):
            two_i = shape[0] * size
            return TensorShard((two_i, *rest), _read_up_gate(rank, size, two_i))
        n = shape[1]
        return TensorShard((shape[0], n * size), _read_cols(rank * n, (rank + 1) * n))

    def peer(self, ckpt_key: str) -> str | None:
        m = _EXPERT_RE.match(ckpt_key)
        if m is None or not self.parallel.expert_parallel:
            return None
        if not 0 <= int(m.group(2)) < self.cfg.num_experts:
            return None
        first = self.parallel.expert_range(self.cfg.num_experts).start
        return f"{m.group(1)}{first}{m.group(3)}"


def hunyuan_shard_plan(cfg: HunyuanImage3Config, parallel: ParallelContext | None) -> HunyuanShardPlan | None:
    """The load plan of one rank, or None for the single-process model (everything read whole)."""
    if parallel is None or not parallel.is_parallel:
        return None
    return HunyuanShardPlan(cfg, parallel)


# ------------------------------------------------------------------------------------------ checkpoint scan
def read_checkpoint_index(ckpt_dir: str | Path) -> dict[str, str]:
    """Checkpoint key -> shard file name, from the index's weight_map or the single file's header."""
    root = Path(ckpt_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(str(root), other=[f"{INDEX_FILE} is not a valid index: {e!r}"]) from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(str(root), other=[f"{INDEX_FILE}: weight_map is not an object"])
        return {str(k): str(v) for k, v in weight_map.items()}
    single = root / SINGLE_FILE
    if single.is_file():
        try:
            header = read_shard_header(single)
        except ValueError as e:
            raise CheckpointError(str(root), bad_shards=[f"{SINGLE_FILE}: {e}"]) from None
        return {k: SINGLE_FILE for k in header}
    raise CheckpointError(str(root), other=[f"neither {INDEX_FILE} nor {SINGLE_FILE} found"])


def read_shard_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header without reading data; ValueError says what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"truncated: {size} bytes, no header")
        n = int.from_bytes(prefix, "little")
        if n > _MAX_HEADER_BYTES:
            raise ValueError(f"corrupt: header length {n} exceeds the format's limit")
        if n > size - 8:
            raise ValueError(f"truncated: header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("corrupt header: not a JSON object")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"corrupt header entry for {key!r}") from None
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r} for {key!r}")
        if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype] or begin < 0:
            raise ValueError(f"corrupt header: offsets of {key!r} do not match its shape/dtype")
        if end > data_len:
            raise ValueError(f"truncated: {key!r} ends at byte {end} of a {data_len}-byte data section")
        end_max = max(end_max, end)
        out[key] = TensorInfo(path.name, dtype, shape)
    if end_max != data_len:
        raise ValueError(f"corrupt: data section is {data_len} bytes but tensors cover {end_max}")
    return out


def scan_checkpoint(ckpt_dir: str | Path) -> tuple[dict[str, str], dict[str, TensorInfo], list[str]]:
    """Headers of all shards named by the index: (weight map, readable key -> info, bad-shard messages).

    Keys of a bad shard are absent from the result (the shard message covers them); a key the index puts in a
    shard that lacks it is reported as a bad-shard message too.
    """
    root = Path(ckpt_dir)
    weight_map = read_checkpoint_index(root)
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard, keys in sorted(by_shard.items()):
        path = root / shard
        if not path.is_file():
            problems.append(f"{shard}: missing ({len(keys)} tensors listed in the index)")
            continue
        try:
            header = read_shard_header(path)
        except (ValueError, OSError) as e:
            problems.append(f"{shard}: {e}")
            continue
        absent = [k for k in keys if k not in header]
        if absent:
            problems.append(f"{shard}: lacks keys the index assigns to it: {', '.join(sorted(absent))}")
        for k in keys:
            if k in header:
                infos[k] = header[k]
    return weight_map, infos, problems


# ---------------------------------------------------------------------------------------------- loading
def _selected(name: str, prefixes: Sequence[str] | None) -> bool:
    return prefixes is None or any(name.startswith(p) for p in prefixes)


def load_state_into(
    module: nn.Module,
    ckpt_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    keep_fp32: Callable[[str], bool] = keep_fp32_param,
    key_transforms: Sequence[KeyTransform] = (),
    select_prefixes: Sequence[str] | None = None,
    shard_plan: ShardPlan | None = None,
    quantize: Callable[[str], str | None] | None = None,
) -> list[str]:
    """Load every `module.state_dict()` entry from the checkpoint, strictly; returns the loaded key names.

    dtype: floating tensors are cast to it (None: keep each module tensor's dtype), except names where
    `keep_fp32(name)` holds, which load as fp32. device: None keeps each module tensor's device (meta -> cpu).
    select_prefixes: when given, only checkpoint keys starting with one of them are considered (others are
    ignored, e.g. the VAE when loading a text-only harness); module keys are never filtered.
    shard_plan: a tensor-parallel rank's slicing (`hunyuan_shard_plan`); sharded tensors are validated against
    their full shape and read as slices; None reads every tensor whole (the single-process model).
    quantize: name -> FP8 scale layout ("channel" / "block") for the weights to store as float8_e4m3fn (see
    `fp8_expert_quantizer`), None to keep the name's dtype. Each such tensor is quantised right after it is read
    (this rank's slice), so only the fp8 copy and its scales stay; the owning module gets `weight_scale`.
    Raises CheckpointError (module untouched) listing all missing / unexpected / mis-shaped keys and bad
    shards.
    """
    where = str(ckpt_dir)
    expected = module.state_dict()
    weight_map, infos, bad_shards = scan_checkpoint(ckpt_dir)
    ckpt_keys = {k for k in weight_map if _selected(k, select_prefixes)}
    shards: dict[str, TensorShard] = {}
    peers: dict[str, str] = {}
    if shard_plan is not None:
        for name, t in expected.items():
            rule = shard_plan.shard(name, t)
            if rule is not None:
                shards[name] = rule
        for k in ckpt_keys - expected.keys():
            p = shard_plan.peer(k)
            if p is not None and p in expected:
                peers[k] = p

    def full_shape(name: str) -> tuple[int, ...]:
        return shards[name].full_shape if name in shards else tuple(expected[name].shape)

    missing = sorted(k for k in expected if k not in ckpt_keys)
    unexpected = sorted(k for k in ckpt_keys if k not in expected and k not in peers)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    other: list[str] = []
    for key in sorted((ckpt_keys & expected.keys()) | peers.keys()):
        info = infos.get(key)
        if info is None:  # in a bad shard: already reported
            continue
        name = peers.get(key, key)
        want = full_shape(name)
        if info.shape != want:
            mismatched.append((key, want, info.shape))
        if (info.dtype in _FLOAT_DTYPES) != expected[name].is_floating_point():
            other.append(f"dtype of {key}: checkpoint {info.dtype}, module {expected[name].dtype}")
    if missing or unexpected or mismatched or bad_shards or other:
        raise CheckpointError(where, missing, unexpected, mismatched, bad_shards, other)

    # phase 2: read into fresh tensors; the module is only touched after every read succeeded
    by_shard: dict[str, list[str]] = {}
    for name in expected:
        by_shard.setdefault(infos[name].shard, []).append(name)
    fresh: dict[str, Tensor] = {}
    quantized: dict[str, Fp8Weight] = {}

    def keep(name: str, t: Tensor) -> None:
        layout = quantize(name) if quantize is not None else None
        if layout is None:
            fresh[name] = t
            return
        q = quantize_fp8(t, layout)
        del t  # the high-precision copy goes now, before the next tensor is read
        quantized[name] = q
        fresh[name] = q.qweight

    for shard, names in sorted(by_shard.items()):
        try:
            with safe_open(str(Path(ckpt_dir) / shard), framework="pt", device="cpu") as f:
                for name in names:
                    if name in shards:
                        t = shards[name].read(f, name)
                        if tuple(t.shape) != tuple(expected[name].shape):
                            raise CheckpointError(where, other=[
                                f"shard of {name}: read {list(t.shape)}, module expects {list(expected[name].shape)}"
                            ])
                        keep(name, _prepare(name, t, expected[name], dtype, device, keep_fp32, ()))
                    else:
                        keep(name, _prepare(name, f.get_tensor(name), expected[name], dtype, device, keep_fp32,
                                            key_transforms))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged data
            raise CheckpointError(where, bad_shards=[f"{shard}: unreadable: {e}"]) from e
    module.load_state_dict(fresh, strict=True, assign=True)
    for name, q in quantized.items():
        owner_name, _, attr = name.rpartition(".")
        if attr != "weight":
            raise ValueError(f"only Linear weights can be FP8-quantised, not {name}")
        attach_fp8(module.get_submodule(owner_name), q)
    return sorted(fresh)


_EXPERT_WEIGHT_RE = re.compile(r"(^|\.)mlp\.(experts\.\d+|shared_mlp)\.(gate_and_up_proj|down_proj)\.weight$")


def is_expert_weight(name: str) -> bool:
    """Routed and shared expert projections: the weights `--quantization fp8` stores as FP8 (attention, router,
    embeddings, the dense-layer MLP, ViT and VAE keep their dtype)."""
    return _EXPERT_WEIGHT_RE.search(name) is not None


def fp8_expert_quantizer(quantization: str | None) -> Callable[[str], str | None] | None:
    """`load_state_into(quantize=...)` for a quantization name (None / "none" / "fp8" / "fp8_block")."""
    layout = fp8_layout(quantization)
    if layout is None:
        return None
    return lambda name: layout if is_expert_weight(name) else None


def _prepare(
    name: str,
    t: Tensor,
    current: Tensor,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    keep_fp32: Callable[[str], bool],
    key_transforms: Sequence[KeyTransform],
) -> Tensor:
    if current.is_floating_point():
        target_dtype = torch.float32 if keep_fp32(name) else (dtype or current.dtype)
    else:
        target_dtype = current.dtype
    if device is not None:
        target_device: torch.device | str = device
    else:
        target_device = current.device if current.device.type != "meta" else "cpu"
    for tr in key_transforms:
        if name.endswith(tr.suffix):
            before = t.shape
            t = tr.fn(t)
            if t.shape != before:
                raise ValueError(f"key transform for {tr.suffix!r} changed the shape of {name}")
    out = t.to(device=target_device, dtype=target_dtype)
    if out is t:  # same dtype/device: never keep a tensor that may view the memory map
        out = out.clone()
    return out.contiguous()


def cast_module_(
    module: nn.Module, dtype: torch.dtype, keep_fp32: Callable[[str], bool] = keep_fp32_param
) -> nn.Module:
    """Cast floating parameters and buffers to `dtype` in place, except the `keep_fp32` names (kept fp32)."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if keep_fp32(name) else dtype)
    return module


def load_hunyuan_image_3(
    module: nn.Module,
    ckpt_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    select_prefixes: Sequence[str] | None = None,
    parallel: ParallelContext | None = None,
    quantization: str | None = None,
) -> list[str]:
    """`load_state_into` with the HunyuanImage-3.0 rules: fp32 routers, QKV re-layout per config.json,
    this rank's slices when `parallel` is a tensor-parallel context (the module must be built with it), and FP8
    expert weights when `quantization` is "fp8" / "fp8_block"."""
    cfg = HunyuanImage3Config.from_pretrained(ckpt_dir)
    return load_state_into(
        module,
        ckpt_dir,
        dtype=dtype,
        device=device,
        keep_fp32=keep_fp32_param,
        key_transforms=hunyuan_key_transforms(cfg),
        select_prefixes=select_prefixes,
        shard_plan=hunyuan_shard_plan(cfg, parallel),
        quantize=fp8_expert_quantizer(quantization),
    )
