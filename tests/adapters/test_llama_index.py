from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from pydantic import Field

from memos_rerank_integrations import BackendUnavailableError, InvalidInputError
from memos_rerank_integrations.llama_index import RerankPostprocessor, RerankQueryBundle

from ..support.backends import MEMOS_EXAMPLES, OverlapReranker, ScriptedReranker, SyncOnlyReranker

HOBBIES = MEMOS_EXAMPLES[1]["documents"]


def nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(text=text, id_=f"n{i}", metadata={"topic": "memory"}),
            score=0.5 - i / 10,
        )
        for i, text in enumerate(HOBBIES)
    ]


def query_engine(postprocessor: RerankPostprocessor) -> Any:
    index = VectorStoreIndex(
        [n.node for n in nodes()], embed_model=MockEmbedding(embed_dim=8), show_progress=False
    )
    return index.as_query_engine(
        llm=MockLLM(),
        similarity_top_k=5,
        node_postprocessors=[postprocessor],
        embed_model=MockEmbedding(embed_dim=8),
    )


def test_inside_a_query_engine() -> None:
    backend = OverlapReranker()
    engine = query_engine(RerankPostprocessor(reranker=backend, top_n=2))
    response = engine.query("playing badminton hobbies")
    top = response.source_nodes
    assert len(top) == 2
    assert top[0].node.get_content() == "User likes playing badminton."
    assert top[0].node.node_id == "n0"
    assert type(top[0].score) is float
    assert top[0].score >= top[1].score
    assert top[0].score == pytest.approx(2 / 3)
    assert top[0].node.metadata["rerank_stage"] == "relevant"
    assert "retrieval_score" in top[0].node.metadata
    # the scored text includes metadata, as LlamaIndex embeds it
    assert backend.calls[0][2][0].startswith("topic: memory")
    # our keys never leak into what the LLM or the embedder sees
    llm_text = top[0].node.get_content(metadata_mode=MetadataMode.LLM)
    assert "rerank_stage" not in llm_text and "retrieval_score" not in llm_text
    assert "rerank_stage" not in top[0].node.get_content(metadata_mode=MetadataMode.EMBED)


async def test_async_query_engine_awaits_arerank() -> None:
    backend = OverlapReranker()
    engine = query_engine(RerankPostprocessor(reranker=backend, top_n=1))
    response = await engine.aquery("playing badminton")
    assert response.source_nodes[0].node.node_id == "n0"
    assert [call[0] for call in backend.calls] == ["arerank"]


async def test_async_with_sync_only_backend() -> None:
    post = RerankPostprocessor(reranker=SyncOnlyReranker(), top_n=1)
    out = await post.apostprocess_nodes(nodes(), query_str="playing badminton")
    assert out[0].node.node_id == "n0"


def test_copies_keep_ids_and_never_mutate_inputs() -> None:
    given = nodes()
    given[1].node.excluded_llm_metadata_keys = ["topic"]
    before = copy.deepcopy(given)
    post = RerankPostprocessor(reranker=ScriptedReranker([0.1, 0.9, 0.5, 0.3, 0.7]))
    out = post.postprocess_nodes(given, query_str="q")
    assert [n.node.node_id for n in out] == ["n1", "n4", "n2", "n3", "n0"]
    assert [n.score for n in out] == [0.9, 0.7, 0.5, 0.3, 0.1]
    assert out[0].node.metadata == {
        "topic": "memory",
        "retrieval_score": pytest.approx(0.4),
        "rerank_stage": "highly_relevant",
    }
    assert out[0].node.excluded_llm_metadata_keys[0] == "topic"
    for key in ("retrieval_score", "rerank_stage"):
        assert key in out[0].node.excluded_llm_metadata_keys
        assert key in out[0].node.excluded_embed_metadata_keys
    for original, saved in zip(given, before, strict=True):
        assert original.score == saved.score
        assert original.node.metadata == saved.node.metadata
        assert original.node.excluded_llm_metadata_keys == saved.node.excluded_llm_metadata_keys
        assert original.node.excluded_embed_metadata_keys == saved.node.excluded_embed_metadata_keys
    assert all(o.node is not g.node for o in out for g in given)


def test_thresholds_before_top_n_and_metadata_mode() -> None:
    post = RerankPostprocessor(
        reranker=ScriptedReranker([0.1, 0.9, 0.5, 0.3, 0.7]), top_n=3, min_stage="relevant"
    )
    out = post.postprocess_nodes(nodes(), query_str="q")
    assert [n.node.node_id for n in out] == ["n1", "n4"]
    backend = OverlapReranker()
    post = RerankPostprocessor(reranker=backend, metadata_mode=MetadataMode.NONE)
    post.postprocess_nodes(nodes(), query_str="q")
    assert backend.calls[0][2] == HOBBIES


