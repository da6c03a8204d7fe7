"""RerankCompressor in LangChain's tracing (callback handlers, astream_events, run
trees) and its per-call control (enabled, skip_if, config["configurable"]), through a
real ContextualCompressionRetriever over a real vector store."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_classic.retrievers.document_compressors import DocumentCompressorPipeline
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.context import collect_runs
from langchain_core.vectorstores import InMemoryVectorStore

from memos_rerank_integrations import BackendUnavailableError, InvalidInputError
from memos_rerank_integrations.langchain import RerankCompressor, RerankRetriever

from ..support.backends import MEMOS_EXAMPLES, OverlapReranker, ScriptedReranker

HOBBIES = MEMOS_EXAMPLES[1]["documents"]
QUERY = "User likes playing which hobbies like badminton?"


def store_retriever() -> Any:
    store = InMemoryVectorStore(embedding=DeterministicFakeEmbedding(size=32))
    store.add_documents([Document(page_content=text, id=f"m{i}") for i, text in enumerate(HOBBIES)])
    return store.as_retriever(search_kwargs={"k": 5})


def compression(compressor: RerankCompressor) -> ContextualCompressionRetriever:
    return ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=store_retriever()
    )


class Recorder(BaseCallbackHandler):
    """Records the runs a real callback manager reports: starts, ends and errors."""

    def __init__(self) -> None:
        self.starts: dict[UUID, dict[str, Any]] = {}
        self.ends: dict[UUID, Any] = {}
        self.errors: dict[UUID, BaseException] = {}

    def on_retriever_start(self, serialized: Any, query: str, **kwargs: Any) -> None:
        self.starts[kwargs["run_id"]] = {"type": "retriever", "input": query, **kwargs}

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        self.starts[kwargs["run_id"]] = {"type": "chain", "input": inputs, **kwargs}

    def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
        self.ends[kwargs["run_id"]] = outputs

    def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors[kwargs["run_id"]] = error

    def named(self, name: str) -> list[UUID]:
        return [run_id for run_id, start in self.starts.items() if start.get("name") == name]


class AsyncRecorder(AsyncCallbackHandler, Recorder):
    async def on_retriever_start(self, serialized: Any, query: str, **kwargs: Any) -> None:
        Recorder.on_retriever_start(self, serialized, query, **kwargs)

    async def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        Recorder.on_chain_start(self, serialized, inputs, **kwargs)

    async def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
        Recorder.on_chain_end(self, outputs, **kwargs)

    async def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
        Recorder.on_chain_error(self, error, **kwargs)


def check_rerank_run(recorder: Recorder, docs: list[Document]) -> dict[str, Any]:
    """One RerankCompressor run, a child of the ContextualCompressionRetriever's run,
    with the call's inputs and outputs; returns its outputs."""
    (parent,) = recorder.named("ContextualCompressionRetriever")
    (rerank,) = recorder.named("RerankCompressor")
    start = recorder.starts[rerank]
    assert start["type"] == "chain"
    assert start["parent_run_id"] == parent
    assert start["input"] == {"query": QUERY, "document_count": 5, "backend": "overlap-test"}
    outputs = recorder.ends[rerank]
    assert outputs["documents"] == docs
    assert outputs["kept"] == 2 and outputs["top_n"] == 2
    assert outputs["fallback"] is False and outputs["skipped"] is False
    assert outputs["error"] is None
    assert outputs["duration_ms"] > 0.0
    return outputs


def test_rerank_is_a_child_run_in_a_callback_handler() -> None:
    recorder = Recorder()
    retriever = compression(RerankCompressor(reranker=OverlapReranker(), top_n=2))
    docs = retriever.invoke(QUERY, config={"callbacks": [recorder]})
    assert docs[0].page_content == "User likes playing badminton."
    check_rerank_run(recorder, docs)


async def test_async_rerank_is_a_child_run_in_an_async_handler() -> None:
    recorder = AsyncRecorder()
    backend = OverlapReranker()
    retriever = compression(RerankCompressor(reranker=backend, top_n=2))
    docs = await retriever.ainvoke(QUERY, config={"callbacks": [recorder]})
    check_rerank_run(recorder, docs)
    assert [call[0] for call in backend.calls] == ["arerank"]


async def test_rerank_run_in_astream_events() -> None:
    retriever = compression(RerankCompressor(reranker=OverlapReranker(), top_n=2))
    events = [event async for event in retriever.astream_events(QUERY, version="v2")]
    (root,) = [e for e in events if e["event"] == "on_retriever_start" and not e["parent_ids"]]
    starts = [e for e in events if e["event"] == "on_chain_start"]
    ends = [e for e in events if e["event"] == "on_chain_end"]
    assert [e["name"] for e in starts] == ["RerankCompressor"]
    assert [e["name"] for e in ends] == ["RerankCompressor"]
    assert starts[0]["run_id"] == ends[0]["run_id"]
    assert starts[0]["parent_ids"] == [root["run_id"]]
    assert starts[0]["data"]["input"] == {
        "query": QUERY,
        "document_count": 5,
        "backend": "overlap-test",
    }
    output = ends[0]["data"]["output"]
    final = [e for e in events if e["event"] == "on_retriever_end" and not e["parent_ids"]]
    assert output["documents"] == final[0]["data"]["output"]
    assert output["kept"] == 2 and output["fallback"] is False and output["skipped"] is False
    assert output["duration_ms"] > 0.0


