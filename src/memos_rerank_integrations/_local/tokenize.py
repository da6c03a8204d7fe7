"""Bounded tokenization: the first tokens of a long text for about their own cost."""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from typing import Any

__all__ = ["encode_head", "head_text"]

# -- bounded tokenization -------------------------------------------------------------------
#
# A document of 50 MB must not be tokenized whole when only its first few thousand
# tokens can be scored. encode_head tokenizes a growing prefix of the text and keeps
# only the tokens that the rest of the text cannot change:
#
# * the prefix ends just before a "stable" character, one whose canonical
#   decomposition starts with a character that never combines with what precedes it,
#   so Unicode normalization (NFC, NFD, accent stripping, lowercasing) of the prefix
#   is the start of the normalization of the whole text;
# * the cut is never inside an occurrence of one of the tokenizer's added tokens
#   (they are matched before anything else);
# * the tokens of the prefix's last two pre-tokens ("words": what the pre-tokenizer
#   splits before BPE / WordPiece / Unigram runs on each) are dropped: a pre-token
#   is decided by the text up to its end plus a character of lookahead, so every
#   earlier word is final;
# * as a cross-check, only tokens on which a second, longer prefix agrees are kept.
#
# A single pre-token longer than the prefix (tens of kilobytes of letters without a
# space) is, for BPE models, decided by the agreement of the two prefixes alone, less
# a margin: BPE merges only reach their neighbours. Other models read on until the
# word ends (WordPiece turns a word of over 100 characters into one [UNK], so a long
# word's pieces depend on its length).

_HEAD_MIN_CHARS = 1024
_CHARS_PER_TOKEN = 4
_AGREEMENT_MARGIN = 16
_CUT_SEARCH = 1024


@functools.cache
def _composition_seconds() -> frozenset[str]:
    """Characters that can combine with the character before them under NFC (the
    second half of a canonical composition, Hangul vowels and trailing consonants)."""
    seconds = {chr(cp) for cp in range(0x1161, 0x1176)} | {chr(cp) for cp in range(0x11A8, 0x11C3)}
    for cp in range(0x30000):
        decomposition = unicodedata.decomposition(chr(cp))
        if not decomposition or decomposition.startswith("<"):
            continue
        parts = decomposition.split()
        if len(parts) == 2 and unicodedata.normalize("NFC", chr(cp)) == chr(cp):
            seconds.add(chr(int(parts[1], 16)))
    return frozenset(seconds)


def _stable(char: str) -> bool:
    if char.isascii():
        return True
    first = unicodedata.normalize("NFD", char)[0]
    return unicodedata.combining(first) == 0 and first not in _composition_seconds()


def _special_strings(tokenizer: Any) -> tuple[str, ...]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tuple({str(getattr(token, "content", token)) for token in decoder.values()} - {""})


def _safe_cut(text: str, position: int, specials: Sequence[str]) -> tuple[int, bool]:
    """A position near ``position`` (left of it if possible) where ``text`` can be cut,
    and whether it is safe for normalization."""
    if position >= len(text):
        return len(text), True
    cut, safe = position, False
    for candidate in (
        *range(position, max(position - _CUT_SEARCH, 0), -1),
        *range(position + 1, min(position + _CUT_SEARCH, len(text))),
    ):
        if _stable(text[candidate]):
            cut, safe = candidate, True
            break
    moved = True
    while moved and cut > 0:
        moved = False
        for special in specials:
            start = text.find(special, max(cut - len(special) + 1, 0), cut + len(special) - 1)
            if start != -1 and start < cut < start + len(special):
                cut, moved = start, True
    return cut, safe


def _encode_words(tokenizer: Any, text: str) -> tuple[list[int], list[int | None]]:
    encoding = tokenizer(text, add_special_tokens=False)
    return list(encoding["input_ids"]), list(encoding.word_ids())


def _is_bpe(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "model", None)).__name__ == "BPE"


def _stable_count(
    ids: Sequence[int], words: Sequence[int | None], other: Sequence[int], *, bpe: bool
) -> int:
    agree = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        agree += 1
    known = [word for word in words if word is not None]
    if not known:
        return 0
    last = known[-1]
    before_last_two = next(
        (i for i, word in enumerate(words) if word is not None and word >= last - 1), len(ids)
    )
    if bpe and before_last_two * 2 < len(ids):
        # The last two words fill most of the prefix: one very long pre-token.
        return max(min(before_last_two, agree), agree - _AGREEMENT_MARGIN)
    return min(before_last_two, agree)


def _head(tokenizer: Any, text: str, need: int, specials: Sequence[str]) -> tuple[list[int], int]:
    chars = _CHARS_PER_TOKEN * need + _HEAD_MIN_CHARS
    while True:
        if chars >= len(text):
            return list(tokenizer(text, add_special_tokens=False)["input_ids"]), len(text)
        cut, _ = _safe_cut(text, chars, specials)
        check, _ = _safe_cut(text, chars + max(_HEAD_MIN_CHARS, chars // 8), specials)
        if cut <= 0 or check >= len(text) or check <= cut:
            chars *= 2
            continue
        ids, words = _encode_words(tokenizer, text[:cut])
        other = tokenizer(text[:check], add_special_tokens=False)["input_ids"]
        keep = _stable_count(ids, words, other, bpe=_is_bpe(tokenizer))
        if keep >= need:
            return ids[:keep], cut
        chars *= 2


def encode_head(tokenizer: Any, texts: Sequence[str], need: int) -> list[list[int]]:
    """For each text, its first token ids (no special tokens), at least ``need`` of
    them when the text has that many; fewer means all of them.

    Equal to ``tokenizer(text, add_special_tokens=False)["input_ids"][:len(result)]``,
    but a long text costs about its first ``need`` tokens' worth of work and memory,
    not its length.
    """
    if need < 1:
        return [[] for _ in texts]
    limit = _CHARS_PER_TOKEN * need + _HEAD_MIN_CHARS
    short = [i for i, text in enumerate(texts) if len(text) <= limit]
    out: list[list[int]] = [[] for _ in texts]
    if short:
        encoded = tokenizer([texts[i] for i in short], add_special_tokens=False)["input_ids"]
        for i, ids in zip(short, encoded, strict=True):
            out[i] = list(ids)
    specials: Sequence[str] | None = None
    for i, text in enumerate(texts):
        if len(text) > limit:
            specials = _special_strings(tokenizer) if specials is None else specials
            out[i] = _head(tokenizer, text, need, specials)[0]
    return out


def head_text(tokenizer: Any, text: str, need: int) -> str:
    """A prefix of ``text`` (maybe all of it) whose first ``need`` tokens are the
    first ``need`` tokens of ``text`` (see :func:`encode_head`)."""
    if len(text) <= _CHARS_PER_TOKEN * need + _HEAD_MIN_CHARS:
        return text
    return text[: _head(tokenizer, text, need, _special_strings(tokenizer))[1]]
