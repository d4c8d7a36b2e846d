"""engine/detokenizer.py: deltas of multi-byte text split at every token boundary, with the tiny checkpoint's
byte-level BPE tokenizer and a sentencepiece-style byte-fallback tokenizer (`<0xE4>` tokens, `▁` spaces)."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from diffgentor.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from diffgentor.engine.models.hunyuan_image_3.tokenizer import _REQUIRED_NAMES, NUM_RATIO_TOKENS, HunyuanTokenizer
from diffgentor.engine.testing.tiny_model import build_tiny_tokenizer

TEXTS = ["把天空变成紫色", "a cat 🐱 on a 🛹, très bien", "<think>画一只猫</think><recaption>猫 🐈‍⬛</recaption>",
         "mixed: 日本語とEnglish and emoji 👩‍👩‍👧"]


def _byte_fallback_tokenizer() -> Tokenizer:
    """Llama-style: a few whole pieces, everything else as <0xNN> byte tokens decoded by ByteFallback."""
    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁a", "▁cat", "▁on", "a", "t", "c", "▁bien"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _with_specials(tok: Tokenizer) -> HunyuanTokenizer:
    names = [*_REQUIRED_NAMES.values(), *(f"<img_ratio_{k}>" for k in range(NUM_RATIO_TOKENS))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    return HunyuanTokenizer(tok)


@pytest.fixture(scope="module", params=["tiny_byte_level", "byte_fallback"])
def tok(request) -> HunyuanTokenizer:
    if request.param == "tiny_byte_level":
        return HunyuanTokenizer(build_tiny_tokenizer())
    return _with_specials(_byte_fallback_tokenizer())


def _ids(tok: HunyuanTokenizer, text: str) -> tuple[list[int], str]:
    """The ids of `text` and their full decode (what the deltas must add up to: the sentencepiece-style one puts
    a space in front of the text after each special token)."""
    ids = tok.encode(text)
    full = tok.decode(ids)
    assert full.replace(" ", "") == text.replace(" ", "")
    return ids, full


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_add_up_and_never_hold_a_broken_character(tok, text):
    ids, text = _ids(tok, text)
    partial = [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert any(p.endswith(REPLACEMENT_CHAR) for p in partial), "the text must split a character across tokens"
    det = IncrementalDetokenizer(tok)
    deltas = []
    for k, i in enumerate(ids):
        deltas.append(det.push([i]))
        if not partial[k].endswith(REPLACEMENT_CHAR):  # deltas keep flowing: all complete text is out at once
            assert det.text == partial[k], k
    deltas.append(det.finish())
    assert "".join(deltas) == det.text == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_every_split_position(tok, text):
    ids, text = _ids(tok, text)
    for k in range(len(ids) + 1):
        det = IncrementalDetokenizer(tok)
        first, second = det.push(ids[:k]), det.push(ids[k:])
        assert first + second + det.finish() == text, k
        assert text.startswith(first) and REPLACEMENT_CHAR not in first + second, k


def test_prefix_ids_open_the_text(tok):
    think = tok.special.think
    ids, _ = _ids(tok, "天空")
    det = IncrementalDetokenizer(tok, prefix_ids=[think])
    deltas = [det.push([i]) for i in ids]
    assert next(d for d in deltas if d).startswith("<think>") and det.text == tok.decode([think, *ids])
    assert det.text.replace(" ", "") == "<think>天空"


def test_finish_flushes_an_unfinished_character(tok):
    ids, _ = _ids(tok, "ok 猫")
    det = IncrementalDetokenizer(tok)
    for i in ids[:-1]:
        det.push([i])
    held = det.text
    assert not held.endswith(REPLACEMENT_CHAR)
    tail = det.finish()
    assert det.text == held + tail == tok.decode(ids[:-1])
    assert tail.endswith(REPLACEMENT_CHAR) and det.finish() == ""


def test_invalid_bytes_in_the_middle_are_sent_once_text_follows():
    tok = HunyuanTokenizer(build_tiny_tokenizer())
    stray = tok.encode("猫")[-1:]  # a lone UTF-8 continuation byte: never a complete character
    ids = stray + tok.encode(" and more")
    det = IncrementalDetokenizer(tok)
    out = "".join(det.push([i]) for i in ids) + det.finish()
    assert out == tok.decode(ids) and out.startswith(REPLACEMENT_CHAR)


def test_unknown_ids_decode_to_nothing():
    tok = HunyuanTokenizer(build_tiny_tokenizer())
    det = IncrementalDetokenizer(tok)
    assert det.push([tok.vocab_size + 5]) == "" and det.finish() == "" and det.text == ""
