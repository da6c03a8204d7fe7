"""What both adapters promise alike: one DEBUG record per call with its facts in
``extra``, the backend's own stage cut points, strict ``top_n``, and outputs that
share no metadata with their inputs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from langchain_core.documents import Document
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from pydantic import ValidationError

from memos_rerank_integrations import (
    DEFAULT_THRESHOLDS,
    BackendUnavailableError,
    EmbeddingReranker,
    FallbackReranker,
    RerankResult,
    Stage,
    StageThresholds,
)
from memos_rerank_integrations._local.embedding import MINILM_THRESHOLDS
from memos_rerank_integrations._types import rank_scores
from memos_rerank_integrations.langchain import RerankCompressor
from memos_rerank_integrations.llama_index import RerankPostprocessor, RerankQueryBundle

from ..support.backends import OverlapReranker, ScriptedReranker

TEXTS = ["alpha", "beta", "gamma", "delta"]
SCORES = [0.1, 0.45, 0.3, 0.9]
ADAPTERS = ["langchain", "llama_index"]


def call(
    adapter: str, options: dict[str, Any], query: str = "q", **meta: Any
) -> list[dict[str, Any]]:
    """Run one adapter call over TEXTS; returns each output's id, score and metadata."""
    if adapter == "langchain":
        docs = [
            Document(page_content=t, id=str(i), metadata=dict(meta)) for i, t in enumerate(TEXTS)
        ]
        out = RerankCompressor(**options).compress_documents(docs, query)
        return [{"id": d.id, **d.metadata} for d in out]
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=str(i), metadata=dict(meta)), score=1.0 - i / 10)
        for i, t in enumerate(TEXTS)
    ]
    post = RerankPostprocessor(metadata_mode=MetadataMode.NONE, **options)
    items = post.postprocess_nodes(nodes, query_bundle=QueryBundle(query))
    return [{"id": n.node.node_id, **n.node.metadata} for n in items]


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.DEBUG and hasattr(r, "rerank_kept")]


# -- the DEBUG record ------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_one_debug_record_per_call_with_extra_fields(
    adapter: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="memos_rerank_integrations"):
        call(adapter, {"reranker": OverlapReranker(), "top_n": 2}, query="beta gamma")
    (record,) = records(caplog)
    assert record.name == "memos_rerank_integrations"
    assert record.rerank_adapter == (
        "RerankCompressor" if adapter == "langchain" else "RerankPostprocessor"
    )  # type: ignore[attr-defined]
    assert record.rerank_backend == "overlap-test"  # type: ignore[attr-defined]
    assert record.rerank_documents == 4  # type: ignore[attr-defined]
    assert record.rerank_kept == 2  # type: ignore[attr-defined]
    assert record.rerank_top_n == 2  # type: ignore[attr-defined]
    assert isinstance(record.rerank_duration_ms, float) and record.rerank_duration_ms > 0  # type: ignore[attr-defined]
    assert record.rerank_fallback is False and record.rerank_skipped is False  # type: ignore[attr-defined]
    assert record.rerank_error is None  # type: ignore[attr-defined]
    assert "overlap-test" in record.getMessage() and "kept 2" in record.getMessage()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_debug_record_flags_fallback_and_skip(
    adapter: str, caplog: pytest.LogCaptureFixture
) -> None:
    failing = ScriptedReranker(error=BackendUnavailableError("down"))
    with caplog.at_level(logging.DEBUG, logger="memos_rerank_integrations"):
        call(adapter, {"reranker": failing, "top_n": 3})
        call(adapter, {"reranker": OverlapReranker(), "enabled": False})
    fell_back, skipped = records(caplog)
    assert fell_back.rerank_fallback is True and fell_back.rerank_skipped is False  # type: ignore[attr-defined]
    assert fell_back.rerank_kept == 3  # type: ignore[attr-defined]
    assert fell_back.rerank_error == "BackendUnavailableError: down"  # type: ignore[attr-defined]
    assert skipped.rerank_skipped is True and skipped.rerank_fallback is False  # type: ignore[attr-defined]
    assert skipped.rerank_kept == 4  # type: ignore[attr-defined]


def test_debug_record_when_the_error_propagates(caplog: pytest.LogCaptureFixture) -> None:
    failing = ScriptedReranker(error=BackendUnavailableError("down"))
    with (
        caplog.at_level(logging.DEBUG, logger="memos_rerank_integrations"),
        pytest.raises(BackendUnavailableError),
    ):
        call("langchain", {"reranker": failing, "fallback": False})
    (record,) = records(caplog)
    assert record.rerank_error == "BackendUnavailableError: down"  # type: ignore[attr-defined]
    assert record.rerank_fallback is False and record.rerank_kept == 0  # type: ignore[attr-defined]


def test_no_record_work_when_debug_is_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="memos_rerank_integrations"):
        call("langchain", {"reranker": OverlapReranker()})
    assert records(caplog) == []


# -- skip_if ---------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_skip_if_error_is_the_callers(adapter: str) -> None:
    def broken(query: str) -> bool:
        raise KeyError(query)

    backend = OverlapReranker()
    with pytest.raises(KeyError):
        call(adapter, {"reranker": backend, "skip_if": broken})
    assert backend.calls == []


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_options_are_strict(adapter: str) -> None:
    cls = RerankCompressor if adapter == "langchain" else RerankPostprocessor
    for bad in ({"enabled": "no"}, {"skip_if": "short"}):
        with pytest.raises(ValidationError):
            cls(reranker=OverlapReranker(), **bad)


# -- stage cut points ------------------------------------------------------------------