def test_run_tree_as_langsmith_records_it() -> None:
    retriever = compression(RerankCompressor(reranker=OverlapReranker(), top_n=2))
    with collect_runs() as collector:
        docs = retriever.invoke(QUERY)
    (root,) = collector.traced_runs
    assert root.name == "ContextualCompressionRetriever"
    children = {child.name: child for child in root.child_runs}
    assert set(children) == {"VectorStoreRetriever", "RerankCompressor"}
    rerank = children["RerankCompressor"]
    assert rerank.run_type == "chain" and rerank.error is None
    assert rerank.inputs["backend"] == "overlap-test"
    assert rerank.outputs is not None and rerank.outputs["documents"] == docs
    assert rerank.end_time is not None and rerank.end_time >= rerank.start_time


def test_fallback_shows_in_the_run() -> None:
    recorder = Recorder()
    failing = ScriptedReranker(error=BackendUnavailableError("down", status_code=503))
    retriever = compression(RerankCompressor(reranker=failing, top_n=2))
    docs = retriever.invoke(QUERY, config={"callbacks": [recorder]})
    (rerank,) = recorder.named("RerankCompressor")
    outputs = recorder.ends[rerank]
    assert outputs["fallback"] is True and outputs["skipped"] is False
    assert outputs["error"] == "BackendUnavailableError: down (status=503)"
    assert outputs["documents"] == docs and all(d.metadata["rerank_fallback"] for d in docs)
    assert rerank not in recorder.errors


def test_secret_in_a_foreign_error_stays_out_of_the_run() -> None:
    recorder = Recorder()
    leaky = ScriptedReranker(error=RuntimeError("Authorization: Bearer sk-secret-123"))
    compression(RerankCompressor(reranker=leaky)).invoke(QUERY, config={"callbacks": [recorder]})
    (rerank,) = recorder.named("RerankCompressor")
    assert recorder.ends[rerank]["error"] == "RuntimeError"
    assert "sk-secret" not in repr(recorder.ends[rerank])


@pytest.mark.parametrize("use_async", [False, True])
async def test_errors_end_the_run(use_async: bool) -> None:
    recorder = AsyncRecorder() if use_async else Recorder()
    failing = ScriptedReranker(error=BackendUnavailableError("down"))
    retriever = compression(RerankCompressor(reranker=failing, fallback=False))
    config: Any = {"callbacks": [recorder]}
    with pytest.raises(BackendUnavailableError):
        if use_async:
            await retriever.ainvoke(QUERY, config=config)
        else:
            retriever.invoke(QUERY, config=config)
    (rerank,) = recorder.named("RerankCompressor")
    assert isinstance(recorder.errors[rerank], BackendUnavailableError)
    assert rerank not in recorder.ends


def test_direct_call_nests_under_the_runnable_that_makes_it() -> None:
    compressor = RerankCompressor(reranker=OverlapReranker(), top_n=1)
    step = RunnableLambda(lambda docs: compressor.compress_documents(docs, QUERY), name="step")
    recorder = Recorder()
    step.invoke(store_retriever().invoke(QUERY), config={"callbacks": [recorder]})
    (outer,) = recorder.named("step")
    (rerank,) = recorder.named("RerankCompressor")
    assert recorder.starts[rerank]["parent_run_id"] == outer


# -- per-call control ------------------------------------------------------------------


def ids(docs: Any) -> list[str]:
    return [doc.id for doc in docs]


def test_enabled_false_skips_without_a_backend_call() -> None:
    backend = ScriptedReranker(error=AssertionError("must not be called"))
    recorder = Recorder()
    retriever = compression(RerankCompressor(reranker=backend, top_n=3, enabled=False))
    vector_order = ids(store_retriever().invoke(QUERY))
    docs = retriever.invoke(QUERY, config={"callbacks": [recorder]})
    assert backend.calls == 0
    assert ids(docs) == vector_order[:3]
    assert all(d.metadata == {"rerank_skipped": True} for d in docs)
    (rerank,) = recorder.named("RerankCompressor")
    assert recorder.ends[rerank]["skipped"] is True
    assert recorder.ends[rerank]["fallback"] is False


async def test_skip_if_decides_per_query() -> None:
    backend = OverlapReranker()
    seen: list[str] = []

    def short(query: str) -> bool:
        seen.append(query)
        return len(query.split()) <= 3

    compressor = RerankCompressor(reranker=backend, top_n=2, skip_if=short)
    skipped = await compression(compressor).ainvoke("badminton")
    assert backend.calls == [] and all(d.metadata["rerank_skipped"] for d in skipped)
    reranked = await compression(compressor).ainvoke(QUERY)
    assert [call[0] for call in backend.calls] == ["arerank"]
    assert "relevance_score" in reranked[0].metadata
    assert seen == ["badminton", QUERY]


