"""Latency budgets (``budget_ms``): anytime answers, cooperative stops, shared budgets.

What is checked here is what a budget promises whatever the machine's speed: every
document comes back once (the scored ones reranked, the rest after them in their
order, flagged), the engine stops between layers and is idle when the call returns,
a budget bounds a stalled backend, and a fallback chain shares one budget. How many
documents a budget of a given size scores on the benchmark's model is measured by
``benchmarks/bench_budget.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, TextNode

from memos_rerank_integrations import (
    FallbackReranker,
    HTTPReranker,
    InvalidInputError,
    QwenReranker,
    compare,
)
from memos_rerank_integrations._calls import Budget
from memos_rerank_integrations._types import rank_scores
from memos_rerank_integrations.langchain import RerankCompressor
from memos_rerank_integrations.llama_index import RerankPostprocessor, RerankQueryBundle

from .support import qwen_fixtures
from .support.backends import FirstK
from .support.loopback import LoopbackServer, Reply

tiny_qwen_dir = qwen_fixtures.tiny_qwen_dir

DOCS = [f"memory number {i} about badminton and tea" for i in range(10)]


class Stuck:
    """A duck-typed backend without budget support that takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        time.sleep(self.seconds)
        return rank_scores([1.0] * len(documents))

    async def arerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        await asyncio.sleep(self.seconds)
        return rank_scores([1.0] * len(documents))


class ExpiresAfter(Budget):
    """A budget that runs out at its ``checks``-th look (deterministic stops)."""

    def __init__(self, checks: int) -> None:
        super().__init__(60_000)
        self.left = checks

    def expired(self) -> bool:
        self.left -= 1
        return self.left < 0


def documents() -> list[Document]:
    return [Document(page_content=text, metadata={"i": i}) for i, text in enumerate(DOCS)]


# -- the anytime answer, through every adapter ------------------------------------------


def test_langchain_partial_answer_keeps_every_document_once_and_flags_them() -> None:
    compressor = RerankCompressor(reranker=FirstK(4), budget_ms=500)
    out = list(compressor.compress_documents(documents(), "q"))
    # The four scored ones, best first (here: the later ones), then the rest in order.
    assert [d.metadata["i"] for d in out] == [3, 2, 1, 0, 4, 5, 6, 7, 8, 9]
    assert all(d.metadata["rerank_partial"] is True for d in out)
    assert [d.metadata["rerank_scored"] for d in out] == [True] * 4 + [False] * 6
    assert all("relevance_score" in d.metadata for d in out[:4])
    assert not any("relevance_score" in d.metadata for d in out[4:])


def test_a_complete_answer_within_a_budget_is_flagged_not_partial() -> None:
    out = RerankCompressor(reranker=FirstK(99), budget_ms=500).compress_documents(documents(), "q")
    assert [d.metadata["i"] for d in out] == list(range(9, -1, -1))
    assert all(d.metadata["rerank_partial"] is False for d in out)
    assert all(d.metadata["rerank_scored"] is True for d in out)


def test_without_a_budget_nothing_changes() -> None:
    backend = FirstK(2)
    out = RerankCompressor(reranker=backend).compress_documents(documents(), "q")
    assert not backend.budgets and len(out) == len(DOCS)
    assert all("rerank_partial" not in d.metadata for d in out)


def test_top_n_counts_scored_and_unscored_and_filters_only_scored() -> None:
    compressor = RerankCompressor(reranker=FirstK(4), budget_ms=500, top_n=6, min_score=0.15)
    out = compressor.compress_documents(documents(), "q")
    # Scored 0.3, 0.2 pass min_score (0.1 and 0.0 do not), then unscored 4, 5, 6, 7.
    assert [d.metadata["i"] for d in out] == [3, 2, 4, 5, 6, 7]


def test_per_call_budget_through_langchain_configurable() -> None:
    from langchain_core.runnables import RunnableLambda

    backend = FirstK(3)
    compressor = RerankCompressor(reranker=backend)
    chain = RunnableLambda(lambda query: compressor.compress_documents(documents(), query))
    result = chain.invoke("q", config={"configurable": {"rerank_budget_ms": 250}})
    assert len(backend.budgets) == 1 and backend.budgets[0].milliseconds == 250
    assert [d.metadata["rerank_scored"] for d in result].count(True) == 3


def test_llama_index_partial_answer_keeps_incoming_scores_for_unscored_nodes() -> None:
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=str(i)), score=1 - i / 10)
        for i, t in enumerate(DOCS)
    ]
    postprocessor = RerankPostprocessor(reranker=FirstK(2))
    out = postprocessor.postprocess_nodes(nodes, RerankQueryBundle("q", rerank_budget_ms=300))
    assert [n.node.node_id for n in out] == ["1", "0", *map(str, range(2, 10))]
    assert [n.node.metadata["rerank_scored"] for n in out] == [True, True] + [False] * 8
    assert out[2].score == pytest.approx(0.8)  # node 2 keeps its retrieval score
    assert "rerank_partial" in out[0].node.excluded_llm_metadata_keys


def test_mem0_partial_answer() -> None:
    from memos_rerank_integrations.mem0 import Mem0Reranker

    reranker = Mem0Reranker(reranker=FirstK(2), budget_ms=200)
    hits = [{"memory": text, "score": 0.5} for text in DOCS]
    out = reranker.rerank("q", hits)
    assert [h["memory"] for h in out] == [DOCS[1], DOCS[0], *DOCS[2:]]
    assert "rerank_score" in out[0] and "rerank_score" not in out[2]
    assert out[2]["rerank_scored"] is False and out[2]["rerank_partial"] is True


