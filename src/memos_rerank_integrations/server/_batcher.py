"""Micro-batching of concurrent rerank calls onto the model's worker threads.

Requests that arrive while the model is busy (or within ``batch_window_ms`` of
it becoming free) are scored together with the backend's ``rerank_many``, so
they share forward passes; the backend's own token budget still bounds each
forward pass. All model work runs in the worker threads (one by default), never
on the event loop, so an ASGI server stays responsive while the model computes.

The worker survives anything the backend does: an exception of any kind
(``BaseException`` included) or an answer of the wrong shape fails only the
calls it concerns, and :meth:`MicroBatcher.health` says whether the model can
serve.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from .._calls import Ask, Budget, rerank_of
from .._exceptions import (
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    RerankError,
)
from .._types import (
    Reranker,
    RerankResult,
    optional_positive_int,
    positive_int,
    validate_ranking,
)

__all__ = ["BatchReport", "BatcherHealth", "MicroBatcher"]

logger = logging.getLogger(__name__)

Call = tuple[str, Sequence[str], int | None]
RerankMany = Callable[[Sequence[Call]], list[list[RerankResult]]]

# Longest error description kept for /health and the logs.
_MAX_REASON = 300
# The call a health probe makes when the last model call failed.
_PROBE: Call = ("health check", ["health check"], None)
# The model's pace (seconds per token, or per document for calls submitted without a
# token count) moves this far towards each turn's, which counts as at most
# _PACE_STEP times (or at least 1/_PACE_STEP of) the pace so far: one stalled turn
# moves it by at most 60%, a lasting change within a few turns.
_PACE_WEIGHT = 0.2
_PACE_STEP = 4.0
# The longest a call is taken to last, however large it is and whatever the pace: its
# wait counts for at least 1/60 of its length per second.
_MAX_LENGTH = 60.0
# The shortest (a call's length while the pace is not measured: then the longest wait
# goes first).
_MIN_LENGTH = 1e-6
# A call is cut into slices of at least 1/_SLICES of its tokens, so a call makes at
# most about twice that many.
_SLICES = 16


class _Slices:
    """A call scored in slices of its documents, each queued as a call of its own, one
    at a time (the next when one is taken, so the queue holds one per call): the
    caller's ``future`` gets the slices' results merged (best first, ``top_n``
    applied) once all have answered, or the first error one of them gets."""

    def __init__(self, top_n: int | None, starts: list[int]) -> None:
        self.future: Future[list[RerankResult]] = Future()
        self.top_n = top_n
        self.starts = starts
        self.parts: list[Future[list[RerankResult]]] = []
        # The slices not queued yet, in order.
        self.waiting: collections.deque[_Job] = collections.deque()
        self._results: dict[int, list[RerankResult]] = {}
        self._lock = threading.Lock()
        # The caller withdrawing the call withdraws the slices not started yet.
        self.future.add_done_callback(self._withdraw)

    def next_slice(self) -> _Job | None:
        """The next slice to queue (withdrawn ones skipped); ``None`` once none is
        left."""
        while self.waiting:
            job = self.waiting.popleft()
            if not job.future.cancelled():
                return job
        return None

    def _withdraw(self, future: Future[list[RerankResult]]) -> None:
        if future.cancelled():
            for part in self.parts:
                part.cancel()

    def answered(self, number: int, part: Future[list[RerankResult]]) -> None:
        """One slice's future is done: keep its results, or fail the call."""
        if part.cancelled():
            return
        error = part.exception()
        with self._lock:
            if self.future.done():
                return
            if error is None:
                self._results[number] = part.result()
                if len(self._results) < len(self.starts):
                    return
                merged = [
                    RerankResult(self.starts[n] + r.index, r.score, r.stage)
                    for n, results in self._results.items()
                    for r in results
                ]
                merged.sort(key=lambda r: (-r.score, r.index))
                outcome: list[RerankResult] | BaseException = merged[: self.top_n]
            else:
                outcome = error
            with contextlib.suppress(InvalidStateError):  # withdrawn meanwhile
                if isinstance(outcome, BaseException):
                    self.future.set_exception(outcome)
                else:
                    self.future.set_result(outcome)
        if error is not None:
            for other in self.parts:
                other.cancel()


