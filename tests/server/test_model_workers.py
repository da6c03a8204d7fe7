"""Several model workers: batches run at the same time, each worker on its own
replica of the reranker, idle workers share the queue, and the server and CLI take
the option."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from memos_rerank_integrations import InvalidInputError, QwenReranker, RerankResult
from memos_rerank_integrations.server import create_app
from memos_rerank_integrations.server._batcher import MicroBatcher

from ..support import qwen_fixtures
from ..support.server import DOCUMENTS, QUERY, LiveServer, WordOverlapReranker

tiny_qwen_dir = qwen_fixtures.tiny_qwen_dir


class Gathering(WordOverlapReranker):
    """Each model call waits (up to ``wait`` seconds) until ``together`` calls are in
    progress at once, records who ran it and how many calls it got, and makes
    replicas that share these records."""

    def __init__(self, together: int, *, wait: float = 5.0) -> None:
        super().__init__()
        self.barrier = threading.Barrier(together)
        self.wait = wait
        self.replicas = 0
        self.runs: list[tuple[int, str, int]] = []  # (replica, thread, calls)
        self.number = 0

    def replica(self) -> Gathering:
        twin = Gathering.__new__(Gathering)
        twin.__dict__.update(self.__dict__)
        with self.lock:
            self.replicas += 1
            twin.number = self.replicas
        return twin

    def _gather(self, calls: int) -> None:
        with self.lock:
            self.runs.append((self.number, threading.current_thread().name, calls))
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait(self.wait)

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        self._gather(1)
        return super().rerank(query, documents, top_n)

    def rerank_many(
        self, calls: Sequence[tuple[str, Sequence[str], int | None]]
    ) -> list[list[RerankResult]]:
        self._gather(len(calls))
        return super().rerank_many(calls)


def test_two_workers_score_two_calls_at_the_same_time_on_their_own_replicas() -> None:
    backend = Gathering(2)
    batcher = MicroBatcher(backend, workers=2, max_batch_documents=len(DOCUMENTS))
    try:
        started = time.monotonic()
        futures = [batcher.submit(QUERY, DOCUMENTS) for _ in range(2)]
        for future in futures:
            assert future.result(10) == WordOverlapReranker().rerank(QUERY, DOCUMENTS)
        # One worker would have waited out the barrier for each call.
        assert time.monotonic() - started < 3
        assert batcher.workers == 2
    finally:
        batcher.close()
    assert backend.replicas == 1  # worker 1 made one replica; worker 0 runs the original
    assert sorted(number for number, _, _ in backend.runs) == [0, 1]
    assert len({thread for _, thread, _ in backend.runs}) == 2


def test_each_worker_takes_at_most_its_share_of_the_queued_calls() -> None:
    backend = Gathering(2)
    batcher = MicroBatcher(backend, workers=2, batch_window_ms=0, max_batch_documents=100)
    batcher.start()
    try:
        # Queued while the workers cannot look: the first worker takes its half, the
        # second at most half of the rest, and so on (taken by one, the 8 calls would
        # wait out the barrier alone, then run again call by call).
        with batcher._condition:
            futures = [batcher.submit(QUERY, DOCUMENTS[:1]) for _ in range(8)]
        for future in futures:
            assert future.result(10)
    finally:
        batcher.close()
    taken = [calls for _, _, calls in backend.runs]
    assert max(taken) == 4 and sum(taken) == 8, taken
    assert len({thread for _, thread, _ in backend.runs}) == 2


def test_light_load_runs_on_the_first_worker_alone() -> None:
    """Calls that come one at a time all run on the first worker (the one that runs
    on every core); the second never even makes its replica."""
    backend = Gathering(1)
    batcher = MicroBatcher(backend, workers=2)
    try:
        for _ in range(20):
            assert batcher.submit(QUERY, DOCUMENTS).result(10)
    finally:
        batcher.close()
    assert {thread for _, thread, _ in backend.runs} == {"memos-rerank-model"}
    assert backend.replicas == 0


class Threads(WordOverlapReranker):
    """Records, per call, the worker thread and the torch threads it runs on; a call
    whose query is in ``gates`` waits for its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, threading.Event] = {}
        self.seen: dict[str, tuple[str, int]] = {}

    def replica(self) -> Threads:
        return self

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        self.seen[query] = (threading.current_thread().name, torch.get_num_threads())
        gate = self.gates.get(query)
        if gate is not None:
            gate.wait(10)
        return super().rerank(query, documents, top_n)