def test_rerank_retriever_reads_configurable() -> None:
    backend = OverlapReranker()
    retriever = RerankRetriever(
        base_retriever=store_retriever(), compressor=RerankCompressor(reranker=backend, top_n=2)
    )
    assert isinstance(retriever, ContextualCompressionRetriever)
    skipped = retriever.invoke(QUERY, config={"configurable": {"rerank": False}})
    assert backend.calls == []
    assert ids(skipped) == ids(store_retriever().invoke(QUERY))[:2]
    assert all(d.metadata["rerank_skipped"] for d in skipped)
    one = retriever.invoke(QUERY, config={"configurable": {"rerank_top_n": 1}})
    assert ids(one) == ["m0"] and len(backend.calls) == 1
    assert len(retriever.invoke(QUERY)) == 2  # the override was for that call only
    retriever.invoke(QUERY, config={"configurable": {"rerank_top_n": 1}})
    direct = retriever.base_compressor.compress_documents(store_retriever().invoke(QUERY), QUERY)
    assert len(direct) == 2  # nothing of that call's config is left behind


def test_a_misspelled_configurable_rerank_key_is_refused_naming_the_right_one() -> None:
    """``configurable`` is shared by every component of a chain, so keys of others
    pass; a ``rerank_`` key that is not one of ours is a misspelling, not ignored."""
    backend = OverlapReranker()
    retriever = RerankRetriever(
        base_retriever=store_retriever(), compressor=RerankCompressor(reranker=backend, top_n=2)
    )
    with pytest.raises(InvalidInputError, match="Did you mean 'rerank_top_n'"):
        retriever.invoke(QUERY, config={"configurable": {"rerank_topn": 1}})
    with pytest.raises(InvalidInputError, match="Did you mean 'rerank_budget_ms'"):
        retriever.invoke(QUERY, config={"configurable": {"rerank_budget": 50}})
    assert backend.calls == []
    others = {"thread_id": "t1", "user_id": "u", "rerank_top_n": 1}
    assert ids(retriever.invoke(QUERY, config={"configurable": others})) == ["m0"]


async def test_rerank_retriever_async_and_forced_rerank() -> None:
    backend = OverlapReranker()
    compressor = RerankCompressor(reranker=backend, top_n=2, enabled=False)
    retriever = compressor.as_retriever(store_retriever())
    assert isinstance(retriever, RerankRetriever)
    assert retriever.base_compressor is compressor
    docs = await retriever.ainvoke(QUERY, config={"configurable": {"rerank": True}})
    assert [call[0] for call in backend.calls] == ["arerank"]
    assert ids(docs) == ["m0", "m2"]
    docs = await retriever.ainvoke(QUERY, config={"configurable": {"rerank_top_n": 4}})
    assert len(docs) == 4 and len(backend.calls) == 1  # still disabled: skipped, cut to 4


def test_rerank_retriever_reaches_a_compressor_in_a_pipeline() -> None:
    backend = OverlapReranker()
    pipeline = DocumentCompressorPipeline(transformers=[RerankCompressor(reranker=backend)])
    retriever = RerankRetriever(base_retriever=store_retriever(), base_compressor=pipeline)
    docs = retriever.invoke(QUERY, config={"configurable": {"rerank_top_n": 1}})
    assert ids(docs) == ["m0"]


@pytest.mark.parametrize("use_async", [False, True])
async def test_configurable_reaches_a_stock_retriever_in_an_lcel_chain(use_async: bool) -> None:
    backend = OverlapReranker()
    chain = compression(RerankCompressor(reranker=backend, top_n=3)) | RunnableLambda(ids)
    top_one: Any = {"configurable": {"rerank_top_n": 1}}
    skip: Any = {"configurable": {"rerank": False}}
    if use_async:
        assert await chain.ainvoke(QUERY, config=top_one) == ["m0"]
        skipped = await chain.ainvoke(QUERY, config=skip)
    else:
        assert chain.invoke(QUERY, config=top_one) == ["m0"]
        skipped = chain.invoke(QUERY, config=skip)
    assert len(backend.calls) == 1
    assert skipped == ids(store_retriever().invoke(QUERY))[:3]


@pytest.mark.parametrize(
    ("configurable", "message"),
    [
        ({"rerank": "no"}, "'rerank' must be True or False"),
        ({"rerank_top_n": 0}, "'rerank_top_n' must be a positive int"),
        ({"rerank_top_n": True}, "'rerank_top_n' must be a positive int"),
        ({"rerank_top_n": "3"}, "'rerank_top_n' must be a positive int"),
    ],
)
def test_bad_configurable_is_a_caller_error(configurable: dict[str, Any], message: str) -> None:
    backend = OverlapReranker()
    recorder = Recorder()
    retriever = RerankRetriever(
        base_retriever=store_retriever(), compressor=RerankCompressor(reranker=backend)
    )
    config: Any = {"configurable": configurable, "callbacks": [recorder]}
    with pytest.raises(InvalidInputError, match=message):
        retriever.invoke(QUERY, config=config)
    assert backend.calls == []
    (rerank,) = recorder.named("RerankCompressor")
    assert isinstance(recorder.errors[rerank], InvalidInputError)
