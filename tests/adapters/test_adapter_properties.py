"""Property tests: for any documents, options and backend outcome, both adapters
lose and duplicate nothing beyond what the options ask, order by score, and
leave their inputs unchanged."""

from __future__ import annotations

import copy
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.documents import Document
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from memos_rerank_integrations import DEFAULT_THRESHOLDS, BackendUnavailableError, StageThresholds
from memos_rerank_integrations.langchain import RerankCompressor
from memos_rerank_integrations.llama_index import RerankPostprocessor

from ..support.backends import ScriptedReranker

cut_points = st.lists(
    st.floats(min_value=0.0, max_value=1.0), min_size=4, max_size=4, unique=True
).map(lambda cuts: StageThresholds.from_cuts(sorted(cuts)))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    texts = draw(st.lists(st.text(max_size=12), max_size=12))
    fails = draw(st.booleans())
    scores = draw(
        st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=len(texts), max_size=len(texts))
    )
    return {
        "texts": texts,
        "scores": scores,
        "fails": fails,
        "top_n": draw(st.none() | st.integers(min_value=1, max_value=15)),
        "min_score": draw(st.none() | st.floats(min_value=0.0, max_value=1.0)),
        "min_stage": draw(st.none() | st.sampled_from(["weak", "partial", "relevant", 4])),
        "thresholds": draw(st.none() | cut_points),
    }


def _thresholds(case: dict[str, object]) -> StageThresholds:
    """The adapter's cut points, else (the scripted backend has none) the defaults."""
    given = case["thresholds"]
    return DEFAULT_THRESHOLDS if given is None else given  # type: ignore[return-value]


def _backend(case: dict[str, object]) -> ScriptedReranker:
    if case["fails"]:
        return ScriptedReranker(error=BackendUnavailableError("down"))
    return ScriptedReranker(case["scores"])  # type: ignore[arg-type]


def _expected_indices(case: dict[str, object]) -> list[int]:
    texts: list[str] = case["texts"]  # type: ignore[assignment]
    top_n = case["top_n"] if case["top_n"] is not None else len(texts)
    if case["fails"]:
        return list(range(len(texts)))[:top_n]  # type: ignore[misc]
    thresholds = _thresholds(case)
    floor = -math.inf
    if case["min_score"] is not None:
        floor = case["min_score"]  # type: ignore[assignment]
    if case["min_stage"] is not None:
        floor = max(floor, thresholds.min_score(case["min_stage"]))  # type: ignore[arg-type]
    scores: list[float] = case["scores"]  # type: ignore[assignment]
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    return [i for i in order if scores[i] >= floor][:top_n]  # type: ignore[misc]


def _options(case: dict[str, object]) -> dict[str, object]:
    return {k: case[k] for k in ("top_n", "min_score", "min_stage", "thresholds")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scenarios())
def test_langchain_compressor_properties(case: dict[str, object]) -> None:
    texts: list[str] = case["texts"]  # type: ignore[assignment]
    docs = [Document(page_content=t, id=str(i), metadata={"i": i}) for i, t in enumerate(texts)]
    before = copy.deepcopy(docs)
    compressor = RerankCompressor(reranker=_backend(case), **_options(case))  # type: ignore[arg-type]
    out = compressor.compress_documents(docs, "query")
    assert docs == before
    assert [int(d.id) for d in out] == _expected_indices(case)  # type: ignore[arg-type]
    for doc in out:
        original = docs[int(doc.id)]  # type: ignore[arg-type]
        assert doc.page_content == original.page_content
        assert doc.metadata["i"] == original.metadata["i"]
        if case["fails"]:
            assert doc.metadata["rerank_fallback"] is True
        else:
            score = doc.metadata["relevance_score"]
            assert score == case["scores"][int(doc.id)]  # type: ignore[index, arg-type]
            thresholds = _thresholds(case)
            assert doc.metadata["rerank_stage"] == thresholds.stage(score).label
    scores = [d.metadata.get("relevance_score", 0.0) for d in out]
    assert scores == sorted(scores, reverse=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scenarios())
def test_llama_index_postprocessor_properties(case: dict[str, object]) -> None:
    texts: list[str] = case["texts"]  # type: ignore[assignment]
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=str(i)), score=float(i))
        for i, t in enumerate(texts)
    ]
    before = copy.deepcopy(nodes)
    post = RerankPostprocessor(
        reranker=_backend(case),
        metadata_mode=MetadataMode.NONE,
        **_options(case),  # type: ignore[arg-type]
    )
    out = post.postprocess_nodes(nodes, query_str="query")
    assert [n.node.metadata for n in nodes] == [n.node.metadata for n in before]
    assert [n.score for n in nodes] == [n.score for n in before]
    assert [int(n.node.node_id) for n in out] == _expected_indices(case)
    for item in out:
        index = int(item.node.node_id)
        assert item.node.metadata["retrieval_score"] == float(index)
        expected = float(index) if case["fails"] else case["scores"][index]  # type: ignore[index]
        assert item.score == expected