def test_the_first_worker_runs_on_the_cores_the_busy_others_leave() -> None:
    """With 4 cores for 2 workers: the second runs on its share (2 threads); the
    first on all 4 while the second is idle, on 2 while it is busy."""
    backend = Threads()
    backend.gates = {"a": threading.Event(), "b": threading.Event()}
    batcher = MicroBatcher(backend, workers=2, cores=4, batch_window_ms=0)
    before = torch.get_num_threads()

    def started(query: str) -> None:
        deadline = time.monotonic() + 10
        while query not in backend.seen and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        a = batcher.submit("a", DOCUMENTS)
        started("a")
        b = batcher.submit("b", DOCUMENTS)  # the first is busy: the second takes it
        started("b")
        backend.gates["a"].set()
        a.result(10)
        c = batcher.submit("c", DOCUMENTS)  # the first again, beside the busy second
        c.result(10)
        backend.gates["b"].set()
        b.result(10)
        batcher.submit("d", DOCUMENTS).result(10)  # the first, alone again
    finally:
        for gate in backend.gates.values():
            gate.set()
        batcher.close()
        torch.set_num_threads(before)
    first, second = "memos-rerank-model", "memos-rerank-model-1"
    assert backend.seen == {"a": (first, 4), "b": (second, 2), "c": (first, 2), "d": (first, 4)}


def test_a_reranker_without_replicas_serves_every_worker() -> None:
    backend = WordOverlapReranker(delay=0.05)
    batcher = MicroBatcher(backend, workers=3)
    try:
        futures = [batcher.submit(QUERY, DOCUMENTS) for _ in range(6)]
        assert all(f.result(10) == backend.rerank(QUERY, DOCUMENTS) for f in futures)
    finally:
        batcher.close()
    assert not any(t.name.startswith("memos-rerank-model") for t in threading.enumerate())


def test_a_worker_that_cannot_make_a_replica_shares_the_reranker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NoReplica(WordOverlapReranker):
        def replica(self) -> WordOverlapReranker:
            raise RuntimeError("no memory for a replica")

    backend = NoReplica(delay=0.2)
    batcher = MicroBatcher(backend, workers=2, max_batch_documents=len(DOCUMENTS))
    try:
        futures = [batcher.submit(QUERY, DOCUMENTS) for _ in range(4)]
        assert all(f.result(10) == backend.rerank(QUERY, DOCUMENTS) for f in futures)
        assert batcher.health().ok
    finally:
        batcher.close()
    assert "Could not make a replica" in caplog.text and "no memory" in caplog.text


@pytest.mark.parametrize("workers", [0, -1, True, 1.5])
def test_workers_must_be_a_positive_int(workers: object) -> None:
    with pytest.raises(InvalidInputError, match="workers"):
        MicroBatcher(WordOverlapReranker(), workers=workers)  # type: ignore[arg-type]


@pytest.mark.parametrize("cores", [0, -2, True, 2.5])
def test_cores_must_be_a_positive_int_or_none(cores: object) -> None:
    with pytest.raises(InvalidInputError, match="cores"):
        MicroBatcher(WordOverlapReranker(), workers=2, cores=cores)  # type: ignore[arg-type]


def test_the_app_runs_its_model_workers() -> None:
    backend = Gathering(2)
    app = create_app(backend, model_name="m", model_workers=2, max_batch_documents=3)
    with LiveServer(app) as live:
        body = {"query": QUERY, "documents": DOCUMENTS[:3]}
        with ThreadPoolExecutor(2) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(f"{live.url}/rerank", json=body, timeout=10), [0, 1])
            )
    assert [a.status_code for a in answers] == [200, 200]
    assert app.state.batcher.workers == 2
    assert sorted(number for number, _, _ in backend.runs) == [0, 1]


def test_a_qwen_replica_scores_while_the_original_is_busy(tiny_qwen_dir: Path) -> None:
    original = QwenReranker(str(tiny_qwen_dir), device="cpu", dtype="float32")
    expected = original.rerank(QUERY, DOCUMENTS)
    twin = original.replica()
    assert repr(twin) == repr(original)
    # The original's model is in use (its lock held, as during a long call): the
    # replica still scores, on the same weights, with the same results.
    with ThreadPoolExecutor(1) as pool, original._loaded().lock:
        answer = pool.submit(twin.rerank, QUERY, DOCUMENTS)
        assert answer.result(20) == expected
    assert twin._loaded().engine is original._loaded().engine