def test_the_outcome_is_in_the_debug_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="memos_rerank_integrations")
    RerankCompressor(reranker=FirstK(3), budget_ms=400).compress_documents(documents(), "q")
    (record,) = [r for r in caplog.records if getattr(r, "rerank_budget_ms", None) is not None]
    assert record.rerank_budget_ms == 400
    assert record.rerank_partial is True and record.rerank_scored == 3
    assert "scored 3" in record.getMessage()


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, True, "100", 86_400_001])
def test_a_bad_budget_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="budget_ms"):  # a pydantic ValidationError
        RerankCompressor(reranker=FirstK(1), budget_ms=value)
    with pytest.raises(InvalidInputError, match="budget_ms"):
        compare("q", DOCS, [FirstK(1)], budget_ms=value)
    with pytest.raises(InvalidInputError, match="rerank_budget_ms"):
        RerankPostprocessor(reranker=FirstK(1)).postprocess_nodes(
            [NodeWithScore(node=TextNode(text="x"), score=1.0)],
            RerankQueryBundle("q", rerank_budget_ms=value),  # type: ignore[arg-type]
        )


# -- backends without budget support -------------------------------------------------------


def test_a_backend_without_budget_support_is_waited_for_only_as_long_as_the_budget() -> None:
    compressor = RerankCompressor(reranker=Stuck(5.0), budget_ms=300)
    started = time.monotonic()
    out = compressor.compress_documents(documents(), "q")
    assert time.monotonic() - started < 2.0
    assert [d.metadata["i"] for d in out] == list(range(10))  # the retriever's order
    assert all(d.metadata["rerank_scored"] is False for d in out)


async def test_an_async_backend_without_budget_support_is_cancelled_at_the_budget() -> None:
    compressor = RerankCompressor(reranker=Stuck(5.0), budget_ms=300)
    started = time.monotonic()
    out = await compressor.acompress_documents(documents(), "q")
    assert time.monotonic() - started < 2.0
    assert all(d.metadata["rerank_partial"] for d in out)


# -- the local engine stops between layers ------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir: Path) -> QwenReranker:
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32")
    reranker.rerank("warm", ["up"])  # loaded, instruction prefix cached
    return reranker


def test_the_packed_engine_stops_between_layers(qwen: QwenReranker) -> None:
    engine = qwen._loaded().engine
    assert engine is not None
    layers = len(engine.layers)
    # One look before the first chunk, one per layer of its pass: the second chunk's
    # first layer is where the budget runs out.
    budget = ExpiresAfter(1 + layers + 1 + 1)
    qwen._history = None  # no speed measured: one document per chunk
    results = qwen.rerank_within("hobbies?", DOCS, budget=budget)
    assert [r.index for r in results] == [0]


def test_a_spent_budget_scores_nothing_and_leaves_the_model_idle(qwen: QwenReranker) -> None:
    before = threading.active_count()
    results = qwen.rerank_within("hobbies?", DOCS, budget=Budget(0.001))
    assert results == []
    scorer = qwen._loaded()
    assert scorer.lock.acquire(blocking=False)  # nothing runs on the model
    scorer.lock.release()
    assert threading.active_count() == before


def test_a_budget_that_lasts_scores_everything_as_rerank_does(qwen: QwenReranker) -> None:
    full = qwen.rerank("hobbies?", DOCS)
    within = qwen.rerank_within("hobbies?", DOCS, budget=Budget(60_000))
    assert [r.index for r in within] == [r.index for r in full]
    assert [r.score for r in within] == pytest.approx([r.score for r in full], abs=1e-5)


async def test_the_async_engine_stops_too(qwen: QwenReranker) -> None:
    results = await qwen.arerank_within("hobbies?", DOCS, budget=Budget(0.001))
    assert results == []


# -- remote backends and the fallback chain ----------------------------------------------


def test_a_budget_is_a_remote_backends_deadline(server: LoopbackServer) -> None:
    server.script(Reply(200, {"results": []}, delay=5.0))
    backend = HTTPReranker(server.url, timeout=10.0, max_retries=0)
    started = time.monotonic()
    assert backend.rerank_within("q", ["a", "b"], budget=Budget(300)) == []
    assert time.monotonic() - started < 2.0


def test_a_fallback_chain_shares_one_budget(server: LoopbackServer, qwen: QwenReranker) -> None:
    server.script(Reply(200, {"results": []}, delay=10.0))  # a stalled remote backend
    chain = FallbackReranker([HTTPReranker(server.url, timeout=10.0, max_retries=0), qwen])
    compressor = RerankCompressor(reranker=chain, budget_ms=2_000)
    started = time.monotonic()
    out = compressor.compress_documents(documents(), "q")
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 1.5  # the budget, plus a layer and the thread hand-offs
    assert sorted(d.metadata["i"] for d in out) == list(range(10))
    # The remote backend had half the budget; the local model scored in the other half.
    assert any(d.metadata["rerank_scored"] for d in out)


def test_compare_takes_a_budget() -> None:
    comparison = compare("q", DOCS, {"first": FirstK(3)}, budget_ms=500)
    column = comparison["first"]
    assert column.partial and [row.index for row in column.ranking] == [2, 1, 0, *range(3, 10)]
    assert column.ranking[5].score is None
    assert comparison.to_dict()["columns"][1]["partial"] is True
