"""The worker's decode stage: VAE decodes of finished images and progressive previews off the step's critical path.

A 256x256 decode costs about half a second per image on a CPU core and a 1024x1024 one tens of milliseconds of
compute-bound work on a GPU; run inside a step it stretches every running request's think token and denoising step.
Asynchronously, `submit()` queues the step's decodes for one background thread and returns at once; a later step's
`collect()` reports the finished images (and the keys of every decode that ended, failed or not, so the scheduler
can release their VAE budget). Inline (`asynchronous=False`) `submit()` decodes at once and the same step's
`collect()` reports them: the same protocol, the behaviour before the stage went asynchronous.

Why the images are the same either way: a decode draws nothing at random and reads only its latents (a fresh tensor
the step never writes again: the Euler step rebinds a request's latents) and the decoder's read-only weights.

Priority over encodes: a finished image ends a request, an encode only lets a queued one start, so while a decode is
in flight the encode thread pauses at its next module (`EncodeStage.yield_to`) and the decode runs on one core, the
step on the rest (one thread per background team: engine/encode_stage.py says why). On CUDA the thread decodes on its
own stream, which first waits for the step that produced the latents; the host copy of the uint8 image ends there.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffgentor.engine.encode_stage import EncodeStage, enter_background_thread, start_background_thread
from diffgentor.engine.scheduler_output import FINAL_IMAGE, DecodeKey, RunnerOutput
from diffgentor.engine.vae_budget import VaeBudget, chunks


@dataclass
class DecodeJob:
    key: DecodeKey  # (request id, preview index or FINAL_IMAGE)
    latents: Tensor  # [C, h, w], model space


@dataclass
class _Decoded:
    key: DecodeKey
    image: Any = None  # uint8 [H, W, 3] numpy
    error: str | None = None


DecodeFn = Callable[[Tensor], Any]
"""The model's decode: latents [B, C, h, w] -> uint8 images [B, H, W, 3] (numpy)."""


def decode_groups(decode: DecodeFn, jobs: list[DecodeJob], vae_budget: VaeBudget | None = None) -> list[_Decoded]:
    """One VAE batch per output size, split into calls that fit the VAE budget (`engine.vae_budget`; the images
    are the same either way); a failing call fails each of its jobs."""
    groups: dict[tuple[int, ...], list[DecodeJob]] = defaultdict(list)
    for j in jobs:
        groups[tuple(j.latents.shape)].append(j)
    calls = []
    for shape, items in groups.items():
        size = vae_budget.grid_decode_images(shape[-2], shape[-1]) if vae_budget else len(items)
        calls += chunks(items, size)
    done: list[_Decoded] = []
    for items in calls:
        try:
            images = decode(torch.stack([j.latents for j in items]))
        except Exception as e:  # noqa: BLE001 - reported per job
            done += [_Decoded(j.key, error=f"VAE decode failed: {type(e).__name__}: {e}") for j in items]
            continue
        done += [_Decoded(j.key, img) for j, img in zip(items, images)]
    return done


class DecodeStage:
    def __init__(self, model: torch.nn.Module, decode: DecodeFn, encodes: EncodeStage, asynchronous: bool = True,
                 vae_budget: VaeBudget | None = None) -> None:
        """`model`: its device picks the thread setup (engine/encode_stage.py); `decode` runs the VAE decoder."""
        self.model = model
        self.decode = decode
        self.encodes = encodes
        self.vae_budget = vae_budget
        self.asynchronous = asynchronous
        self._cond = encodes.cond  # one lock and one wake-up for both stages: the step waits for either
        self._pending: set[DecodeKey] = set()
        self._done: list[_Decoded] = []
        self._jobs: queue.SimpleQueue[tuple[list[DecodeJob], Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stream = None
        if asynchronous:  # an inline decode runs on the step's thread, the cores the step keeps
            encodes.yield_to = self.busy

    def busy(self) -> bool:
        """Decodes submitted and not yet finished (called under the shared lock by the encode thread)."""
        return len(self._pending) > len(self._done)

    @property
    def num_pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, jobs: list[DecodeJob], step_idle: bool = False) -> None:
        """Queue the step's decodes for the thread (asynchronous), or decode them now (inline). `step_idle`: the step
        ran no model work; on CPU with no encode or decode in flight either, the step decodes them itself with every
        core (the thread has one: engine/encode_stage.py), as an inline stage would."""
        if not jobs:
            return
        with self._cond:
            idle = step_idle and self.model.device.type == "cpu" and not (self.busy() or self.encodes.pending_keys())
            self._pending.update(j.key for j in jobs)
        if not self.asynchronous or idle:
            done = self._decode_now(jobs)
            with self._cond:
                self._done += done
                self._cond.notify_all()
            return
        event = None
        if self.model.device.type == "cuda":
            main = torch.cuda.current_stream(self.model.device)
            event = torch.cuda.Event()
            event.record(main)  # the latents are ready once the step's work so far has run
        if self._thread is None:
            self._start()
        if self._stream is not None:
            for j in jobs:
                j.latents.record_stream(self._stream)  # not handed back to the step's stream before the decode
        self._jobs.put((list(jobs), event))

    def collect(self, out: RunnerOutput, alive: set[str] | dict) -> None:
        """Report every decode that ended: its key in `out.decoded`, and the image or preview of a request still
        `alive` (an aborted request's image is dropped; its key still releases the scheduler's budget)."""
        with self._cond:
            done, self._done = self._done, []
            for d in done:
                self._pending.discard(d.key)
        for d in done:
            rid, index = d.key
            out.decoded.append(d.key)
            if rid not in alive:
                continue
            if d.error is not None:
                if index == FINAL_IMAGE:  # a failed preview is dropped silently, the request goes on
                    out.failed[rid] = d.error
            elif index == FINAL_IMAGE:
                out.images[rid] = d.image
            else:
                out.partial_images[rid] = (index, d.image)

    def has_done(self) -> bool:
        return bool(self._done)

    def _decode_now(self, jobs: list[DecodeJob]) -> list[_Decoded]:
        return decode_groups(self.decode, jobs, self.vae_budget)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    # ------------------------------------------------------------------ the decode thread
    def _start(self) -> None:
        self._thread, self._stream = start_background_thread(self.model, self._loop, "diffgentor-decode")

    def _loop(self) -> None:
        enter_background_thread(self.model)  # one thread on CPU (engine/encode_stage.py)
        while True:
            item = self._jobs.get()
            if item is None:
                return
            jobs, event = item
            try:
                with torch.no_grad():
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            self._stream.wait_event(event)
                            done = self._decode_now(jobs)
                    else:
                        done = self._decode_now(jobs)
            except Exception as err:  # noqa: BLE001 - never leave a key pending forever
                done = [_Decoded(j.key, error=f"VAE decode failed: {type(err).__name__}: {err}") for j in jobs]
            with self._cond:
                self._done += done
                self._cond.notify_all()


def wait_for_vae(encodes: EncodeStage, decodes: DecodeStage) -> None:
    """Block until an encode or a decode in flight has finished (the step has nothing else to run). The background
    threads keep their one-thread teams: a larger team would throttle the step's OpenMP team for the rest of the
    process (engine/encode_stage.py)."""
    cond = encodes.cond
    with cond:
        if not (encodes.pending_keys() or decodes._pending):
            return
        cond.wait_for(lambda: encodes.has_done() or decodes.has_done()
                      or not (encodes.pending_keys() or decodes._pending))


__all__ = ["DecodeJob", "DecodeStage", "decode_groups", "wait_for_vae"]
