"""Incremental detokenisation of a generated token stream: text deltas that only ever extend what was sent.

Decoding the whole sequence after every token and sending the new suffix breaks as soon as a token ends inside a
multi-byte character (byte-level BPE and byte-fallback tokenizers split UTF-8 characters across tokens): the partial
bytes decode to U+FFFD, the next token turns that U+FFFD into the real character, the text no longer extends what was
sent, and no delta can follow. This is vLLM's scheme instead: two offsets into the ids, `prefix_offset` (start of a
short window decoded again only for context, so tokenizers that drop a leading space at the start of a decode
still produce it) and `read_offset` (the end of what was already sent). Each push decodes the window
`ids[prefix_offset:]`, and sends the part after `ids[prefix_offset:read_offset]`'s text unless it ends in U+FFFD (an
incomplete character: held back until a later token completes it). Each decode covers a few tokens, never the whole
text.
"""

from __future__ import annotations

from collections.abc import Iterable

from diffgentor.engine.model_interface import TokenDecoder

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of one sequence, token by token.

    `prefix_ids` are ids that open the text (e.g. the `<think>` the stage machine starts a think phase with): they
    are part of `text` and of the first delta, exactly as if pushed first. `text` is everything sent so far; once
    `finish()` has flushed the held-back tail it equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: TokenDecoder, prefix_ids: Iterable[int] | None = None) -> None:
        self._tok = tokenizer
        self._ids: list[int] = [int(i) for i in (prefix_ids or ())]
        self._prefix_offset = 0
        self._read_offset = 0
        self._sent: list[str] = []

    @property
    def text(self) -> str:
        """The text sent so far (the concatenation of every delta returned)."""
        return "".join(self._sent)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_ids: list[int]) -> str:
        """Appends `token_ids`; returns the new text they complete ("" while it ends in an incomplete character)."""
        self._ids.extend(int(i) for i in token_ids)
        return self._advance(hold_incomplete=True)

    def finish(self) -> str:
        """The held-back tail (an incomplete character at the very end decodes to U+FFFD here, as in a full
        decode); call once when the sequence ends."""
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        window = self._ids[self._prefix_offset:]
        prefix_text = self._tok.decode(window[: self._read_offset - self._prefix_offset])
        new_text = self._tok.decode(window)
        if len(new_text) <= len(prefix_text) or (hold_incomplete and new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._sent.append(delta)
        return delta
