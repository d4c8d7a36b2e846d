"""Per-request next-token sampling with the official (Hugging Face) warper chain (docs/decisions.md: Sampling).

The official text phase samples through HF `generate`: logits in fp32, then temperature, top-k, top-p
(each only when active: temperature != 1, top_k != 0, top_p < 1; min_tokens_to_keep 1; removed entries
become -inf), softmax, and `torch.multinomial(probs, 1)`. A step samples all its rows at once (`sample_batch`:
one warp pass per warper over [B, V], one argmax, no host sync), yet each row reproduces its request's tokens
for its seed whatever else is in the batch: the per-row settings are tensors, every op is row-independent and
each row draws its noise from its own `torch.Generator`, so row i equals the one-row chain (`warp_logits`,
multinomial) bit for bit. Greedy rows (do_sample false or temperature 0) take the argmax and draw nothing.

Forcing (`constrain_batch`: the stage machine's forced token, greedy ratio pick, banned ratio tokens) makes
one-hot rows that still go through the draw here, exactly as in the official code, which keeps the generator
stream aligned. The serving worker and the golden verifier both force and sample through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from diffgentor.kernels.host_copy import to_device

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
    """Temperature -> top-k -> top-p on fp32 scores [1, V] (or [V]); returns new scores, -inf = removed.

    The one-row statement of the chain (the reference that `warp_batch` reproduces bit for bit per row)."""
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


class RowForcing(Protocol):
    """A row's stage-machine forcing for this step (`plan.SampleSpec` and `StageMachine.forcing` have it)."""

    forced_token: int | None
    ratio_ids: tuple[int, ...] | None  # greedy pick restricted to these ids (in this order; first max wins)
    banned_ids: tuple[int, ...] | None  # never sampled (ignored on forced and ratio steps)


@dataclass(frozen=True)
class Forcing:
    """A plain `RowForcing` (the default forces nothing)."""

    forced_token: int | None = None
    ratio_ids: tuple[int, ...] | None = None
    banned_ids: tuple[int, ...] | None = None


def constrain_batch(logits: torch.Tensor, rows: Sequence[RowForcing]) -> torch.Tensor:
    """The stage machine's forcing as the official processors apply it, on logits [B, V] in place.

    Row i: a forced token, or else (ratio ids given) the greedy ratio pick, becomes the only finite score (every
    score set to the dtype's minimum, the chosen id to 0; still sampled afterwards); otherwise its banned ids get
    the minimum. Index tensors are built on the host and copied once; nothing reads the device."""
    if logits.dim() != 2 or logits.size(0) != len(rows):
        raise ValueError(f"logits must be [{len(rows)}, vocab], got shape {tuple(logits.shape)}")
    lo = torch.finfo(logits.dtype).min
    hot_rows = [i for i, r in enumerate(rows) if r.forced_token is not None or r.ratio_ids is not None]
    ratio = [j for j, i in enumerate(hot_rows) if rows[i].forced_token is None]  # positions among hot_rows
    hot = set(hot_rows)
    banned = [(i, t) for i, r in enumerate(rows) if i not in hot and r.banned_ids for t in r.banned_ids]
    if not hot_rows and not banned:
        return logits
    ratio_ids = [rows[hot_rows[j]].ratio_ids for j in ratio]
    width = max(map(len, ratio_ids), default=0)
    # one packed host tensor: hot rows, their forced token (0 for ratio rows), the ratio rows' positions among
    # them, their ids (padded with the row's first id: a repeat never wins argmax over the first occurrence),
    # banned (row, id) pairs
    packed = to_device(
        hot_rows + [rows[i].forced_token or 0 for i in hot_rows] + ratio
        + [t for ids in ratio_ids for t in (*ids, *[ids[0]] * (width - len(ids)))]
        + [i for i, _ in banned] + [t for _, t in banned],
        torch.long, logits.device,
    )
    n_hot, n_ratio, n_ban = len(hot_rows), len(ratio), len(banned)
    hot_t, target, ratio_pos, ids_t, ban_rows, ban_ids = packed.split(
        [n_hot, n_hot, n_ratio, n_ratio * width, n_ban, n_ban])
    if n_ratio:
        ids_t = ids_t.view(n_ratio, width)
        scores = logits.index_select(0, hot_t.index_select(0, ratio_pos)).gather(1, ids_t)
        target = target.index_copy(0, ratio_pos, ids_t.gather(1, scores.argmax(1, keepdim=True)).view(-1))
    if n_hot:
        logits.index_fill_(0, hot_t, lo)  # in place: no [rows, vocab] temporary (the hot rows are distinct)
        logits.index_put_((hot_t, target), logits.new_zeros(()))
    if n_ban:
        logits.index_put_((ban_rows, ban_ids), logits.new_full((), lo))  # filled on the device: no host copy
    return logits


