"""Calling duck-typed rerankers, sync and async, over one core.

A core is a generator that yields the calls it wants made (:class:`Ask`), is sent
each answer (or has the call's exception thrown in), and returns its result
(:data:`Steps`): the logic is written once, and :func:`run_steps` /
:func:`arun_steps` make the calls synchronously or asynchronously. The adapters'
pipeline, ``compare`` and the fallback chain are such cores.

A call may carry a latency :class:`Budget`: the reranker is then asked to score the
documents in their given order until the budget runs out and to answer with what it
scored (``rerank_within`` / ``arerank_within``, which every backend of this package
has). A duck-typed reranker without them is called as usual and waited for until the
budget runs out; if it has not answered by then its answer is empty (an async call
is cancelled; a sync one is left to finish in its worker thread, unread).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._exceptions import InvalidInputError

__all__ = [
    "Ask",
    "Budget",
    "Steps",
    "Stopped",
    "arerank_of",
    "arun_steps",
    "check_budget_ms",
    "check_stop",
    "rerank_of",
    "run_steps",
    "stopping_at",
]

# A budget longer than a day is a mistake (or a unit error).
MAX_BUDGET_MS = 86_400_000.0


def check_budget_ms(value: object, *, name: str = "budget_ms") -> float | None:
    """``None`` (no budget), or ``value`` milliseconds: a finite number > 0 and at most
    a day; anything else is an :class:`InvalidInputError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{name} must be a number of milliseconds or None, got {value!r}.")
    milliseconds = float(value)
    if not (math.isfinite(milliseconds) and 0 < milliseconds <= MAX_BUDGET_MS):
        raise InvalidInputError(
            f"{name} must be more than 0 and at most {MAX_BUDGET_MS:.0f} ms, got {value!r}."
        )
    return milliseconds


class Budget:
    """A latency budget for one rerank, started when it is made: a backend scores
    documents in their given order and stops, between units of work, once
    :meth:`expired`; what it scored by then is its answer."""

    def __init__(self, milliseconds: float) -> None:
        self.milliseconds = float(milliseconds)
        self.started = time.monotonic()
        self.at = self.started + self.milliseconds / 1000.0

    def remaining(self) -> float:
        """Seconds left (negative once spent)."""
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0

    def __repr__(self) -> str:
        return f"Budget({self.milliseconds:g} ms, {self.remaining() * 1000:.0f} ms left)"


class Stopped(Exception):
    """A computation under a :class:`Budget` stopped between units of work because the
    budget ran out (caught by the backend that set the budget; never reaches a caller)."""


_STOP: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "memos_rerank_stop", default=None
)


@contextlib.contextmanager
def stopping_at(budget: Budget) -> Iterator[None]:
    """Within this block (this thread, and threads started with a copy of its
    context), :func:`check_stop` raises :class:`Stopped` once ``budget`` runs out."""
    token = _STOP.set(budget)
    try:
        yield
    finally:
        _STOP.reset(token)


def check_stop() -> None:
    """Between units of work (a layer, a batch): raise :class:`Stopped` if the budget
    of the computation in progress has run out (a no-op without one)."""
    budget = _STOP.get()
    if budget is not None and budget.expired():
        raise Stopped


T = TypeVar("T")


@dataclass(frozen=True)
class Ask:
    """One call a core wants made: ``reranker.rerank(query, documents, top_n)``."""

    reranker: Any
    query: str
    documents: list[str]
    top_n: int | None = None
    budget: Budget | None = None

    def options(self) -> dict[str, Any]:
        """``top_n`` as a keyword, when one is asked for (a duck-typed reranker may
        take only ``query`` and ``documents``)."""
        return {} if self.top_n is None else {"top_n": self.top_n}


# A core: see the module's docs.
Steps = Generator[Ask, object, T]


def rerank_of(ask: Ask) -> object:
    """Make ``ask`` synchronously: ``rerank``, or an async-only reranker's ``arerank``
    in a new event loop (refused inside a running one)."""
    reranker = ask.reranker
    if ask.budget is not None:
        return _within(ask, ask.budget)
    if callable(getattr(reranker, "rerank", None)):
        return reranker.rerank(ask.query, ask.documents, **ask.options())
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(reranker.arerank(ask.query, ask.documents, **ask.options())))
    raise InvalidInputError(
        f"{type(reranker).__name__} is async-only and cannot be called synchronously "
        "inside a running event loop; use the async API."
    )


async def arerank_of(ask: Ask) -> object:
    """Make ``ask`` asynchronously: ``arerank``, or ``rerank`` in a worker thread."""
    reranker = ask.reranker
    if ask.budget is not None:
        return await _awithin(ask, ask.budget)
    if callable(getattr(reranker, "arerank", None)):
        return await _awaited(reranker.arerank(ask.query, ask.documents, **ask.options()))
    return await asyncio.to_thread(reranker.rerank, ask.query, ask.documents, **ask.options())


def _within(ask: Ask, budget: Budget) -> object:
    """``ask`` within ``budget``, synchronously (see the module docs)."""
    within = getattr(ask.reranker, "rerank_within", None)
    if callable(within):
        return within(ask.query, ask.documents, budget=budget)
    plain = Ask(ask.reranker, ask.query, ask.documents)
    answer: Future[object] = Future()

    def work() -> None:
        try:
            answer.set_result(rerank_of(plain))
        except BaseException as error:  # delivered to the caller, if it still waits
            answer.set_exception(error)

    # A daemon thread: a reranker that never returns cannot hold the process open.
    threading.Thread(target=work, name="rerank-within", daemon=True).start()
    try:
        return answer.result(timeout=max(budget.remaining(), 0.0))
    except FutureTimeout:
        return []


async def _awithin(ask: Ask, budget: Budget) -> object:
    """``ask`` within ``budget``, asynchronously (see the module docs)."""
    reranker = ask.reranker
    within = getattr(reranker, "arerank_within", None)
    if callable(within):
        return await _awaited(within(ask.query, ask.documents, budget=budget))
    plain = Ask(reranker, ask.query, ask.documents)
    try:
        return await asyncio.wait_for(arerank_of(plain), max(budget.remaining(), 0.0))
    except asyncio.TimeoutError:
        return []


async def _awaited(value: object) -> object:
    return await value if inspect.isawaitable(value) else value


class _Driver(Generic[T]):
    """Steps a core: :attr:`ask` is the call it waits for (``None`` once it is done,
    its return value in :attr:`result`)."""

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self.result: T | None = None
        self.ask: Ask | None = self._step(next, steps)

    def _step(self, step: Callable[..., Ask], *arguments: object) -> Ask | None:
        try:
            return step(*arguments)
        except StopIteration as stop:
            self.result = stop.value
            return None

    def answer(self, value: object) -> None:
        self.ask = self._step(self._steps.send, value)

    def fail(self, error: Exception) -> None:
        self.ask = self._step(self._steps.throw, error)


def run_steps(steps: Steps[T]) -> T:
    """Drive a core synchronously (see :data:`Steps`)."""
    driver = _Driver(steps)
    while driver.ask is not None:
        try:
            answer = rerank_of(driver.ask)
        except Exception as error:
            driver.fail(error)
        else:
            driver.answer(answer)
    return driver.result  # type: ignore[return-value]


async def arun_steps(steps: Steps[T]) -> T:
    """Drive a core asynchronously (see :data:`Steps`)."""
    driver = _Driver(steps)
    while driver.ask is not None:
        try:
            answer = await arerank_of(driver.ask)
        except Exception as error:
            driver.fail(error)
        else:
            driver.answer(answer)
    return driver.result  # type: ignore[return-value]
