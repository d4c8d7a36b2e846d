"""No device-to-host syncs inside the backbone forward (docs/decisions.md).

On a GPU every `.item()`, `int(t)`, `.tolist()`, `bool(t)`, `nonzero` or boolean-mask index inside a layer stalls
the stream until the device catches up. CPU tensors never stall, so the test makes those calls RAISE while the
backbone's forward runs (entered in a forward pre-hook, left in a forward hook) and drives one engine step that
holds a prefill, a decode and a diffusion chunk at once.

Nothing is allow-listed: the grouped MoE (`kernels.moe`) is sync-free as well (torch._grouped_mm runs on CPU
here; only its per-expert fallback reads group sizes on the host).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from diffgentor.engine.models.hunyuan_image_3.backbone import HunyuanImage3Backbone
from diffgentor.engine.offline import Engine
from diffgentor.engine.testing.tiny_model import make_tiny
from diffgentor.kernels import flashinfer_attention
from diffgentor.kernels.attention import AttentionMetadata, SequenceChunk

Tensor = torch.Tensor
aten = torch.ops.aten

SYNC_FUNCTIONS = {
    Tensor.item, Tensor.tolist, Tensor.__int__, Tensor.__float__, Tensor.__bool__, Tensor.__index__,
    Tensor.__complex__, Tensor.nonzero, torch.nonzero, Tensor.masked_select, torch.masked_select, torch.argwhere,
    Tensor.argwhere, torch.unique, Tensor.unique, torch.unique_consecutive, Tensor.any, Tensor.all,
}
# ops whose output size or value needs the device's data on the host (composites land here too)
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.item.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


def _bool_index(indices) -> bool:
    if isinstance(indices, Tensor):
        return indices.dtype == torch.bool
    if isinstance(indices, (tuple, list)):
        return any(_bool_index(i) for i in indices)
    return False


class _SyncFunctionGuard(TorchFunctionMode):
    """Raises on Python-level calls that read device data on the host."""

    def __init__(self, found: list[str], strict: bool = True) -> None:
        super().__init__()
        self.found = found
        self.strict = strict

    def _hit(self, what: str) -> None:
        self.found.append(what)
        if self.strict:
            raise RuntimeError(f"host sync in the guarded region: {what}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in SYNC_FUNCTIONS:
            self._hit(name)
        elif func in (Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put) and len(args) > 1 \
                and _bool_index(args[1]):
            self._hit(f"{name}[bool mask]")
        return func(*args, **kwargs)


class _SyncDispatchGuard(TorchDispatchMode):
    """Raises on aten ops that need a device read (catches what composites and C++ code paths call)."""

    def __init__(self, found: list[str], strict: bool = True) -> None:
        super().__init__()
        self.found = found
        self.strict = strict

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS or (func in INDEX_OPS and len(args) > 1 and _bool_index(args[1])):
            self.found.append(str(func))
            if self.strict:
                raise RuntimeError(f"host sync in the guarded region: {func}")
        return func(*args, **kwargs)


class SyncGuard:
    """Both guards, active only between the backbone's forward pre-hook and forward hook (or around a call).
    strict: raise at the first sync; otherwise record every one (to count them)."""

    def __init__(self, strict: bool = True) -> None:
        self.found: list[str] = []
        self.forwards = 0
        self.strict = strict
        self._modes: list = []

    def enter(self, *_args) -> None:
        self.forwards += 1
        self._modes = [_SyncFunctionGuard(self.found, self.strict), _SyncDispatchGuard(self.found, self.strict)]
        for m in self._modes:
            m.__enter__()

    def exit(self, *_args) -> None:
        while self._modes:
            self._modes.pop().__exit__(None, None, None)

    @property
    def active(self) -> bool:
        return bool(self._modes)

    def wrap(self, fn):
        """fn with the guard active for the duration of each call."""

        def guarded(*args, **kwargs):
            self.enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        return guarded

    def install(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self.enter)
        # always_call: an exception inside the forward must leave the modes too
        module.register_forward_hook(self.exit, always_call=True)


def _kinds(plan) -> set[str]:
    kinds = set()
    for c in plan.chunks:
        kinds.add("diffusion" if c.diffusion else "decode" if c.end - c.start == 1 else "prefill")
    return kinds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.Distil-3.0", distil=True)


def test_guard_catches_the_calls_it_is_meant_to():
    guard = SyncGuard()
    mod = torch.nn.Identity()
    guard.install(mod)
    x = torch.arange(4)
    for bad in (lambda t: t.tolist(), lambda t: int(t[0]), lambda t: t[t > 1], lambda t: t.nonzero(),
                lambda t: bool(t.any()), lambda t: t.max().item()):
        with pytest.raises(RuntimeError, match="host sync"):
            guard.enter()
            try:
                bad(x)
            finally:
                guard.exit()
    guard.enter()
    try:
        y = x.index_select(0, torch.tensor([1, 2])) + x[1:3]  # allowed: index tensors, slices
    finally:
        guard.exit()
    assert y.shape == (2,) and not guard.active


def test_mixed_step_has_no_host_syncs_in_the_backbone(tiny, monkeypatch):
    eng = Engine.from_pretrained(tiny, environ={}, num_kv_blocks=256, device="cpu", dtype="float32",
                                 max_num_seqs=8, max_num_batched_tokens=4096)
    backbone = next(m for m in eng.core.executor.worker.runner.model.modules() if isinstance(m, HunyuanImage3Backbone))
    guard = SyncGuard()
    guard.install(backbone)

    sched = eng.core.scheduler
    plans = []
    schedule = sched.schedule

    def recording_schedule():
        plan = schedule()
        plans.append(plan)
        return plan

    monkeypatch.setattr(sched, "schedule", recording_schedule)
    base = dict(infer_align_image_size=False, output_type="latent", num_inference_steps=4, image_size="256x256")
    core = eng.core
    eng.add_request(dict(request_id="img", prompt="a red cube", bot_task="image", seed=1, **base))
    eng.add_request(dict(request_id="think", prompt="think about a cat", bot_task="think_recaption",
                         max_new_tokens=64, seed=2, **base))
    mixed, results = False, {}
    for step in range(12):
        if step == 2:  # a fresh prefill joins while "img" diffuses and "think" decodes
            eng.add_request(dict(request_id="late", prompt="a blue sphere on grass",
                                 bot_task="image", seed=3, **base))
        results.update(core.step().finished)
        assert not guard.found, f"step {step}: {guard.found}"
        if plans and _kinds(plans[-1]) == {"prefill", "decode", "diffusion"}:
            mixed = True
            break
    assert mixed, [sorted(_kinds(p)) for p in plans]
    assert guard.forwards >= len(plans) - 1 and not guard.active
    failed = [r for r in results.values() if r.error]
    assert not failed, [r.error for r in failed]


def test_sampling_reads_the_device_once_per_step(tiny):
    """A step samples all its rows (forced, ratio and free rows of several think requests) with ONE device-to-host
    copy: the logits, forcing and draws stay on the device and only the ids come back. Per-row sampling reads
    each row's token (`.item()`) and multinomial's validity check on the host: one or more syncs per row."""
    eng = Engine.from_pretrained(tiny, environ={}, num_kv_blocks=256, device="cpu", dtype="float32",
                                 max_num_seqs=8, max_num_batched_tokens=4096)
    runner = eng.core.executor.worker.runner
    guard = SyncGuard(strict=False)
    calls: list[tuple[int, list[str]]] = []
    sample = runner._sample

    def counted(chunks, hidden, out):
        before, n_before = len(guard.found), len(out.sampled_tokens)
        guard.wrap(sample)(chunks, hidden, out)
        calls.append((len(out.sampled_tokens) - n_before, guard.found[before:]))

    runner._sample = counted
    core = eng.core
    base = dict(infer_align_image_size=False, output_type="latent", num_inference_steps=2, image_size="auto")
    for i in range(3):
        eng.add_request(dict(request_id=f"t{i}", prompt=f"think about cat number {i}",
                             bot_task="think_recaption", max_new_tokens=6, seed=i, **base))
    results = {}
    for _ in range(40):
        if not core.has_unfinished_requests():
            break
        results.update(core.step().finished)
    batched = [found for rows, found in calls if rows >= 2]
    assert len(batched) >= 5, calls
    for rows, found in calls:
        assert found == (["tolist"] if rows else []), (rows, found)
    assert not [r.error for r in results.values() if r.error]


class _RecordingWrapper:
    """Stands in for a FlashInfer wrapper on a machine without it: records what plan() receives."""

    def __init__(self, kind: str, calls: list) -> None:
        self.kind, self.calls = kind, calls

    def plan(self, *args, **kwargs) -> None:
        self.calls.append((self.kind, args, kwargs))


def _recording_flashinfer(calls: list) -> types.ModuleType:
    mod = types.ModuleType("flashinfer")
    for name, kind in (("BatchDecodeWithPagedKVCacheWrapper", "decode"),
                       ("BatchPrefillWithPagedKVCacheWrapper", "paged"),
                       ("BatchPrefillWithRaggedKVCacheWrapper", "ragged")):
        setattr(mod, name, lambda workspace, layout, _kind=kind, **kw: _RecordingWrapper(_kind, calls))
    return mod


@pytest.mark.parametrize("variant", ["segments", "cascade", "mask"])
def test_flashinfer_plans_on_host_arrays_without_device_reads(variant, monkeypatch):
    """FlashInfer's plan() reads its index arrays on the host: handed device tensors it copies them back (a sync per
    wrapper per forward). The backend, planning for a device ("meta" here: every array made for the device lands
    there), must hand plan() host int32 arrays and read nothing from the device while planning."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "flashinfer", _recording_flashinfer(calls))
    monkeypatch.setattr(flashinfer_attention, "flashinfer_attention_available", lambda device: (True, "ok"))
    be = flashinfer_attention.FlashInferPagedAttention(8, 2, 16, variant=variant)
    decode = [SequenceChunk([8], 9, [3, 1, 4]), SequenceChunk([29], 30, list(range(10, 18)))]
    mixed = decode + [SequenceChunk(range(0, 12), 12, [20, 21, 22], [(4, 9)]),
                      SequenceChunk(range(4, 9), 9, [23, 24, 25], [(4, 9)])]
    guard = SyncGuard()
    for chunks in (decode, mixed):
        before = len(calls)
        guard.wrap(be.plan)(AttentionMetadata.build(chunks, 4, device="meta"))
        assert len(calls) > before
    assert not guard.found
    assert ("decode" in {kind for kind, _, _ in calls}) == (variant != "mask")  # "mask" plans one prefill wrapper
    for kind, args, _ in calls:
        arrays = [a for a in args if isinstance(a, torch.Tensor)]
        assert arrays and all(a.device.type == "cpu" and a.dtype == torch.int32 for a in arrays), \
            (kind, [(a.device, a.dtype) for a in arrays])
