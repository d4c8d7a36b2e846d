"""Engine configuration: the ONE place where CLI flags and environment variables become an `EngineConfig`.

Everything the engine, the batch CLI, the server and the benchmark harness need to know about how to run is
built here, once, into frozen objects that are passed down; nothing else reads ``os.environ`` or keeps global
mutable configuration.

* `HunyuanImage3Env` - the user's ``DG_HUNYUAN_IMAGE_3_*`` contract (the table in README.md),
  parsed with the diffgentor convention: booleans accept ``true/1/yes/on`` and ``false/0/no/off``
  (case-insensitive), surrounding whitespace is trimmed, an unset or empty variable takes the default, and an
  invalid value raises `EnvVarError` naming the variable, the value and the allowed values.
* `EngineConfig` - one sub-config per concern, each setting in exactly one: `ModelConfig` (checkpoint, dtype,
  device, kernels, quantization, request defaults), `CacheConfig` (KV and encoder caches, GPU share, host heap),
  `SchedulerConfig` (how a step is filled), `ParallelConfig` (rank grid, executor timeouts), plus the env block.
  ``EngineConfig.from_cli_and_env(args, environ)`` builds it; flags win over env vars where both exist
  (``--attn-impl`` / ``--moe-impl`` / ``--tensor-parallel-size`` vs the env block).
* `add_engine_args(parser)` - the engine flags, shared by the CLI and the server.

``DG_HUNYUAN_IMAGE_3_MOE_DROP_TOKENS`` is accepted and validated for compatibility but has no effect: our MoE is
dropless (docs/decisions.md: MoE: dropless) and never materialises a dense dispatch tensor, so dropping would save
no memory.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from diffgentor.engine.parallel_layout import ParallelLayout
from diffgentor.engine.request_contract import BOT_TASKS, MAX_COND_IMAGES
from diffgentor.kernels.impl_names import ATTN_IMPLS, MOE_IMPLS, QUANTIZATIONS

logger = logging.getLogger(__name__)

ENV_PREFIX = "DG_HUNYUAN_IMAGE_3_"
SYSTEM_PROMPT_KINDS = ("None", "dynamic", "en_vanilla", "en_recaption", "en_think_recaption", "en_unified", "custom")
DTYPES = ("float32", "bfloat16", "float16", "auto")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}
_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")

CHECKPOINT_REQUEST_KEYS = ("bot_task", "use_system_prompt", "max_new_tokens")
"""Request defaults that a checkpoint's ``generation_config.json`` also sets (engine/request_defaults.py)."""

TRUE_STRINGS = ("true", "1", "yes", "on")
FALSE_STRINGS = ("false", "0", "no", "off")

GiB = 1 << 30
DEFAULT_CPU_KV_CACHE_BYTES = 2 * GiB
"""KV budget on CPU when neither --num-kv-blocks nor --kv-cache-memory is given."""
CFG_ROWS = 2  # a request's sequences at most: its own and its classifier-free-guidance row
DEFAULT_HEAP_REUSE_BYTES = 4 * GiB
"""Freed host heap an engine process keeps for reuse by default (docs/decisions.md: Host heap reuse)."""


class EnvVarError(ValueError):
    """An environment variable whose value is not one of the allowed values."""

    def __init__(self, name: str, value: str, allowed: str) -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{name}={value!r} is invalid; allowed: {allowed}")


# ---------------------------------------------------------------------------------------------------- parsing
def parse_bool(text: str) -> bool:
    """``true/1/yes/on`` -> True, ``false/0/no/off`` -> False (case-insensitive, trimmed); else ValueError."""
    s = text.strip().lower()
    if s in TRUE_STRINGS:
        return True
    if s in FALSE_STRINGS:
        return False
    raise ValueError(f"{text!r} is not a boolean; allowed: {', '.join(TRUE_STRINGS + FALSE_STRINGS)}")


def _parse_choice(text: str, choices: tuple[str, ...]) -> str:
    s = text.strip()
    for c in choices:
        if s.lower() == c.lower():
            return c
    raise ValueError(f"{text!r} is not one of: {', '.join(choices)}")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) -> (host, port); a clear ValueError otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {text!r} is invalid; expected HOST:PORT, e.g. 10.0.0.1:29600")
    return host, int(port)


def parse_size(text: str | int) -> int:
    """A byte count: plain bytes (``1073741824``) or a number with a unit, case-insensitive.

    ``KiB/MiB/GiB/TiB`` (and the bare letters ``K/M/G/T``) are powers of 1024; ``KB/MB/GB/TB`` are powers of
    1000; ``B`` is bytes. Fractions are allowed with a unit (``1.5GiB``); the result is floored to whole bytes.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r}; expected bytes or a number with a unit like 512MiB, 2GiB, 4GB")
    number, unit = m.group(1), m.group(2).lower()
    if unit in ("", "b") and "." in number:
        raise ValueError(f"invalid size {text!r}: a fractional size needs a unit such as MiB or GiB")
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {m.group(2)!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"
        )
    return int(float(number) * _SIZE_UNITS[unit]) if "." in number else int(number) * _SIZE_UNITS[unit]


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def hf_offline(environ: Mapping[str, str] | None = None) -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE=1): model ids resolve from the local cache only."""
    raw = (os.environ if environ is None else environ).get("HF_HUB_OFFLINE", "")
    return raw.strip().lower() in TRUE_STRINGS


def omp_num_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """``$OMP_NUM_THREADS`` as a positive int (the host's thread budget for this process); None when unset or
    not a positive integer."""
    raw = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n > 0 else None


