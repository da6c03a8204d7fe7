"""What both framework adapters share: their options, result validation,
thresholds before the ``top_n`` cut, and the fallback to the original order.

The adapters differ only in how they read text from, and write scores onto,
their framework's objects.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._exceptions import InvalidInputError, MalformedResponseError, RerankError
from ._types import RerankResult, Stage, StageThresholds, validate_ranking

__all__ = ["Outcome", "RerankSettings", "arun", "run"]

logger = logging.getLogger("memos_rerank_integrations")

SCORE_KEY = "relevance_score"
STAGE_KEY = "rerank_stage"
FALLBACK_KEY = "rerank_fallback"


class RerankSettings(BaseModel):
    """Options shared by the LangChain compressor and the LlamaIndex postprocessor."""

    model_config = ConfigDict(arbitrary_types_allowed=True, validate_assignment=True)

    reranker: Any = Field(
        description="Any object with rerank(query, documents, top_n=None) and, ideally, "
        "async arerank(...) returning results sorted by score."
    )
    top_n: int | None = Field(default=None, description="Keep at most this many; None keeps all.")
    min_score: float | None = Field(default=None, description="Drop results scoring below this.")
    min_stage: Stage | None = Field(default=None, description="Drop results below this stage.")
    thresholds: StageThresholds = Field(
        default_factory=StageThresholds, description="Cut points that map scores onto stages."
    )
    fallback: bool = Field(
        default=True,
        description="On a backend error, return the input in its original order, flagged.",
    )

    @field_validator("reranker")
    @classmethod
    def _check_reranker(cls, value: Any) -> Any:
        if not callable(getattr(value, "rerank", None)):
            raise ValueError(
                f"reranker must have a rerank(query, documents, top_n=None) method; "
                f"got {type(value).__name__}. Use e.g. QwenReranker(), MemOSReranker() "
                "or any object with that method."
            )
        return value

    @field_validator("top_n")
    @classmethod
    def _check_top_n(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"top_n must be a positive int or None (keep all), got {value}.")
        return value

    @field_validator("min_score")
    @classmethod
    def _check_min_score(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"min_score must be a finite number or None, got {value}.")
        return value

    @field_validator("min_stage", mode="before")
    @classmethod
    def _parse_min_stage(cls, value: Any) -> Stage | None:
        return None if value is None else Stage.parse(value)

    def _model_name(self) -> str:
        name = getattr(self.reranker, "model", None)
        return name if isinstance(name, str) else type(self.reranker).__name__


@dataclass(frozen=True)
class Outcome:
    """What an adapter should return: ``results`` (kept, best first) on success, or
    ``fallback_indices`` (original order, cut to ``top_n``) after a backend error."""

    results: list[RerankResult] | None
    fallback_indices: list[int] | None = None

    @property
    def is_fallback(self) -> bool:
        return self.results is None


def check_query(query: object) -> str:
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}.")
    return query


def _validated(raw: object, count: int, backend: str) -> list[RerankResult]:
    """Backends are duck-typed, so their answer is checked before it is trusted:
    exactly one finite score per document, no index twice."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise MalformedResponseError(
            f"The reranker returned {type(raw).__name__}, not a list of results."
        )
    pairs = [(getattr(item, "index", None), getattr(item, "score", None)) for item in raw]
    scores = validate_ranking(pairs, n_documents=count, top_n_sent=None, backend=backend)
    ranked = sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))
    return [RerankResult(index, score, Stage.IRRELEVANT) for index, score in ranked]


def _select(settings: RerankSettings, raw: object, count: int) -> list[RerankResult]:
    """Re-stage with the adapter's thresholds, filter, then cut to ``top_n``."""
    floor = -math.inf
    if settings.min_score is not None:
        floor = settings.min_score
    if settings.min_stage is not None:
        floor = max(floor, settings.thresholds.min_score(settings.min_stage))
    kept = [
        RerankResult(result.index, result.score, settings.thresholds.stage(result.score))
        for result in _validated(raw, count, settings._model_name())
        if result.score >= floor
    ]
    return kept if settings.top_n is None else kept[: settings.top_n]


def _fall_back(settings: RerankSettings, error: Exception, count: int) -> Outcome:
    if not settings.fallback:
        raise error
    detail = f": {error}" if isinstance(error, RerankError) else ""
    logger.warning(
        "Reranking failed with %s%s; returning the %d documents in their original order.",
        type(error).__name__,
        detail,
        count,
    )
    keep = count if settings.top_n is None else min(count, settings.top_n)
    return Outcome(results=None, fallback_indices=list(range(keep)))


def run(settings: RerankSettings, query: str, texts: list[str]) -> Outcome:
    """Rerank ``texts`` synchronously, applying the adapter's options."""
    if not texts:
        return Outcome(results=[])
    try:
        raw = settings.reranker.rerank(query, texts)
        return Outcome(results=_select(settings, raw, len(texts)))
    except Exception as error:
        return _fall_back(settings, error, len(texts))


async def arun(settings: RerankSettings, query: str, texts: list[str]) -> Outcome:
    """The async twin of :func:`run`; a backend without ``arerank`` runs in a thread."""
    if not texts:
        return Outcome(results=[])
    try:
        arerank = getattr(settings.reranker, "arerank", None)
        if callable(arerank):
            raw = await arerank(query, texts)
        else:
            raw = await asyncio.to_thread(settings.reranker.rerank, query, texts)
        return Outcome(results=_select(settings, raw, len(texts)))
    except Exception as error:
        return _fall_back(settings, error, len(texts))
