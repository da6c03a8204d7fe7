"""The order in which queued calls reach the model: the call that has waited the
largest multiple of its length (its size at the model's measured pace) first."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest

from memos_rerank_integrations.server import _batcher

from ..support.batching import Recording, queued_behind_a_held_call, serving
from ..support.server import DOCUMENTS


def test_a_short_call_goes_before_a_long_one_that_came_just_before() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=1) as batcher:
        queued_behind_a_held_call(batcher, backend)
        long = batcher.submit("long", DOCUMENTS, tokens=10_000)
        short = batcher.submit("short", DOCUMENTS[:2], tokens=10)
        backend.release.set()
        long.result(5), short.result(5)
        assert backend.order == [["hold"], ["short"], ["long"]]


def test_calls_of_one_size_keep_their_arrival_order() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=1) as batcher:
        queued_behind_a_held_call(batcher, backend)
        futures = [batcher.submit(f"call {i}", DOCUMENTS[:2], tokens=50) for i in range(5)]
        backend.release.set()
        for future in futures:
            future.result(5)
        assert backend.order == [["hold"]] + [[f"call {i}"] for i in range(5)]


def test_a_long_call_that_waited_goes_before_short_ones_that_just_came() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=1) as batcher:
        queued_behind_a_held_call(batcher, backend)
        long = batcher.submit("long", DOCUMENTS, tokens=100)  # lasts ~10-20 ms
        time.sleep(0.5)
        # By the time the held call ends (~10 ms after these come), the long call has
        # waited ~30 times its length, these a few times theirs.
        shorts = [batcher.submit(f"short {i}", DOCUMENTS[:2], tokens=10) for i in range(3)]
        backend.release.set()
        long.result(5)
        for future in shorts:
            future.result(5)
        assert backend.order == [["hold"], ["long"]] + [[f"short {i}"] for i in range(3)]


def test_short_calls_are_fused_first_and_the_long_one_runs_after() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=100) as batcher:
        queued_behind_a_held_call(batcher, backend)
        long = batcher.submit("long", DOCUMENTS, tokens=10_000)
        shorts = [batcher.submit(f"short {i}", DOCUMENTS[:2], tokens=10) for i in range(3)]
        backend.release.set()
        long.result(5)
        for future in shorts:
            future.result(5)
        # The short calls head the turn in arrival order; the long one, the lowest ratio,
        # comes after them (here in the same turn: nothing bounds its tokens).
        assert backend.order == [["hold"], ["short 0", "short 1", "short 2", "long"]]


def test_until_the_pace_is_measured_calls_run_in_arrival_order() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=1) as batcher:
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


def test_a_huge_call_counts_as_lasting_at_most_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bound is a minute; here a fraction of a second, to keep the test short.
    monkeypatch.setattr(_batcher, "_MAX_LENGTH", 0.02)
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=1) as batcher:
        queued_behind_a_held_call(batcher, backend)
        huge = batcher.submit("huge", DOCUMENTS, tokens=10**9)  # ~28 hours at this pace
        # Waits 25 times the bound: more, for its length, than the short call will.
        time.sleep(0.5)
        short = batcher.submit("short", DOCUMENTS[:2], tokens=10)
        backend.release.set()
        huge.result(5), short.result(5)
        assert backend.order == [["hold"], ["huge"], ["short"]]


def test_one_stalled_turn_barely_moves_the_pace() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=1) as batcher:
        for _ in range(2):  # two 1-token turns that stall ~0.3 s each (~3,000x the pace)
            queued_behind_a_held_call(batcher, backend)
            time.sleep(0.3)
            backend.release.set()
            while batcher.busy:
                time.sleep(0.001)
            backend.release.clear()
        queued_behind_a_held_call(batcher, backend)
        bigger = batcher.submit("5,000 tokens", DOCUMENTS, tokens=5_000)
        time.sleep(0.05)
        smaller = batcher.submit("2,000 tokens", DOCUMENTS, tokens=2_000)
        time.sleep(0.3)
        backend.release.set()
        bigger.result(5), smaller.result(5)
        # At a pace near the measured one, the smaller call has waited the larger
        # multiple of its length; had the stalls set the pace, both would count as
        # lasting the longest a call can, and the longer wait would go first.
        assert backend.order[-2:] == [["2,000 tokens"], ["5,000 tokens"]]


def test_a_long_call_is_not_starved_by_a_stream_of_short_ones() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_documents=1) as batcher:
        queued_behind_a_held_call(batcher, backend)
        long = batcher.submit("long", DOCUMENTS, tokens=500)
        stop = threading.Event()
        shorts: list[Future[Any]] = []

        def feed() -> None:  # short calls, at least 3 queued at any time, until stopped
            while not stop.is_set():
                if batcher.queued < 4:
                    shorts.append(batcher.submit("short", DOCUMENTS[:2], tokens=10))
                else:
                    time.sleep(0.001)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            time.sleep(0.05)
            backend.release.set()
            # Each turn lasts ~10 ms; every short call waits 2-4 of them. The long call's
            # wait passes that many times its length (500 tokens at the measured pace)
            # within a few seconds, however many short calls keep coming.
            long.result(10)
        finally:
            stop.set()
            feeder.join(5)
        ran_before = backend.order.index(["long"]) - 1
        assert ran_before >= 10  # the short calls kept the model busy meanwhile
        for future in shorts:
            future.result(5)