def warp_batch(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """`warp_logits` for rows [B, V] with per-row settings, one pass per warper; row i equals
    `warp_logits(scores[i], params[i])` bit for bit (tests/test_sampling.py). The settings reach the device as one
    [B, 4] float32 tensor (temperature, top-k index, top-k on, top-p threshold), copied once."""
    s = scores.to(torch.float32)
    dev, v = s.device, s.size(-1)
    ks = [min(max(p.top_k, 1), v) if p.top_k != 0 else 0 for p in params]
    use_t = any(p.temperature != 1.0 for p in params)
    use_k = any(ks)
    use_p = any(p.top_p < 1.0 for p in params)
    if not (use_t or use_k or use_p):
        return s
    # top-k index < 2**24 is exact in float32; the top-p threshold is cast to float32 as the one-row comparison
    # casts it, and -1 never drops (inactive rows)
    table = to_device([x for p, k in zip(params, ks) for x in (
        float(p.temperature), float(max(k - 1, 0)), float(k != 0), 1 - p.top_p if p.top_p < 1.0 else -1.0)],
        torch.float32, dev).view(-1, 4)
    if use_t:
        t = table[:, 0:1]
        # x / 1.0 == x exactly. CUDA divides a tensor by a Python scalar as a multiply by the scalar's float32
        # reciprocal, the CPU divides: each device repeats what the one-row chain does there
        s = s * t.reciprocal() if dev.type == "cuda" else s / t
    if use_k:
        kth = torch.topk(s, max(ks))[0].gather(1, table[:, 1:2].long())
        kth = torch.where(table[:, 2:3] > 0, kth, torch.full_like(kth, -float("inf")))
        s = s.masked_fill(s < kth, -float("inf"))
    if use_p:
        sorted_s, sorted_idx = torch.sort(s, descending=False)
        drop_sorted = sorted_s.softmax(dim=-1).cumsum(dim=-1) <= table[:, 3:4]
        drop_sorted[..., -1:] = False  # keep at least one token
        s = s.masked_fill(drop_sorted.scatter(1, sorted_idx, drop_sorted), -float("inf"))
    return s


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next tokens [B] (a device tensor, no host sync) for logits [B, V]; row i uses params[i] and generators[i]
    only, so a row's token never depends on the others or on the batch size.

    The draw is the one `torch.multinomial(probs, 1, generator=g)` makes, written out: argmax of probs / q with
    q ~ Exp(1) drawn from the row's own generator (V draws per row, exactly what multinomial consumes), minus
    multinomial's host-side validity check. Greedy rows take the argmax of their scores and draw nothing."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    b = logits.size(0)
    if len(params) != b or len(generators) != b:
        raise ValueError(f"{b} rows but {len(params)} params and {len(generators)} generators")
    scores = logits.to(torch.float32)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if not drawn:
        return torch.argmax(scores, dim=-1)
    every = len(drawn) == b
    rows = None if every else to_device(drawn, torch.long, scores.device)
    sub = scores if rows is None else scores.index_select(0, rows)
    probs = torch.softmax(warp_batch(sub, [params[i] for i in drawn]), dim=-1)
    q = torch.empty_like(probs)
    for j, i in enumerate(drawn):
        q[j].exponential_(1, generator=generators[i])
    tokens = torch.argmax(probs / q, dim=-1)
    if every:
        return tokens
    return torch.argmax(scores, dim=-1).index_copy_(0, rows, tokens)


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Next token of one request from its logits row [V] (or [1, V]); a host int (one sync)."""
    return int(sample_batch(logits.reshape(1, -1), [params], [generator])[0])
