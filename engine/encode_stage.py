"""The worker's encoder stage: condition-image encodes (VAE posterior + SigLIP2 tokens) off the step's critical path.

A 1024x768 encode costs seconds on a CPU and tens of milliseconds of compute-bound work on a GPU; run inside a step
it stretches every running request's decode and denoising step. Asynchronously, `submit()` queues the scheduled
images for one background thread and returns at once; each step's `collect()` hands the finished ones to the
encoder cache and the `RunnerOutput`, so the scheduler admits their requests in a later step (it never schedules a
request's prefill before its encode is reported). Inline (`asynchronous=False`) the encodes run in `submit()` and
are reported by the same step's `collect()`: the same protocol, the behaviour before the stage went asynchronous.

Why the results are the same either way: an encode draws nothing at random (`encode_images`); every request's
posterior sample is drawn later, at admission, from its own seeded generator on the step's thread, in input order.
The thread shares only read-only weights with the step (the VAE's encoder and the vision tower; the step uses the
backbone and the VAE's decoder) and hands over fresh tensors that nothing else writes.

Threads on CPU: the step and the encode thread each set their own OpenMP/MKL team size (torch.set_num_threads is
per calling thread for both). A background thread (this one, the decode thread) always runs with a team of one:
libgomp counts every pooled thread of every team, and once that count exceeds the cores it throttles every team's
spin-wait to almost nothing for the life of the process, so each later parallel region of the step pays a futex
wake-up (measured on 2 cores: a lone text-to-image request's think and denoising phases 1.6-2x slower after one
background decode had used a team of two; docs/decisions.md, "Background VAE threads run one thread each").
While an encode is in flight the step runs on the cores the encode thread leaves (`total - 1`, at least one) and
gets all of them back once nothing is in flight. A step with nothing else to run encodes inline with every core.
A forward pre-hook on the encoder modules pauses the encode while a decode of a finished image is in flight
(engine/decode_stage.py): the decode ends a request, the encode only starts one, so on CPU the two never share the
background core.
On CUDA the thread encodes on its own stream; the step's stream waits on the encode's event before it uses the
tensors, which are marked as used by the step's stream so the allocator never hands their memory back to the encode
stream early.
Under tensor parallelism every rank encodes for itself (the VAE and the vision tower are replicated; no collective
runs on the thread); a rank behind rank 0 waits for an image at admission (`wait_for`).
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffgentor.engine.encoder_cache import EncoderKey
from diffgentor.engine.models.hunyuan_image_3.execution import EncodedImage, HunyuanImage3ForCausalMM, encode_images
from diffgentor.engine.scheduler_output import EncoderInput, RunnerOutput
from diffgentor.engine.vae_budget import VaeBudget, chunks


@dataclass
class _Done:
    key: EncoderKey
    encoded: EncodedImage | None
    error: str | None = None
    event: object | None = None  # torch.cuda.Event recorded on the encode stream after the encode


def encode_groups(model: HunyuanImage3ForCausalMM, inputs: list[EncoderInput],
                  vae_budget: VaeBudget | None = None) -> list[_Done]:
    """Encode the images, one VAE (and ViT) call per bucket, in chunks that fit the VAE budget
    (`engine.vae_budget`); a failing batch is retried image by image so the failure is pinned on the image(s) at
    fault."""
    groups: dict[tuple, list[EncoderInput]] = defaultdict(list)
    for e in inputs:
        vit_shape = tuple(e.vit.pixel_values.shape) if e.vit is not None else None
        groups[(tuple(e.vae.pixels.shape), vit_shape)].append(e)
    calls = []
    for (shape, _), group in groups.items():
        calls += chunks(group, vae_budget.encode_images(*shape[-2:]) if vae_budget else len(group))
    done: list[_Done] = []
    for group in calls:
        try:
            encoded = encode_images(model, [e.vae for e in group], [e.vit for e in group])
        except Exception as err:  # noqa: BLE001 - the image's own content or size
            if len(group) > 1:
                for e in group:
                    done += encode_groups(model, [e])
            else:
                done.append(_Done(group[0].key, None, f"{type(err).__name__}: {err}"))
            continue
        done += [_Done(e.key, enc) for e, enc in zip(group, encoded)]
    return done


def start_background_thread(model: HunyuanImage3ForCausalMM, loop, name: str):
    """(a daemon thread running `loop`, its own CUDA stream on a GPU or None): the stream exists before the
    thread starts."""
    stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread, stream


BACKGROUND_THREADS = 1
"""Intra-op threads of a background VAE thread (encode or decode), whatever the core count: a larger team keeps
pooled OpenMP threads alive beside the step's, and libgomp then throttles every team's spin-wait for good (module
docstring); the step keeps the other cores while a background thread works."""


def enter_background_thread(model: HunyuanImage3ForCausalMM) -> int:
    """First thing on a background thread: its CUDA device, or on CPU its intra-op team of `BACKGROUND_THREADS`
    (set once: nothing changes it later); returns the thread's ident."""
    if model.device.type == "cuda":
        torch.cuda.set_device(model.device)
    else:
        torch.set_num_threads(BACKGROUND_THREADS)
    return threading.get_ident()


