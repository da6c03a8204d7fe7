"""Core types shared by every backend and adapter."""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, runtime_checkable

from ._exceptions import InvalidInputError, MalformedResponseError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "RerankResult",
    "Reranker",
    "Stage",
    "StageThresholds",
    "check_call",
    "check_inputs",
    "check_text",
    "check_top_n",
    "checked_results",
    "estimate_tokens",
    "lone_surrogate",
    "nonempty_text",
    "optional_positive_int",
    "positive_int",
    "rank_scores",
    "replace_surrogates",
    "validate_ranking",
]


class Stage(IntEnum):
    """Five ordered relevance stages, lowest to highest.

    MemOS describes reranker scores as falling into five stages; the boundaries
    used to map a score onto a stage are :class:`StageThresholds`.
    """

    IRRELEVANT = 0
    WEAK = 1
    PARTIAL = 2
    RELEVANT = 3
    HIGHLY_RELEVANT = 4

    @property
    def label(self) -> str:
        """The lowercase name used in metadata, e.g. ``"highly_relevant"``."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: Stage | str | int) -> Stage:
        """Accept a ``Stage``, its value (0-4) or its name in any case, with spaces,
        dashes or underscores (``"highly relevant"``, ``"HIGHLY_RELEVANT"``)."""
        if isinstance(value, Stage):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        elif isinstance(value, str):
            key = value.strip().upper().replace("-", "_").replace(" ", "_")
            if key in cls.__members__:
                return cls[key]
            if key.isdigit():
                return cls.parse(int(key))
        names = ", ".join(stage.label for stage in cls)
        raise InvalidInputError(
            f"Not a relevance stage: {value!r}. Use a Stage, an int 0-4 or one of: {names}."
        )


@dataclass(frozen=True)
class StageThresholds:
    """Four increasing cut points on a [0, 1] score that split it into five stages.

    Each field is the lowest score of its stage: a score below ``weak`` is
    :attr:`Stage.IRRELEVANT`, a score at or above ``highly_relevant`` is
    :attr:`Stage.HIGHLY_RELEVANT`. The defaults ``(0.2, 0.4, 0.6, 0.8)`` are this
    package's own: the MemOS documentation shows its five stages only as a figure.
    Scores outside [0, 1] (raw logits) are staged by the same cut points.
    """

    weak: float = 0.2
    partial: float = 0.4
    relevant: float = 0.6
    highly_relevant: float = 0.8

    def __post_init__(self) -> None:
        cuts = self.cuts
        for cut in cuts:
            if isinstance(cut, bool) or not isinstance(cut, (int, float)) or not math.isfinite(cut):
                raise InvalidInputError(f"Stage cut points must be finite numbers, got {cuts!r}.")
        if not all(0.0 <= cut <= 1.0 for cut in cuts):
            raise InvalidInputError(f"Stage cut points must lie in [0, 1], got {cuts!r}.")
        if not all(low < high for low, high in itertools.pairwise(cuts)):
            raise InvalidInputError(f"Stage cut points must be strictly increasing, got {cuts!r}.")

    @classmethod
    def from_cuts(cls, cuts: Sequence[float]) -> StageThresholds:
        """Build from a sequence of four cut points."""
        if len(cuts) != 4:
            raise InvalidInputError(f"Expected four cut points, got {len(cuts)}: {list(cuts)!r}.")
        return cls(*cuts)

    @property
    def cuts(self) -> tuple[float, float, float, float]:
        return (self.weak, self.partial, self.relevant, self.highly_relevant)

    def stage(self, score: float) -> Stage:
        """The stage a score falls into."""
        if math.isnan(score):
            raise InvalidInputError("Cannot stage a NaN score.")
        stage = Stage.IRRELEVANT
        for candidate, cut in zip(list(Stage)[1:], self.cuts, strict=True):
            if score >= cut:
                stage = candidate
        return stage

    def min_score(self, stage: Stage | str | int) -> float:
        """The lowest score that reaches ``stage`` (``-inf`` for the lowest stage)."""
        parsed = Stage.parse(stage)
        return -math.inf if parsed is Stage.IRRELEVANT else self.cuts[parsed - 1]


DEFAULT_THRESHOLDS = StageThresholds()


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One ranked document: its ``index`` in the input list, its ``score``
    (a plain ``float``, higher is more relevant) and its :class:`Stage`."""

    index: int
    score: float
    stage: Stage


