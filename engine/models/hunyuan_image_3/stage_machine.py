"""Think / recaption stage machine of the text phase, one object per request, fed one token at a time.

The official code drives the text phase with two HF logits processors (a stage-transition forcer and a
ratio-vocabulary slicer) plus an eos set. An engine that batches requests of different stages needs the
same rules per request without HF, so this class replays them (golden `tiny_distil` README, "Observed
stage machine"; docs/decisions.md: Stage machine keeps the quirks):

* first stage = `bot_task.split("_")[0]`; the text prompt ends with `<think>` / `<recaption>`;
* think_recaption: after `</think>` force `<recaption>`;
* auto size: after END (`</recaption>` if "recaption" in bot_task else `</think>`) force the answer prefix
  `[<answer>] <boi> <img_size_N>`; after any `<img_size_N>` the next token is the greedy argmax over the 37
  ratio tokens; every ratio token stops the phase (it is the eos set);
* fixed size: stop on `</recaption>` (bot_task with recaption) or on `</think>` / `</recaption>` (think);
* each trigger fires once (a second `</think>` is ignored); `</recaption>` while still thinking is END and
  fires the answer prefix directly (recaption is skipped);
* forced tokens come from a queue: a token equal to the queue head pops it, a non-empty queue forces its
  head, otherwise an unfired trigger fills the queue;
* the CoT handed to the image phase is the start tag + generated tokens through the first END (all
  tokens when END never came);
* bot_task "image" with auto size: a single greedy ratio step after `...<answer><boi><img_size_N>`;
  bot_task "auto": free text until `<|endoftext|>`.

Think budget (docs/decisions.md): when `max_new_tokens` runs out inside a stage, `close()` returns the tokens that
end it as if
the model had emitted each open stage's end tag at once (following the forced transitions: e.g. inside
think of think_recaption `</think><recaption></recaption>`, then for auto size the answer prefix and a
pending ratio pick), so the request still yields an image. The official code raises (auto size) or wraps
the truncated text in `<answer>` (fixed size) there.

Forced steps still go through the sampler (the official forcing is a one-hot distribution that is then
sampled), so a request's RNG stream stays aligned with the official one. `forcing` is the one statement of what a
step may sample: the serving scheduler sends it to the worker (engine/scheduler.py, `SampleSpec`), whose batched
`sampling.constrain_batch` applies it; `constrain()` applies the same forcing through the same function to one
logits row (the golden verifier and the reference pipeline).

Auto size (docs/decisions.md, "Auto size picks a bucket that fits"): `limit_ratios()` restricts the ratio pick to
the buckets whose image phase fits the model's positions, and bans the other ratio tokens on free steps (a ratio
token also ends think/recaption text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffgentor.engine.request_contract import BOT_TASKS

from .sampling import Forcing, constrain_batch
from .tokenizer import HunyuanTokenizer, SpecialTokens


class StageMachineError(RuntimeError):
    """The engine fed the machine out of order (e.g. a token after it finished)."""


class StageMachine:
    """Per-request text-phase state: what the next token must be, when to stop, the CoT span.

    Engine loop for one request (prompt from `PromptBuilder.text_prompt(task=m.prompt_task)`):

        while not m.finished:
            if m.needs_close:              # budget spent inside a stage (docs/decisions.md: Think budget)
                append(m.close())          # prefill these; no sampling
                continue
            logits = next_logits()
            m.constrain(logits)            # forced token / greedy ratio pick, as one-hot
            m.feed(sample(logits))         # forced steps are drawn too (RNG alignment)

    Then the image phase uses `m.cot_ids` and, for auto size, `m.ratio_index`.
    """

    def __init__(
        self,
        special: SpecialTokens,
        size_token_id: int,
        *,
        bot_task: str,
        image_size_auto: bool,
        template: str = "instruct",
        max_new_tokens: int | None = None,
    ) -> None:
        if bot_task not in BOT_TASKS:
            raise ValueError(f"bot_task {bot_task!r} is not one of {BOT_TASKS}")
        if template not in ("instruct", "pretrain"):
            raise ValueError(f"sequence template {template!r} is not 'instruct' or 'pretrain'")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.sp = special
        self.size_id = size_token_id
        self.bot_task = bot_task
        self.need_ratio = image_size_auto
        self.template = template
        self.max_new_tokens = max_new_tokens
        self._ratio_ids = frozenset(special.ratio)

        self.transitions: dict[int, list[int]] = {}
        self.stop_ids: frozenset[int] = frozenset()
        self.first_stage: str | None
        self.prompt_task: str | None
        """`PromptBuilder.text_prompt` task for this request; None = no text phase."""
        self.end_id: int | None = None
        self.start_id: int | None = None
        cot_task = bot_task in ("think", "recaption", "think_recaption")
        if cot_task:
            self.first_stage = bot_task.split("_")[0]
            self.prompt_task = self.first_stage
            self.start_id = special.think if self.first_stage == "think" else special.recaption
            self.end_id = special.end_recaption if "recaption" in bot_task else special.end_think
            if bot_task == "think_recaption":
                self.transitions[special.end_think] = [special.recaption]
            if self.need_ratio:
                prefix = [special.answer] if template == "instruct" else []
                self.transitions[self.end_id] = prefix + [special.boi, size_token_id]
                self.stop_ids = self._ratio_ids
            elif "recaption" in bot_task:
                self.stop_ids = frozenset({special.end_recaption})
            else:
                self.stop_ids = frozenset({special.end_think, special.end_recaption})
        elif bot_task == "auto":
            self.first_stage, self.prompt_task = "answer", "auto"
            self.need_ratio = False
            self.stop_ids = frozenset({special.eos})
        elif self.need_ratio:  # image, auto size: one greedy ratio step
            self.first_stage, self.prompt_task = "ratio", "img_ratio"
            self.stop_ids = self._ratio_ids
        else:  # image, fixed size: no text phase
            self.first_stage = self.prompt_task = None

        self.allowed_ratios: tuple[int, ...] | None = None
        """Auto size: the bucket indexes the ratio pick may choose (None: all of them; `limit_ratios`)."""
        self._offered_ratio_ids = tuple(special.ratio)
        self._banned_ids: tuple[int, ...] | None = None
        self.tokens: list[int] = []
        """Every token after the prompt: fed ones, then any closing tokens from `close()`."""
        self.n_fed = 0
        self.stage: str | None = self.first_stage
        self._pending: list[int] = []
        self._completed: set[int] = set()
        self._forced: int | None = None
        self._ratio_pick = False
        self._stopped = self.prompt_task is None
        self._budget_hit = False
        self.closed = False
        self.closing_tokens: list[int] = []
        if self.prompt_task is not None:
            tail = {"think": special.think, "recaption": special.recaption, "auto": None}.get(
                self.prompt_task, size_token_id
            )
            if tail is not None:
                self._observe(tail)

    @classmethod
    def for_request(
        cls,
        tokenizer: HunyuanTokenizer,
        *,
        bot_task: str,
        image_size: str | tuple[int, int] = "auto",
        base_size: int,
        template: str = "instruct",
        max_new_tokens: int | None = None,
    ) -> StageMachine:
        """Machine for a request; `image_size` "auto" lets the model pick the ratio."""
        return cls(
            tokenizer.special,
            tokenizer.size_token_id(base_size),
            bot_task=bot_task,
            image_size_auto=isinstance(image_size, str) and image_size == "auto",
            template=template,
            max_new_tokens=max_new_tokens,
        )

    def limit_ratios(self, allowed: tuple[int, ...] | None) -> None:
        """Offer only the buckets `allowed` (indexes) to the ratio pick, and never sample the other ratio tokens on a
        free step; None offers every bucket and bans nothing (the official pick)."""
        ratio = self.sp.ratio
        if allowed is not None and not all(0 <= r < len(ratio) for r in allowed):
            raise ValueError(f"ratio indexes must be in [0, {len(ratio)}), got {allowed}")
        self.allowed_ratios = None if allowed is None else tuple(allowed)
        self._offered_ratio_ids = tuple(ratio) if allowed is None else tuple(ratio[r] for r in allowed)
        self._banned_ids = None if allowed is None else tuple(t for r, t in enumerate(ratio) if r not in allowed)

    # ------------------------------------------------------------------------------------ state
    @property
    def forced_token(self) -> int | None:
        """The token the next step must produce (a forced transition), or None."""
        return self._forced

    @property
    def pending(self) -> tuple[int, ...]:
        """Forced tokens still queued (head first), as the official transition processor holds them."""
        return tuple(self._pending)

    @property
    def completed_triggers(self) -> frozenset[int]:
        """Transition triggers that already fired (each fires once)."""
        return frozenset(self._completed)

    @property
    def needs_ratio_pick(self) -> bool:
        """The next step is the greedy ratio pick (restricted to the 37 ratio tokens)."""
        return self._ratio_pick and self._forced is None and not self._stopped

    @property
    def needs_close(self) -> bool:
        """The budget ran out inside a stage; call `close()` before anything else."""
        return self._budget_hit and not self.closed and not self._stopped

    @property
    def finished(self) -> bool:
        """No more tokens: stopped, or closed with no ratio pick left (or no text phase at all)."""
        if self._stopped:
            return True
        if self._budget_hit:
            return self.closed and not self._ratio_pick
        return False

    @property
    def truncated(self) -> bool:
        """The budget ran out before the phase ended by itself (docs/decisions.md: Think budget applied)."""
        return self._budget_hit

    @property
    def ratio_index(self) -> int | None:
        """Bucket index chosen by the model (auto size), once the ratio token is in."""
        if not self.need_ratio or not self.tokens:
            return None
        return self.sp.ratio_index(self.tokens[-1])

    @property
    def cot_ids(self) -> list[int]:
        """CoT for the image phase: start tag + tokens through the first END (all tokens without one)."""
        if self.start_id is None:
            return []
        toks = self.tokens
        if self.end_id in toks:
            toks = toks[: toks.index(self.end_id) + 1]
        return [self.start_id] + list(toks)

    # ------------------------------------------------------------------------------------ steps
    @property
    def forcing(self) -> Forcing:
        """What this step may sample: the forced token; or else, on the greedy ratio pick, the offered ratio ids; or
        else anything but the banned ratio tokens (`limit_ratios`)."""
        if self.needs_ratio_pick:
            return Forcing(ratio_ids=self._offered_ratio_ids)
        return Forcing(forced_token=self._forced, banned_ids=self._banned_ids)

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply this step's official forcing to a 1-D logits row in place and return it.

        A forced token (or the greedy ratio pick) becomes the only finite-probability entry: every score
        is set to the dtype's minimum and the chosen id to 0, as the official processors do. Free steps
        are left untouched but for banned ratio tokens. The serving worker's forcing: the same `forcing`, through
        the same `constrain_batch`.
        """
        if self._stopped:
            raise StageMachineError("the text phase is over; no further step to constrain")
        constrain_batch(logits.view(1, -1), [self.forcing])
        return logits

    def feed(self, token_id: int) -> None:
        """Record the token the step produced and advance (forcing, triggers, stop, budget)."""
        if self._stopped or (self._budget_hit and not (self.closed and self._ratio_pick)):
            raise StageMachineError("token fed after the text phase finished (or before close())")
        token_id = int(token_id)
        if self._forced is not None and token_id != self._forced:
            raise StageMachineError(f"step is forced to {self._forced}, got {token_id}")
        if self.needs_ratio_pick and token_id not in self._ratio_ids:
            raise StageMachineError(f"step is the ratio pick, got non-ratio token {token_id}")
        after_budget = self._budget_hit
        self.tokens.append(token_id)
        if not after_budget:
            self.n_fed += 1
        if token_id in self.stop_ids:
            self._stopped = True
            self._forced = None
            self._ratio_pick = False
            return
        self._observe(token_id)
        if not after_budget and self.max_new_tokens is not None and self.n_fed >= self.max_new_tokens:
            self._budget_hit = True

    def close(self) -> list[int]:
        """Think budget (docs/decisions.md): tokens that end the open stage(s) after the budget ran out (appended to
        `tokens`).

        For auto size `needs_ratio_pick` is then true: run one more step and `feed()` the ratio token.
        Returns [] when nothing is open (also for bot_task auto/image).
        """
        if self.closed or self._stopped:
            return []
        self.closed = True
        out: list[int] = []
        if self.start_id is None:
            if not self._ratio_pick:
                self._stopped = True
            return out
        while not self._stopped and not self._ratio_pick:
            tok = self._pending[0] if self._pending else self._stage_end_tag()
            out.append(tok)
            self.tokens.append(tok)
            if tok in self.stop_ids:
                self._stopped = True
                break
            self._observe(tok)
        self.closing_tokens = out
        return out

    # ------------------------------------------------------------------------------------ internals
    def _stage_end_tag(self) -> int:
        if self.stage == "think":
            return self.sp.end_think
        if self.stage == "recaption":
            return self.sp.end_recaption
        raise StageMachineError(f"no open stage to close in state {self.stage!r}")  # pragma: no cover

    def _observe(self, last: int) -> None:
        """The official per-step processor logic, looking at the last token of the sequence."""
        forced: int | None = None
        if self._pending and last == self._pending[0]:
            self._pending.pop(0)
        if self._pending:
            forced = self._pending[0]
        elif last in self.transitions and last not in self._completed:
            self._completed.add(last)
            self._pending = list(self.transitions[last])
            forced = self._pending[0] if self._pending else None
            self.stage = "recaption" if last == self.sp.end_think and last != self.end_id else "answer_prefix"
        self._forced = forced
        self._ratio_pick = self.need_ratio and last == self.size_id
        if self._ratio_pick:
            self.stage = "ratio"


def replay(machine: StageMachine, tokens: Sequence[int]) -> list[int | None]:
    """Feed `tokens` in order; returns the forced token (or greedy ratio token) seen before each one.

    A ratio-pick step reports the token that was fed (it is the argmax by construction). Test helper for
    golden traces; the engine feeds tokens itself.
    """
    seen: list[int | None] = []
    for t in tokens:
        if machine.finished or machine.needs_close:
            break
        if machine.forced_token is not None:
            seen.append(machine.forced_token)
        elif machine.needs_ratio_pick:
            seen.append(int(t))
        else:
            seen.append(None)
        machine.feed(t)
    return seen
