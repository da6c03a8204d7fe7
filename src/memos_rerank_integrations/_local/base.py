"""The call frame every local backend shares: checking calls, scoring many calls in
shared forward passes, ranking, and the async twins that run in a worker thread.

A local backend provides :meth:`LocalReranker._score_calls` (one score per document
of each call, inputs already checked) and :meth:`LocalReranker._count_tokens`;
everything a caller sees is here, once.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence

from .._configurable import Configurable
from .._exceptions import InvalidInputError
from .._types import RerankResult, StageThresholds, check_call, check_inputs, rank_scores

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


class LocalReranker(Configurable, ABC):
    """Base of the rerankers that run a model in this process."""

    thresholds: StageThresholds

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
        remaining = iter(self._score_calls(pending) if pending else [])
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
        """:meth:`rerank` in a worker thread, so the event loop never blocks; calls on
        one model run one at a time."""
        return await asyncio.to_thread(self.rerank, query, documents, top_n)

    async def arerank_many(self, calls: Sequence[RerankCall]) -> list[list[RerankResult]]:
        """:meth:`rerank_many` in a worker thread."""
        return await asyncio.to_thread(self.rerank_many, calls)

    def count_tokens(self, query: str, documents: Sequence[str]) -> int:
        """The tokens a :meth:`rerank` of these inputs feeds the model, by
        tokenization only (no forward pass, and it never waits for one); a long text
        costs what can fit, not its length. See the backend for what counts."""
        checked = check_inputs(query, documents)
        return self._count_tokens(query, checked) if checked else 0