@runtime_checkable
class Reranker(Protocol):
    """What every backend provides. Adapters accept any object of this shape."""

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]: ...

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]: ...


def rank_scores(
    scores: Sequence[float],
    *,
    top_n: int | None = None,
    thresholds: StageThresholds = DEFAULT_THRESHOLDS,
) -> list[RerankResult]:
    """Turn one score per document into results sorted best first.

    Ties keep input order; scores become plain floats; ``top_n`` cuts the list.
    """
    results = []
    for index, raw in enumerate(scores):
        score = float(raw)
        if math.isnan(score):
            raise MalformedResponseError(f"Score for document {index} is NaN.")
        results.append(RerankResult(index=index, score=score, stage=thresholds.stage(score)))
    results.sort(key=lambda result: -result.score)
    return results if top_n is None else results[:top_n]


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool), else :class:`InvalidInputError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}.")
    return value


def optional_positive_int(name: str, value: object) -> int | None:
    """``None``, or ``value`` if it is an int >= 1 (not a bool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int or None, got {value!r}.")
    return value


def check_top_n(top_n: object) -> int | None:
    """Validate a ``top_n`` option: ``None`` (keep all) or a positive int."""
    return optional_positive_int("top_n", top_n)


def check_call(
    query: object, documents: object, top_n: object = None
) -> tuple[str, list[str], int | None]:
    """One rerank call's inputs checked (:func:`check_inputs`, :func:`check_top_n`)."""
    docs = check_inputs(query, documents)
    return str(query), docs, check_top_n(top_n)


def nonempty_text(name: str, value: object) -> str:
    """``value`` if it is a str with something besides white space and no lone
    surrogate (a model name, an instruction), else :class:`InvalidInputError`."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{name} must be a non-empty str, got {value!r}.")
    check_text(name, value)
    return value


# Lone surrogates: a str can hold them (from "\\ud800" in JSON, or bytes decoded with
# errors="surrogateescape"), but no UTF-8 encoder or tokenizer takes them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> tuple[int, str] | None:
    """The position and character of the first lone surrogate in ``text``, if any."""
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    return None if found is None else (found.start(), found.group())


def replace_surrogates(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def check_text(what: str, text: str) -> None:
    """Raise :class:`InvalidInputError` if ``text`` holds a lone surrogate."""
    found = lone_surrogate(text)
    if found is not None:
        position, char = found
        raise InvalidInputError(
            f"{what} contains a lone surrogate (U+{ord(char):04X} at character "
            f"{position}), which is not valid Unicode text and cannot be encoded as "
            "UTF-8. Decode the source with errors='replace', or remove the character."
        )


def check_inputs(query: object, documents: object) -> list[str]:
    """Validate a backend call's query and documents; returns the documents as a list.

    Every backend calls this first, so every backend raises the same
    :class:`InvalidInputError` for a query or document that is not a str or cannot
    be encoded (a lone surrogate), naming the document.
    """
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}.")
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise InvalidInputError(
            f"documents must be a sequence of str, got {type(documents).__name__}."
        )
    check_text("The query", query)
    docs = list(documents)
    for position, document in enumerate(docs):
        if not isinstance(document, str):
            raise InvalidInputError(
                f"documents[{position}] must be a str, got {type(document).__name__}."
            )
        check_text(f"documents[{position}]", document)
    return docs


def estimate_tokens(text: str) -> int:
    """A tokenizer-free, deliberately high token estimate.

    One token per non-ASCII character (CJK text is close to that) plus one per
    four ASCII characters (English averages a little over four per token).
    """
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (len(text) - ascii_chars) + math.ceil(ascii_chars / 4)


def _is_boolean(value: object) -> bool:
    # numpy.bool_ is no bool subclass, but float() and int() take it.
    kind = type(value)
    return isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
    )


def _as_index(value: object) -> int | None:
    """``value`` as a plain int if it is an integer (``operator.index`` takes it:
    int, numpy.int64, ...), else ``None``; booleans are not indices."""
    if _is_boolean(value):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except Exception:  # TypeError, or whatever a foreign __index__ raises
        return None


def _as_score(value: object) -> float | None:
    """``value`` as a plain float if it is a real number (``float()`` takes it without
    parsing text: int, float, numpy.float32, Decimal, ...), else ``None``; ints too large
    for a float give ``inf``, which the caller rejects like any non-finite score."""
    if _is_boolean(value) or isinstance(value, (str, bytes, bytearray, memoryview)):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return math.inf
    except Exception:  # TypeError, ValueError, or whatever a foreign __float__ raises
        return None


def _shown(value: object) -> str:
    """A short, safe rendering of a value from an untrusted answer."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int over Python's 4,300-digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


def validate_ranking(
    pairs: Sequence[tuple[object, object]],
    *,
    n_documents: int,
    top_n_sent: int | None,
    backend: str,
    partial: bool = False,
) -> dict[int, float]:
    """Check a backend's ``(index, score)`` pairs; returns plain int index -> float score.

    Every index an integer in range (anything ``operator.index`` takes, such as
    ``numpy.int64``), none twice; every score a finite real number (anything
    ``float()`` takes without parsing text, such as ``numpy.float32``); booleans are
    neither. One result per document, or exactly ``min(top_n, n)`` when ``top_n`` was
    sent. Everything wrong is a :class:`MalformedResponseError`.
    """
    expected = n_documents if top_n_sent is None else min(top_n_sent, n_documents)
    scores: dict[int, float] = {}
    for raw_index, raw_score in pairs:
        index = _as_index(raw_index)
        if index is None:
            raise MalformedResponseError(
                f"The {backend} answer has an index of type {type(raw_index).__name__}, "
                "not an integer.",
                backend=backend,
            )
        if not 0 <= index < n_documents:
            raise MalformedResponseError(
                f"The {backend} answer has index {_shown(index)}, outside 0..{n_documents - 1}.",
                backend=backend,
            )
        if index in scores:
            raise MalformedResponseError(
                f"The {backend} answer ranks document {index} twice.", backend=backend
            )
        score = _as_score(raw_score)
        if score is None:
            raise MalformedResponseError(
                f"The {backend} answer has a score of type {type(raw_score).__name__} for "
                f"document {index}, not a number.",
                backend=backend,
            )
        if not math.isfinite(score):
            raise MalformedResponseError(
                f"The {backend} answer has a non-finite score {_shown(raw_score)} for "
                f"document {index}.",
                backend=backend,
            )
        scores[index] = score
    if len(scores) != expected and not partial:
        raise MalformedResponseError(
            f"The {backend} answer ranks {len(scores)} documents, expected {expected}.",
            backend=backend,
        )
    return scores


def checked_results(
    raw: object, *, count: int, backend: str, top_n: int | None = None, partial: bool = False
) -> list[RerankResult]:
    """A duck-typed reranker's answer, checked before it is trusted (see
    :func:`validate_ranking`: one finite score per document, no index twice, exactly
    ``min(top_n, count)`` when ``top_n`` was asked for, or, with ``partial`` (an answer
    within a latency budget), any of the documents) and sorted best first, ties in
    input order. Indices and scores become plain ``int`` / ``float``; an item without a
    :class:`Stage` gets the default thresholds' stage."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise MalformedResponseError(
            f"{backend} returned {type(raw).__name__}, not a list of results.", backend=backend
        )
    items = list(raw)
    pairs = [(getattr(item, "index", None), getattr(item, "score", None)) for item in items]
    scores = validate_ranking(
        pairs, n_documents=count, top_n_sent=top_n, backend=backend, partial=partial
    )
    results = []
    # validate_ranking keeps the answer's order, with plain int indices and float scores.
    for item, (index, score) in zip(items, scores.items(), strict=True):
        stage = getattr(item, "stage", None)
        if not isinstance(stage, Stage):
            stage = DEFAULT_THRESHOLDS.stage(score)
        results.append(RerankResult(index, score, stage))
    results.sort(key=lambda result: (-result.score, result.index))
    return results