class EncodeStage:
    def __init__(self, model: HunyuanImage3ForCausalMM, asynchronous: bool = True,
                 vae_budget: VaeBudget | None = None) -> None:
        self.model = model
        self.vae_budget = vae_budget
        self.asynchronous = asynchronous
        self.total_threads = torch.get_num_threads()
        self._pending: set[EncoderKey] = set()  # submitted, not yet collected
        self._done: list[_Done] = []  # finished on the thread, not yet collected
        self._cond = threading.Condition()
        self._jobs: queue.SimpleQueue[list[EncoderInput] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stream = None
        self._step_threads = self.total_threads
        self._thread_ident: int | None = None
        # higher-priority VAE work in flight (the decode stage's finished images): the encode thread pauses at its
        # next module while this says so (called under `cond`, which that stage notifies)
        self.yield_to: Callable[[], bool] | None = None
        if asynchronous and model.device.type == "cpu":
            parts = (model.vae.encoder, getattr(model, "vision_model", None), getattr(model, "vision_aligner", None))
            for part in parts:
                for m in part.modules() if part is not None else ():
                    m.register_forward_pre_hook(self._yield_to_decode)

    @property
    def cond(self) -> threading.Condition:
        """The lock over both stages' queues, notified whenever a background encode or decode ends."""
        return self._cond

    def pending_keys(self) -> set[EncoderKey]:
        """Submitted, not yet collected (call under `cond`)."""
        return self._pending

    def has_done(self) -> bool:
        """Finished on the thread, not yet collected (call under `cond`)."""
        return bool(self._done)

    @property
    def num_pending(self) -> int:
        """Images submitted and not yet collected (the encode queue)."""
        with self._cond:
            return len(self._pending)

    def is_pending(self, key: EncoderKey) -> bool:
        with self._cond:
            return key in self._pending

    # ------------------------------------------------------------------ the step's side
    def submit(self, inputs: list[EncoderInput], step_idle: bool = False) -> None:
        """Queue images for the encode thread (asynchronous), or encode them now (inline). `step_idle`: the step
        has nothing else to run, so with no encode in flight it encodes them itself with every core (on the thread
        it would leave half of them idle while it waits)."""
        if not inputs:
            return
        if step_idle and not self.num_pending:
            self.fit_step_threads()
        if not self.asynchronous or (step_idle and not self.num_pending):
            with self._cond:
                self._pending.update(e.key for e in inputs)
                self._done += encode_groups(self.model, inputs, self.vae_budget)
            return
        if self._thread is None:
            self._start()
        with self._cond:
            self._pending.update(e.key for e in inputs)
        self._jobs.put(list(inputs))

    def fit_step_threads(self, decoding: bool = False) -> None:
        """CPU: the step's intra-op team is what the background thread leaves while an encode or (`decoding`) a
        decode is in flight (one of them runs at a time: an encode yields to a decode). No step holds an encode on
        the step's behalf: the encode would still finish its current module beside a step on every core, and an
        oversubscribed spinning team stretches the step far more (docs/decisions.md, "Background VAE threads run one
        thread each")."""
        if self.model.device.type != "cpu" or not (self.asynchronous or decoding):
            return
        busy = decoding or (self.asynchronous and self.num_pending)
        want = max(1, self.total_threads - BACKGROUND_THREADS) if busy else self.total_threads
        if want != self._step_threads:
            torch.set_num_threads(want)
            self._step_threads = want

    def wait_for(self, key: EncoderKey) -> list[_Done]:
        """Block until `key` is encoded (a rank behind rank 0 admitting a request); returns what finished."""
        with self._cond:  # the encode keeps its one thread (a larger team would throttle the step's for good)
            self._cond.wait_for(lambda: key not in self._pending or any(d.key == key for d in self._done))
        return self._take()

    def _yield_to_decode(self, module, args) -> None:
        """Forward pre-hook of the encoder modules: on the encode thread, wait while a decode has priority."""
        if threading.get_ident() != self._thread_ident:
            return
        with self._cond:
            self._cond.wait_for(lambda: not (self.yield_to is not None and self.yield_to()))

    def collect(self, cache: dict[EncoderKey, EncodedImage], out: RunnerOutput | None) -> None:
        """Move finished encodes into the worker's encoder cache and report them in `out`."""
        self.store(self._take(), cache, out)

    def store(self, done: list[_Done], cache: dict[EncoderKey, EncodedImage], out: RunnerOutput | None) -> None:
        main = torch.cuda.current_stream(self.model.device) if self.model.device.type == "cuda" else None
        for d in done:
            if d.encoded is None:
                if out is not None:
                    out.encode_failed[d.key] = d.error or "encode failed"
                continue
            if main is not None:  # the step's stream reads what the encode stream wrote
                main.wait_event(d.event)
                for t in (d.encoded.posterior, d.encoded.vit_tokens):
                    if t is not None:
                        t.record_stream(main)
            cache[d.key] = d.encoded
            if out is not None:
                out.encoded[d.key] = d.encoded.nbytes

    def _take(self) -> list[_Done]:
        with self._cond:
            done, self._done = self._done, []
            for d in done:
                self._pending.discard(d.key)
        return done

    def close(self) -> None:
        """Stop the encode thread after its current job (idempotent)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    # ------------------------------------------------------------------ the encode thread
    def _start(self) -> None:
        self._thread, self._stream = start_background_thread(self.model, self._loop, "diffgentor-encode")

    def _loop(self) -> None:
        self._thread_ident = enter_background_thread(self.model)
        while True:
            inputs = self._jobs.get()
            if inputs is None:
                return
            try:
                with torch.no_grad():
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            done = encode_groups(self.model, inputs, self.vae_budget)
                            event = torch.cuda.Event()
                            event.record(self._stream)
                        for d in done:
                            d.event = event
                    else:
                        done = encode_groups(self.model, inputs, self.vae_budget)
            except Exception as err:  # noqa: BLE001 - never leave a key pending forever
                done = [_Done(e.key, None, f"{type(err).__name__}: {err}") for e in inputs]
            with self._cond:
                self._done += done
                self._cond.notify_all()


__all__ = ["BACKGROUND_THREADS", "EncodeStage", "encode_groups", "enter_background_thread",
           "start_background_thread"]
