"""A model's ``tokenizer.json`` read with the ``tokenizers`` library, where that
gives exactly the token ids transformers' ``AutoTokenizer`` gives.

Importing transformers takes longer (over a second) than anything else a first score
needs besides torch and the weights, and a tokenizer needs none of it: a transformers
"fast" tokenizer is a ``tokenizers.Tokenizer`` plus settings from
``tokenizer_config.json``. :func:`open_tokenizer_file` reads the file directly only
where those settings change nothing:

* the class is one that runs ``tokenizer.json`` as stored (``TokenizersBackend``,
  ``PreTrainedTokenizerFast``), or Qwen2's, whose normalizer, pre-tokenizer, decoder
  and BPE options (transformers rebuilds them from its own code, keeping only the
  vocabulary and merges) are the ones in the file;
* every special token the config names (and every entry of its
  ``added_tokens_decoder``) is an added token of the file, with the same id and
  flags, so transformers adds nothing;
* no option that changes splitting is set (``add_prefix_space``,
  ``split_special_tokens``).

Anything else (another class, a changed pattern, a missing or unreadable file)
returns ``None`` and the caller loads the tokenizer through transformers.

torch and transformers are never imported here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .._engine.checkpoint import model_file

__all__ = ["FileTokenizer", "open_tokenizer_file", "qwen2_pipeline"]

# The pre-tokenizer split pattern transformers' Qwen2Tokenizer builds (Qwen2, Qwen3).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_CLASSES = frozenset({"Qwen2Tokenizer", "Qwen2TokenizerFast"})
_AS_STORED_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# Qwen2Tokenizer's default special tokens (added even where the config names none).
_QWEN2_DEFAULT_SPECIALS = ("<|endoftext|>",)
_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_LIST_KEYS = ("additional_special_tokens", "extra_special_tokens")
_FLAGS = ("lstrip", "rstrip", "single_word", "normalized", "special")
_SPLITTING_OPTIONS = ("add_prefix_space", "split_special_tokens")


class _Encoded:
    """What this package reads of transformers' ``BatchEncoding``: ``["input_ids"]``
    (one text's ids, or a list of them for a list of texts) and, for one text,
    :meth:`word_ids`."""

    __slots__ = ("_encodings", "_single")

    def __init__(self, encodings: list[Any], *, single: bool) -> None:
        self._encodings = encodings
        self._single = single

    def __getitem__(self, key: str) -> list[int] | list[list[int]]:
        if key != "input_ids":
            raise KeyError(key)
        if self._single:
            return list(self._encodings[0].ids)
        return [list(encoding.ids) for encoding in self._encodings]

    def word_ids(self) -> list[int | None]:
        """Each token's pre-token ("word") index (``None`` for an added token)."""
        return list(self._encodings[0].word_ids)


class FileTokenizer:
    """A ``tokenizers.Tokenizer`` answering the calls this package makes of a
    transformers fast tokenizer: ``tokenizer(text or texts, add_special_tokens=...)``,
    :meth:`encode`, :meth:`decode` (special tokens kept, as transformers' default),
    :meth:`convert_tokens_to_ids`, :meth:`convert_ids_to_tokens`,
    ``added_tokens_decoder`` and ``backend_tokenizer``. Truncation and padding are off,
    as transformers turns them off for a call that asks for neither."""

    def __init__(self, backend: Any) -> None:
        backend.no_truncation()
        backend.no_padding()
        self.backend_tokenizer = backend

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        """The added tokens (``tokenizers.AddedToken``) by id."""
        decoder: dict[int, Any] = self.backend_tokenizer.get_added_tokens_decoder()
        return decoder

    def __call__(self, text: str | Sequence[str], *, add_special_tokens: bool = True) -> _Encoded:
        if isinstance(text, str):
            encoding = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return _Encoded([encoding], single=True)
        encodings = self.backend_tokenizer.encode_batch(
            list(text), add_special_tokens=add_special_tokens
        )
        return _Encoded(encodings, single=False)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids."""
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included."""
        text: str = self.backend_tokenizer.decode(list(ids), skip_special_tokens=False)
        return text

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """The id of a token, ``None`` where the vocabulary has no such token."""
        token_id: int | None = self.backend_tokenizer.token_to_id(token)
        return token_id

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        """The token of an id, ``None`` where there is none."""
        token: str | None = self.backend_tokenizer.id_to_token(token_id)
        return token


def open_tokenizer_file(model: str) -> FileTokenizer | None:
    """``model``'s tokenizer (a directory or a Hub id) read from its
    ``tokenizer.json``, where transformers would load the same tokenizer (see the
    module docs); ``None`` otherwise (the caller then loads it through transformers).
    """
    config_file = model_file(model, "tokenizer_config.json")
    tokenizer_file = model_file(model, "tokenizer.json")
    if config_file is None or tokenizer_file is None:
        return None
    try:
        from tokenizers import Tokenizer

        config = json.loads(config_file.read_text(encoding="utf-8"))
        backend = Tokenizer.from_file(str(tokenizer_file))
        same = isinstance(config, dict) and _as_transformers_loads(config, backend)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # unreadable or unexpected files (the tokenizers library
        # panics on some, and its panic is a BaseException): transformers decides
        return None
    return FileTokenizer(backend) if same else None


def _as_transformers_loads(config: dict[str, Any], backend: Any) -> bool:
    """Whether transformers, given ``config``, would tokenize as ``backend`` does."""
    kind = config.get("tokenizer_class")
    if kind in _QWEN2_CLASSES:
        if not _qwen2_pipeline(backend):
            return False
        specials = [*_QWEN2_DEFAULT_SPECIALS, *_named_specials(config)]
    elif kind in _AS_STORED_CLASSES:
        specials = _named_specials(config)
    else:
        return False
    if any(config.get(option) for option in _SPLITTING_OPTIONS):
        return False
    added_tokens: dict[int, Any] = backend.get_added_tokens_decoder()
    added = {token.content: (token_id, token) for token_id, token in added_tokens.items()}
    for content in specials:
        known = added.get(content)
        if known is None or not known[1].special:
            return False
    declared = config.get("added_tokens_decoder", {})
    if not isinstance(declared, dict):
        return False
    for key, entry in declared.items():
        listed = entry.get("content") if isinstance(entry, dict) else entry
        known = added.get(listed) if isinstance(listed, str) else None
        if known is None or str(known[0]) != str(key):
            return False
        if isinstance(entry, dict) and any(
            flag in entry and entry[flag] != getattr(known[1], flag) for flag in _FLAGS
        ):
            return False
    return True


def _named_specials(config: dict[str, Any]) -> list[str]:
    """The special tokens ``config`` names (each a string, or a dict with
    ``content``); raises ``ValueError`` on anything else."""
    named: list[Any] = [config[key] for key in _SPECIAL_KEYS if config.get(key) is not None]
    for key in _LIST_KEYS:
        values = config.get(key) or []
        named.extend(values.values() if isinstance(values, dict) else values)
    contents = []
    for token in named:
        content = token.get("content") if isinstance(token, dict) else token
        if not isinstance(content, str):
            raise ValueError(f"a special token of an unexpected form: {token!r}")
        contents.append(content)
    return contents


def qwen2_pipeline() -> dict[str, Any]:
    """The normalizer, pre-tokenizer and decoder transformers' Qwen2Tokenizer builds
    (Qwen2, Qwen3), by the ``tokenizers.Tokenizer`` attribute each goes in."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    return {
        "normalizer": normalizers.NFC(),
        "pre_tokenizer": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        "decoder": decoders.ByteLevel(),
    }


def _qwen2_pipeline(backend: Any) -> bool:
    """Whether ``backend``'s normalizer, pre-tokenizer, decoder and BPE options are
    the ones transformers' Qwen2Tokenizer builds."""
    for part, component in qwen2_pipeline().items():
        stored = getattr(backend, part)
        if stored is None or _state(stored) != _state(component):
            return False
    model = backend.model
    return (
        type(model).__name__ == "BPE"
        and model.dropout is None
        and model.unk_token is None
        and not model.continuing_subword_prefix  # None and "" both add nothing
        and not model.end_of_word_suffix
        and model.fuse_unk is False
        and model.byte_fallback is False
        and getattr(model, "ignore_merges", False) is False
    )


def _state(component: Any) -> Any:
    """A tokenizer component's settings (its serialized form)."""
    return json.loads(component.__getstate__())