OWN_CUTS = StageThresholds(0.05, 0.2, 0.4, 0.85)


class OwnCuts(ScriptedReranker):
    """A backend that carries its own cut points (as every backend of this package does),
    while its results carry the default stages: the adapters stage with the cut points."""

    thresholds = OWN_CUTS


class StagesOwnResults(ScriptedReranker):
    """A backend without a thresholds attribute whose results carry stages of OWN_CUTS."""

    def _answer(self, documents: Sequence[str]) -> list[RerankResult]:
        self.calls += 1
        return rank_scores(SCORES[: len(documents)], thresholds=OWN_CUTS)


class StagedOnly:
    """A duck-typed backend whose results carry stages but which has no thresholds."""

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        stages = [Stage.WEAK, Stage.HIGHLY_RELEVANT, Stage.IRRELEVANT, Stage.PARTIAL]
        results = [RerankResult(i, SCORES[i], stages[i]) for i in range(len(documents))]
        return sorted(results, key=lambda r: -r.score)


def stages(out: list[dict[str, Any]]) -> dict[str, str]:
    return {item["id"]: item["rerank_stage"] for item in out}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_backend_cut_points_unless_the_adapter_has_its_own(adapter: str) -> None:
    own = call(adapter, {"reranker": OwnCuts(SCORES)})
    assert stages(own) == {"3": "highly_relevant", "1": "relevant", "2": "partial", "0": "weak"}
    assert [
        item["id"] for item in call(adapter, {"reranker": OwnCuts(SCORES), "min_stage": "relevant"})
    ] == ["3", "1"]
    given = call(adapter, {"reranker": OwnCuts(SCORES), "thresholds": DEFAULT_THRESHOLDS})
    assert stages(given) == {"3": "highly_relevant", "1": "partial", "2": "weak", "0": "irrelevant"}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_stages_the_results_carry_are_kept_without_cut_points(adapter: str) -> None:
    out = call(adapter, {"reranker": StagedOnly(), "min_stage": "weak"})
    assert stages(out) == {"3": "partial", "1": "highly_relevant", "0": "weak"}
    # A FallbackReranker reports the stages of the backend that answered.
    chain = FallbackReranker(
        [ScriptedReranker(error=BackendUnavailableError("x")), StagesOwnResults(SCORES)]
    )
    assert stages(call(adapter, {"reranker": chain}))["1"] == "relevant"


def test_embedding_reranker_ships_its_own_cut_points() -> None:
    backend = EmbeddingReranker()  # nothing is loaded before the first call
    assert backend.thresholds == MINILM_THRESHOLDS != DEFAULT_THRESHOLDS
    compressor = RerankCompressor(reranker=backend)
    assert compressor.thresholds is None
    assert compressor._stage_thresholds() == MINILM_THRESHOLDS


# -- issue 10: strict top_n, outputs that share nothing --------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("bad", [True, False, "3", 2.0, 0, -1])
def test_top_n_is_strict_like_the_backends(adapter: str, bad: object) -> None:
    cls: Callable[..., Any] = RerankCompressor if adapter == "langchain" else RerankPostprocessor
    with pytest.raises(ValidationError, match="top_n"):
        cls(reranker=OverlapReranker(), top_n=bad)
    adapter_object = cls(reranker=OverlapReranker(), top_n=2)
    with pytest.raises(ValidationError, match="top_n"):
        adapter_object.top_n = bad
    assert adapter_object.top_n == 2


class Unpicklable:
    """A metadata value that refuses to be deep-copied (like a client or a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("outcome", ["reranked", "fallback", "skipped"])
def test_outputs_share_no_nested_metadata_with_inputs(adapter: str, outcome: str) -> None:
    tags = ["memory"]
    handle = Unpicklable()
    if adapter == "langchain":
        docs = [
            Document(
                page_content=t,
                id=str(i),
                metadata={"tags": tags, "nested": {"k": [1]}, "handle": handle},
            )
            for i, t in enumerate(TEXTS)
        ]
        options: dict[str, Any] = {"reranker": OverlapReranker()}
        if outcome == "fallback":
            options["reranker"] = ScriptedReranker(error=BackendUnavailableError("down"))
        if outcome == "skipped":
            options["enabled"] = False
        out_meta = [
            d.metadata for d in RerankCompressor(**options).compress_documents(docs, "beta")
        ]
        in_meta = [d.metadata for d in docs]
    else:
        nodes = [
            NodeWithScore(
                node=TextNode(
                    text=t,
                    id_=str(i),
                    metadata={"tags": tags, "nested": {"k": [1]}, "handle": handle},
                ),
                score=0.5,
            )
            for i, t in enumerate(TEXTS)
        ]
        options = {"reranker": OverlapReranker(), "metadata_mode": MetadataMode.NONE}
        if outcome == "fallback":
            options["reranker"] = ScriptedReranker(error=BackendUnavailableError("down"))
        bundle = RerankQueryBundle("beta", rerank=False if outcome == "skipped" else None)
        items = RerankPostprocessor(**options).postprocess_nodes(nodes, query_bundle=bundle)
        out_meta = [n.node.metadata for n in items]
        in_meta = [n.node.metadata for n in nodes]
    assert len(out_meta) == 4
    for meta in out_meta:
        meta["tags"].append("changed")
        meta["nested"]["k"].append(2)
        assert meta["handle"] is handle  # cannot be deep-copied: shared, not an error
    assert tags == ["memory"]
    assert all(m["nested"] == {"k": [1]} and m["tags"] is tags for m in in_meta)