def test_fallback_keeps_order_and_scores() -> None:
    given = nodes()
    post = RerankPostprocessor(
        reranker=ScriptedReranker(error=BackendUnavailableError("down")), top_n=3
    )
    out = post.postprocess_nodes(given, query_str="q")
    assert [n.node.node_id for n in out] == ["n0", "n1", "n2"]
    assert [n.score for n in out] == [n.score for n in given[:3]]
    assert all(n.node.metadata["rerank_fallback"] is True for n in out)
    assert "rerank_fallback" not in given[0].node.metadata
    assert "rerank_fallback" in out[0].node.excluded_llm_metadata_keys
    with pytest.raises(BackendUnavailableError):
        RerankPostprocessor(
            reranker=ScriptedReranker(error=BackendUnavailableError("down")), fallback=False
        ).postprocess_nodes(given, query_str="q")


def test_missing_query_and_empty_input() -> None:
    backend = ScriptedReranker(error=AssertionError("must not be called"))
    post = RerankPostprocessor(reranker=backend)
    assert post.postprocess_nodes([], query_str="q") == []
    assert backend.calls == 0
    with pytest.raises(InvalidInputError, match="query"):
        post.postprocess_nodes(nodes())
    with pytest.raises(InvalidInputError, match="NodeWithScore"):
        post.postprocess_nodes(["text"], query_str="q")  # type: ignore[list-item]


class _Recorder(BaseEventHandler):
    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


