"""Calls longer than ``max_batch_tokens`` are scored in slices of their documents,
each queued like a call of its own (one at a time, the next when one is taken):
short calls get in between, and the answer is the whole call's."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from memos_rerank_integrations import QwenReranker, RerankResult
from memos_rerank_integrations.server import create_app

from ..support import qwen_fixtures
from ..support.batching import Recording, queued_behind_a_held_call, serving
from ..support.server import DOCUMENTS, QUERY, LiveServer, WordOverlapReranker

tiny_qwen_dir = qwen_fixtures.tiny_qwen_dir

# Eight documents of one length: a call's tokens are shared evenly among them.
EIGHT = [f"memory number {i} about the user" for i in range(8)]


class Sizes(WordOverlapReranker):
    """Records the documents of each call the model scores."""

    def __init__(self) -> None:
        super().__init__()
        self.scored: list[list[str]] = []

    def rerank_many(
        self, calls: Sequence[tuple[str, Sequence[str], int | None]]
    ) -> list[list[RerankResult]]:
        with self.lock:
            self.scored.extend(list(documents) for _, documents, _ in calls)
        return super().rerank_many(calls)

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        with self.lock:
            self.scored.append(list(documents))
        return super().rerank(query, documents, top_n)


@pytest.mark.parametrize("top_n", [None, 3, 8, 20])
def test_a_long_call_is_scored_in_slices_within_the_bound_and_answered_whole(
    top_n: int | None,
) -> None:
    backend = Sizes()
    with serving(backend, max_batch_tokens=300, batch_window_ms=0) as batcher:
        # 1000 tokens over 8 equal documents: 125 each, so slices of 2 (250 <= 300).
        got = batcher.submit(QUERY, EIGHT, top_n, tokens=1000).result(5)
        assert sorted(map(tuple, backend.scored)) == [
            tuple(EIGHT[i : i + 2]) for i in range(0, 8, 2)
        ]
        assert got == backend.rerank(QUERY, EIGHT, top_n)


def test_a_document_longer_than_the_bound_is_a_slice_of_its_own() -> None:
    backend = Sizes()
    with serving(backend, max_batch_tokens=300, batch_window_ms=0) as batcher:
        documents = ["short", "a much longer memory " * 20, "short too"]
        got = batcher.submit(QUERY, documents, tokens=900).result(5)
        assert ["a much longer memory " * 20] in backend.scored
        assert all(len(scored) < 3 for scored in backend.scored)
        assert got == backend.rerank(QUERY, documents)


def test_a_huge_call_makes_a_few_dozen_slices_at_most() -> None:
    # 1,000 documents of 1,000 tokens: 1,000 slices at the bound, 32 at 1/16 of the call.
    backend = Sizes()
    with serving(backend, max_batch_tokens=300, batch_window_ms=0) as batcher:
        documents = [f"memory {i:04d}" for i in range(1000)]
        got = batcher.submit(QUERY, documents, tokens=10**6).result(30)
        assert 16 <= len(backend.scored) <= 32
        assert got == backend.rerank(QUERY, documents)


@pytest.mark.parametrize(
    "call",
    [
        {"tokens": 300},  # within the bound
        {"tokens": None},  # size unknown
        {"tokens": 1000, "one_document": True},
    ],
    ids=["within", "uncounted", "one-document"],
)
def test_calls_that_are_not_sliced(call: dict[str, object]) -> None:
    backend = Sizes()
    with serving(backend, max_batch_tokens=300, batch_window_ms=0) as batcher:
        documents = EIGHT[:1] if call.get("one_document") else EIGHT
        tokens = call["tokens"]
        assert tokens is None or isinstance(tokens, int)
        batcher.submit(QUERY, documents, tokens=tokens).result(5)
        assert backend.scored == [documents]


def test_without_a_token_bound_nothing_is_sliced() -> None:
    backend = Sizes()
    with serving(backend, batch_window_ms=0) as batcher:
        batcher.submit(QUERY, EIGHT, tokens=10**6).result(5)
        assert backend.scored == [EIGHT]


def test_a_short_call_gets_in_between_the_slices_of_a_long_one() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_tokens=2_500) as batcher:
        queued_behind_a_held_call(batcher, backend)  # a pace of ~0.1 ms per token
        # 4 slices of 2,500 tokens, lasting ~0.25 s each.
        long = batcher.submit("long", EIGHT, tokens=10_000)
        time.sleep(0.3)
        short = batcher.submit("short", DOCUMENTS[:2], tokens=10)  # lasts ~1 ms
        backend.release.set()
        long.result(5), short.result(5)
        order = [queries[0] for queries in backend.order]
        assert order.count("long") == 4 and order[0] == "hold"
        # The slices have waited ~1.2 times their length; within a slice's turn the
        # short call waits many times its own, so it goes next at the latest.
        assert order.index("short") in (1, 2)


def test_a_failing_slice_fails_the_call_and_withdraws_the_rest() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_tokens=250) as batcher:
        queued_behind_a_held_call(batcher, backend)
        failing = batcher.submit("EXPLODE", EIGHT, tokens=1000)
        backend.release.set()
        with pytest.raises(RuntimeError, match="exploded"):
            failing.result(5)
        deadline = time.monotonic() + 5
        while batcher.queued:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [queries for queries in backend.order if "EXPLODE" in queries] == [["EXPLODE"]]
        assert batcher.submit(QUERY, DOCUMENTS).result(5)  # still serving


def test_withdrawing_a_sliced_call_withdraws_its_queued_slices() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_tokens=250) as batcher:
        queued_behind_a_held_call(batcher, backend)
        withdrawn = batcher.submit("withdrawn", EIGHT, tokens=1000)
        assert batcher.queued == 1  # one call, however many slices
        assert withdrawn.cancel()
        assert batcher.queued == 0
        backend.release.set()
        assert batcher.submit(QUERY, DOCUMENTS, tokens=10).result(5)
        assert all("withdrawn" not in queries for queries in backend.order)


def test_the_queue_holds_one_slice_of_each_sliced_call_at_a_time() -> None:
    backend = Recording()
    with serving(backend, batch_window_ms=0, max_batch_tokens=250) as batcher:
        queued_behind_a_held_call(batcher, backend)
        calls = [batcher.submit(f"call {i}", EIGHT, tokens=1000) for i in range(20)]
        # What the batcher orders at each turn grows with the calls, not their slices
        # (4 each here; up to ~32 for a call of any length).
        assert len(batcher._queue) == 20
        backend.release.set()
        for call in calls:
            assert len(call.result(10)) == len(EIGHT)
        # Each next slice is queued as the one before is taken, as early as the call:
        # the calls' slices run in the calls' order, as they would all queued at once.
        assert backend.order == [["hold"]] + [[f"call {i}"] for i in range(20) for _ in range(4)]


class Pairs(Sizes):
    """Each model call waits until another is running beside it (a second worker)."""

    def __init__(self) -> None:
        super().__init__()
        self.together = threading.Barrier(2, timeout=5)

    def rerank_many(
        self, calls: Sequence[tuple[str, Sequence[str], int | None]]
    ) -> list[list[RerankResult]]:
        self.together.wait()
        return super().rerank_many(calls)

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        self.together.wait()
        return super().rerank(query, documents, top_n)


def test_two_workers_score_the_slices_of_a_lone_call_at_once() -> None:
    backend = Pairs()
    with serving(backend, batch_window_ms=0, max_batch_tokens=500, workers=2) as batcher:
        # Two slices of 4 documents: the second is queued as the first is taken, and
        # the idle worker takes it (each model call waits for the other to start).
        got = batcher.submit(QUERY, EIGHT, tokens=1000).result(10)
        assert got == WordOverlapReranker().rerank(QUERY, EIGHT)
        assert sorted(map(tuple, backend.scored)) == [tuple(EIGHT[:4]), tuple(EIGHT[4:])]


class SlicedQwen(QwenReranker):
    """The tiny Qwen, recording the documents of each model call."""

    calls: list[list[str]]

    def rerank_many(
        self, calls: Sequence[tuple[str, Sequence[str], int | None]]
    ) -> list[list[RerankResult]]:
        self.calls.extend(list(documents) for _, documents, _ in calls)
        return super().rerank_many(calls)


def test_the_server_answers_a_sliced_call_as_the_model_does(tiny_qwen_dir: Path) -> None:
    reranker = SlicedQwen(tiny_qwen_dir, dtype="float32")
    reranker.calls = []
    documents = [f"{document} ({i})" for i, document in enumerate(DOCUMENTS * 3)]
    tokens = reranker.count_tokens(QUERY, documents)
    app = create_app(reranker, model_name="tiny", max_batch_tokens=tokens // 4)
    with LiveServer(app) as live:
        answer = httpx.post(
            f"{live.url}/rerank",
            json={"query": QUERY, "documents": documents, "top_n": 7},
            timeout=60,
        )
    assert answer.status_code == 200
    slices = [call for call in reranker.calls if set(call) <= set(documents)]
    assert len(slices) >= 4  # each within a quarter of the call's tokens
    assert sorted(document for call in slices for document in call) == sorted(documents)
    expected = reranker.rerank(QUERY, documents, top_n=7)
    got = answer.json()["results"]
    assert [r["index"] for r in got] == [e.index for e in expected]
    assert [r["relevance_score"] for r in got] == pytest.approx(
        [e.score for e in expected], abs=1e-6
    )
