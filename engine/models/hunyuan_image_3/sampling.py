"""Per-request next-token sampling with the official (Hugging Face) warper chain (docs/decisions.md: Sampling).

The official text phase samples through HF `generate`: logits in fp32, then temperature, top-k, top-p
(each only when active: temperature != 1, top_k != 0, top_p < 1; min_tokens_to_keep 1; removed entries
become -inf), softmax, and `torch.multinomial(probs, 1)`. To reproduce a request's tokens for its seed
whatever else is in the batch, every row is warped and drawn on its own, as a [1, V] tensor with its own
`torch.Generator`, so neither the other rows nor the batch size can change its result. Greedy rows
(do_sample false or temperature 0) take the argmax and draw nothing.

Forced tokens (see `stage_machine.StageMachine.constrain`) are one-hot rows that still go through the
draw here, exactly as in the official code, which keeps the generator stream aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import GenerationDefaults


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request (defaults are the no-op values, not a checkpoint's)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (1 disables it), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_generation_defaults(cls, gen: GenerationDefaults) -> SamplingParams:
        """From a checkpoint's `GenerationDefaults` (generation_config.json)."""
        return cls(do_sample=gen.do_sample, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The per-request generator: seeded once, then consumed only by this request's draws."""
    return torch.Generator(device=device).manual_seed(int(seed))


def warp_logits(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature -> top-k -> top-p on fp32 scores [1, V] (or [V]); returns new scores, -inf = removed."""
    squeeze = scores.dim() == 1
    s = scores.reshape(1, -1).to(torch.float32)
    if params.temperature != 1.0:
        s = s / float(params.temperature)
    if params.top_k != 0:
        k = min(max(params.top_k, 1), s.size(-1))
        kth = torch.topk(s, k)[0][..., -1, None]
        s = s.masked_fill(s < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_s, sorted_idx = torch.sort(s, descending=False)
        cum = sorted_s.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - params.top_p)
        drop_sorted[..., -1:] = False  # keep at least one token
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        s = s.masked_fill(drop, -float("inf"))
    return s.reshape(-1) if squeeze else s


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Token of one row as a [1] long tensor (no host sync)."""
    scores = logits.reshape(1, -1).to(torch.float32)
    if params.greedy:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(warp_logits(scores, params), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).reshape(1)


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Next token of one request from its logits row [V] (or [1, V])."""
    return int(_draw(logits, params, generator).item())


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next tokens [B] for logits [B, V]; row i uses params[i] and generators[i] only."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    b = logits.size(0)
    if len(params) != b or len(generators) != b:
        raise ValueError(f"{b} rows but {len(params)} params and {len(generators)} generators")
    if b == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    return torch.cat([_draw(logits[i], params[i], generators[i]) for i in range(b)])
