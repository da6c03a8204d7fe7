"""A chain of rerankers tried in order until one answers."""

from __future__ import annotations

import contextvars
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._calls import Ask, Budget, Steps, arun_steps, run_steps
from ._configurable import Configurable
from ._exceptions import InvalidInputError, RerankError, RerankTimeoutError
from ._types import (
    RerankResult,
    check_call,
    checked_results,
)

__all__ = ["FallbackAnswer", "FallbackReranker"]

logger = logging.getLogger(__name__)

# Which backend answered each FallbackReranker's latest call, per thread / asyncio
# task: a context variable, so concurrent calls never see each other's answer.
# Keyed by a serial number rather than id(), which can be reused after collection.
_ANSWERED: contextvars.ContextVar[Mapping[int, int]] = contextvars.ContextVar(
    "memos_rerank_fallback_answered", default=MappingProxyType({})
)
_SERIALS = itertools.count()


@dataclass(frozen=True)
class FallbackAnswer:
    """The record of one call: the ``results``, the ``backend`` that produced them,
    its ``position`` in the chain and the ``errors`` of the backends tried before it."""

    results: list[RerankResult]
    backend: Any
    position: int
    errors: tuple[Exception, ...]


class FallbackReranker(Configurable):
    """Try rerankers in order (e.g. MemOS cloud, then a local ``QwenReranker``);
    the first that answers wins.

    Any object with ``rerank`` and/or ``arerank`` works. A backend that raises, or
    answers with an invalid ranking, is logged at WARNING (naming the error type)
    and the next one is tried. When all fail, the last error is raised; the
    earlier ones hang off it as ``__context__`` so the traceback shows the chain.

    Which backend answered: :meth:`rerank_detailed` / :meth:`arerank_detailed`
    return a :class:`FallbackAnswer` for that very call. :attr:`last_backend` is the
    backend that answered the latest call *made in the current thread or asyncio
    task*, so it stays right under concurrency (64 tasks sharing one instance each
    see their own), and reads ``None`` in a context that made no successful call.
    """

    def __init__(self, rerankers: Sequence[Any]) -> None:
        if isinstance(rerankers, (str, bytes)) or not isinstance(rerankers, Sequence):
            raise InvalidInputError(
                "FallbackReranker takes a list of rerankers, e.g. "
                "FallbackReranker([MemOSReranker(), QwenReranker()])."
            )
        if not rerankers:
            raise InvalidInputError("FallbackReranker needs at least one reranker.")
        for position, backend in enumerate(rerankers):
            if not (_method(backend, "rerank") or _method(backend, "arerank")):
                raise InvalidInputError(
                    f"rerankers[{position}] ({type(backend).__name__}) has neither "
                    "rerank(query, documents, top_n=None) nor arerank(...)."
                )
        self._rerankers = tuple(rerankers)
        self._serial = next(_SERIALS)

    @property
    def rerankers(self) -> tuple[Any, ...]:
        return self._rerankers

    @property
    def last_backend(self) -> Any:
        """The backend that answered this thread's / task's latest call, or ``None``."""
        position = _ANSWERED.get().get(self._serial)
        return None if position is None else self._rerankers[position]

    def __repr__(self) -> str:
        return f"FallbackReranker({list(self._rerankers)!r})"

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return self.rerank_detailed(query, documents, top_n).results

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return (await self.arerank_detailed(query, documents, top_n)).results

    def rerank_detailed(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> FallbackAnswer:
        """Like :meth:`rerank`, with which backend answered and what failed before it."""
        return run_steps(self._attempts(query, documents, top_n))

    async def arerank_detailed(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> FallbackAnswer:
        """The async twin of :meth:`rerank_detailed`."""
        return await arun_steps(self._attempts(query, documents, top_n))

    def rerank_within(
        self, query: str, documents: Sequence[str], *, budget: Budget
    ) -> list[RerankResult]:
        """The chain under one latency budget: each backend gets an equal share of what
        is left of it (the first of two half, a third of three...), so one that stalls
        leaves the rest their time; the first that scores any document answers, with
        what it scored. When none scores any, the answer is empty (nothing scored)."""
        return run_steps(self._attempts(query, documents, None, budget)).results

    async def arerank_within(
        self, query: str, documents: Sequence[str], *, budget: Budget
    ) -> list[RerankResult]:
        """The async twin of :meth:`rerank_within`."""
        return (await arun_steps(self._attempts(query, documents, None, budget))).results

    def _attempts(
        self, query: str, documents: Sequence[str], top_n: int | None, budget: Budget | None = None
    ) -> Steps[FallbackAnswer]:
        query, docs, top_n = check_call(query, documents, top_n)
        errors: list[Exception] = []
        for position, backend in enumerate(self._rerankers):
            name = type(backend).__name__
            share = None if budget is None else _share(budget, len(self._rerankers) - position)
            try:
                raw = yield Ask(backend, query, docs, top_n, budget=share)
                results = checked_results(
                    raw, count=len(docs), backend=name, top_n=top_n, partial=share is not None
                )
                if docs and not results:
                    raise RerankTimeoutError(
                        f"{name} scored nothing within its share of the budget."
                    )
            except Exception as error:
                self._failed(position, error, errors)
                continue
            return self._answered(results, position, errors)
        if budget is not None:
            return FallbackAnswer([], None, -1, tuple(errors))
        raise _chained(errors)

    def _failed(self, position: int, error: Exception, errors: list[Exception]) -> None:
        errors.append(error)
        total = len(self._rerankers)
        name = type(self._rerankers[position]).__name__
        detail = f": {error}" if isinstance(error, RerankError) else ""
        if position + 1 < total:
            following = type(self._rerankers[position + 1]).__name__
            logger.warning(
                "Reranker %d/%d (%s) failed with %s%s; falling back to %d/%d (%s).",
                position + 1,
                total,
                name,
                type(error).__name__,
                detail,
                position + 2,
                total,
                following,
            )
        else:
            logger.warning(
                "Reranker %d/%d (%s) failed with %s%s; no reranker left.",
                position + 1,
                total,
                name,
                type(error).__name__,
                detail,
            )

    def _answered(
        self, results: list[RerankResult], position: int, errors: list[Exception]
    ) -> FallbackAnswer:
        _ANSWERED.set(MappingProxyType({**_ANSWERED.get(), self._serial: position}))
        return FallbackAnswer(results, self._rerankers[position], position, tuple(errors))

    def close(self) -> None:
        """Close every backend that has ``close()``."""
        for backend in self._rerankers:
            if _method(backend, "close"):
                backend.close()

    async def aclose(self) -> None:
        """Close every backend, with ``aclose()`` where it has one."""
        for backend in self._rerankers:
            if _method(backend, "aclose"):
                await backend.aclose()
            elif _method(backend, "close"):
                backend.close()

    def __enter__(self) -> FallbackReranker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> FallbackReranker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _method(backend: Any, name: str) -> bool:
    return callable(getattr(backend, name, None))


def _share(budget: Budget, backends_left: int) -> Budget:
    """An equal share, for the next backend, of what is left of ``budget``."""
    return Budget(max(budget.remaining(), 0.0) * 1000.0 / backends_left)


def _chained(errors: list[Exception]) -> Exception:
    """The last error, with each earlier one at the end of the next one's context chain."""
    for earlier, later in itertools.pairwise(errors):
        seen = {id(later)}
        tail: BaseException = later
        while tail.__context__ is not None and id(tail.__context__) not in seen:
            tail = tail.__context__
            seen.add(id(tail))
        if id(earlier) not in seen and tail.__context__ is None:
            tail.__context__ = earlier
    return errors[-1]
