"""LlamaIndex integration: a node postprocessor for any query engine.

>>> query_engine = index.as_query_engine(
...     similarity_top_k=20,
...     node_postprocessors=[RerankPostprocessor(reranker=QwenReranker(), top_n=5)],
... )
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import _pipeline as pipeline
from ._config import settings_from_dict, settings_to_dict
from ._exceptions import InvalidInputError
from ._extras import missing_extra

__all__ = ["RerankPostprocessor", "RerankQueryBundle"]

try:
    from llama_index.core.bridge.pydantic import Field
    from llama_index.core.callbacks import CBEventType, EventPayload

    # Re-exported by llama_index.core.instrumentation without __all__.
    from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
    from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise missing_extra(
        "llama-index", "llama-index-core", feature="memos_rerank_integrations.llama_index"
    ) from exc


dispatcher = get_dispatcher(__name__)

RETRIEVAL_SCORE_KEY = "retrieval_score"
_ADDED_KEYS = (
    RETRIEVAL_SCORE_KEY,
    pipeline.STAGE_KEY,
    pipeline.FALLBACK_KEY,
    pipeline.SKIPPED_KEY,
    pipeline.PARTIAL_KEY,
    pipeline.SCORED_KEY,
)


@dataclass
class RerankQueryBundle(QueryBundle):
    """A ``QueryBundle`` with per-query rerank options for :class:`RerankPostprocessor`:
        ``rerank`` (``False`` skips reranking for this query, ``True`` forces it past
        ``enabled`` / ``skip_if``) and ``rerank_top_n`` (keep this many instead of
        ``top_n``) and ``rerank_budget_ms`` (a latency budget for this query instead of
    ``budget_ms``). Pass it where a query string goes:
        ``query_engine.query(RerankQueryBundle("...", rerank_top_n=3))``.
    """

    rerank: bool | None = None
    rerank_top_n: int | None = None
    rerank_budget_ms: float | None = None


class RerankPostprocessor(pipeline.RerankSettings, BaseNodePostprocessor):
    """Rerank retrieved nodes with any reranker of this package (or any object with
    ``rerank`` / ``arerank``).

    Returns new ``NodeWithScore`` objects, best first, whose ``score`` is the rerank
    score (a plain float), on copies of the nodes (same ids, metadata deep-copied) that
    carry ``metadata["retrieval_score"]`` (the incoming score) and
    ``metadata["rerank_stage"]``; both keys are excluded from LLM and embedding
    text. The incoming nodes are never mutated. ``min_score`` and ``min_stage``
    apply before the ``top_n`` cut. An option it does not have (``top_k=3``, a
    misspelling) is an ``InvalidInputError`` naming the closest valid one (``top_n``).
    On a backend error with ``fallback`` true, the nodes keep their original order
    and scores, cut to ``top_n``, flagged with ``metadata["rerank_fallback"] = True``;
    a skipped query (``enabled=False``, ``skip_if(query)`` true, or a
    :class:`RerankQueryBundle` with ``rerank=False``) comes back the same way flagged
    ``metadata["rerank_skipped"] = True``, without a backend call.

    Each call is an instrumentation span with ``ReRankStartEvent`` / ``ReRankEndEvent``
    (whose ``tags`` hold ``rerank_backend``, ``rerank_documents``, ``rerank_kept``,
    ``rerank_fallback``, ``rerank_skipped``, ``rerank_error`` and
    ``rerank_duration_ms``) and a ``CBEventType.RERANKING`` callback event.
    """

    metadata_mode: MetadataMode = Field(
        default=MetadataMode.EMBED, description="Which node text the reranker scores."
    )

    @classmethod
    def class_name(cls) -> str:
        return "RerankPostprocessor"

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """JSON-ready fields; the backend as its ``to_config()`` (see ``from_config``).

        A ``skip_if`` function cannot be written as data: set it again after
        :meth:`from_dict` (a ``TypeError`` says so rather than dropping it)."""
        if self.skip_if is not None:
            raise TypeError(
                "RerankPostprocessor.to_dict() cannot hold skip_if (a function); build "
                "the dict without it and pass skip_if=... to from_dict()."
            )
        return settings_to_dict(super().to_dict(**kwargs))

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> RerankPostprocessor:
        """The inverse of :meth:`to_dict`: a backend config is built with ``from_config``."""
        built: RerankPostprocessor = super().from_dict(settings_from_dict({**data, **kwargs}))
        return built

    def __getstate__(self) -> dict[str, Any]:
        # LlamaIndex drops fields that fail to pickle; the backend and skip_if must not
        # vanish silently (a lambda cannot be pickled: the error says so).
        pickle.dumps(self.reranker)
        pickle.dumps(self.skip_if)
        state: dict[str, Any] = super().__getstate__()
        return state

    # LlamaIndex spans this implementation of an abstract method itself (its dispatcher
    # mixin); the async twin is not abstract, so it is spanned here.
    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query, texts, options = self._inputs(nodes, query_bundle)
        if not nodes:
            pipeline.run(self, query, texts, options, adapter=type(self).__name__)
            return []
        with self._events(nodes, query_bundle, options) as finish:
            return finish(
                nodes, pipeline.run(self, query, texts, options, adapter=type(self).__name__)
            )

    @dispatcher.span
    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query, texts, options = self._inputs(nodes, query_bundle)
        if not nodes:
            await pipeline.arun(self, query, texts, options, adapter=type(self).__name__)
            return []
        with self._events(nodes, query_bundle, options) as finish:
            outcome = await pipeline.arun(self, query, texts, options, adapter=type(self).__name__)
            return finish(nodes, outcome)

    def _inputs(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None
    ) -> tuple[str, list[str], pipeline.CallOptions]:
        if query_bundle is None:
            raise InvalidInputError(
                "RerankPostprocessor needs a query: pass query_bundle or query_str."
            )
        query = pipeline.check_query(query_bundle.query_str)
        options = pipeline.call_options(query_bundle, source="The query bundle's")
        texts = []
        for position, item in enumerate(nodes):
            node = getattr(item, "node", None)
            if node is None or not callable(getattr(node, "get_content", None)):
                raise InvalidInputError(
                    f"nodes[{position}] must be a NodeWithScore, got {type(item).__name__}."
                )
            text = node.get_content(metadata_mode=self.metadata_mode)
            if not isinstance(text, str):
                raise InvalidInputError(
                    f"nodes[{position}] content must be a str, got {type(text).__name__}."
                )
            texts.append(text)
        return query, texts, options

    @contextmanager
    def _events(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None,
        options: pipeline.CallOptions,
    ) -> Iterator[Callable[[list[NodeWithScore], pipeline.Outcome], list[NodeWithScore]]]:
        """Emit ReRankStart/End events and the RERANKING callback event around one
        rerank; the yielded ``finish`` builds the output, records it and returns it."""
        model = self._model_name()
        top_n = options.top_n or self.top_n or len(nodes)
        dispatcher.event(
            ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=top_n, model_name=model)
        )
        payload: dict[str, Any] = {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: model,
            EventPayload.QUERY_STR: query_bundle.query_str if query_bundle else None,
            EventPayload.TOP_K: top_n,
        }
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:

            def finish(
                given: list[NodeWithScore], outcome: pipeline.Outcome
            ) -> list[NodeWithScore]:
                result = _build(given, outcome)
                facts = outcome.facts()
                event.on_end(payload={EventPayload.NODES: result, **facts})
                dispatcher.event(ReRankEndEvent(nodes=result, tags=facts))
                return result

            yield finish


def _copy(item: NodeWithScore, extra: dict[str, Any]) -> Any:
    node = item.node
    metadata = pipeline.copy_metadata(node.metadata)
    for key in (RETRIEVAL_SCORE_KEY, *extra):
        metadata.pop(key, None)  # our keys come last, after the original metadata
    return node.model_copy(
        update={
            "metadata": {**metadata, RETRIEVAL_SCORE_KEY: item.score, **extra},
            "excluded_llm_metadata_keys": _with_keys(node.excluded_llm_metadata_keys),
            "excluded_embed_metadata_keys": _with_keys(node.excluded_embed_metadata_keys),
        }
    )


def _with_keys(keys: list[str]) -> list[str]:
    return [*keys, *(key for key in _ADDED_KEYS if key not in keys)]


def _build(nodes: list[NodeWithScore], outcome: pipeline.Outcome) -> list[NodeWithScore]:
    """Scored nodes carry the rerank score; nodes passed through (skipped, a fallback,
    or left unscored by a latency budget) keep their incoming score."""
    built = []
    for index, result, flags in outcome.placed():
        if result is None:
            built.append(NodeWithScore(node=_copy(nodes[index], flags), score=nodes[index].score))
        else:
            extra = {pipeline.STAGE_KEY: result.stage.label, **flags}
            built.append(NodeWithScore(node=_copy(nodes[index], extra), score=result.score))
    return built
