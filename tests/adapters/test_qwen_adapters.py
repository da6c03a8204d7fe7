"""QwenReranker end to end inside LangChain and LlamaIndex, on the tiny offline model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode, TextNode

from memos_rerank_integrations import QwenReranker
from memos_rerank_integrations.langchain import RerankCompressor
from memos_rerank_integrations.llama_index import RerankPostprocessor

from ..support import qwen_fixtures as _qwen_fixtures
from ..support.qwen_fixtures import ModelCardRecipe

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir
qwen_recipe = _qwen_fixtures.qwen_recipe

QUERY = "What are the user's hobbies?"
MEMORIES = [
    "User likes playing badminton.",
    "User is a backend developer in Hangzhou.",
    "User prefers concise replies.",
    "User prefers Jiangxiang-flavored baijiu.",
    "User is going on a business trip to Beijing next Wednesday.",
]


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


@pytest.fixture
def compression_retriever(tiny_qwen_dir: Path) -> ContextualCompressionRetriever:
    store = InMemoryVectorStore(embedding=DeterministicFakeEmbedding(size=16))
    store.add_documents(
        [
            Document(page_content=text, id=f"m{i}", metadata={"source": "memory", "n": i})
            for i, text in enumerate(MEMORIES)
        ]
    )
    compressor = RerankCompressor(reranker=QwenReranker(tiny_qwen_dir, dtype="float32"), top_n=3)
    return ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=store.as_retriever(search_kwargs={"k": 5})
    )


def check_langchain(docs: list[Document], recipe: ModelCardRecipe) -> None:
    expected = recipe(QUERY, MEMORIES)
    assert [doc.id for doc in docs] == [f"m{i}" for i in best_first(expected)[:3]]
    for doc in docs:
        index = doc.metadata["n"]
        assert doc.page_content == MEMORIES[index]
        assert doc.metadata["source"] == "memory"
        assert type(doc.metadata["relevance_score"]) is float
        assert doc.metadata["relevance_score"] == pytest.approx(expected[index], abs=1e-4)


def test_langchain_contextual_compression_with_qwen(
    compression_retriever: ContextualCompressionRetriever, qwen_recipe: ModelCardRecipe
) -> None:
    check_langchain(compression_retriever.invoke(QUERY), qwen_recipe)


async def test_langchain_async_with_qwen(
    compression_retriever: ContextualCompressionRetriever, qwen_recipe: ModelCardRecipe
) -> None:
    check_langchain(await compression_retriever.ainvoke(QUERY), qwen_recipe)


@pytest.fixture
def query_engine(tiny_qwen_dir: Path) -> Any:
    nodes = [
        TextNode(text=text, id_=f"n{i}", metadata={"topic": "memory"})
        for i, text in enumerate(MEMORIES)
    ]
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8), show_progress=False)
    postprocessor = RerankPostprocessor(
        reranker=QwenReranker(tiny_qwen_dir, dtype="float32"), top_n=2
    )
    return index.as_query_engine(
        llm=MockLLM(),
        similarity_top_k=5,
        node_postprocessors=[postprocessor],
        embed_model=MockEmbedding(embed_dim=8),
    )


def check_llama_index(response: Any, recipe: ModelCardRecipe) -> None:
    # LlamaIndex scores the text as it embeds it: metadata included.
    texts = [
        TextNode(text=text, metadata={"topic": "memory"}).get_content(
            metadata_mode=MetadataMode.EMBED
        )
        for text in MEMORIES
    ]
    expected = recipe(QUERY, texts)
    top = response.source_nodes
    assert [node.node.node_id for node in top] == [f"n{i}" for i in best_first(expected)[:2]]
    for node in top:
        index = int(node.node.node_id[1:])
        assert type(node.score) is float
        assert node.score == pytest.approx(expected[index], abs=1e-4)


def test_llama_index_query_engine_with_qwen(
    query_engine: Any, qwen_recipe: ModelCardRecipe
) -> None:
    check_llama_index(query_engine.query(QUERY), qwen_recipe)


async def test_llama_index_async_query_engine_with_qwen(
    query_engine: Any, qwen_recipe: ModelCardRecipe
) -> None:
    check_llama_index(await query_engine.aquery(QUERY), qwen_recipe)
