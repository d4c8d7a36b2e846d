"""The engine's online estimate of what a step's work costs, so the scheduler can size a step to a time target.

Why: a long prefill chunk (an edit's condition-image tokens) or several denoising blocks in the same step as other
requests' think tokens make every one of them wait. With `SchedulerConfig.max_step_ms` the scheduler sizes each step
to what the estimate says fits the target: a text token (prefill or think decode) and a token of a denoising block
cost differently (a block is one bidirectional, compute-bound pass over the whole image; a think token is
bandwidth-bound), so the estimate keeps one rate for each. The rates are measured, never guessed: the core feeds
each step's forward seconds with its text and block token counts, and the estimate is a least-squares fit of
seconds = text tokens x text rate + block tokens x block rate over the recent steps (older steps weigh
exponentially less).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepCost:
    seconds_per_token: float | None = None
    """Seconds per text token; None until a step with text tokens has been measured (then the target does not
    bind)."""
    seconds_per_block_token: float | None = None
    """Seconds per denoising-block token; None until the fit can tell it from the text rate (then the target sizes
    image work at the text rate, as one kind of token)."""
    weight: float = 0.2
    """How much one new step moves the estimate (a step's cost varies with its mix of phases)."""
    _sums: list[float] = field(default_factory=list, repr=False)
    """The weighted sums of the fit: text x text, text x block, block x block, text x seconds, block x seconds."""

    def observe(self, tokens: int, forward_s: float, block_tokens: int = 0) -> None:
        """One step's forward: `tokens` text tokens and `block_tokens` denoising-block tokens in `forward_s`
        seconds."""
        if tokens + block_tokens <= 0 or forward_s <= 0:
            return
        t, b = float(tokens), float(block_tokens)
        new = [t * t, t * b, b * b, t * forward_s, b * forward_s]
        w = self.weight
        self._sums = new if not self._sums else [s + w * (x - s) for s, x in zip(self._sums, new)]
        self._fit()

    def _fit(self) -> None:
        tt, tb, bb, ty, by = self._sums
        det = tt * bb - tb * tb
        if det > 1e-9 * tt * bb:  # both kinds seen, in varying proportions: solve for both rates
            text, block = (ty * bb - by * tb) / det, (by * tt - ty * tb) / det
            if text > 0 and block > 0:
                self.seconds_per_token, self.seconds_per_block_token = text, block
                return
        if tt and not bb:  # text tokens only
            self.seconds_per_token = ty / tt
        elif bb and not tt:  # denoising blocks only
            self.seconds_per_block_token = by / bb
        elif self.seconds_per_token is None:  # always mixed in one proportion: one rate for both kinds
            self.seconds_per_token = (ty + by) / (tt + 2 * tb + bb)

    def tokens_within(self, seconds: float) -> int | None:
        """Text tokens a step may carry to take about `seconds` (at least one); None: no estimate yet."""
        if self.seconds_per_token is None:
            return None
        return max(1, int(seconds / self.seconds_per_token + 1e-9))


__all__ = ["StepCost"]
