"""The order in which queued calls reach the model: earliest due first, where a call
is due at its arrival plus its size at the model's measured pace."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from memos_rerank_integrations import RerankResult
from memos_rerank_integrations.server import _batcher
from memos_rerank_integrations.server._batcher import MicroBatcher

from ..support.server import DOCUMENTS, WordOverlapReranker

# Seconds each model call takes: with the warm-up call's 100 tokens, a pace of 0.1 ms
# per token (a 10,000-token call is due 1 s after it arrives, a 10-token one 1 ms).
TURN = 0.01


class Recording(WordOverlapReranker):
    """Records the queries of each model call, in order; a call whose query is
    ``hold`` waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(delay=TURN)
        self.order: list[list[str]] = []
        self.release = threading.Event()

    def _record(self, queries: list[str]) -> None:
        with self.lock:
            self.order.append(queries)
        if "hold" in queries:
            assert self.release.wait(10)

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        self._record([query])
        return super().rerank(query, documents, top_n)

    def rerank_many(
        self, calls: Sequence[tuple[str, Sequence[str], int | None]]
    ) -> list[list[RerankResult]]:
        self._record([query for query, _, _ in calls])
        return super().rerank_many(calls)


def _queued_behind_a_held_call(batcher: MicroBatcher, backend: Recording) -> None:
    """Warm up (the pace is measured), then occupy the worker."""
    batcher.submit("warm", DOCUMENTS, tokens=100).result(5)
    backend.order.clear()
    batcher.submit("hold", DOCUMENTS[:1], tokens=1)
    deadline = time.monotonic() + 5
    while not backend.order:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_short_call_goes_before_a_long_one_that_came_just_before() -> None:
    backend = Recording()
    batcher = MicroBatcher(backend, batch_window_ms=0, max_batch_documents=1)
    try:
        _queued_behind_a_held_call(batcher, backend)
        long = batcher.submit("long", DOCUMENTS, tokens=10_000)
        short = batcher.submit("short", DOCUMENTS[:2], tokens=10)
        backend.release.set()
        long.result(5), short.result(5)
        assert backend.order == [["hold"], ["short"], ["long"]]
    finally:
        backend.release.set()
        batcher.close()


def test_calls_of_one_size_keep_their_arrival_order() -> None:
    backend = Recording()
    batcher = MicroBatcher(backend, batch_window_ms=0, max_batch_documents=1)
    try:
        _queued_behind_a_held_call(batcher, backend)
        futures = [batcher.submit(f"call {i}", DOCUMENTS[:2], tokens=50) for i in range(5)]
        backend.release.set()
        for future in futures:
            future.result(5)
        assert backend.order == [["hold"]] + [[f"call {i}"] for i in range(5)]
    finally:
        backend.release.set()
        batcher.close()


def test_a_long_call_is_not_overtaken_by_calls_that_fall_due_after_it() -> None:
    backend = Recording()
    batcher = MicroBatcher(backend, batch_window_ms=0, max_batch_documents=1)
    try:
        _queued_behind_a_held_call(batcher, backend)
        long = batcher.submit("long", DOCUMENTS, tokens=2_000)  # due in ~0.2 s
        time.sleep(0.5)
        # Arrived after the long call fell due: each is due later than it.
        shorts = [batcher.submit(f"short {i}", DOCUMENTS[:2], tokens=10) for i in range(3)]
        backend.release.set()
        long.result(5)
        for future in shorts:
            future.result(5)
        assert backend.order == [["hold"], ["long"]] + [[f"short {i}"] for i in range(3)]
    finally:
        backend.release.set()
        batcher.close()


def test_short_calls_are_fused_first_and_the_long_one_runs_after() -> None:
    backend = Recording()
    batcher = MicroBatcher(backend, batch_window_ms=0, max_batch_documents=100)
    try:
        _queued_behind_a_held_call(batcher, backend)
        long = batcher.submit("long", DOCUMENTS, tokens=10_000)
        shorts = [batcher.submit(f"short {i}", DOCUMENTS[:2], tokens=10) for i in range(3)]
        backend.release.set()
        long.result(5)
        for future in shorts:
            future.result(5)
        # The short calls head the turn in arrival order; the long one, due last,
        # comes after them (here in the same turn: nothing bounds its tokens).
        assert backend.order == [["hold"], ["short 0", "short 1", "short 2", "long"]]
    finally:
        backend.release.set()
        batcher.close()


def test_until_the_pace_is_measured_calls_run_in_arrival_order() -> None:
    backend = Recording()
    batcher = MicroBatcher(backend, batch_window_ms=0, max_batch_documents=1)
    try:
        batcher.submit("hold", DOCUMENTS[:1])  # no token count: the pace of tokens is unknown
        deadline = time.monotonic() + 5
        while not backend.order:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        long = batcher.submit("long", DOCUMENTS, tokens=10_000)
        short = batcher.submit("short", DOCUMENTS[:2], tokens=10)
        backend.release.set()
        long.result(5), short.result(5)
        assert backend.order == [["hold"], ["long"], ["short"]]
    finally:
        backend.release.set()
        batcher.close()


def test_a_huge_call_falls_due_within_the_head_start_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bound is a minute; here a fraction of a second, to keep the test short.
    monkeypatch.setattr(_batcher, "_MAX_HEAD_START", 0.2)
    backend = Recording()
    batcher = MicroBatcher(backend, batch_window_ms=0, max_batch_documents=1)
    try:
        _queued_behind_a_held_call(batcher, backend)
        huge = batcher.submit("huge", DOCUMENTS, tokens=10**9)  # ~28 hours at this pace
        time.sleep(0.5)
        short = batcher.submit("short", DOCUMENTS[:2], tokens=10)
        backend.release.set()
        huge.result(5), short.result(5)
        assert backend.order == [["hold"], ["huge"], ["short"]]
    finally:
        backend.release.set()
        batcher.close()
