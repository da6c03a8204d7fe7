"""The call frame every local backend shares: checking calls, scoring many calls in
shared forward passes, ranking, and the async twins that run in a worker thread.

A local backend provides :meth:`LocalReranker._score_calls` (one score per document
of each call, inputs already checked) and :meth:`LocalReranker._count_tokens`;
everything a caller sees is here, once.
"""

from __future__ import annotations

import collections
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

from .._calls import Budget, Stopped, stopping_at
from .._configurable import Configurable
from .._exceptions import InvalidInputError
from .._types import RerankResult, StageThresholds, check_call, check_inputs, rank_scores
from .runtime import in_model_thread

__all__ = ["LocalReranker", "RerankCall", "check_calls"]

RerankCall = tuple[str, Sequence[str], "int | None"]


def check_calls(calls: object) -> list[tuple[str, list[str], int | None]]:
    """``(query, documents, top_n)`` calls, each checked as :meth:`rerank` checks one."""
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        raise InvalidInputError(
            f"calls must be a sequence of (query, documents, top_n) tuples, "
            f"got {type(calls).__name__}."
        )
    checked = []
    for position, call in enumerate(calls):
        if not isinstance(call, (tuple, list)) or len(call) != 3:
            raise InvalidInputError(
                f"calls[{position}] must be a (query, documents, top_n) tuple, got {call!r}."
            )
        query, documents, top_n = call
        checked.append(check_call(query, documents, top_n))
    return checked


# The share of the budget left that one chunk of a budgeted call is planned to take:
# a speed estimate off by up to this factor still ends the chunk inside the budget.
_CHUNK_SHARE = 0.5
# How many recent calls the speed estimate averages.
_HISTORY = 8


class LocalReranker(Configurable, ABC):
    """Base of the rerankers that run a model in this process."""

    thresholds: StageThresholds
    # (characters of query and documents, seconds) of this reranker's last calls: its
    # speed, which sizes the chunks of a call under a latency budget.
    _history: collections.deque[tuple[int, float]] | None = None

    @abstractmethod
    def _score_calls(self, calls: list[tuple[str, list[str]]]) -> list[list[float]]:
        """One score per document of each call (every call has documents; inputs are
        checked). Loads the model on first use."""

    @abstractmethod
    def _count_tokens(self, query: str, documents: list[str]) -> int:
        """The tokens a rerank of these (checked, non-empty) inputs feeds the model."""

    def rerank_many(self, calls: Sequence[RerankCall]) -> list[list[RerankResult]]:
        """Rerank several independent ``(query, documents, top_n)`` calls in shared
        forward passes. Each result list equals what :meth:`rerank` returns for that
        call (up to float rounding from the different batch shapes)."""
        checked = check_calls(calls)
        pending = [(query, documents) for query, documents, _ in checked if documents]
        remaining = iter(self._timed(pending) if pending else [])
        return [
            rank_scores(
                next(remaining) if documents else [], top_n=top_n, thresholds=self.thresholds
            )
            for _, documents, top_n in checked
        ]

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Score every document against ``query``; results best first, ties in input
        order, ``top_n`` kept."""
        return self.rerank_many([(query, documents, top_n)])[0]

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """:meth:`rerank` on the process's thread for local models' async calls, so the
        event loop never blocks; they run one at a time."""
        return await in_model_thread(self.rerank, query, documents, top_n)

    async def arerank_many(self, calls: Sequence[RerankCall]) -> list[list[RerankResult]]:
        """:meth:`rerank_many` on the process's thread for local models' async calls."""
        return await in_model_thread(self.rerank_many, calls)

    def rerank_within(
        self, query: str, documents: Sequence[str], *, budget: Budget
    ) -> list[RerankResult]:
        """Score the documents in their given order until ``budget`` runs out; the
        results of the scored ones, best first (all of them when it lasts).

        The documents run in chunks planned from this reranker's measured speed to
        take at most half of the budget left (one document while nothing has been
        measured yet); once the budget is spent the chunk in progress stops between
        layers (or batches) and is dropped, so the call returns about one layer's time
        after the budget ends and no work goes on after it. A call that first loads
        the model also takes the load's time: warm the model up with a first call."""
        query, docs, _ = check_call(query, documents)
        scores: list[float] = []
        with stopping_at(budget):
            while len(scores) < len(docs) and not budget.expired():
                chunk = self._chunk(query, docs, len(scores), budget)
                try:
                    (chunk_scores,) = self._timed([(query, chunk)])
                except Stopped:
                    break
                scores.extend(chunk_scores)
        return rank_scores(scores, thresholds=self.thresholds)

    async def arerank_within(
        self, query: str, documents: Sequence[str], *, budget: Budget
    ) -> list[RerankResult]:
        """:meth:`rerank_within` on the process's thread for local models' async calls
        (the call ends with the budget)."""
        return await in_model_thread(self.rerank_within, query, documents, budget=budget)

    def _timed(self, calls: list[tuple[str, list[str]]]) -> list[list[float]]:
        """:meth:`_score_calls`, recording how long it took for how much text."""
        started = time.perf_counter()
        scores = self._score_calls(calls)
        chars = sum(len(query) + sum(map(len, documents)) for query, documents in calls)
        if self._history is None:
            self._history = collections.deque(maxlen=_HISTORY)
        self._history.append((chars, time.perf_counter() - started))
        return scores

    def _seconds_per_char(self) -> float | None:
        """This reranker's recent speed, weighted by size (large calls, the least
        dominated by per-call costs, count most); ``None`` before any call."""
        history = list(self._history or ())
        chars = sum(c for c, _ in history)
        return sum(s for _, s in history) / chars if chars else None

    def _chunk(self, query: str, docs: list[str], start: int, budget: Budget) -> list[str]:
        """The next documents of a budgeted call: as many as the measured speed says fit
        in half the budget left (at least one; one while nothing is measured)."""
        rate = self._seconds_per_char()
        if rate is None:
            return docs[start : start + 1]
        room = budget.remaining() * _CHUNK_SHARE / rate - len(query)
        end, used = start + 1, len(docs[start])
        while end < len(docs) and used + len(docs[end]) <= room:
            used += len(docs[end])
            end += 1
        return docs[start:end]

    def count_tokens(self, query: str, documents: Sequence[str]) -> int:
        """The tokens a :meth:`rerank` of these inputs feeds the model, by
        tokenization only (no forward pass, and it never waits for one); a long text
        costs what can fit, not its length. See the backend for what counts."""
        checked = check_inputs(query, documents)
        return self._count_tokens(query, checked) if checked else 0