@dataclass
class _Job:
    query: str
    documents: Sequence[str]
    top_n: int | None
    probe: bool = False
    future: Future[list[RerankResult]] = field(default_factory=Future)
    # The call this job is a slice of (None: a whole call).
    slices: _Slices | None = None
    # When it was queued (time.monotonic()).
    queued_at: float = field(default_factory=time.monotonic)
    # The tokens the call scores, when known: batches are then formed by tokens.
    tokens: int | None = None
    # A latency budget (running from when the call was queued): the call runs alone,
    # scoring in order until it runs out, and its answer may leave documents unscored.
    budget: Budget | None = None

    @property
    def size(self) -> int:
        """What the call costs the model: its tokens, else its documents."""
        return self.tokens if self.tokens is not None else len(self.documents)


@dataclass(frozen=True)
class BatchReport:
    """What one turn of the model worker did (passed to ``on_batch``)."""

    calls: int
    """Calls scored in this turn (more than one: they were fused)."""
    documents: int
    """Documents of those calls."""
    scored_documents: int
    """Documents of the calls that got an answer."""
    seconds: float
    """Wall time the model spent on them."""
    failed: int
    """Calls that ended with an error."""


@dataclass(frozen=True)
class BatcherHealth:
    """Whether the model can serve, and if not, why."""

    ok: bool
    reason: str | None = None


