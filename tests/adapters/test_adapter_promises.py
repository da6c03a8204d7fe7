"""Issue 27's adapter promises, each with a test that fails when it breaks: unknown
options are errors naming the closest valid one (LangChain's own compressors forbid
unknown fields), ties keep input order for duck-typed backends, and ``min_stage``
applies before the ``top_n`` cut even when a backend's own stages are not monotone in
its scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pydantic
import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

from memos_rerank_integrations import InvalidInputError, RerankResult, Stage
from memos_rerank_integrations.langchain import RerankCompressor, RerankRetriever
from memos_rerank_integrations.llama_index import RerankPostprocessor
from memos_rerank_integrations.mem0 import Mem0Reranker

from ..support.backends import OverlapReranker

TEXTS = ["alpha", "beta", "gamma", "delta"]
ADAPTERS = ["langchain", "llama_index", "mem0"]


def ranked_ids(adapter: str, options: dict[str, Any]) -> list[str]:
    """One adapter call over TEXTS; the ids of what comes back, in order."""
    if adapter == "langchain":
        docs = [Document(page_content=t, id=str(i)) for i, t in enumerate(TEXTS)]
        return [str(d.id) for d in RerankCompressor(**options).compress_documents(docs, "q")]
    if adapter == "llama_index":
        nodes = [NodeWithScore(node=TextNode(text=t, id_=str(i))) for i, t in enumerate(TEXTS)]
        post = RerankPostprocessor(metadata_mode=MetadataMode.NONE, **options)
        return [n.node.node_id for n in post.postprocess_nodes(nodes, QueryBundle("q"))]
    hits = [{"id": str(i), "memory": t, "score": 0.5} for i, t in enumerate(TEXTS)]
    return [hit["id"] for hit in Mem0Reranker(**options).rerank("q", hits)]


# -- unknown options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "closest"),
    [("top_k", "top_n"), ("min_scroe", "min_score"), ("treshold", "thresholds")],
)
@pytest.mark.parametrize("adapter", ["RerankCompressor", "RerankPostprocessor", "Mem0Reranker"])
def test_an_unknown_option_is_an_error_naming_the_closest_one(
    adapter: str, name: str, closest: str
) -> None:
    cls: Any = {
        "RerankCompressor": RerankCompressor,
        "RerankPostprocessor": RerankPostprocessor,
        "Mem0Reranker": Mem0Reranker,
    }[adapter]
    if cls is Mem0Reranker and name == "top_k":  # Mem0's own name for top_n, in Mem0
        assert cls(reranker=OverlapReranker(), top_k=3).config.limit == 3
        return
    # Issue 27: top_k=3 (Mem0's name for top_n) was accepted and every document came back.
    with pytest.raises(InvalidInputError, match=rf"Did you mean '{closest}' for '{name}'\?"):
        cls(reranker=OverlapReranker(), **{name: 3})


@pytest.mark.parametrize("cls", [RerankCompressor, RerankPostprocessor])
def test_unknown_options_are_refused_on_every_way_in(cls: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match="Did you mean 'top_n'"):
        cls.model_validate({"reranker": OverlapReranker(), "top_k": 3})
    adapter = cls(reranker=OverlapReranker(), top_n=2)
    with pytest.raises(InvalidInputError, match="Did you mean 'top_n'"):
        adapter.top_k = 3
    assert adapter.top_n == 2
    if cls is RerankPostprocessor:  # LlamaIndex's dict form
        data = {**adapter.to_dict(), "top_k": 3}
        data["reranker"] = adapter.reranker
        with pytest.raises(InvalidInputError, match="Did you mean 'top_n'"):
            RerankPostprocessor.from_dict(data)


def test_a_mem0_block_names_the_closest_option_of_the_block_or_its_backend() -> None:
    from mem0.utils.factory import RerankerFactory

    from memos_rerank_integrations.mem0 import Mem0RerankerConfig, register

    register()
    for options, closest in [
        ({"backend": "embedding", "top_m": 3}, "top_n"),  # the block's own option
        ({"backend": "embedding", "max_lenght": 64}, "max_length"),  # the backend's
    ]:
        with pytest.raises(pydantic.ValidationError, match=f"Did you mean '{closest}'"):
            Mem0RerankerConfig(**options)
        with pytest.raises(pydantic.ValidationError, match=f"Did you mean '{closest}'"):
            RerankerFactory.create("memos", options)  # as Memory.from_config builds it
        with pytest.raises(InvalidInputError, match=f"Did you mean '{closest}'"):
            Mem0Reranker(options)


def test_the_retriever_refuses_unknown_options_too() -> None:
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=8))
    store.add_documents([Document(page_content=t) for t in TEXTS])
    compressor = RerankCompressor(reranker=OverlapReranker(), top_n=2)
    with pytest.raises(InvalidInputError, match="Did you mean 'base_compressor'"):
        RerankRetriever(base_retriever=store.as_retriever(), base_compresor=compressor)
    with pytest.raises(InvalidInputError, match=r"\['top_n'\]"):
        compressor.as_retriever(store.as_retriever(), top_n=3)
    # A stock ContextualCompressionRetriever gets a compressor that keeps two.
    stock = ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=store.as_retriever(search_kwargs={"k": 4})
    )
    assert len(stock.invoke("alpha")) == 2


# -- ties keep input order -------------------------------------------------------------------


class TiedReranker:
    """Duck-typed: every document scores 0.5 except 'gamma' (0.9); the answer lists the
    tied ones in reverse input order, as a backend with an unstable sort may."""

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        scores = [0.9 if d == "gamma" else 0.5 for d in documents]
        answer = sorted(range(len(documents)), key=lambda i: (-scores[i], -i))
        return [RerankResult(i, scores[i], Stage.PARTIAL) for i in answer]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_ties_keep_input_order_for_duck_typed_backends(adapter: str) -> None:
    assert ranked_ids(adapter, {"reranker": TiedReranker()}) == ["2", "0", "1", "3"]
    assert ranked_ids(adapter, {"reranker": TiedReranker(), "top_n": 2}) == ["2", "0"]


# -- min_stage before the top_n cut ---------------------------------------------------------


class NonMonotoneStages:
    """Duck-typed, without cut points: its results carry stages that do not follow its
    scores (the best score is only 'weak', the second best 'highly_relevant')."""

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        table = {
            "alpha": (0.9, Stage.WEAK),
            "beta": (0.8, Stage.HIGHLY_RELEVANT),
            "gamma": (0.7, Stage.IRRELEVANT),
            "delta": (0.6, Stage.HIGHLY_RELEVANT),
        }
        results = [RerankResult(i, *table[d]) for i, d in enumerate(documents)]
        return sorted(results, key=lambda r: -r.score)


@pytest.mark.parametrize("adapter", ["langchain", "llama_index"])
def test_min_stage_applies_before_the_top_n_cut_with_non_monotone_stages(adapter: str) -> None:
    options = {"reranker": NonMonotoneStages(), "min_stage": "highly_relevant"}
    assert ranked_ids(adapter, options) == ["1", "3"]
    # Cut first, the best-scored ('weak') document would take the one place and be
    # dropped, leaving nothing.
    assert ranked_ids(adapter, {**options, "top_n": 1}) == ["1"]
