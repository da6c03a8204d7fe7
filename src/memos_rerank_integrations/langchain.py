"""LangChain integration: a document compressor for ``ContextualCompressionRetriever``.

>>> from langchain_classic.retrievers import ContextualCompressionRetriever
>>> compressor = RerankCompressor(reranker=QwenReranker(), top_n=5, min_stage="relevant")
>>> retriever = ContextualCompressionRetriever(
...     base_compressor=compressor, base_retriever=vector_store.as_retriever(k=50)
... )
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._exceptions import InvalidInputError
from ._extras import missing_extra
from ._pipeline import (
    FALLBACK_KEY,
    SCORE_KEY,
    STAGE_KEY,
    Outcome,
    RerankSettings,
    arun,
    check_query,
    run,
)

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise missing_extra(
        "langchain", "langchain-core", feature="memos_rerank_integrations.langchain"
    ) from exc

__all__ = ["RerankCompressor"]


class RerankCompressor(RerankSettings, BaseDocumentCompressor):
    """Rerank retrieved documents with any reranker of this package (or any object
    with ``rerank`` / ``arerank``).

    Returns copies, best first, with ``metadata["relevance_score"]`` (float) and
    ``metadata["rerank_stage"]`` (e.g. ``"relevant"``) written after the original
    metadata; ids and all other metadata are kept and the input is never mutated.
    ``min_score`` and ``min_stage`` are applied before the ``top_n`` cut. When the
    backend fails and ``fallback`` is true (the default), the original documents
    come back in their original order, cut to ``top_n``, flagged with
    ``metadata["rerank_fallback"] = True``, and a warning is logged.
    """

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        texts = _texts(documents)
        return _build(documents, run(self, check_query(query), texts))

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        texts = _texts(documents)
        return _build(documents, await arun(self, check_query(query), texts))


def _texts(documents: Sequence[Document]) -> list[str]:
    texts = []
    for position, document in enumerate(documents):
        content = getattr(document, "page_content", None)
        if not isinstance(content, str):
            raise InvalidInputError(
                f"documents[{position}].page_content must be a str, got "
                f"{type(content).__name__}; pass langchain Document objects."
            )
        texts.append(content)
    return texts


def _copy(document: Document, extra: dict[str, Any]) -> Document:
    return document.model_copy(update={"metadata": {**document.metadata, **extra}})


def _build(documents: Sequence[Document], outcome: Outcome) -> list[Document]:
    if outcome.results is None:
        return [_copy(documents[i], {FALLBACK_KEY: True}) for i in outcome.fallback_indices or []]
    return [
        _copy(documents[r.index], {SCORE_KEY: r.score, STAGE_KEY: r.stage.label})
        for r in outcome.results
    ]
