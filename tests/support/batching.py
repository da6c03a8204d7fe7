"""A model stand-in that records the order in which the batcher hands it calls."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from memos_rerank_integrations import Reranker, RerankResult
from memos_rerank_integrations.server._batcher import MicroBatcher

from .server import DOCUMENTS, WordOverlapReranker

# Seconds each model call takes: with the warm-up call's 100 tokens, a pace of 0.1 ms
# per token (a 10,000-token call lasts 1 s, a 10-token one 1 ms).
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


def queued_behind_a_held_call(batcher: MicroBatcher, backend: Recording) -> None:
    """Warm up (the pace is measured), then occupy the worker."""
    batcher.submit("warm", DOCUMENTS, tokens=100).result(5)
    backend.order.clear()
    batcher.submit("hold", DOCUMENTS[:1], tokens=1)
    deadline = time.monotonic() + 5
    while not backend.order:
        assert time.monotonic() < deadline
        time.sleep(0.001)


@contextlib.contextmanager
def serving(backend: Reranker, **options: Any) -> Iterator[MicroBatcher]:
    """A batcher on ``backend`` for the block; a held call is let go at the end, and
    the batcher closed."""
    batcher = MicroBatcher(backend, **options)
    try:
        yield batcher
    finally:
        release = getattr(backend, "release", None)
        if release is not None:
            release.set()
        batcher.close()