@dataclass(frozen=True)
class TorchrunRank:
    """A process's coordinates as torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK; the rendezvous itself reads
    MASTER_ADDR / MASTER_PORT, which must be set too)."""

    rank: int
    world_size: int
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TorchrunRank:
        env = os.environ if environ is None else environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(f"tp-worker runs under torchrun (missing {', '.join(missing)}); e.g. torchrun "
                               "--nnodes 2 --node-rank R --nproc-per-node K --master-addr HEAD --master-port 29500 "
                               "-m diffgentor.server.cli tp-worker --connect HEAD:29600")
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------- env block
@dataclass(frozen=True)
class _EnvSpec:
    kind: str  # "int" | "bool" | "choice" | "size" (bytes, `parse_size`)
    minimum: int = 0
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        if self.kind == "bool":
            return ", ".join(TRUE_STRINGS + FALSE_STRINGS)
        if self.kind == "choice":
            return ", ".join(self.choices)
        if self.kind == "size":
            return "a size in bytes or with a unit, e.g. 0, 512MiB, 4GiB"
        return f"an integer >= {self.minimum}"

    def parse(self, text: str) -> Any:
        if self.kind == "bool":
            return parse_bool(text)
        if self.kind == "choice":
            return _parse_choice(text, self.choices)
        if self.kind == "size":
            return parse_size(text)
        s = text.strip()
        if not re.fullmatch(r"[+-]?[0-9]+", s):
            raise ValueError(text)
        value = int(s)
        if value < self.minimum:
            raise ValueError(text)
        return value

    def check(self, name: str, value: Any) -> None:
        """Validate a value given directly (not from a string)."""
        ok = {
            "bool": isinstance(value, bool),
            "choice": value in self.choices,
            "int": _is_int(value) and value >= self.minimum,
            "size": _is_int(value) and value >= 0,
        }[self.kind]
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid; allowed: {self.allowed()}")


_ENV_SPECS: dict[str, _EnvSpec] = {
    "gpus_per_model": _EnvSpec("int", minimum=0),
    "attn_impl": _EnvSpec("choice", choices=ATTN_IMPLS),
    "moe_impl": _EnvSpec("choice", choices=MOE_IMPLS),
    "moe_drop_tokens": _EnvSpec("bool"),
    "quantization": _EnvSpec("choice", choices=QUANTIZATIONS),
    "use_system_prompt": _EnvSpec("choice", choices=SYSTEM_PROMPT_KINDS),
    "bot_task": _EnvSpec("choice", choices=BOT_TASKS),
    "infer_align_image_size": _EnvSpec("bool"),
    "max_new_tokens": _EnvSpec("int", minimum=1),
    "use_taylor_cache": _EnvSpec("bool"),
    "expert_parallel": _EnvSpec("bool"),
    "heap_reuse_memory": _EnvSpec("size"),
}


