"""Tokenizer of a HunyuanImage-3.0 checkpoint: `tokenizer.json` plus special-token ids looked up by name.

docs/decisions.md: Token ids: ids are never hard-coded. The real checkpoint and the tiny golden ones put the
same tokens at completely different ids, so everything downstream (prompt builder, stage machine) asks
this object. A token the engine needs but the file lacks is reported by name at load time, not as a
wrong id later. `<guidance>` / `<timestep_r>` are only required for the Distil (cfg-distilled / MeanFlow)
checkpoints.

`encode` adds nothing (no BOS): the official prompt builder tokenizes every text segment separately and
adds BOS itself. Added tokens written in the text (e.g. "<think>") still become their single id, as
with the official `encode(text, add_special_tokens=False)`. `decode` keeps special tokens, like the
official decode of the CoT text; ids the tokenizer does not know (the padding rows of the embedding,
which a sampler can still pick) decode to "".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

NUM_RATIO_TOKENS = 37


class TokenizerError(ValueError):
    """A checkpoint tokenizer that lacks a token the engine needs."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the engine uses, resolved by name from `tokenizer.json`."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    img: int
    cfg: int
    timestep: int
    joint_img_sep: int
    answer: int
    end_answer: int
    think: int
    end_think: int
    recaption: int
    end_recaption: int
    ratio: tuple[int, ...]
    """`<img_ratio_k>` ids in index order k = 0..36 (not contiguous in the real vocabulary)."""
    guidance: int | None = None
    timestep_r: int | None = None

    def ratio_index(self, token_id: int) -> int | None:
        """Bucket index of a ratio token id, or None if `token_id` is not a ratio token."""
        try:
            return self.ratio.index(token_id)
        except ValueError:
            return None


_REQUIRED_NAMES: dict[str, str] = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "pad": "<pad>",
    "boi": "<boi>",
    "eoi": "<eoi>",
    "img": "<img>",
    "cfg": "<cfg>",
    "timestep": "<timestep>",
    "joint_img_sep": "<joint_img_sep>",
    "answer": "<answer>",
    "end_answer": "</answer>",
    "think": "<think>",
    "end_think": "</think>",
    "recaption": "<recaption>",
    "end_recaption": "</recaption>",
}
_DISTIL_NAMES: dict[str, str] = {"guidance": "<guidance>", "timestep_r": "<timestep_r>"}


class HunyuanTokenizer:
    """`tokenizers.Tokenizer` from a checkpoint folder plus the resolved special ids (`.special`)."""

    def __init__(self, tokenizer: Tokenizer, *, require_distil_tokens: bool = False) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        missing: list[str] = []

        def look(name: str, required: bool) -> int | None:
            tid = tokenizer.token_to_id(name)
            if tid is None and required:
                missing.append(name)
            return tid

        ids = {field: look(tok, True) for field, tok in _REQUIRED_NAMES.items()}
        distil = {field: look(tok, require_distil_tokens) for field, tok in _DISTIL_NAMES.items()}
        ratio = tuple(look(f"<img_ratio_{k}>", True) for k in range(NUM_RATIO_TOKENS))
        if missing:
            raise TokenizerError(
                "tokenizer.json lacks special token(s) HunyuanImage-3.0 needs: " + ", ".join(missing)
            )
        self.special = SpecialTokens(ratio=ratio, **ids, **distil)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | Path, *, require_distil_tokens: bool = False
    ) -> HunyuanTokenizer:
        """Load `tokenizer.json` from a checkpoint folder (the Distil checkpoints need guidance tokens)."""
        path = Path(ckpt_dir) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path} not found: the checkpoint folder has no tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), require_distil_tokens=require_distil_tokens)

    # ------------------------------------------------------------------ lookups
    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def require(self, token: str) -> int:
        """Id of `token`, with an error naming it when the tokenizer lacks it."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"tokenizer.json has no token {token!r}")
        return tid

    def size_token_id(self, base_size: int) -> int:
        """`<img_size_{base_size}>`: the base-size token in front of every image block."""
        return self.require(f"<img_size_{base_size}>")

    @property
    def guidance_id(self) -> int:
        if self.special.guidance is None:
            raise TokenizerError(
                "tokenizer.json has no '<guidance>' token (needed by cfg-distilled checkpoints)"
            )
        return self.special.guidance

    @property
    def timestep_r_id(self) -> int:
        if self.special.timestep_r is None:
            raise TokenizerError(
                "tokenizer.json has no '<timestep_r>' token (needed by MeanFlow checkpoints)"
            )
        return self.special.timestep_r

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, nothing added (no BOS); added tokens in the text map to their id."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with special tokens kept; ids unknown to the tokenizer decode to ""."""
        known = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=False)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tok.id_to_token(int(i)) for i in ids]
