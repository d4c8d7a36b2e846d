"""Per-request Taylor cache for the HunyuanImage-3.0 diffusion loop (the official cache_utils.py and CLI defaults).

The Taylor cache is an optional, training-free speed-up: on most diffusion steps the backbone is not run and
its last hidden states are extrapolated from the steps where it was run. ``final_layer`` still runs on the
extrapolated states; a skipped step writes nothing to the KV cache.

How it works (our reading of the official code, re-expressed):

* Schedule. A counter starts at 0. A step is *full* (the backbone runs) when it is step 0, when the counter
  equals ``interval - 1``, inside the first-enhance window (``step < first_enhance_steps``, when enabled) or
  inside the tailing-enhance window (``step >= num_steps - tailing_enhance_steps``, when enabled). A full step
  sets the counter to 0; a skipped step adds 1 to it. With the defaults this gives steps 0, 5, 10, ...; the
  schedule depends only on the config and ``num_steps``, so it is computed once up front.
* Full step. The hidden states X are split along the token axis into a low and a high frequency part: FFT in
  float32 over the tokens, keep the bins with ``|f| <= 0.1 * max|f|`` (``f = fftfreq(n_tokens)``) for the low
  part and the rest for the high part, inverse FFT each, take the real part, cast back to X's dtype. For each
  part a finite-difference table is updated: ``D0 = X_part`` and ``D_{k+1} = (D_k(new) - D_k(old)) / delta``,
  where ``delta`` is the number of steps since the previous full step; the table grows by one order per full
  step until the part's order. While first-enhance is on, the full steps before the window's last one store
  nothing (the window's last step starts the table afresh).
* Skipped step. Each part is ``sum_k D_k * d**k / k!`` with ``d`` the steps since the last full step, and the
  two parts are added.

Orders. ``max_order`` bounds both parts. The official container also stops moving the low part's new entries
one order above the high part's (its copy loop breaks on the first missing high-frequency entry), so the
low part's effective order is ``min(low_freqs_order, max_order, high_freqs_order + 1)`` and the high part's is
``min(high_freqs_order, max_order)``; we reproduce that. (A part order above ``max_order + 1`` makes the
official code raise; we cap it instead.) With the defaults (2/2/2) both parts have order 2 and, because the
split and the differences are linear, the prediction equals the unsplit Taylor extrapolation up to rounding.

Note on accuracy: ``D1`` is a backward difference, the slope at the middle of the last interval rather than at
its end, so the extrapolation is exact for trajectories linear in the step index but carries an error of
``c * delta * d`` for a quadratic ``c * step**2`` term (``D2`` itself is exact there). That is the official
scheme; tests pin it.

Differences from the official code, all deliberate:

* State lives in the object, one per request (the official code keeps the counter, the last full step and the
  derivative tables on the shared model module, so they leak across requests and cannot serve a batch).
* Our engine feeds only the hidden states of the image tokens (the rows ``final_layer`` reads), with the same
  shape at every step. The official code caches whatever the backbone returned: the whole sequence at step 0
  but only the timestep/guidance/image tokens afterwards, so its first extrapolated step can mismatch in shape
  unless first-enhance is on. That cannot happen here, and ``update`` rejects a shape change.
  Consequence: the FFT runs over the image tokens only, while the official one (on steps >= 1) also includes
  the 1-3 leading special tokens. With equal effective orders for both parts (the defaults) this changes
  nothing beyond rounding; with unequal orders the split, hence the prediction, differs slightly.
* Leading dimensions are allowed (``[..., n_tokens, hidden]``, e.g. a CFG pair); each row is split on its own,
  like the official ``[batch, tokens, hidden]`` input.
* The tables are released after the last step (as officially), and misuse (an update on a skipped step, a
  prediction with a missed full step, steps out of order) raises instead of silently extrapolating garbage.

Tables are stored in the dtype of the fed hidden states, like the official code (bf16 in practice). Memory per
request is about ``(low_order + high_order + 2) * hidden.numel() * itemsize`` at steady state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FFT_CUTOFF_RATIO = 0.1
"""Low-frequency bins are those with ``|f| <= FFT_CUTOFF_RATIO * max|f|`` (official value)."""


@dataclass(frozen=True)
class TaylorCacheConfig:
    """Taylor cache settings; defaults are the official CLI defaults.

    CLI mapping: ``--taylor-cache-interval`` -> interval, ``--taylor-cache-order`` -> max_order,
    ``--taylor-cache-enable-first-enhance`` / ``--taylor-cache-first-enhance-steps``,
    ``--taylor-cache-enable-tailing-enhance`` / ``--taylor-cache-tailing-enhance-steps``,
    ``--taylor-cache-low-freqs-order`` / ``--taylor-cache-high-freqs-order``.
    """

    interval: int = 5
    max_order: int = 2
    enable_first_enhance: bool = False
    first_enhance_steps: int = 3
    enable_tailing_enhance: bool = False
    tailing_enhance_steps: int = 1
    low_freqs_order: int = 2
    high_freqs_order: int = 2

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        for name in (
            "max_order",
            "first_enhance_steps",
            "tailing_enhance_steps",
            "low_freqs_order",
            "high_freqs_order",
        ):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def effective_high_order(self) -> int:
        """Highest difference order kept for the high-frequency part."""
        return min(self.high_freqs_order, self.max_order)

    @property
    def effective_low_order(self) -> int:
        """Highest difference order kept for the low-frequency part (see the module notes on orders)."""
        return min(self.low_freqs_order, self.max_order, self.high_freqs_order + 1)


def full_step_schedule(config: TaylorCacheConfig, num_steps: int) -> list[bool]:
    """For each of ``num_steps`` steps, whether the backbone runs there (the official counter rule)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    schedule = []
    counter = 0
    for step in range(num_steps):
        full = (
            step == 0
            or counter == config.interval - 1
            or (config.enable_first_enhance and step < config.first_enhance_steps)
            or (config.enable_tailing_enhance and step >= num_steps - config.tailing_enhance_steps)
        )
        counter = 0 if full else counter + 1
        schedule.append(full)
    return schedule


