from __future__ import annotations

import copy
import logging

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from pydantic import ValidationError

from memos_rerank_integrations import (
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    RerankResult,
    Stage,
    StageThresholds,
)
from memos_rerank_integrations.langchain import RerankCompressor

from ..support.backends import (
    MEMOS_EXAMPLES,
    OverlapReranker,
    RawReranker,
    ScriptedReranker,
    SyncOnlyReranker,
)

HOBBIES = MEMOS_EXAMPLES[1]


def memory_docs() -> list[Document]:
    return [
        Document(page_content=text, id=f"m{i}", metadata={"source": "memory", "n": i})
        for i, text in enumerate(HOBBIES["documents"])
    ]


def retriever(compressor: RerankCompressor) -> ContextualCompressionRetriever:
    store = InMemoryVectorStore(embedding=DeterministicFakeEmbedding(size=32))
    store.add_documents(memory_docs())
    return ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=store.as_retriever(search_kwargs={"k": 5})
    )


def test_inside_contextual_compression_retriever() -> None:
    backend = OverlapReranker()
    query = "User likes playing which hobbies like badminton?"
    docs = retriever(RerankCompressor(reranker=backend, top_n=2)).invoke(query)
    assert len(docs) == 2
    assert docs[0].page_content == "User likes playing badminton."
    assert docs[1].metadata["relevance_score"] == pytest.approx(1 / 7)
    assert docs[0].id == "m0"
    assert docs[0].metadata["source"] == "memory"
    assert docs[0].metadata["relevance_score"] == pytest.approx(4 / 7)
    assert docs[0].metadata["rerank_stage"] == "partial"
    assert backend.calls[0][0] == "rerank" and len(backend.calls[0][2]) == 5


async def test_async_path_awaits_arerank() -> None:
    backend = OverlapReranker()
    docs = await retriever(RerankCompressor(reranker=backend, top_n=1)).ainvoke("playing badminton")
    assert [d.page_content for d in docs] == ["User likes playing badminton."]
    assert [call[0] for call in backend.calls] == ["arerank"]


async def test_async_path_runs_a_sync_only_backend() -> None:
    compressor = RerankCompressor(reranker=SyncOnlyReranker(), top_n=1)
    docs = await compressor.acompress_documents(memory_docs(), "playing badminton")
    assert docs[0].page_content == "User likes playing badminton."


def test_outputs_are_copies_and_inputs_are_untouched() -> None:
    docs = memory_docs()
    docs[0].metadata["relevance_score"] = "stale"
    before = copy.deepcopy(docs)
    out = RerankCompressor(reranker=OverlapReranker()).compress_documents(docs, "badminton")
    assert docs == before
    assert all(o is not d for o in out for d in docs)
    top = out[0]
    assert top.id == "m0"
    assert top.metadata["relevance_score"] == 1.0  # our key wins over stale metadata
    assert list(top.metadata)[-1] == "rerank_stage"
    assert type(top.metadata["relevance_score"]) is float


def test_thresholds_apply_before_top_n() -> None:
    scores = [0.1, 0.95, 0.5, 0.65, 0.85]
    compressor = RerankCompressor(reranker=ScriptedReranker(scores), top_n=3, min_stage="relevant")
    out = compressor.compress_documents(memory_docs(), "q")
    assert [d.id for d in out] == ["m1", "m4", "m3"]
    assert [d.metadata["rerank_stage"] for d in out] == [
        "highly_relevant",
        "highly_relevant",
        "relevant",
    ]
    compressor = RerankCompressor(reranker=ScriptedReranker(scores), top_n=3, min_score=0.9)
    assert [d.id for d in compressor.compress_documents(memory_docs(), "q")] == ["m1"]
    custom = StageThresholds(0.05, 0.3, 0.9, 0.99)
    compressor = RerankCompressor(
        reranker=ScriptedReranker(scores), thresholds=custom, min_stage=Stage.RELEVANT
    )
    out = compressor.compress_documents(memory_docs(), "q")
    assert [(d.id, d.metadata["rerank_stage"]) for d in out] == [("m1", "relevant")]


def test_empty_input_returns_empty_without_calling_backend() -> None:
    backend = ScriptedReranker(error=AssertionError("must not be called"))
    assert RerankCompressor(reranker=backend).compress_documents([], "q") == []
    assert backend.calls == 0


@pytest.mark.parametrize(
    "error", [BackendUnavailableError("down", status_code=503), ConnectionError("boom")]
)
def test_fallback_returns_original_order_flagged(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    docs = memory_docs()
    compressor = RerankCompressor(reranker=ScriptedReranker(error=error), top_n=3)
    with caplog.at_level(logging.WARNING, logger="memos_rerank_integrations"):
        out = compressor.compress_documents(docs, "q")
    assert [d.id for d in out] == ["m0", "m1", "m2"]
    assert all(d.metadata["rerank_fallback"] is True for d in out)
    assert all("relevance_score" not in d.metadata for d in out)
    assert all("rerank_fallback" not in d.metadata for d in docs)
    assert type(error).__name__ in caplog.text


async def test_async_fallback_and_no_fallback() -> None:
    docs = memory_docs()
    failing = ScriptedReranker(error=BackendUnavailableError("down"))
    out = await RerankCompressor(reranker=failing).acompress_documents(docs, "q")
    assert [d.id for d in out] == [d.id for d in docs]
    with pytest.raises(BackendUnavailableError):
        await RerankCompressor(reranker=failing, fallback=False).acompress_documents(docs, "q")


def test_no_fallback_propagates() -> None:
    compressor = RerankCompressor(
        reranker=ScriptedReranker(error=BackendUnavailableError("down")), fallback=False
    )
    with pytest.raises(BackendUnavailableError):
        compressor.compress_documents(memory_docs(), "q")


@pytest.mark.parametrize(
    "raw",
    [
        [RerankResult(0, 0.5, Stage.PARTIAL)],  # missing documents
        [RerankResult(i % 2, 0.5, Stage.PARTIAL) for i in range(5)],  # duplicates
        [RerankResult(i + 1, 0.5, Stage.PARTIAL) for i in range(5)],  # out of range
        [RerankResult(i, float("nan"), Stage.PARTIAL) for i in range(5)],
        "not a list",
    ],
)
def test_malformed_backend_answers_fall_back_or_raise(raw: object) -> None:
    out = RerankCompressor(reranker=RawReranker(raw)).compress_documents(memory_docs(), "q")
    assert [d.id for d in out] == ["m0", "m1", "m2", "m3", "m4"]
    with pytest.raises(MalformedResponseError):
        RerankCompressor(reranker=RawReranker(raw), fallback=False).compress_documents(
            memory_docs(), "q"
        )


def test_bad_caller_input_is_an_error_even_with_fallback() -> None:
    bad = Document.model_construct(page_content=b"bytes", metadata={})
    compressor = RerankCompressor(reranker=OverlapReranker())
    with pytest.raises(InvalidInputError, match="page_content"):
        compressor.compress_documents([bad], "q")
    with pytest.raises(InvalidInputError, match="query"):
        compressor.compress_documents(memory_docs(), None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_n", 0, "top_n"),
        ("min_stage", "very relevant", "highly_relevant"),
        ("min_score", float("nan"), "finite"),
        ("reranker", object(), "rerank"),
    ],
)
def test_invalid_options_are_rejected(field: str, value: object, message: str) -> None:
    options: dict[str, object] = {"reranker": OverlapReranker(), field: value}
    with pytest.raises(ValidationError, match=message):
        RerankCompressor(**options)