class MicroBatcher:
    """Runs rerank calls of many concurrent requests on ``workers`` worker threads.

    ``reranker`` is any :class:`Reranker`; if it also has ``rerank_many(calls)``
    (a list of ``(query, documents, top_n)`` scored in shared forward passes),
    queued calls are grouped into batches of at most ``max_batch_documents``
    documents and, with ``max_batch_tokens``, at most that many tokens (calls submitted
    with their token count). A call longer than that is scored in slices of its
    documents, each within the bound (a longer document alone) and queued like a call
    of its own that came with the call, one at a time (the next as one is taken: the
    queue, ordered at each turn, holds one entry per call). Its future gets the
    slices' results merged, best first, ``top_n`` applied (``rerank_many`` scores
    each document on its own, so slicing changes no score), or the first error a
    slice gets. So no model turn runs much longer than ``max_batch_tokens`` take, and
    a short call waits for at most one such turn per busy worker. Without
    ``rerank_many``, or with ``enabled=False``, calls run one at a time, whole.

    Calls are taken by how long they have waited for their length: the call whose
    wait is the largest multiple of its length goes first (highest response ratio
    next). A call's length is the time its size (its tokens, or its documents where
    it was submitted without a token count) takes at the model's pace, measured from
    the turns so far, and at most a minute (until the first turn ends, the longest
    wait goes first). So a short call does not wait behind long ones (a 2-memory call
    behind 12-passage ones): it goes first once it has waited a fraction of what they
    have, in the ratio of their lengths. Calls of one size run in arrival order, and
    no call starves: its ratio grows while it waits, and every call that arrives
    after it starts from nothing.

    The default of 32 documents suits CPUs, where one forward pass of a few dozen
    rows already uses every core: small calls are fused, larger calls run one by
    one. GPUs gain from more.

    When the worker is idle a call starts at once; the ``batch_window_ms`` wait
    for more calls applies only right after a batch finished, i.e. under load,
    when the clients just answered are about to send their next request.

    Every answer is checked like a remote one (one result per document, or
    exactly ``top_n``; indices in range, none twice; finite scores): a bad answer
    is a :class:`MalformedResponseError` for its own call only. When a fused batch
    fails (any exception, ``BaseException`` included) or answers for the wrong
    number of calls, each of its calls is retried alone, so every call gets its
    own result or its own error. An exception that is not an ``Exception`` reaches
    the caller as a :class:`BackendUnavailableError`. A call whose future is
    cancelled before the model takes it (its client went away) costs no model work.

    With ``workers`` above 1, that many threads take batches from the one queue;
    each runs its own replica of the reranker (its ``replica()``, made on the
    worker's first call, where the reranker has one: :meth:`QwenReranker.replica
    <memos_rerank_integrations.QwenReranker.replica>` shares the loaded weights),
    else the reranker itself. The first worker takes the calls while it is free; the
    next takes calls only while every worker before it is busy, so light load runs on
    the first alone. A worker takes at most its share (one in ``workers``) of the
    queued documents, so a burst spreads over the workers. With ``cores`` (the torch
    threads the workers share), each worker after the first runs its turns on
    ``cores // workers`` threads and the first on the threads the busy ones leave
    free (all ``cores`` when it runs alone): under load one worker per core keeps
    every core busy while requests take turns with the event loop and tokenizing
    (one pass across all cores waits for the slowest), and a lone call still runs on
    every core. Without ``cores`` the threads are left as they are.

    ``on_batch``, if given, is called in the worker thread after each turn with a
    :class:`BatchReport` (for metrics); its errors are logged and ignored.
    """

    def __init__(
        self,
        reranker: Reranker,
        *,
        enabled: bool = True,
        batch_window_ms: float = 5.0,
        max_batch_documents: int = 32,
        max_batch_tokens: int | None = None,
        workers: int = 1,
        cores: int | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        if batch_window_ms < 0:
            raise InvalidInputError(f"batch_window_ms must be >= 0, got {batch_window_ms!r}.")
        if isinstance(max_batch_documents, bool) or max_batch_documents < 1:
            raise InvalidInputError(
                f"max_batch_documents must be a positive int, got {max_batch_documents!r}."
            )
        self._reranker = reranker
        rerank_many = getattr(reranker, "rerank_many", None)
        self._enabled = enabled and callable(rerank_many)
        self._window = batch_window_ms / 1000.0
        self._max_documents = max_batch_documents
        self._max_tokens = optional_positive_int("max_batch_tokens", max_batch_tokens)
        self._workers = positive_int("workers", workers)
        self._cores = optional_positive_int("cores", cores)
        self._on_batch = on_batch
        # Queued calls, in arrival order.
        self._queue: list[_Job] = []
        # Seconds per token, and per document for calls without a token count, from
        # the turns so far (0: not measured yet).
        self._pace = {True: 0.0, False: 0.0}
        self._condition = threading.Condition()
        self._closed = False
        # When each busy worker (by index) started its turn.
        self._busy_since: dict[int, float] = {}
        self._busy_seconds = 0.0
        self._threads: list[threading.Thread] = []
        # The kind of error of the model's last call, while it failed (None: it
        # did not). Only its type: the message may quote a caller's text.
        self._failure: str | None = None
        self._probe: _Job | None = None
        self._last_probe = -float("inf")

    @property
    def batching(self) -> bool:
        """Whether calls are grouped (``rerank_many`` exists and batching is on)."""
        return self._enabled

    @property
    def queued(self) -> int:
        """Calls waiting for the model (not counting the batch being computed): the
        queue holds one entry per call, a sliced call's next slice included."""
        with self._condition:
            return sum(1 for job in self._queue if not job.future.cancelled())

    @property
    def workers(self) -> int:
        """How many worker threads run the model."""
        return self._workers

    @property
    def busy(self) -> bool:
        """Whether the model is computing right now (in any worker)."""
        return bool(self._busy_since)

    @property
    def busy_for(self) -> float:
        """Seconds the longest-running current model turn has been running (0 when
        idle)."""
        with self._condition:
            starts = list(self._busy_since.values())
        return time.monotonic() - min(starts) if starts else 0.0

    @property
    def busy_seconds(self) -> float:
        """Total seconds the model has spent computing, summed over the workers, the
        current turns included."""
        with self._condition:
            now = time.monotonic()
            return self._busy_seconds + sum(now - since for since in self._busy_since.values())

    def health(self) -> BatcherHealth:
        """Whether the model can serve now (a quick look: never waits for the model).

        After a failed call the reason names the error's type only, never its
        message, which may quote the text of whoever's call failed."""
        with self._condition:
            if self._closed:
                return BatcherHealth(False, "The server is shutting down.")
            if any(not thread.is_alive() for thread in self._threads):
                return BatcherHealth(False, "A model worker thread has stopped.")
            if self._failure is not None:
                return BatcherHealth(
                    False,
                    f"The last model call failed ({self._failure}); the server log has the "
                    "details.",
                )
        return BatcherHealth(True)

    def probe(self, *, min_interval: float = 5.0) -> None:
        """After a model failure, queue one tiny call to find out whether the model
        recovered (at most one at a time, one per ``min_interval`` seconds); its
        success makes :meth:`health` ok again. Does nothing while healthy."""
        with self._condition:
            now = time.monotonic()
            if (
                self._closed
                or self._failure is None
                or self._probe is not None
                or now - self._last_probe < min_interval
            ):
                return
            self._last_probe = now
            query, documents, top_n = _PROBE
            self._probe = _Job(query, documents, top_n, probe=True)
            self._queue.append(self._probe)
            self._wake()
        self.start()

    def start(self) -> None:
        """Start the worker threads (also done by the first call)."""
        with self._condition:
            if self._closed:
                raise BackendUnavailableError("The reranker is shutting down.")
            if not self._threads:
                for index in range(self._workers):
                    name = "memos-rerank-model" + (f"-{index}" if index else "")
                    thread = threading.Thread(
                        target=self._run, args=(index,), name=name, daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()

    def submit(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None = None,
        *,
        budget: Budget | None = None,
        tokens: int | None = None,
    ) -> Future[list[RerankResult]]:
        """Queue one call; its future resolves to the results or the call's own error.

        With a latency ``budget`` (counting the wait in the queue) the call runs alone
        and resolves to the results of the documents scored before it ran out, best
        first (``top_n`` does not apply). Cancel the future to withdraw a call that has
        not started yet.
        """
        whole = _Job(query, documents, top_n, tokens=tokens, budget=budget)
        jobs, slices = self._sliced(whole)
        self.start()
        with self._condition:
            if self._closed:
                raise BackendUnavailableError("The reranker is shutting down.")
            self._queue.append(jobs[0])
            if slices is not None:
                slices.waiting.extend(jobs[1:])
            self._wake()
        return whole.future if slices is None else slices.future

    def _sliced(self, job: _Job) -> tuple[list[_Job], _Slices | None]:
        """The call as slices of its documents, each within ``max_batch_tokens``, or
        1/16 of the call's tokens where that is more (a longer document alone), where
        it is longer and may be sliced: batching on, its tokens counted, no latency
        budget. The call's tokens are shared among its documents in proportion to
        their length (with the query's)."""
        bound, tokens, documents = self._max_tokens, job.tokens, job.documents
        if (
            not self._enabled
            or bound is None
            or tokens is None
            or tokens <= bound
            or len(documents) < 2
            or job.budget is not None
        ):
            return [job], None
        bound = max(bound, math.ceil(tokens / _SLICES))
        weights = [len(job.query) + len(document) + 1 for document in documents]
        total = sum(weights)
        starts, shares = [0], [0.0]
        for index, weight in enumerate(weights):
            share = tokens * weight / total
            if shares[-1] and shares[-1] + share > bound:
                starts.append(index)
                shares.append(0.0)
            shares[-1] += share
        slices = _Slices(job.top_n, starts)
        ends = [*starts[1:], len(documents)]
        jobs = []
        for number, (start, end, share) in enumerate(zip(starts, ends, shares, strict=True)):
            part = _Job(
                job.query, documents[start:end], None, tokens=max(1, round(share)), slices=slices
            )
            slices.parts.append(part.future)
            part.future.add_done_callback(functools.partial(slices.answered, number))
            jobs.append(part)
        return jobs, slices

    async def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Queue one call and wait for it without blocking the event loop.

        If the awaiting task is cancelled before the model takes the call, the call
        is withdrawn.
        """
        return await asyncio.wrap_future(self.submit(query, documents, top_n))

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new calls, finish the queued ones, then stop the worker threads
        (waiting at most ``timeout`` seconds in all)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            if thread is threading.current_thread():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("The model worker did not stop within %s s.", timeout)
                return

    # -- the worker ------------------------------------------------------------------

    def _by_ratio(self) -> list[_Job]:
        """The queued calls (withdrawn ones dropped), highest response ratio first:
        wait over length, longest wait first while the pace is not measured; ties
        in arrival order. Called with the condition held."""
        self._queue = [job for job in self._queue if not job.future.cancelled()]
        now, pace = time.monotonic(), self._pace

        def ratio(job: _Job) -> float:
            length = job.size * pace[job.tokens is not None]
            return (now - job.queued_at) / min(max(length, _MIN_LENGTH), _MAX_LENGTH)

        # sorted() is stable: equal ratios keep the arrival order.
        return sorted(self._queue, key=ratio, reverse=True)

    def _learn_pace(self, jobs: list[_Job], seconds: float, failed: int) -> None:
        """Fold a turn's seconds per token (or per document) into the pace. Turns that
        failed, ran under a latency budget or mixed both kinds of size say nothing
        reliable and are skipped."""
        counted = {job.tokens is not None for job in jobs}
        size = sum(job.size for job in jobs)
        if failed or len(counted) != 1 or size < 1 or any(job.budget is not None for job in jobs):
            return
        (kind,) = counted
        sample = seconds / size
        with self._condition:
            pace = self._pace[kind]
            if pace:
                sample = min(max(sample, pace / _PACE_STEP), pace * _PACE_STEP)
                sample = pace + _PACE_WEIGHT * (sample - pace)
            self._pace[kind] = sample

    def _wake(self) -> None:
        # Called with the condition held, after queueing. With several workers, every
        # waiting one looks (only those allowed to take will), so the call is never
        # left to one that may not take it.
        if self._workers > 1:
            self._condition.notify_all()
        else:
            self._condition.notify()

    def _may_take(self, index: int) -> bool:
        # Called with the condition held: a worker takes calls while every worker
        # before it is busy (the first, always). At shutdown any finishes the queue.
        return all(before in self._busy_since for before in range(index))

    def _turn_threads(self, index: int, others_busy: int) -> int | None:
        """The torch threads for this worker's turn (``None``: leave them)."""
        if self._cores is None or self._workers == 1:
            return None
        share = max(1, self._cores // self._workers)
        return share if index else max(share, self._cores - share * others_busy)

    def _run(self, index: int) -> None:
        # Worker 0 runs the reranker itself, the others a replica each, made on their
        # first turn (see _replica).
        reranker: Reranker | None = self._reranker if index == 0 else None
        last_batch_end = -float("inf")
        threads: int | None = None
        while True:
            with self._condition:
                while not (self._queue and self._may_take(index)) and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return
                if self._enabled:
                    self._wait_for_more(last_batch_end)
                jobs = self._take_batch()
                if not jobs:
                    continue
                wanted = self._turn_threads(index, len(self._busy_since))
                self._busy_since[index] = started = time.monotonic()
                if self._queue:
                    self._wake()  # the next worker may take the rest
            failed = 0
            try:
                if wanted is not None and wanted != threads:
                    from .._local.runtime import use_torch_threads

                    use_torch_threads(wanted)
                    threads = wanted
                if reranker is None:
                    reranker = _replica(self._reranker)
                failed = self._execute(jobs, reranker)
            except BaseException:  # a bug here must not stop the worker either
                logger.exception("The model worker failed; its calls get an error.")
                failed = len(jobs)
                self._fail_unresolved(jobs, "Internal error in the model worker.")
            finally:
                last_batch_end = ended = time.monotonic()
                with self._condition:
                    del self._busy_since[index]
                    self._busy_seconds += ended - started
                    if any(job.probe for job in jobs):
                        self._probe = None
            self._learn_pace(jobs, ended - started, failed)
            self._report(jobs, ended - started, failed)

    def _wait_for_more(self, last_batch_end: float) -> None:
        # Called with the condition held. Idle for longer than the window: no wait.
        deadline = last_batch_end + self._window
        enough = self._max_documents
        while not self._closed and self._queued_documents(enough) < enough:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def _queued_documents(self, enough: int) -> int:
        """The documents of the queued calls, counted up to ``enough`` (the count
        stops there: what is asked costs at most that much however long the queue)."""
        count = 0
        for job in self._queue:
            if not job.future.cancelled():
                count += len(job.documents)
                if count >= enough:
                    break
        return count

    def _take_batch(self) -> list[_Job]:
        # Called with the condition held. Withdrawn calls are dropped unseen.
        ordered = self._by_ratio()
        if not ordered:
            return []
        # With several workers, each takes at most its share of what is queued: the
        # rest goes to the next worker free (a burst spreads over the workers).
        limit = self._max_documents
        if self._workers > 1:
            queued = self._queued_documents(limit * self._workers)
            limit = min(limit, math.ceil(queued / self._workers))
        jobs = ordered[:1]
        if self._enabled and jobs[0].budget is None:
            total, tokens = len(jobs[0].documents), jobs[0].tokens or 0
            for job in ordered[1:]:
                if job.budget is not None or total + len(job.documents) > limit:
                    break
                if self._max_tokens is not None and (
                    job.tokens is None or tokens + job.tokens > self._max_tokens
                ):
                    break
                total += len(job.documents)
                tokens += job.tokens or 0
                jobs.append(job)
        # A sliced call's next slice takes the place of the one taken.
        taken = {id(job): job.slices.next_slice() if job.slices else None for job in jobs}
        queue = []
        for job in self._queue:
            if id(job) not in taken:
                queue.append(job)
            elif (following := taken[id(job)]) is not None:
                queue.append(following)
        self._queue = queue
        return jobs

    def _execute(self, jobs: list[_Job], reranker: Reranker) -> int:
        """Score the jobs with ``reranker`` (this worker's); returns how many failed."""
        # A future cancelled while queued (its request went away) costs no model work.
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return 0
        rerank_many: RerankMany | None = getattr(reranker, "rerank_many", None)
        if len(live) > 1 and callable(rerank_many):
            calls = [(job.query, job.documents, job.top_n) for job in live]
            try:
                outputs = rerank_many(calls)
            except BaseException as exc:
                # One bad call must not fail its batch mates: retry each on its own,
                # so every request gets exactly its own result or its own error.
                logger.warning(
                    "A fused batch of %d calls failed (%s); retrying them one by one.",
                    len(live),
                    _describe(exc),
                )
            else:
                if isinstance(outputs, list) and len(outputs) == len(live):
                    return sum(
                        not self._resolve(job, output)
                        for job, output in zip(live, outputs, strict=True)
                    )
                logger.warning(
                    "rerank_many answered %s for %d calls; retrying them one by one.",
                    f"{len(outputs)} results" if isinstance(outputs, list) else "a non-list",
                    len(live),
                )
        failed = 0
        for job in live:
            try:
                if job.budget is not None:
                    ask = Ask(reranker, job.query, list(job.documents), budget=job.budget)
                    output = rerank_of(ask)
                else:
                    output = reranker.rerank(job.query, job.documents, job.top_n)
            except BaseException as exc:
                failed += 1
                self._fail(job, exc)
            else:
                failed += not self._resolve(job, output)
        return failed

    def _resolve(self, job: _Job, output: object) -> bool:
        """Validate one call's answer and hand it over; False if it was invalid."""
        try:
            results = _checked(output, job)
        except MalformedResponseError as exc:
            logger.error("The model gave an invalid answer: %s", exc.message)
            self._fail(job, exc)
            return False
        with self._condition:
            self._failure = None
        job.future.set_result(results)
        return True

    def _fail(self, job: _Job, exc: BaseException) -> None:
        error = _as_exception(exc)
        if not isinstance(error, InvalidInputError):
            # The caller's bad input says nothing about the model; anything else does.
            with self._condition:
                self._failure = type(exc).__name__
        if job.probe:
            logger.warning("Health probe failed: %s", _describe(exc))
        job.future.set_exception(error)

    def _fail_unresolved(self, jobs: list[_Job], message: str) -> None:
        for job in jobs:
            if not job.future.done():
                try:
                    self._fail(job, BackendUnavailableError(message))
                except BaseException:  # pragma: no cover - a future in an odd state
                    logger.exception("Could not fail a call")

    def _report(self, jobs: list[_Job], seconds: float, failed: int) -> None:
        if self._on_batch is None:
            return
        answered = [
            job
            for job in jobs
            if job.future.done() and not job.future.cancelled() and job.future.exception() is None
        ]
        report = BatchReport(
            calls=len(jobs),
            documents=sum(len(job.documents) for job in jobs),
            scored_documents=sum(len(job.documents) for job in answered),
            seconds=seconds,
            failed=failed,
        )
        try:
            self._on_batch(report)
        except Exception:
            logger.exception("on_batch failed")


def _replica(reranker: Reranker) -> Reranker:
    """A second worker's reranker: the reranker's ``replica()`` where it has one (the
    same weights, a lock of its own), else, or where that fails, the reranker itself
    (the workers' calls then take turns on it)."""
    replica = getattr(reranker, "replica", None)
    if not callable(replica):
        return reranker
    try:
        made = replica()
        if not callable(getattr(made, "rerank", None)):
            raise TypeError(f"{type(reranker).__name__}.replica() returned no reranker")
    except Exception as exc:
        logger.warning(
            "Could not make a replica of the model (%s); this worker shares the first.",
            _describe(exc),
        )
        return reranker
    return made  # type: ignore[no-any-return]


def _checked(output: object, job: _Job) -> list[RerankResult]:
    if not isinstance(output, list) or not all(isinstance(r, RerankResult) for r in output):
        raise MalformedResponseError(
            "The model answered something other than a list of RerankResult.", backend="model"
        )
    validate_ranking(
        [(result.index, result.score) for result in output],
        n_documents=len(job.documents),
        top_n_sent=job.top_n,
        backend="model",
        partial=job.budget is not None,
    )
    # Best first; ties keep input order (what rank_scores does).
    return sorted(output, key=lambda result: (-result.score, result.index))


def _as_exception(exc: BaseException) -> Exception:
    if isinstance(exc, Exception):
        return exc
    # KeyboardInterrupt, SystemExit, CancelledError... raised by the model code:
    # awaiting them would stop the caller's event loop or task, so wrap them.
    error = BackendUnavailableError(f"The model failed: {_describe(exc)}.")
    error.__cause__ = exc
    return error


def _describe(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, RerankError) else str(exc)
    message = " ".join(message.split())
    if len(message) > _MAX_REASON:
        message = message[: _MAX_REASON - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
