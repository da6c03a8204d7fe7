"""LangChain integration: a document compressor for ``ContextualCompressionRetriever``,
and ``RerankRetriever``, a drop-in for that retriever which honours per-call config.

>>> from langchain_classic.retrievers import ContextualCompressionRetriever
>>> compressor = RerankCompressor(reranker=QwenReranker(), top_n=5, min_stage="relevant")
>>> retriever = ContextualCompressionRetriever(
...     base_compressor=compressor, base_retriever=vector_store.as_retriever(k=50)
... )

Every ``compress_documents`` / ``acompress_documents`` call is a run of its own (a
``chain`` run named after the compressor, a child of the retriever's run), so callback
handlers, ``astream_events`` and LangSmith show the rerank with its inputs, outputs,
errors and duration.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ConfigDict, Field

from . import _pipeline as pipeline
from ._configurable import unknown_options
from ._exceptions import InvalidInputError
from ._extras import missing_extra

try:
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.callbacks import AsyncCallbackManager, CallbackManager, Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.retrievers import RetrieverLike
    from langchain_core.runnables import RunnableConfig, ensure_config
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    package = (exc.name or "langchain_core").split(".")[0].replace("_", "-")
    raise missing_extra(
        "langchain", package, feature="memos_rerank_integrations.langchain"
    ) from exc

__all__ = ["RerankCompressor", "RerankRetriever"]

# The ``configurable`` of the RerankRetriever call in progress (a stock
# ContextualCompressionRetriever does not hand its config to the compressor).
_CONFIGURABLE: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "memos_rerank_configurable", default=None
)


class RerankCompressor(pipeline.RerankSettings, BaseDocumentCompressor):
    """Rerank retrieved documents with any reranker of this package (or any object
    with ``rerank`` / ``arerank``).

    Returns copies, best first, with ``metadata["relevance_score"]`` (float) and
    ``metadata["rerank_stage"]`` (e.g. ``"relevant"``) written after the original
    metadata; ids and all other metadata (deep-copied) are kept and the input is never
    mutated. ``min_score`` and ``min_stage`` are applied before the ``top_n`` cut.
    An option it does not have (``top_k=3``, a misspelling) is an
    ``InvalidInputError`` naming the closest valid one (``top_n``), as LangChain's
    own compressors forbid unknown fields.
    When the backend fails and ``fallback`` is true (the default), the original
    documents come back in their original order, cut to ``top_n``, flagged with
    ``metadata["rerank_fallback"] = True``, and a warning is logged. A skipped call
    (``enabled=False``, ``skip_if(query)`` true, or ``{"rerank": False}`` in the run's
    ``configurable``) returns them the same way flagged ``metadata["rerank_skipped"]``,
    without calling the backend.

    Per call, the run's ``config["configurable"]`` may hold ``"rerank"`` (bool: force
    or skip reranking), ``"rerank_top_n"`` (a positive int replacing ``top_n``) and
    ``"rerank_budget_ms"`` (a latency budget for this call); any other ``rerank_`` key
    is a misspelling, an ``InvalidInputError`` naming the closest of these. They
    reach the compressor inside an LCEL chain or LangGraph node, and through
    :class:`RerankRetriever` (a stock ``ContextualCompressionRetriever`` invoked on its
    own drops them).
    """

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        config = ensure_config()
        manager = CallbackManager.configure(_callbacks(callbacks, config))
        trace = manager.on_chain_start(
            None, self._run_inputs(documents, query), name=self._run_name()
        )
        try:
            outcome = pipeline.run(
                self, *self._inputs(documents, query, config), adapter=self._run_name()
            )
            kept = _build(documents, outcome)
        except BaseException as error:
            trace.on_chain_error(error)
            raise
        trace.on_chain_end(_run_outputs(kept, outcome))
        return kept

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        config = ensure_config()
        manager = AsyncCallbackManager.configure(_callbacks(callbacks, config))
        inputs = self._run_inputs(documents, query)
        trace = await manager.on_chain_start(None, inputs, name=self._run_name())
        try:
            call = self._inputs(documents, query, config)
            outcome = await pipeline.arun(self, *call, adapter=self._run_name())
            kept = _build(documents, outcome)
        except BaseException as error:
            await trace.on_chain_error(error)
            raise
        await trace.on_chain_end(_run_outputs(kept, outcome))
        return kept

    def _inputs(
        self, documents: Sequence[Document], query: object, config: RunnableConfig
    ) -> tuple[str, list[str], pipeline.CallOptions]:
        """What the pipeline takes: the query, the documents' texts, the call's options."""
        options = _options(config)
        return pipeline.check_query(query), _texts(documents), options

    def as_retriever(self, base_retriever: RetrieverLike, **kwargs: Any) -> RerankRetriever:
        """A :class:`RerankRetriever` that reranks what ``base_retriever`` finds."""
        return RerankRetriever(base_retriever=base_retriever, compressor=self, **kwargs)

    def _run_name(self) -> str:
        return type(self).__name__

    def _run_inputs(self, documents: Sequence[Document], query: object) -> dict[str, Any]:
        count = len(documents) if isinstance(documents, Sequence) else None
        return {"query": query, "document_count": count, "backend": self._model_name()}


class RerankRetriever(ContextualCompressionRetriever):
    """A ``ContextualCompressionRetriever`` whose compressor sees the call's config.

    ``RerankRetriever(base_retriever=..., compressor=RerankCompressor(...))`` (or
    ``base_compressor=``, as for the stock class, or ``compressor.as_retriever(...)``)
    retrieves and reranks like ``ContextualCompressionRetriever``, and is one (an
    unknown option is an ``InvalidInputError`` naming the closest one). Per call,
    ``retriever.invoke(query, config={"configurable": {"rerank": False}})`` skips
    reranking and ``{"rerank_top_n": 3}`` keeps three; the keys reach every
    :class:`RerankCompressor` under it (also inside a ``DocumentCompressorPipeline``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    base_compressor: BaseDocumentCompressor = Field(alias="compressor")

    def __init__(self, /, **data: Any) -> None:
        # LangChain's retrievers ignore unknown fields: top_n=3 here would vanish.
        valid = pipeline.field_names(type(self))
        unknown = [name for name in data if name not in valid]
        if unknown:
            raise InvalidInputError(unknown_options(unknown, valid, owner=type(self).__name__))
        super().__init__(**data)

    def invoke(
        self, input: str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[Document]:
        token = _CONFIGURABLE.set(_configurable(config))
        try:
            return super().invoke(input, config, **kwargs)
        finally:
            _CONFIGURABLE.reset(token)

    async def ainvoke(
        self, input: str, config: RunnableConfig | None = None, **kwargs: Any
    ) -> list[Document]:
        token = _CONFIGURABLE.set(_configurable(config))
        try:
            return await super().ainvoke(input, config, **kwargs)
        finally:
            _CONFIGURABLE.reset(token)


def _callbacks(callbacks: Callbacks | None, config: RunnableConfig) -> Callbacks:
    return callbacks if callbacks is not None else config.get("callbacks")


def _configurable(config: RunnableConfig | None) -> Mapping[str, Any]:
    return dict(ensure_config(config).get("configurable") or {})


def _options(config: RunnableConfig) -> pipeline.CallOptions:
    scoped = _CONFIGURABLE.get()
    values = scoped if scoped is not None else config.get("configurable") or {}
    return pipeline.call_options(values, source='config["configurable"]')


def _texts(documents: Sequence[Document]) -> list[str]:
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise InvalidInputError(
            f"documents must be a sequence of langchain Documents, got {type(documents).__name__}."
        )
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
    metadata = pipeline.copy_metadata(document.metadata)
    for key in extra:
        metadata.pop(key, None)  # our keys come last, after the original metadata
    return document.model_copy(update={"metadata": {**metadata, **extra}})


def _build(documents: Sequence[Document], outcome: pipeline.Outcome) -> list[Document]:
    built = []
    for index, result, flags in outcome.placed():
        scored: dict[str, Any] = {}
        if result is not None:
            scored = {pipeline.SCORE_KEY: result.score, pipeline.STAGE_KEY: result.stage.label}
        built.append(_copy(documents[index], {**scored, **flags}))
    return built


def _run_outputs(documents: list[Document], outcome: pipeline.Outcome) -> dict[str, Any]:
    return {
        "documents": documents,
        "kept": outcome.kept,
        "fallback": outcome.fell_back,
        "skipped": outcome.skipped,
        "error": outcome.error,
        "top_n": outcome.top_n,
        "duration_ms": outcome.duration_ms,
        "budget_ms": outcome.budget_ms,
        "partial": outcome.partial,
        "scored": outcome.scored if outcome.results is not None else 0,
    }
