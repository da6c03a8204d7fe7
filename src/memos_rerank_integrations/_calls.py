"""Calling duck-typed rerankers, sync and async, over one core.

A core is a generator that yields the calls it wants made (:class:`Ask`), is sent
each answer (or has the call's exception thrown in), and returns its result
(:data:`Steps`): the logic is written once, and :func:`run_steps` /
:func:`arun_steps` make the calls synchronously or asynchronously. The adapters'
pipeline, ``compare`` and the fallback chain are such cores.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._exceptions import InvalidInputError

__all__ = ["Ask", "Steps", "arerank_of", "arun_steps", "rerank_of", "run_steps"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ask:
    """One call a core wants made: ``reranker.rerank(query, documents, top_n)``."""

    reranker: Any
    query: str
    documents: list[str]
    top_n: int | None = None

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
    if callable(getattr(reranker, "arerank", None)):
        return await _awaited(reranker.arerank(ask.query, ask.documents, **ask.options()))
    return await asyncio.to_thread(reranker.rerank, ask.query, ask.documents, **ask.options())


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
