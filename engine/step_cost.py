"""The engine's online estimate of what a step's tokens cost, so the scheduler can size a step to a time target.

Why: a long prefill chunk (an edit's condition-image tokens) in the same step as other requests' think tokens and
denoising blocks makes every one of them wait for it. With `EngineConfig.max_step_ms` the scheduler caps a step's
tokens at what the estimate says fits the target (decode tokens of running requests go first; prefill chunks take
what is left; an indivisible image block still runs whole). The estimate is measured, never guessed: the core feeds
it each step's forward seconds and token count, and it keeps an exponentially weighted mean of seconds per token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCost:
    seconds_per_token: float | None = None
    """The current estimate; None until a step with tokens has been measured (then the target does not bind)."""
    weight: float = 0.2
    """How much one new step moves the estimate (a step's cost varies with its mix of phases)."""

    def observe(self, tokens: int, forward_s: float) -> None:
        """One step's forward: `tokens` tokens in `forward_s` seconds."""
        if tokens <= 0 or forward_s <= 0:
            return
        per = forward_s / tokens
        old = self.seconds_per_token
        self.seconds_per_token = per if old is None else old + self.weight * (per - old)

    def tokens_within(self, seconds: float) -> int | None:
        """Tokens a step may carry to take about `seconds` (at least one); None: no estimate yet."""
        if self.seconds_per_token is None:
            return None
        return max(1, int(seconds / self.seconds_per_token))


__all__ = ["StepCost"]
