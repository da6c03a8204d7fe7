"""What every local backend shares: device and dtype choice, the process-wide
model cache (with loading serialized against every other model use), bounded
tokenization of long texts, and length-sorted, token-budget batching.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import unicodedata
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._exceptions import InvalidInputError, ModelLoadError
from ._extras import missing_extra

if TYPE_CHECKING:
    import torch

__all__ = [
    "budget_batches",
    "check_positive_int",
    "clear_model_cache",
    "cpu_has_amx",
    "encode_head",
    "head_text",
    "inference",
    "limit_padding",
    "load_shared",
    "model_cache_key",
    "require_local",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger("memos_rerank_integrations")

T = TypeVar("T")

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def check_positive_int(value: object, *, name: str, allow_none: bool = False) -> int | None:
    """Validate an integer option that must be >= 1 (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise InvalidInputError(f"{name} must be {expected}, got {value!r}.")
    return value


def model_cache_key(
    kind: str, model: str | Path, device: torch.device, dtype: torch.dtype
) -> tuple[str, str, str, str]:
    """The :func:`load_shared` key of a local model: one load per kind of scorer,
    model (a local path counts by its resolved location), device and dtype."""
    name = str(model)
    local = Path(name).expanduser()
    if local.exists():
        name = str(local.resolve())
    return (kind, name, str(device), str(dtype))


def require_local(feature: str) -> None:
    """Check torch and transformers import, or explain which extra to install."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise missing_extra("local", exc.name or "torch", feature=feature) from exc


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA, then MPS, then CPU, when called (never at import time)."""
    require_local("Local reranking")
    import torch

    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidInputError(
                f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:0' or 'mps'."
            ) from exc
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that torch can use (torch's own probe, which
    also asks the OS for the tile state; ``False`` where this torch has none)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` picks bfloat16 where the hardware has native bf16 matrix units
    (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), else float32."""
    require_local("Local reranking")
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = _DTYPE_NAMES.get(dtype.lower().removeprefix("torch."))
        if name is None:
            raise InvalidInputError(
                f"Unknown dtype {dtype!r}; use 'float32', 'bfloat16', 'float16' or a torch.dtype."
            )
        resolved: torch.dtype = getattr(torch, name)
        return resolved
    if dtype is not None:
        raise InvalidInputError(f"dtype must be a torch.dtype, a name or None, got {dtype!r}.")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


class _LoadGate:
    """Loading a model excludes every other use of torch models in the process.

    transformers' ``from_pretrained`` changes process-wide state while it loads
    (torch's default dtype, a meta-device context for empty weights): a second
    load, or a forward pass, running at the same time in another thread builds
    tensors of the wrong dtype or on the meta device. Loads take the gate alone
    (one at a time); forward passes share it, so different models still run in
    parallel. Waiting loads go first, so a busy model cannot starve them.

    Lock order: a model's own lock first, the gate last; nothing waits for a
    lock while holding the gate.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._users = 0
        self._loading = False
        self._waiting_loads = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):  # a loader that loads (or uses) a model
            yield
            return
        with self._condition:
            self._waiting_loads += 1
            try:
                self._condition.wait_for(lambda: not self._loading and self._users == 0)
            finally:
                self._waiting_loads -= 1
            self._loading = True
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._condition:
                self._loading = False
                self._condition.notify_all()

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._condition:
            self._condition.wait_for(lambda: not self._loading and self._waiting_loads == 0)
            self._users += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._condition:
                self._users -= 1
                self._condition.notify_all()


_gate = _LoadGate()


def inference() -> contextlib.AbstractContextManager[None]:
    """Hold around every forward pass of a local model (after taking the model's own
    lock): it waits while a model loads anywhere in the process, and keeps loads
    out while it runs."""
    return _gate.using()


_cache: dict[Hashable, Any] = {}
_cache_lock = threading.Lock()
_key_locks: dict[Hashable, threading.Lock] = {}


def load_shared(key: Hashable, loader: Callable[[], T], *, model: str) -> T:
    """Load once per process per ``key`` (model, kind, device, dtype, ...).

    Concurrent first calls for one key wait for a single load. Loads of different
    models run one at a time, and while one runs no forward pass of any local
    model does (see :func:`inference`): transformers' loading is not thread-safe.
    Any loading failure becomes a :class:`ModelLoadError` that names the model and
    says how to use a local copy.
    """
    with _cache_lock:
        if key in _cache:
            return _cache[key]  # type: ignore[no-any-return]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]  # type: ignore[no-any-return]
        try:
            with _gate.loading():
                value = loader()
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load model {model!r}: {type(exc).__name__}: {exc}. "
                "Pass a local directory (a copy saved with save_pretrained, or downloaded "
                "with `huggingface-cli download`) as the model, or make sure the Hugging Face "
                "Hub is reachable (and HF_HUB_OFFLINE is unset)."
            ) from exc
        logger.info("Loaded model %s", model)
        with _cache_lock:
            _cache[key] = value
        return value


def clear_model_cache() -> None:
    """Forget every loaded model (the next use loads again)."""
    with _cache_lock:
        _cache.clear()


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


def budget_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group indices into batches sorted by length (longest first) so that each
    batch's padded size, rows x longest row, stays within ``max_tokens``.

    A single row longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be positive, got {max_tokens}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def limit_padding(
    batch: Sequence[int], lengths: Sequence[int], *, max_padding: float, min_tokens: int = 0
) -> list[list[int]]:
    """Split a longest-first batch (as :func:`budget_batches` makes them) into runs
    whose padding stays at most ``max_padding`` of their padded size.

    Runs smaller than ``min_tokens`` padded tokens are never split further: below
    that, a bigger matrix multiply is worth more than the padding it saves.
    """
    runs: list[list[int]] = []
    current: list[int] = []
    real = longest = 0
    for index in batch:
        widest = max(longest, lengths[index])
        padded = (len(current) + 1) * widest
        padding = padded - real - lengths[index]
        if current and padded > min_tokens and padding > max_padding * padded:
            runs.append(current)
            current, real, widest = [], 0, lengths[index]
        current.append(index)
        real += lengths[index]
        longest = widest
    if current:
        runs.append(current)
    return runs
