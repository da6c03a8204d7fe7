"""Micro-batching of concurrent rerank calls onto one model worker thread.

Requests that arrive while the model is busy (or within ``batch_window_ms`` of
it becoming free) are scored together with the backend's ``rerank_many``, so
they share forward passes; the backend's own token budget still bounds each
forward pass. All model work runs in a single worker thread, never on the event
loop, so an ASGI server stays responsive while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ._exceptions import BackendUnavailableError, InvalidInputError
from ._types import Reranker, RerankResult

__all__ = ["MicroBatcher"]

logger = logging.getLogger(__name__)

Call = tuple[str, Sequence[str], int | None]
RerankMany = Callable[[Sequence[Call]], list[list[RerankResult]]]


@dataclass
class _Job:
    query: str
    documents: Sequence[str]
    top_n: int | None
    future: Future[list[RerankResult]] = field(default_factory=Future)


class MicroBatcher:
    """Runs rerank calls of many concurrent requests on one worker thread.

    ``reranker`` is any :class:`Reranker`; if it also has ``rerank_many(calls)``
    (a list of ``(query, documents, top_n)`` scored in shared forward passes),
    queued calls are grouped into batches of at most ``max_batch_documents``
    documents (a single larger call runs alone). Without ``rerank_many``, or with
    ``enabled=False``, calls run one at a time in arrival order.

    When the worker is idle a call starts at once; the ``batch_window_ms`` wait
    for more calls applies only right after a batch finished, i.e. under load,
    when the clients just answered are about to send their next request.
    """

    def __init__(
        self,
        reranker: Reranker,
        *,
        enabled: bool = True,
        batch_window_ms: float = 5.0,
        max_batch_documents: int = 128,
    ) -> None:
        if batch_window_ms < 0:
            raise InvalidInputError(f"batch_window_ms must be >= 0, got {batch_window_ms!r}.")
        if isinstance(max_batch_documents, bool) or max_batch_documents < 1:
            raise InvalidInputError(
                f"max_batch_documents must be a positive int, got {max_batch_documents!r}."
            )
        self._reranker = reranker
        rerank_many = getattr(reranker, "rerank_many", None)
        self._rerank_many: RerankMany | None = rerank_many if callable(rerank_many) else None
        self._enabled = enabled and self._rerank_many is not None
        self._window = batch_window_ms / 1000.0
        self._max_documents = max_batch_documents
        self._queue: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._busy = False
        self._last_batch_end = -float("inf")
        self._thread: threading.Thread | None = None

    @property
    def batching(self) -> bool:
        """Whether calls are grouped (``rerank_many`` exists and batching is on)."""
        return self._enabled

    @property
    def queued(self) -> int:
        """Calls waiting for the model (not counting the batch being computed)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether the model is computing right now."""
        return self._busy

    def start(self) -> None:
        """Start the worker thread (also done by the first call)."""
        with self._condition:
            if self._closed:
                raise BackendUnavailableError("The reranker is shutting down.")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="memos-rerank-model", daemon=True
                )
                self._thread.start()

    def submit(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> Future[list[RerankResult]]:
        """Queue one call; its future resolves to the results or the call's own error."""
        job = _Job(query, documents, top_n)
        self.start()
        with self._condition:
            if self._closed:
                raise BackendUnavailableError("The reranker is shutting down.")
            self._queue.append(job)
            self._condition.notify()
        return job.future

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Queue one call and wait for it without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(query, documents, top_n))

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new calls, finish the queued ones, then stop the worker thread."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("The model worker did not stop within %s s.", timeout)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return
                if self._enabled:
                    self._wait_for_more()
                jobs = self._take_batch()
                self._busy = True
            try:
                self._execute(jobs)
            finally:
                with self._condition:
                    self._busy = False
                    self._last_batch_end = time.monotonic()

    def _wait_for_more(self) -> None:
        # Called with the condition held. Idle for longer than the window: no wait.
        deadline = self._last_batch_end + self._window
        while not self._closed and self._queued_documents() < self._max_documents:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def _queued_documents(self) -> int:
        return sum(len(job.documents) for job in self._queue)

    def _take_batch(self) -> list[_Job]:
        jobs = [self._queue.popleft()]
        if not self._enabled:
            return jobs
        total = len(jobs[0].documents)
        while self._queue and total + len(self._queue[0].documents) <= self._max_documents:
            job = self._queue.popleft()
            total += len(job.documents)
            jobs.append(job)
        return jobs

    def _execute(self, jobs: list[_Job]) -> None:
        # A future cancelled while queued (its request went away) costs no model work.
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if len(live) > 1 and self._rerank_many is not None:
            try:
                outputs = self._rerank_many([(j.query, j.documents, j.top_n) for j in live])
            except Exception:
                # One bad call must not fail its batch mates: retry each on its own,
                # so every request gets exactly its own result or its own error.
                logger.warning("A batched rerank failed; retrying its calls one by one.")
            else:
                if len(outputs) == len(live):
                    for job, output in zip(live, outputs, strict=True):
                        job.future.set_result(output)
                    return
                logger.warning(
                    "rerank_many returned %d results for %d calls; retrying one by one.",
                    len(outputs),
                    len(live),
                )
        for job in live:
            try:
                job.future.set_result(self._reranker.rerank(job.query, job.documents, job.top_n))
            except BaseException as exc:
                job.future.set_exception(exc)