def test_emits_instrumentation_and_callback_events() -> None:
    recorder = _Recorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    debug = LlamaDebugHandler()
    try:
        post = RerankPostprocessor(
            reranker=OverlapReranker(), top_n=2, callback_manager=CallbackManager([debug])
        )
        out = post.postprocess_nodes(nodes(), query_bundle=QueryBundle("playing badminton"))
    finally:
        root.event_handlers.remove(recorder)
    starts = [e for e in recorder.events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in recorder.events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == 1 and len(ends) == 1
    assert starts[0].top_n == 2 and starts[0].model_name == "overlap-test"
    assert len(starts[0].nodes) == 5
    assert [n.node.node_id for n in ends[0].nodes] == [n.node.node_id for n in out]
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    start, end = pairs[0]
    assert start.payload is not None and start.payload[EventPayload.TOP_K] == 2
    assert start.payload[EventPayload.QUERY_STR] == "playing badminton"
    assert end.payload is not None and end.payload[EventPayload.NODES] == out


def test_class_name_and_global_settings_untouched() -> None:
    assert RerankPostprocessor.class_name() == "RerankPostprocessor"
    assert Settings.callback_manager is not None


# -- tracing: the span, the events' facts ----------------------------------------------


class _Spans(SimpleSpanHandler):
    @classmethod
    def class_name(cls) -> str:
        return "Spans"


@contextmanager
def instrumented() -> Iterator[tuple[_Recorder, _Spans]]:
    recorder, spans = _Recorder(), _Spans()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    root.add_span_handler(spans)
    try:
        yield recorder, spans
    finally:
        root.event_handlers.remove(recorder)
        root.span_handlers.remove(spans)


def _rerank_events(recorder: _Recorder) -> tuple[ReRankStartEvent, ReRankEndEvent]:
    (start,) = [e for e in recorder.events if isinstance(e, ReRankStartEvent)]
    (end,) = [e for e in recorder.events if isinstance(e, ReRankEndEvent)]
    return start, end


@pytest.mark.parametrize("use_async", [False, True])
async def test_span_and_end_event_carry_the_facts(use_async: bool) -> None:
    engine = query_engine(RerankPostprocessor(reranker=OverlapReranker(), top_n=2))
    with instrumented() as (recorder, spans):
        if use_async:
            response = await engine.aquery("playing badminton hobbies")
        else:
            response = engine.query("playing badminton hobbies")
    start, end = _rerank_events(recorder)
    assert end.tags["rerank_backend"] == "overlap-test"
    assert end.tags["rerank_documents"] == 5 and end.tags["rerank_kept"] == 2
    assert end.tags["rerank_top_n"] == 2
    assert end.tags["rerank_fallback"] is False and end.tags["rerank_skipped"] is False
    assert end.tags["rerank_error"] is None
    assert end.tags["rerank_duration_ms"] > 0.0
    assert [n.node.node_id for n in end.nodes] == [n.node.node_id for n in response.source_nodes]
    method = "_apostprocess_nodes" if use_async else "_postprocess_nodes"
    (span,) = [
        s for s in spans.completed_spans if s.id_.startswith(f"RerankPostprocessor.{method}")
    ]
    assert start.span_id == end.span_id == span.id_
    assert span.parent_id is not None  # nested in the query engine's span
    assert span.duration is not None and span.duration >= 0


def test_fallback_facts_in_events_and_callback_payload() -> None:
    debug = LlamaDebugHandler()
    post = RerankPostprocessor(
        reranker=ScriptedReranker(error=BackendUnavailableError("down")),
        callback_manager=CallbackManager([debug]),
    )
    with instrumented() as (recorder, _):
        out = post.postprocess_nodes(nodes(), query_str="q")
    _, end = _rerank_events(recorder)
    assert end.tags["rerank_fallback"] is True
    assert end.tags["rerank_error"] == "BackendUnavailableError: down"
    ((_, cb_end),) = debug.get_event_pairs(CBEventType.RERANKING)
    assert cb_end.payload is not None and cb_end.payload["rerank_fallback"] is True
    assert cb_end.payload[EventPayload.NODES] == out


def test_error_drops_the_span() -> None:
    post = RerankPostprocessor(
        reranker=ScriptedReranker(error=BackendUnavailableError("down")), fallback=False
    )
    with instrumented() as (_, spans), pytest.raises(BackendUnavailableError):
        post.postprocess_nodes(nodes(), query_str="q")
    (dropped,) = [s for s in spans.dropped_spans if s.id_.startswith("RerankPostprocessor.")]
    assert "down" in dropped.metadata["error"]


# -- per-query control -----------------------------------------------------------------


def test_enabled_false_skips_without_a_backend_call() -> None:
    backend = ScriptedReranker(error=AssertionError("must not be called"))
    given = nodes()
    post = RerankPostprocessor(reranker=backend, top_n=3, enabled=False)
    with instrumented() as (recorder, _):
        out = post.postprocess_nodes(given, query_str="q")
    assert backend.calls == 0
    assert [n.node.node_id for n in out] == ["n0", "n1", "n2"]
    assert [n.score for n in out] == [n.score for n in given[:3]]
    assert all(n.node.metadata["rerank_skipped"] is True for n in out)
    assert all("rerank_stage" not in n.node.metadata for n in out)
    assert "rerank_skipped" in out[0].node.excluded_llm_metadata_keys
    _, end = _rerank_events(recorder)
    assert end.tags["rerank_skipped"] is True and end.tags["rerank_fallback"] is False


async def test_skip_if_decides_per_query() -> None:
    backend = OverlapReranker()
    post = RerankPostprocessor(reranker=backend, skip_if=lambda q: len(q.split()) <= 3)
    skipped = await post.apostprocess_nodes(nodes(), query_str="badminton")
    assert backend.calls == [] and all(n.node.metadata["rerank_skipped"] for n in skipped)
    reranked = await post.apostprocess_nodes(nodes(), query_str="which hobbies like badminton")
    assert [call[0] for call in backend.calls] == ["arerank"]
    assert reranked[0].node.node_id == "n0" and "rerank_stage" in reranked[0].node.metadata


def test_query_bundle_options_through_a_query_engine() -> None:
    backend = OverlapReranker()
    engine = query_engine(RerankPostprocessor(reranker=backend, top_n=3))
    one = engine.query(RerankQueryBundle("playing badminton hobbies", rerank_top_n=1))
    assert [n.node.node_id for n in one.source_nodes] == ["n0"]
    skipped = engine.query(RerankQueryBundle("playing badminton hobbies", rerank=False))
    assert len(backend.calls) == 1
    assert len(skipped.source_nodes) == 3
    assert all(n.node.metadata["rerank_skipped"] for n in skipped.source_nodes)
    assert len(engine.query("playing badminton hobbies").source_nodes) == 3


async def test_query_bundle_forces_a_disabled_postprocessor() -> None:
    backend = OverlapReranker()
    post = RerankPostprocessor(reranker=backend, enabled=False, top_n=1)
    out = await post.apostprocess_nodes(
        nodes(), query_bundle=RerankQueryBundle("playing badminton", rerank=True)
    )
    assert [call[0] for call in backend.calls] == ["arerank"]
    assert out[0].node.node_id == "n0" and "rerank_stage" in out[0].node.metadata


@pytest.mark.parametrize(
    ("bundle", "message"),
    [
        (RerankQueryBundle("q", rerank="no"), "'rerank' must be True or False"),  # type: ignore[arg-type]
        (RerankQueryBundle("q", rerank_top_n=0), "'rerank_top_n' must be a positive int"),
        (RerankQueryBundle("q", rerank_top_n="2"), "'rerank_top_n'"),  # type: ignore[arg-type]
    ],
)
def test_bad_query_bundle_options_are_caller_errors(bundle: QueryBundle, message: str) -> None:
    backend = OverlapReranker()
    with pytest.raises(InvalidInputError, match=message):
        RerankPostprocessor(reranker=backend).postprocess_nodes(nodes(), query_bundle=bundle)
    assert backend.calls == []


def test_query_bundle_round_trips_as_json() -> None:
    bundle = RerankQueryBundle("q", rerank=False, rerank_top_n=2)
    assert isinstance(bundle, QueryBundle) and str(bundle) == "q"
    assert RerankQueryBundle.from_json(bundle.to_json()) == bundle