@dataclass(frozen=True)
class HunyuanImage3Env:
    """The ``DG_HUNYUAN_IMAGE_3_*`` variables, with the contract's defaults.

    ``use_system_prompt`` keeps the contract's spelling: the string ``"None"`` means "no system prompt" (a Python
    ``None`` in a request means "not given, use this default").
    """

    gpus_per_model: int = 0
    """GPUs per model instance; 0 = one instance over all visible GPUs. Default tensor-parallel size."""
    attn_impl: str = "sdpa"
    moe_impl: str = "eager"
    moe_drop_tokens: bool = True
    """Accepted for compatibility; no effect (our MoE is dropless, docs/decisions.md: MoE: dropless)."""
    quantization: str = "none"
    """Expert weights stored as FP8 at load (`--quantization`); none keeps the checkpoint's precision."""
    use_system_prompt: str = "en_unified"
    bot_task: str = "think_recaption"
    infer_align_image_size: bool = True
    max_new_tokens: int = 2048
    use_taylor_cache: bool = False
    expert_parallel: bool = False
    """Tensor-parallel MoE sharded by whole experts instead of by expert width (`--expert-parallel` wins)."""
    heap_reuse_memory: int = DEFAULT_HEAP_REUSE_BYTES
    """Bytes of freed host heap an engine process keeps for reuse (`--heap-reuse-memory` wins); 0 = glibc's
    defaults (engine/allocator.py)."""
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """The fields a variable or a flag set; the others hold the documented defaults (engine/request_defaults.py)."""

    def __post_init__(self) -> None:
        for name, spec in _ENV_SPECS.items():
            spec.check(name, getattr(self, name))
        # a value given in code (not the contract's default) counts as set explicitly too
        changed = {f.name for f in fields(self) if f.name in _ENV_SPECS and getattr(self, f.name) != f.default}
        object.__setattr__(self, "explicit", frozenset(self.explicit) | changed)

    @staticmethod
    def var_name(field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HunyuanImage3Env:
        """Read ``DG_HUNYUAN_IMAGE_3_<NAME>`` from ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, spec in _ENV_SPECS.items():
            var = cls.var_name(name)
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = spec.parse(raw)
            except ValueError:
                raise EnvVarError(var, raw, spec.allowed()) from None
        known = {cls.var_name(n) for n in _ENV_SPECS}
        for var in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known):
            logger.warning("ignoring unknown environment variable %s (known: %s)", var, ", ".join(sorted(known)))
        return cls(**values, explicit=frozenset(values))

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("explicit")
        return out


# ---------------------------------------------------------------------------------------------------- scheduler
@dataclass(frozen=True)
class SchedulerConfig:
    """How the one scheduler fills a step (engine/scheduler.py): `EngineConfig.scheduler`. Validated here; the
    checks that involve other parts (``max_num_batched_tokens`` against ``block_size``) are `EngineConfig`'s."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 8192
    max_num_image_tokens: int | None = None
    """Denoising-block tokens per step, a budget apart from max_num_batched_tokens (prefill and text), so several
    1024x1024 blocks (4099 tokens per CFG row) can share a step; None: one budget for both (the memory plan sizes
    the largest step as their sum)."""
    max_waiting_requests: int = 1024
    max_num_encoder_pixels: int = 1024 * 1024
    """Encoder budget: the encodes in flight (scheduled and not yet reported) cost at most what encoding one image of
    this many pixels costs, each image weighed by its FLOPs (VAE + ViT: the model's `encode_flops`); decodes in
    flight likewise. At least one image is in flight even when it is larger, so any image gets through."""
    async_encode: bool = True
    """Condition-image encodes run beside the steps (a worker thread on CPU, a side stream on CUDA) and are picked
    up by a later step, instead of inside the step that schedules them (engine/encode_stage.py)."""
    async_decode: bool = True
    """VAE decodes of finished images and previews run beside the steps (a worker thread on CPU, a side stream on
    CUDA) and are reported by a later step, instead of inside the step that schedules them (engine/decode_stage.py);
    on CPU a decode in flight pauses the encode thread (a finished image before a queued request's encode)."""
    encode_defer_ms: float | None = None
    """Latency first: while requests without condition images run (short jobs: nothing to encode), a waiting
    request's condition encode is not scheduled, for at most this many milliseconds after its arrival (then it goes
    ahead: no starvation); edits do not wait for other edits. On a CPU, where an encode and the steps share the same
    cores, the text-to-image requests then finish on every core instead of beside a multi-second encode; with
    ``max_num_image_tokens`` 1 (one image's denoising step at a time, first come first served) and ``async_decode``
    off they finish in turn (docs/decisions.md, "Latency first"). None: encodes are scheduled as soon as the encoder
    budget allows."""
    max_step_ms: float | None = None
    """Step-time target: the scheduler caps each step's tokens at what the measured cost per token says fits
    (engine/step_cost.py), so a long prefill is chunked and running requests see bounded inter-token and
    inter-step times; decode tokens go first, an image block still runs whole. None: only max_num_batched_tokens."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests", "max_num_encoder_pixels"):
            _check_positive(name, getattr(self, name))
        if self.max_num_image_tokens is not None:
            _check_positive("max_num_image_tokens", self.max_num_image_tokens)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running sequence needs at least one token per step"
            )
        for name in ("async_encode", "async_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        ms = self.max_step_ms
        if ms is not None and (not _is_number(ms) or not 0 < ms < math.inf):
            raise ValueError(f"max_step_ms must be a positive number of milliseconds, got {ms!r}")
        ms = self.encode_defer_ms
        if ms is not None and (not _is_number(ms) or not 0 <= ms < math.inf):
            raise ValueError(f"encode_defer_ms must be a non-negative number of milliseconds, got {ms!r}")


def _check_positive(name: str, v: Any) -> None:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_seconds(name: str, v: Any) -> None:
    if not _is_number(v) or not 0 < v < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")


SCHEDULER_KEYS = tuple(f.name for f in fields(SchedulerConfig))
"""The `from_cli_and_env` keys (flags) that go to `EngineConfig.scheduler`."""


# ---------------------------------------------------------------------------------------------------- parallel
@dataclass(frozen=True)
class ParallelConfig:
    """The rank grid of one model instance and how the executor drives its rank processes (engine/tp/executor.py):
    `EngineConfig.parallel`. ``tensor_parallel_size`` and ``expert_parallel`` given as ``None`` are taken from the
    env block (GPUS_PER_MODEL, EXPERT_PARALLEL) by `EngineConfig`."""

    tensor_parallel_size: int | None = None
    """0 = all visible devices (see `EngineConfig.resolve_tensor_parallel_size`)."""
    cfg_parallel_size: int = 1
    """CFG groups (1 or 2), each a full tensor-parallel model copy: the conditional and unconditional rows of a
    request with classifier-free guidance run on different groups (engine/parallel_layout.py)."""
    sequence_parallel_size: int = 1
    """Ranks that split one image block's tokens (Ulysses) inside each model copy."""
    rank_endpoint: str | None = None
    """HOST:PORT this process binds for tensor-parallel ranks started elsewhere (torchrun, possibly on several
    nodes: `diffgentor tp-worker --connect HOST:PORT`) instead of spawning them; uses PORT .. PORT + size."""
    expert_parallel: bool | None = None
    """Tensor-parallel MoE sharded by whole experts instead of by expert width; None = the env block's."""
    ready_timeout_s: float = 600.0
    """How long the executor waits for every rank to load its shard and report ready."""
    step_timeout_s: float = 600.0
    """A step the ranks do not answer within this fails its requests (a hung rank)."""
    pg_timeout_s: float = 120.0
    """torch.distributed's own timeout: ends collectives blocked on a dead peer."""
    poll_s: float = 0.2
    """How often the executor checks its rank processes while it waits for them."""
    heartbeat_timeout_s: float = 5.0
    """External ranks silent for longer than this are taken as dead."""
    num_threads: int | None = None
    """Torch threads of each rank process; None: on CPU this process's share (OMP_NUM_THREADS) split over the
    ranks, on CUDA torch's default."""

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if tp is not None and (not _is_int(tp) or tp < 0):
            raise ValueError(f"tensor_parallel_size must be an integer >= 0 (0 = all visible devices), got {tp!r}")
        if self.expert_parallel is not None and not isinstance(self.expert_parallel, bool):
            raise ValueError(f"expert_parallel must be a bool, got {self.expert_parallel!r}")
        for name in ("ready_timeout_s", "step_timeout_s", "pg_timeout_s", "poll_s", "heartbeat_timeout_s"):
            _check_seconds(name, getattr(self, name))
        if self.num_threads is not None:
            _check_positive("num_threads", self.num_threads)
        layout = ParallelLayout(tp=max(tp or 0, 1), cfg=self.cfg_parallel_size, sp=self.sequence_parallel_size)
        if self.rank_endpoint is not None:
            host, port = parse_endpoint(self.rank_endpoint)
            if tp is not None and (tp == 0 or layout.world_size < 2):
                raise ValueError(f"rank_endpoint={self.rank_endpoint!r} needs an explicit layout of >= 2 ranks "
                                 "(tensor_parallel_size x cfg_parallel_size x sequence_parallel_size; the ranks run "
                                 "elsewhere, so the visible devices do not say how many)")
            if port + layout.world_size > 65535:
                raise ValueError(f"rank_endpoint port {port} + {layout.world_size} ranks is past 65535")


PARALLEL_KEYS = tuple(f.name for f in fields(ParallelConfig))
"""The `from_cli_and_env` keys (flags) that go to `EngineConfig.parallel`."""


# ---------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint runs, where, in what precision and with which kernels, and the defaults of requests that
    leave a setting out: `EngineConfig.model`. ``attn_impl``, ``moe_impl`` and ``quantization`` given as ``None``
    are the env block's (resolved by `EngineConfig`). ``dtype`` aliases (bf16, fp16, half, fp32, float) are
    normalised to the canonical names."""

    checkpoint: str | None = None
    """A checkpoint folder, or a Hugging Face model id until `EngineConfig.with_local_checkpoint` resolves it."""
    revision: str | None = None
    """A Hugging Face model id's branch, tag or commit."""
    download_dir: str | None = None
    """The Hugging Face cache folder for model ids (default: huggingface_hub's, e.g. ~/.cache/huggingface/hub)."""
    hf_offline: bool = False
    """Resolve model ids from the cache only (HF_HUB_OFFLINE)."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (auto = bfloat16 on CUDA, float32 on CPU)."""
    device: str = "auto"
    """cpu | cuda | cuda:N | auto (auto = cuda when available, else cpu)."""
    quantization: str | None = None
    """none | fp8 | fp8_block: expert weights quantised at load; None = the env block's QUANTIZATION."""
    attn_impl: str | None = None
    moe_impl: str | None = None
    attn_impl_explicit: bool | None = field(default=None, compare=False)
    """An attention implementation was asked for (argument, flag or DG_HUNYUAN_IMAGE_3_ATTN_IMPL); when not, CUDA
    tries FlashInfer first (`wants_flashinfer_attention`). None: whether ``attn_impl`` was given."""
    enforce_eager: bool = False
    """Never use CUDA graphs (decode-only steps are captured per batch-size bucket and replayed on CUDA otherwise;
    see `engine.cuda_graph`)."""
    flashinfer_warmup_s: float = 600.0
    """Start-up budget for building and running once every FlashInfer kernel the engine would use (its JIT
    compiles at first use); what is not proven by then runs on the torch path (`engine.kernel_warmup`)."""
    seed: int | None = None
    """The seed of a request that gives none; None: 42 in the offline engine, a random seed per request when served."""
    default_num_inference_steps: int | None = None
    """None = the checkpoint's generation_config value."""
    default_guidance_scale: float | None = None
    """The guidance scale of a request that gives none (the batch CLI's ``--guidance_scale``); None = the
    checkpoint's generation_config value."""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass: normalise in place
        if self.attn_impl_explicit is None:
            set_("attn_impl_explicit", self.attn_impl is not None)
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            set_("checkpoint", os.fspath(self.checkpoint))
        dtype = self.dtype.strip().lower() if isinstance(self.dtype, str) else self.dtype
        dtype = _DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
        set_("dtype", dtype)
        device = self.device.strip().lower() if isinstance(self.device, str) else self.device
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            raise ValueError(f"device={self.device!r} is invalid; allowed: cpu, cuda, cuda:N, auto")
        set_("device", device)
        if self.attn_impl is not None and self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is invalid; allowed: {', '.join(ATTN_IMPLS)}")
        if self.moe_impl is not None and self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r} is invalid; allowed: {', '.join(MOE_IMPLS)}")
        if self.quantization is not None:
            quant = self.quantization.strip().lower().replace("-", "_") if isinstance(self.quantization, str) else None
            if quant not in QUANTIZATIONS:
                raise ValueError(f"quantization={self.quantization!r} is invalid; allowed: {', '.join(QUANTIZATIONS)}")
            set_("quantization", quant)
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        budget = self.flashinfer_warmup_s
        if not _is_number(budget) or not budget >= 0:
            raise ValueError(f"flashinfer_warmup_s must be a number of seconds >= 0, got {budget!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.default_num_inference_steps is not None:
            _check_positive("default_num_inference_steps", self.default_num_inference_steps)
        g = self.default_guidance_scale
        if g is not None and (not _is_number(g) or not 0 <= g < math.inf):
            raise ValueError(f"default_guidance_scale must be a finite number >= 0, got {g!r}")

    def resolve_device(self, cuda_available: bool | None = None) -> str:
        """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; other values unchanged."""
        if self.device != "auto":
            return self.device
        if cuda_available is None:
            cuda_available = _cuda_available()
        return "cuda" if cuda_available else "cpu"

    def on_cuda(self, cuda_available: bool | None = None) -> bool:
        return self.resolve_device(cuda_available).startswith("cuda")

    def wants_flashinfer_attention(self, cuda_available: bool | None = None) -> bool:
        """FlashInfer attention is tried (and proven at start-up) when asked for, or on CUDA when no attention
        implementation was asked for; `sdpa` is what runs otherwise and when FlashInfer is not proven."""
        return self.attn_impl == "flashinfer" or (not self.attn_impl_explicit and self.on_cuda(cuda_available))

    def resolve_dtype(self, cuda_available: bool | None = None) -> str:
        """``auto`` -> ``bfloat16`` on CUDA, ``float32`` on CPU; other values unchanged."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.on_cuda(cuda_available) else "float32"

    def torch_dtype(self, cuda_available: bool | None = None):
        import torch

        return getattr(torch, self.resolve_dtype(cuda_available))


MODEL_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("checkpoint", "attn_impl_explicit"))
"""The `from_cli_and_env` keys (flags) that go to `EngineConfig.model` (``model`` / ``model_name`` is its
``checkpoint``)."""


# ---------------------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CacheConfig:
    """What the engine keeps in memory and how much: the paged KV cache (engine/kv_cache_manager.py), the encoder
    cache of condition images, the GPU share (engine/memory_plan.py) and the host heap an engine process reuses
    (engine/allocator.py): `EngineConfig.cache`. ``heap_reuse_bytes`` given as ``None`` is the env block's."""

    block_size: int = 16
    """Tokens per KV block, a power of two."""
    num_kv_blocks: int | None = None
    """Explicit KV block count; wins over every budget."""
    kv_cache_memory_bytes: int | None = None
    """Explicit KV budget in bytes; used when num_kv_blocks is not given."""
    gpu_memory_utilization: float = 0.9
    """Fraction of each GPU's TOTAL memory the engine may use (weights + activations + workspace + KV cache);
    `engine.memory_plan` sizes the KV cache from it (vLLM's meaning of the name)."""
    enable_prefix_caching: bool = True
    encoder_cache_bytes: int = 512 * 1024 * 1024
    """Bound of the encoder cache (posterior parameters and ViT outputs by image digest and bucket), LRU."""
    heap_reuse_bytes: int | None = None
    """Freed host heap an engine process keeps for the next large CPU tensor instead of unmapping it (0 = glibc's
    defaults: every large tensor is mapped and faulted in anew); None = the env block's HEAP_REUSE_MEMORY. See
    `engine.allocator`."""
    heap_idle_release_s: float = 1.0
    """Seconds an engine stays idle before it hands its freed host heap back to the OS."""

    def __post_init__(self) -> None:
        for name in ("block_size", "encoder_cache_bytes"):
            _check_positive(name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_memory_bytes"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        heap = self.heap_reuse_bytes
        if heap is not None and (not _is_int(heap) or heap < 0):
            raise ValueError(f"heap_reuse_bytes must be a byte count >= 0 (0 = off), got {heap!r}")
        idle = self.heap_idle_release_s
        if not _is_number(idle) or not (0.0 <= idle < math.inf):
            raise ValueError(f"heap_idle_release_s must be a number of seconds >= 0, got {idle!r}")
        util = self.gpu_memory_utilization
        if not _is_number(util) or not (0.0 < util <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")

    def max_blocks_per_seq(self, max_tokens: int) -> int:
        return math.ceil(max_tokens / self.block_size)


CACHE_KEYS = tuple(f.name for f in fields(CacheConfig))
"""The `from_cli_and_env` keys (flags) that go to `EngineConfig.cache`."""


# ---------------------------------------------------------------------------------------------------- server
MiB = 1 << 20
DEFAULT_MAX_IMAGE_BYTES = 20 * MiB
"""The largest image file taken by default, by either front end: one upload or fetched URL of the API server
(`serve --max-upload-bytes`), one local or embedded image file of a batch row."""
DEFAULT_MAX_UPLOAD_BYTES = DEFAULT_MAX_IMAGE_BYTES
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_PROMPT_CHARS = 32000
DEFAULT_MAX_REQUEST_BYTES = 64 * MiB
DEFAULT_FETCH_DEADLINE_S = 20.0
"""One image URL's whole download (server/url_fetch.py)."""
DEFAULT_INFLIGHT_BYTES = 512 * MiB
DEFAULT_BODY_IDLE_TIMEOUT_S = 30.0
DEFAULT_BODY_DEADLINE_S = 300.0
DEFAULT_HEAD_TIMEOUT_S = 10.0
DEFAULT_MAX_REQUEST_COST_BYTES = 2048 * MiB
DEFAULT_MAX_QUEUED_COST_BYTES = 8192 * MiB


@dataclass(frozen=True)
class ServerConfig:
    """What one client can make the API server hold or do (server/http/): `EngineConfig.server`, built from the
    ``serve`` flags by `from_cli_and_env` like every other setting."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    """One image file (upload or fetched URL)."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """One whole request body."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Decompression bombs are refused from the image header, before decoding."""
    max_output_side: int = 4096
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_images: int = MAX_COND_IMAGES
    min_image_side: int = 4
    """SigLIP2 preprocessing (transformers) takes a 1-pixel-high image for channels-first and fails on it."""
    max_n: int = 10
    allow_url_fetch: bool = False
    """Image URLs are fetched only when allowed, under server/url_fetch.py's policy."""
    allowed_url_hosts: tuple[str, ...] = ()
    fetch_deadline_s: float = DEFAULT_FETCH_DEADLINE_S
    """One image, the whole download."""
    request_fetch_deadline_s: float = 2 * DEFAULT_FETCH_DEADLINE_S
    """Every image of one request."""
    max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    """Uploads and downloads held by all requests in flight (server/http/limits.py)."""
    body_idle_timeout_s: float = DEFAULT_BODY_IDLE_TIMEOUT_S
    body_deadline_s: float = DEFAULT_BODY_DEADLINE_S
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    max_request_cost_bytes: int = DEFAULT_MAX_REQUEST_COST_BYTES
    """The memory one request may cost (server/http/request_cost.py)."""
    max_queued_cost_bytes: int = DEFAULT_MAX_QUEUED_COST_BYTES
    """The memory cost of all admitted requests."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "allow_url_fetch":
                if not isinstance(v, bool):
                    raise ValueError(f"allow_url_fetch must be a bool, got {v!r}")
            elif f.name == "allowed_url_hosts":
                object.__setattr__(self, f.name, tuple(v))
            elif f.name.endswith("_s"):
                _check_seconds(f.name, v)
            else:
                _check_positive(f.name, v)


SERVER_KEYS = tuple(f.name for f in fields(ServerConfig))
"""The `from_cli_and_env` keys that go to `EngineConfig.server` (the ``serve`` flags spell some differently:
`SERVE_FLAG_KEYS`)."""
SERVE_FLAG_KEYS = {"allowed_url_fetch": "allow_url_fetch", "header_timeout_s": "head_timeout_s",
                   "body_timeout_s": "body_idle_timeout_s"}
"""``serve`` flag -> `ServerConfig` field, where the names differ (``--url-fetch-timeout-s`` and the ``*_mib`` cost
flags are converted in `from_cli_and_env`)."""


# ---------------------------------------------------------------------------------------------------- engine
@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: one frozen object of sub-configs, each setting in exactly one of them (the model, its
    memory, the scheduler, the rank grid, the HTTP server's limits) plus the ``DG_HUNYUAN_IMAGE_3_*`` env block.
    Build it with `from_cli_and_env`; every sub-config validates itself, and ``__post_init__`` resolves what a
    sub-config leaves to the env block (attention, MoE and quantization, tensor-parallel size, expert parallelism,
    heap reuse) and checks what involves two of them.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The checkpoint, its device, dtype and kernels, and request defaults."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """KV cache, encoder cache, GPU memory share and host heap reuse."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """How the one scheduler fills a step."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The rank grid and the executor's settings."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The API server's limits on what a client can make it hold or do."""
    env: HunyuanImage3Env = field(default_factory=HunyuanImage3Env)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass: resolve in place
        for name, kind in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig),
                           ("parallel", ParallelConfig), ("server", ServerConfig), ("env", HunyuanImage3Env)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        env, m = self.env, self.model
        fill: dict[str, Any] = {}
        if m.attn_impl is None:
            fill.update(attn_impl=env.attn_impl, attn_impl_explicit="attn_impl" in env.explicit)
        if m.moe_impl is None:
            fill["moe_impl"] = env.moe_impl
        if m.quantization is None:
            fill["quantization"] = env.quantization
        if fill:
            set_("model", replace(m, **fill))
        par = {}
        if self.parallel.tensor_parallel_size is None:
            par["tensor_parallel_size"] = env.gpus_per_model
        if self.parallel.expert_parallel is None:
            par["expert_parallel"] = env.expert_parallel
        if par:
            set_("parallel", replace(self.parallel, **par))
        if self.cache.heap_reuse_bytes is None:
            set_("cache", replace(self.cache, heap_reuse_bytes=env.heap_reuse_memory))
        tokens, block = self.scheduler.max_num_batched_tokens, self.cache.block_size
        if tokens < block:
            raise ValueError(f"max_num_batched_tokens ({tokens}) must be >= block_size ({block})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cli_and_env(
        cls, args: argparse.Namespace | Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> EngineConfig:
        """Build the config from parsed flags (`add_engine_args`) and ``DG_HUNYUAN_IMAGE_3_*`` variables.

        ``args`` may be an ``argparse.Namespace`` or a mapping; unknown keys are ignored and ``None`` means "not
        given". Flags win over env vars: ``attn_impl``, ``moe_impl`` and ``tensor_parallel_size`` override the
        env block's ATTN_IMPL, MOE_IMPL and GPUS_PER_MODEL (the env block itself keeps what the environment said),
        and keys named like an env field (``bot_task``, ``max_new_tokens``, ...) override that field. The
        `SchedulerConfig` keys (``max_num_seqs``, ``max_num_batched_tokens``, ``max_num_image_tokens``,
        ``max_waiting_requests``, ``max_num_encoder_pixels``, ``async_encode``) go to ``scheduler``; the
        `ParallelConfig` keys (``tensor_parallel_size``, ``cfg_parallel_size``, ``sequence_parallel_size``,
        ``rank_endpoint``, ``expert_parallel`` and the executor's timeouts) go to ``parallel``; the `CacheConfig`
        keys to ``cache`` and the `ModelConfig` keys to ``model`` (``model`` / ``model_name`` is its checkpoint).
        Other spellings: ``torch_dtype`` (dtype), ``num_inference_steps`` / ``guidance_scale`` (the defaults),
        ``flashinfer_warmup_timeout``, and sizes as bytes or strings: ``kv_cache_memory``, ``heap_reuse_memory``,
        ``encoder_cache_memory``. The `ServerConfig` keys go to ``server``, with the ``serve`` flags' spellings
        (`SERVE_FLAG_KEYS`, ``url_fetch_timeout_s``, ``max_request_cost_mib``, ``max_queued_cost_mib``).
        """
        if args is None:
            a: dict[str, Any] = {}
        elif isinstance(args, argparse.Namespace):
            a = dict(vars(args))
        else:
            a = dict(args)
        given = {k: v for k, v in a.items() if v is not None}

        env = HunyuanImage3Env.from_environ(environ)
        env_overrides = {}
        for name, spec in _ENV_SPECS.items():
            if name in ("gpus_per_model", "attn_impl", "moe_impl", "quantization", "heap_reuse_memory",
                        "expert_parallel") or name not in given:
                continue  # these are overridden through EngineConfig's own fields
            value = given[name]
            if isinstance(value, str):
                try:
                    value = spec.parse(value)
                except ValueError:
                    raise ValueError(f"{name}={value!r} is invalid; allowed: {spec.allowed()}") from None
            env_overrides[name] = value
        if env_overrides:
            env = HunyuanImage3Env(**{**asdict(env), **env_overrides, "explicit": env.explicit | set(env_overrides)})

        def first(*keys: str) -> Any:
            for k in keys:
                if k in given:
                    return given[k]
            return None

        flat: dict[str, Any] = {k: v for k, v in given.items() if k in SCHEDULER_KEYS + PARALLEL_KEYS + CACHE_KEYS
                                + MODEL_KEYS}
        aliases = {  # a key's other spellings (the batch CLI's, sizes given as strings)
            "dtype": ("torch_dtype",),
            "default_num_inference_steps": ("num_inference_steps",),
            "default_guidance_scale": ("guidance_scale",),
            "flashinfer_warmup_s": ("flashinfer_warmup_timeout",),
            "kv_cache_memory_bytes": ("kv_cache_memory",),
            "heap_reuse_bytes": ("heap_reuse_memory",),
            "encoder_cache_bytes": ("encoder_cache_memory",),
        }
        for key, others in aliases.items():
            v = first(key, *others)
            if v is not None:
                flat[key] = v
        for key in ("kv_cache_memory_bytes", "heap_reuse_bytes", "encoder_cache_bytes"):
            if key in flat:
                flat[key] = parse_size(flat[key])
        for k, choices in (("attn_impl", ATTN_IMPLS), ("moe_impl", MOE_IMPLS)):
            if isinstance(flat.get(k), str):
                try:
                    flat[k] = _parse_choice(flat[k], choices)
                except ValueError:
                    raise ValueError(f"{k}={flat[k]!r} is invalid; allowed: {', '.join(choices)}") from None
        server = {SERVE_FLAG_KEYS.get(k, k): v for k, v in given.items()
                  if SERVE_FLAG_KEYS.get(k, k) in SERVER_KEYS}
        if "url_fetch_timeout_s" in given:
            server["fetch_deadline_s"] = given["url_fetch_timeout_s"]
            server["request_fetch_deadline_s"] = 2 * given["url_fetch_timeout_s"]
        for flag, key in (("max_request_cost_mib", "max_request_cost_bytes"),
                          ("max_queued_cost_mib", "max_queued_cost_bytes")):
            if flag in given:
                server[key] = given[flag] * MiB
        model = first("model", "model_name")
        return cls(
            model=ModelConfig(checkpoint=None if model is None else os.fspath(model), hf_offline=hf_offline(environ),
                              **{k: flat[k] for k in MODEL_KEYS if k in flat and k != "hf_offline"}),
            cache=CacheConfig(**{k: flat[k] for k in CACHE_KEYS if k in flat}),
            scheduler=SchedulerConfig(**{k: flat[k] for k in SCHEDULER_KEYS if k in flat}),
            parallel=ParallelConfig(**{k: flat[k] for k in PARALLEL_KEYS if k in flat}),
            server=ServerConfig(**server),
            env=env,
        )

    # ------------------------------------------------------------------ resolution helpers
    def resolve_tensor_parallel_size(self, num_visible_devices: int | None = None) -> int:
        """Tensor-parallel ranks of each model copy: the configured size, or when it is 0 all visible devices over
        the CFG and sequence-parallel sizes (at least 1)."""
        return self.parallel_layout(num_visible_devices).tp

    def parallel_layout(self, num_visible_devices: int | None = None) -> ParallelLayout:
        """The rank grid of one model instance (tp x cfg x sp, engine/parallel_layout.py).

        ``num_visible_devices`` defaults to ``torch.cuda.device_count()`` on CUDA and 1 on CPU. A layout of more
        ranks than visible devices is an error on CUDA (one GPU per rank), unless the ranks are external."""
        cuda = self.model.on_cuda(None if num_visible_devices is None else num_visible_devices > 0)
        if num_visible_devices is None:
            num_visible_devices = _cuda_device_count() if cuda else 1
        par = self.parallel
        other = par.cfg_parallel_size * par.sequence_parallel_size
        tp = par.tensor_parallel_size or max(1, num_visible_devices // other)
        layout = ParallelLayout(tp=tp, cfg=par.cfg_parallel_size, sp=par.sequence_parallel_size)
        if cuda and layout.world_size > num_visible_devices and par.rank_endpoint is None:
            raise ValueError(f"the layout {layout.describe()} (--tensor-parallel-size x --cfg-parallel-size x "
                             f"--sequence-parallel-size) needs one GPU per rank, but only {num_visible_devices} "
                             "device(s) are visible")
        return layout

    @property
    def ranks_per_instance(self) -> int:
        """GPUs (rank processes) one model instance takes: tp x cfg x sp, or 0 with tp 0 (all visible devices)."""
        par = self.parallel
        tp = par.tensor_parallel_size
        return tp * par.cfg_parallel_size * par.sequence_parallel_size if tp else 0

    def resolve_world_size(self, num_visible_devices: int | None = None) -> int:
        """Rank processes (GPUs) per model instance: tp x cfg x sp."""
        return self.parallel_layout(num_visible_devices).world_size

    def num_instances(self, num_visible_devices: int) -> int:
        """Model instances side by side (data parallel): visible devices // ranks per instance (at least 1)."""
        return max(1, num_visible_devices // self.resolve_world_size(num_visible_devices))

    def kv_cache_budget_bytes(self, cuda_available: bool | None = None) -> int:
        """Bytes for the KV cache when no explicit block count is given: ``kv_cache_memory_bytes`` if set, else on
        CPU `DEFAULT_CPU_KV_CACHE_BYTES`; on CUDA the memory plan sizes the cache instead (engine/memory_plan.py)."""
        if self.cache.kv_cache_memory_bytes is not None:
            return self.cache.kv_cache_memory_bytes
        if self.model.on_cuda(cuda_available):
            raise ValueError("on CUDA the memory plan sizes the KV cache; set --kv-cache-memory or --num-kv-blocks "
                             "to size it yourself")
        return DEFAULT_CPU_KV_CACHE_BYTES

    def resolve_num_blocks(
        self, bytes_per_block: int, cuda_available: bool | None = None, max_model_len: int | None = None,
    ) -> int:
        """KV blocks to allocate: ``num_kv_blocks`` if given, else `kv_cache_budget_bytes` // ``bytes_per_block``.
        On CPU without an explicit size (`num_kv_blocks`, `kv_cache_memory_bytes`), no more than ``max_num_seqs``
        requests at ``max_model_len`` tokens with a CFG row each can use: a small model gets a small cache instead of
        the whole default budget.

        ``bytes_per_block`` is the size of one block across all layers (K and V) on one rank. Raises ValueError
        when the budget does not hold a single block.
        """
        if self.cache.num_kv_blocks is not None:
            return self.cache.num_kv_blocks
        if not _is_int(bytes_per_block) or bytes_per_block <= 0:
            raise ValueError(f"bytes_per_block must be a positive integer, got {bytes_per_block!r}")
        budget = self.kv_cache_budget_bytes(cuda_available)
        n = budget // bytes_per_block
        explicit = self.cache.kv_cache_memory_bytes is not None
        if max_model_len is not None and not explicit and not self.model.on_cuda(cuda_available):
            n = min(n, self.scheduler.max_num_seqs * CFG_ROWS * self.cache.max_blocks_per_seq(max_model_len))
        if n < 1:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds no block of {bytes_per_block} bytes; "
                "raise --kv-cache-memory or set --num-kv-blocks"
            )
        return n

    def with_local_checkpoint(self) -> EngineConfig:
        """This config with `model.checkpoint` as a local folder: a Hugging Face repo id is resolved (and downloaded
        unless offline) through engine/model_source.py; a folder stays as it is. Raises CheckpointNotFound."""
        from diffgentor.engine.model_source import resolve_checkpoint

        m = self.model
        if m.checkpoint is None:
            return self
        path = resolve_checkpoint(m.checkpoint, m.revision, m.download_dir, offline=m.hf_offline)
        return self if str(path) == m.checkpoint else replace(self, model=replace(m, checkpoint=str(path)))

    # ------------------------------------------------------------------ logging
    def describe(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of every setting, for the startup log."""
        out: dict[str, Any] = {f.name: asdict(v) if is_dataclass(v) else v
                               for f in fields(self) if f.name != "env" for v in (getattr(self, f.name),)}
        out["env"] = self.env.describe()
        out["moe_drop_tokens_effective"] = False  # dropless MoE (docs/decisions.md: MoE: dropless)
        return out


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _cuda_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


# ---------------------------------------------------------------------------------------------------- flags
def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the engine flags (shared by ``diffgentor edit/t2i/serve/bench``). Every default is ``None`` so
    `EngineConfig.from_cli_and_env` can tell "not given" (env var or built-in default applies) from "given".

    ``--dtype`` also answers to diffgentor's ``--torch_dtype``. Model path and ``--seed`` are left to the caller
    (the diffgentor CLI defines ``--model_name`` and ``--seed`` itself); `from_cli_and_env` reads them.
    """
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--dtype",
        "--torch_dtype",
        "--torch-dtype",
        dest="dtype",
        default=None,
        choices=DTYPES + tuple(_DTYPE_ALIASES),
        help="weights/activations dtype; auto = bfloat16 on CUDA, float32 on CPU (default auto)",
    )
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default auto)")
    g.add_argument("--revision", default=None,
                   help="with a Hugging Face model id: the branch, tag or commit to use (default: main)")
    g.add_argument("--download-dir", "--download_dir", dest="download_dir", default=None, metavar="DIR",
                   help="with a Hugging Face model id: the cache folder to download to and read from (default: "
                   "huggingface_hub's, ~/.cache/huggingface/hub or $HF_HUB_CACHE); HF_HUB_OFFLINE=1 reads it only")
    g.add_argument("--max-num-seqs", type=int, default=None, help="max requests running at once (default 16)")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step (default 8192)"
    )
    g.add_argument(
        "--max-num-image-tokens", type=int, default=None,
        help="denoising-block tokens per step, apart from --max-num-batched-tokens (default: they share it)",
    )
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block, a power of two (default 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV block count (overrides any budget)")
    g.add_argument(
        "--kv-cache-memory",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="KV cache budget: bytes or e.g. 512MiB, 2GiB, 4GB (default: on CUDA what the memory plan leaves "
        "under --gpu-memory-utilization; 2GiB on CPU)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="ranks per model instance; 0 = all visible GPUs (default: DG_HUNYUAN_IMAGE_3_GPUS_PER_MODEL)",
    )
    g.add_argument(
        "--cfg-parallel-size",
        type=int,
        default=None,
        help="1 or 2: CFG groups, each a --tensor-parallel-size copy of the model; the conditional and unconditional "
        "rows of each image step run on different groups (non-distilled Instruct with CFG), requests without CFG "
        "are spread over the groups (default 1). Ranks = tp x cfg x sp",
    )
    g.add_argument(
        "--sequence-parallel-size",
        type=int,
        default=None,
        help="ranks splitting one image block's tokens inside each model copy (Ulysses; default 1)",
    )
    g.add_argument(
        "--rank-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="multi-node: bind HOST:PORT (and the next SIZE ports) and wait for --tensor-parallel-size ranks started "
        "by torchrun running `diffgentor tp-worker --connect HEAD:PORT`, instead of spawning local ranks",
    )
    g.add_argument(
        "--attn-impl",
        default=None,
        choices=ATTN_IMPLS,
        help="attention kernels (default: DG_HUNYUAN_IMAGE_3_ATTN_IMPL, else FlashInfer on CUDA when its kernels "
        "build and pass at start-up, else sdpa)",
    )
    g.add_argument(
        "--moe-impl", default=None, choices=MOE_IMPLS, help="MoE kernels (default: DG_HUNYUAN_IMAGE_3_MOE_IMPL, eager)"
    )
    g.add_argument(
        "--quantization",
        default=None,
        type=lambda s: s.strip().lower().replace("-", "_"),
        choices=QUANTIZATIONS,
        help="expert weights quantised at load: fp8 (per-channel scales) or fp8_block (128x128 block scales); "
        "default: DG_HUNYUAN_IMAGE_3_QUANTIZATION, none",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of each GPU's total memory the engine may use; sizes the KV cache (default 0.9)",
    )
    g.add_argument(
        "--flashinfer-warmup-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start-up budget for building and proving FlashInfer's kernels (JIT); what is not proven in time runs "
        "on the torch path (default 600)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="never capture CUDA graphs: decode-only steps run eagerly too (graphs are only ever used on CUDA)",
    )
    g.add_argument(
        "--heap-reuse-memory",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="freed host memory an engine process keeps for reuse by large CPU tensors instead of returning it to "
        "the OS on every free; 0 = glibc's defaults (default: DG_HUNYUAN_IMAGE_3_HEAP_REUSE_MEMORY, 4GiB)",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=None,
        help="disable automatic prefix caching of KV blocks",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="queue length before new requests are refused (default 1024)",
    )
    g.add_argument(
        "--max-num-encoder-pixels",
        type=int,
        default=None,
        help="encodes (and decodes) in flight cost at most one image of this many pixels, each image weighed by its "
        "FLOPs (default 1048576; at least one image at a time)",
    )
    g.add_argument(
        "--no-async-encode",
        dest="async_encode",
        action="store_false",
        default=None,
        help="encode condition images inside the engine step that schedules them (default: beside the steps, "
        "picked up by a later step)",
    )
    g.add_argument(
        "--encode-defer-ms",
        type=float,
        default=None,
        help="latency first: a queued request's condition encode waits while requests without images run, at most "
        "this many milliseconds after its arrival (with --max-num-image-tokens 1, text-to-image requests finish in "
        "turn; default: encodes start as soon as the encoder budget allows)",
    )
    g.add_argument(
        "--max-step-ms",
        type=float,
        default=None,
        help="step-time target in milliseconds: each step's prefill is sized from the measured cost per token so "
        "running requests' think tokens and denoising steps are not held up by long prompts (default: none)",
    )
    g.add_argument(
        "--no-async-decode",
        dest="async_decode",
        action="store_false",
        default=None,
        help="VAE-decode finished images and previews inside the engine step that schedules them (default: beside "
        "the steps, reported by a later step)",
    )
    g.add_argument(
        "--encoder-cache-memory",
        default=None,
        help="bound of the encoder cache of condition images, bytes or a size such as 512MiB (default 512MiB)",
    )
    return parser
