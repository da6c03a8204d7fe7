"""A/B helper: the same documents through several rerankers, side by side with the
vector (input) order, as Mem0's reranker guide asks ("log the reranked vs.
non-reranked lists"). ``memos-rerank compare`` is its command line (in ``cli/``).

>>> comparison = compare(query, documents, rerankers={"minilm": EmbeddingReranker()})
>>> print(comparison)          # a table: vector order first, then each reranker
>>> comparison.to_dict()       # the same, JSON-ready, for structured logs
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._calls import Ask, Budget, Steps, arun_steps, check_budget_ms, run_steps
from ._exceptions import InvalidInputError, RerankError
from ._types import (
    Stage,
    _as_score,
    _shown,
    check_call,
    checked_results,
)

__all__ = [
    "VECTOR_ORDER",
    "Comparison",
    "ComparisonColumn",
    "RankedDocument",
    "acompare",
    "compare",
]

VECTOR_ORDER = "vector order"
_TEXT_WIDTH = 100


@dataclass(frozen=True)
class RankedDocument:
    """One row of a column: the document's ``index`` in the input, its ``score``
    and ``stage`` (``None`` in the vector column without ``vector_scores``)."""

    index: int
    score: float | None
    stage: Stage | None


@dataclass(frozen=True)
class ComparisonColumn:
    """One ordering: the vector (input) order or a reranker's, best first, with how
    long the reranker took; ``error`` names a backend error instead of a ranking."""

    name: str
    ranking: tuple[RankedDocument, ...]
    duration_ms: float | None = None
    error: str | None = None
    partial: bool = False
    """A latency budget ran out first: the unscored documents follow the scored ones,
    in their input order, with no score or stage."""

    @property
    def order(self) -> list[int]:
        """The input indices, best first."""
        return [row.index for row in self.ranking]


@dataclass(frozen=True)
class Comparison:
    """The orders and scores of several rerankers over the same documents; the first
    column is the vector (input) order. ``str(comparison)`` is a table."""

    query: str
    documents: tuple[str, ...]
    columns: tuple[ComparisonColumn, ...]

    def __getitem__(self, name: str) -> ComparisonColumn:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types."""
        return {
            "query": self.query,
            "documents": list(self.documents),
            "columns": [
                {
                    "name": column.name,
                    "duration_ms": column.duration_ms,
                    "error": column.error,
                    "partial": column.partial,
                    "ranking": [
                        {
                            "rank": rank,
                            "index": row.index,
                            "score": row.score,
                            "stage": None if row.stage is None else row.stage.label,
                        }
                        for rank, row in enumerate(column.ranking, 1)
                    ],
                }
                for column in self.columns
            ],
        }

    def table(self, *, text_width: int = _TEXT_WIDTH) -> str:
        """The columns side by side (``[index] score stage`` per rank), their time,
        then the text of each document shown, after its index."""
        header = ["rank", *(column.name for column in self.columns)]
        depth = max((len(column.ranking) for column in self.columns), default=0)
        rows = [header]
        for position in range(depth):
            cells = [str(position + 1)]
            for column in self.columns:
                cells.append(
                    _cell(column.ranking[position]) if position < len(column.ranking) else ""
                )
            rows.append(cells)
        timing = ["time"]
        for column in self.columns:
            if column.error is not None:
                timing.append(f"failed: {column.error}")
            elif column.duration_ms is None:
                timing.append("")
            else:
                timing.append(f"{column.duration_ms:.1f} ms")
        rows.append(timing)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"query: {_clip(self.query, text_width)}"]
        for row in rows:
            lines.append(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
        lines.append("")
        shown = sorted({row.index for column in self.columns for row in column.ranking})
        for index in shown:
            lines.append(f"[{index}] {_clip(self.documents[index], text_width)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _cell(row: RankedDocument) -> str:
    parts = [f"[{row.index}]"]
    if row.score is not None:
        parts.append(f"{row.score:.3f}")
    if row.stage is not None:
        parts.append(row.stage.label)
    return " ".join(parts)


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _label(reranker: Any) -> str:
    model = getattr(reranker, "model", None)
    name = type(reranker).__name__
    return f"{name}({model})" if isinstance(model, str) and model else name


def _named(rerankers: Sequence[Any] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    if isinstance(rerankers, Mapping):
        pairs = [(str(name), reranker) for name, reranker in rerankers.items()]
    elif isinstance(rerankers, (str, bytes)) or not isinstance(rerankers, Sequence):
        raise InvalidInputError(
            "rerankers must be a list of rerankers or a mapping of names to rerankers."
        )
    else:
        pairs = [(_label(reranker), reranker) for reranker in rerankers]
    if not pairs:
        raise InvalidInputError("compare needs at least one reranker.")
    seen: dict[str, int] = {VECTOR_ORDER: 1}
    named = []
    for name, reranker in pairs:
        if not (
            callable(getattr(reranker, "rerank", None))
            or callable(getattr(reranker, "arerank", None))
        ):
            raise InvalidInputError(f"{name!r} has neither rerank(...) nor arerank(...).")
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name} #{seen[name]}", reranker))
    return named


def _vector_column(count: int, vector_scores: Iterable[object] | None) -> ComparisonColumn:
    """The first column: the input order, with ``vector_scores`` when given (any
    iterable of real numbers, one per document: a list, a generator, a numpy array of
    ``float32``, as vector stores return them)."""
    if vector_scores is None:
        return ComparisonColumn(
            VECTOR_ORDER, tuple(RankedDocument(i, None, None) for i in range(count))
        )
    if isinstance(vector_scores, (str, bytes, Mapping)) or not isinstance(vector_scores, Iterable):
        raise InvalidInputError(
            "vector_scores must be a sequence or iterable of numbers, one per document, "
            f"got {type(vector_scores).__name__}."
        )
    given = list(vector_scores)
    if len(given) != count:
        raise InvalidInputError(
            f"vector_scores must hold one number per document: got {len(given)} for "
            f"{count} documents."
        )
    scores = []
    for position, raw in enumerate(given):
        score = _as_score(raw)
        if score is None or not math.isfinite(score):
            raise InvalidInputError(
                f"vector_scores[{position}] must be a finite number, got {_shown(raw)}."
            )
        scores.append(score)
    return ComparisonColumn(
        VECTOR_ORDER, tuple(RankedDocument(i, s, None) for i, s in enumerate(scores))
    )


def _column(
    name: str,
    count: int,
    started: float,
    raw: object = None,
    error: RerankError | None = None,
    budgeted: bool = False,
) -> ComparisonColumn:
    elapsed = (time.perf_counter() - started) * 1000.0
    if error is None:
        try:
            results = checked_results(raw, count=count, backend=name, partial=budgeted)
        except RerankError as bad:
            error = bad
        else:
            scored = {r.index for r in results}
            ranking = (
                *(RankedDocument(r.index, r.score, r.stage) for r in results),
                *(RankedDocument(i, None, None) for i in range(count) if i not in scored),
            )
            return ComparisonColumn(name, ranking, elapsed, partial=len(scored) < count)
    return ComparisonColumn(name, (), elapsed, f"{type(error).__name__}: {error}")


def _no_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise InvalidInputError(
        f"{name} is async-only and compare() was called inside a running event loop; "
        "use await acompare(...)."
    )


def _checked(
    query: object, documents: object, top_n: int | None, vector_scores: Iterable[object] | None
) -> tuple[str, list[str], ComparisonColumn]:
    query, docs, _ = check_call(query, documents, top_n)
    return query, docs, _vector_column(len(docs), vector_scores)


def _cut(comparison: Comparison, top_n: int | None) -> Comparison:
    if top_n is None:
        return comparison
    columns = tuple(
        ComparisonColumn(c.name, c.ranking[:top_n], c.duration_ms, c.error, c.partial)
        for c in comparison.columns
    )
    return Comparison(comparison.query, comparison.documents, columns)


def compare(
    query: str,
    documents: Sequence[str],
    rerankers: Sequence[Any] | Mapping[str, Any],
    *,
    vector_scores: Iterable[float] | None = None,
    top_n: int | None = None,
    warm_up: bool = False,
    budget_ms: float | None = None,
) -> Comparison:
    """Rerank ``documents`` (in their vector-search order) with each reranker in turn.

    ``rerankers`` is a list (columns are named after each backend's class and model)
    or a mapping of column names to rerankers. ``vector_scores`` (one real number per
    document, in any iterable: a list, a generator, a numpy array of ``float32`` as
    vector stores return them) show in the first column; ``top_n`` shows only the best
    ``top_n`` of each. A backend error (a ``RerankError``) fills its column with the
    error instead of failing the comparison; rerankers run one after another, so their
    times do not interfere. A local backend's first call loads its model:
    ``warm_up=True`` first scores one pair per reranker, untimed, so the times are
    scoring times. Tied scores keep the input order in every column. ``budget_ms`` gives
    each reranker that latency budget: a column whose budget ran out is ``partial``,
    its unscored documents after the scored ones in their input order.
    """
    query, docs, vector = _checked(query, documents, top_n, vector_scores)
    named = _named(rerankers)
    for name, reranker in named:
        if not callable(getattr(reranker, "rerank", None)):
            _no_running_loop(name)
    budget = check_budget_ms(budget_ms)
    return run_steps(_columns(query, docs, vector, named, top_n, warm_up, budget))


async def acompare(
    query: str,
    documents: Sequence[str],
    rerankers: Sequence[Any] | Mapping[str, Any],
    *,
    vector_scores: Iterable[float] | None = None,
    top_n: int | None = None,
    warm_up: bool = False,
    budget_ms: float | None = None,
) -> Comparison:
    """The async twin of :func:`compare`: awaits each backend's ``arerank`` (a
    backend with only ``rerank`` runs in a worker thread)."""
    query, docs, vector = _checked(query, documents, top_n, vector_scores)
    named, budget = _named(rerankers), check_budget_ms(budget_ms)
    return await arun_steps(_columns(query, docs, vector, named, top_n, warm_up, budget))


def _columns(
    query: str,
    docs: list[str],
    vector: ComparisonColumn,
    named: list[tuple[str, Any]],
    top_n: int | None,
    warm_up: bool,
    budget_ms: float | None,
) -> Steps[Comparison]:
    """Each reranker in turn (the calls are yielded: see ``_types.Steps``)."""
    columns = [vector]
    for name, reranker in named:
        started = time.perf_counter()
        try:
            if warm_up:
                yield Ask(reranker, query, docs[:1])
                started = time.perf_counter()
            budget = None if budget_ms is None else Budget(budget_ms)
            raw = yield Ask(reranker, query, docs, budget=budget)
        except RerankError as error:
            columns.append(_column(name, len(docs), started, error=error))
            continue
        columns.append(_column(name, len(docs), started, raw, budgeted=budget_ms is not None))
    return _cut(Comparison(query, tuple(docs), tuple(columns)), top_n)