def frequency_split(hidden: torch.Tensor, cutoff_ratio: float = FFT_CUTOFF_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``hidden`` ([..., n_tokens, dim]) along the token axis into (low, high) frequency parts.

    The FFT runs in float32; each part is the real part of the inverse FFT of the masked spectrum, cast back to
    the input dtype. ``low + high`` reconstructs the input up to rounding.
    """
    if hidden.dim() < 2:
        raise ValueError(f"expected [..., n_tokens, dim], got shape {tuple(hidden.shape)}")
    n_tokens = hidden.shape[-2]
    spectrum = torch.fft.fft(hidden.to(torch.float32), dim=-2)
    freqs = torch.fft.fftfreq(n_tokens, d=1.0, device=hidden.device).abs()
    low_mask = (freqs <= cutoff_ratio * freqs.max()).unsqueeze(-1)
    low = torch.fft.ifft(spectrum * low_mask, dim=-2).real.to(hidden.dtype)
    high = torch.fft.ifft(spectrum * ~low_mask, dim=-2).real.to(hidden.dtype)
    return low, high


def _advance_table(table: list[torch.Tensor], new: torch.Tensor, delta: int, order: int) -> list[torch.Tensor]:
    """New difference table from the previous one and a fresh D0, keeping orders 0..order."""
    updated = [new]
    for k in range(min(order, len(table))):
        updated.append((updated[k] - table[k]) / delta)
    return updated


def _extrapolate(table: list[torch.Tensor], distance: int) -> torch.Tensor:
    out = table[0]
    for k in range(1, len(table)):
        out = out + (1 / math.factorial(k)) * table[k] * (distance**k)
    return out


class TaylorCache:
    """Taylor cache state of one request; see the module docstring.

    Call ``is_full_step(step)`` for each step in order; on a full step run the backbone and feed its image-token
    hidden states to ``update(step, hidden)``; on a skipped step use ``predict(step)`` instead.
    """

    def __init__(self, config: TaylorCacheConfig, num_steps: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self._schedule = tuple(full_step_schedule(config, num_steps))
        last = 0
        self._last_full_at: list[int] = []
        for step, full in enumerate(self._schedule):
            if full:
                last = step
            self._last_full_at.append(last)
        self.reset()

    @property
    def schedule(self) -> tuple[bool, ...]:
        """Full (True) / skipped (False) for every step."""
        return self._schedule

    @property
    def last_full_step(self) -> int | None:
        """The last step fed to ``update`` since construction or ``reset``."""
        return self._last_full_step

    @property
    def orders(self) -> tuple[int, int]:
        """Number of stored difference orders (low part, high part); (0, 0) when empty."""
        return len(self._low), len(self._high)

    @property
    def nbytes(self) -> int:
        """Bytes held by the difference tables."""
        return sum(t.numel() * t.element_size() for t in (*self._low, *self._high))

    def reset(self) -> None:
        """Drop all tables and step bookkeeping (the schedule is kept)."""
        self._low: list[torch.Tensor] = []
        self._high: list[torch.Tensor] = []
        self._last_full_step: int | None = None

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside [0, {self.num_steps})")

    def is_full_step(self, step: int) -> bool:
        """Whether the backbone must run at ``step``."""
        self._check_step(step)
        return self._schedule[step]

    def update(self, step: int, hidden: torch.Tensor) -> None:
        """Record the backbone's hidden states ([..., n_tokens, dim]) computed at full step ``step``."""
        self._check_step(step)
        if not self._schedule[step]:
            raise ValueError(f"step {step} is a skipped step; use predict()")
        if self._last_full_step is not None and step <= self._last_full_step:
            raise ValueError(f"step {step} fed after step {self._last_full_step}; steps must increase")
        if self._low:
            ref = self._low[0]
            if hidden.shape != ref.shape or hidden.dtype != ref.dtype or hidden.device != ref.device:
                raise ValueError(
                    f"hidden states changed from {tuple(ref.shape)} {ref.dtype} {ref.device} to "
                    f"{tuple(hidden.shape)} {hidden.dtype} {hidden.device}"
                )
        cfg = self.config
        in_first_enhance = cfg.enable_first_enhance and step < cfg.first_enhance_steps - 1
        if not in_first_enhance:
            delta = step - self._last_full_step if self._last_full_step is not None else 0
            low, high = frequency_split(hidden.detach())
            self._low = _advance_table(self._low, low, delta, cfg.effective_low_order)
            self._high = _advance_table(self._high, high, delta, cfg.effective_high_order)
        self._last_full_step = step
        if step == self.num_steps - 1:
            self._low, self._high = [], []

    def predict(self, step: int) -> torch.Tensor:
        """Extrapolated hidden states at skipped step ``step``."""
        self._check_step(step)
        if self._schedule[step]:
            raise ValueError(f"step {step} is a full step; run the backbone and update()")
        expected = self._last_full_at[step]
        if self._last_full_step != expected:
            raise RuntimeError(
                f"step {step} extrapolates from full step {expected}, but the last update was at {self._last_full_step}"
            )
        if not self._low:
            raise RuntimeError(f"no stored hidden states to extrapolate step {step} from")
        distance = step - expected
        out = _extrapolate(self._low, distance) + _extrapolate(self._high, distance)
        if step == self.num_steps - 1:
            self._low, self._high = [], []
        return out
