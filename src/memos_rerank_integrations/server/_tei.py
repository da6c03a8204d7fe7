"""Hugging Face text-embeddings-inference (TEI): ``POST /rerank`` with ``texts``,
and ``GET /info``.

Clients: ``tei-client`` (it reads ``/info`` first), this package's
``HTTPReranker(api_format="tei")``, LangChain/LlamaIndex TEI rerankers.

This module's :data:`router` owns ``/info``. ``/rerank`` belongs to
:mod:`._memos`, whose handler answers a TEI body with :func:`rerank`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from .._types import Reranker
from ._core import (
    ApiError,
    Budgeted,
    Dialect,
    Query,
    Router,
    Service,
    ServiceDep,
    Text,
    check_sizes,
)

__all__ = [
    "TEI",
    "TEIError",
    "TEIInfo",
    "TEIRank",
    "TEIRerankRequest",
    "info",
    "rerank",
    "router",
    "score_scale",
]

_ERROR_TYPES = {
    "invalid_request": "Validation",
    "too_large": "Validation",
    "token_budget": "Validation",
    "timeout": "Validation",
    "unauthorized": "Unauthorized",
    "unavailable": "Unhealthy",
    "model_error": "Backend",
    "malformed_answer": "Backend",
    "internal": "Backend",
}


def _error_body(error: ApiError) -> dict[str, Any]:
    # TEI's own error shape, plus the FastAPI/Jina ``detail``.
    return {
        "error": error.message,
        "error_type": _ERROR_TYPES.get(error.kind, "Backend"),
        "detail": error.message,
    }


TEI = Dialect("tei", _error_body)


class TEIError(BaseModel):
    """text-embeddings-inference's error shape, plus ``detail``."""

    error: str
    error_type: str
    detail: str


ScoreScale = Literal["probability", "logit", "other"]


def score_scale(reranker: Reranker) -> ScoreScale:
    """What the backend's scores are: a sigmoid probability (Qwen3's P(yes), a
    normalized cross-encoder), a raw logit (``normalize=False``), or neither."""
    qwen = sys.modules.get("memos_rerank_integrations._local.qwen")
    if qwen is not None and isinstance(reranker, qwen.QwenReranker):
        return "probability"
    encoder = sys.modules.get("memos_rerank_integrations._local.cross_encoder")
    if encoder is not None and isinstance(reranker, encoder.CrossEncoderReranker):
        return "probability" if reranker.normalize else "logit"
    return "other"


# The largest finite logit a float64 probability below 1 can express.
_EPSILON = 2.0**-53


def _logit(probability: float) -> float:
    p = min(max(probability, _EPSILON), 1.0 - _EPSILON)
    return math.log(p) - math.log1p(-p)


def _sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


class TEIRerankRequest(Budgeted):
    """The text-embeddings-inference rerank request (``texts`` instead of ``documents``)."""

    model_config = ConfigDict(strict=True)

    query: Query
    texts: list[Text] = Field(min_length=1)
    raw_scores: bool = Field(
        False,
        description="Raw logits instead of probabilities: the logit of P(yes) for "
        "Qwen3 and normalized cross-encoders; other backends' scores are returned as they are.",
    )
    return_text: bool = Field(False, description="Echo each text in its result.")
    truncate: bool | None = Field(
        None,
        description="Accepted; inputs over the model's limit are always cut at the end "
        "of the text (see /info auto_truncate).",
    )
    truncation_direction: Literal["Right", "right"] = Field(
        "Right", description="Only 'Right' (the document's tail is cut) is supported."
    )

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data: Any) -> Any:
        return check_sizes(data, lists=("texts",), dialect=TEI)


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


async def rerank(service: Service, request: Request, body: TEIRerankRequest) -> JSONResponse:
    """Answer a TEI ``/rerank`` body (errors too, in TEI's shape)."""
    request.state.dialect = TEI
    scale = score_scale(service.reranker)
    ranked = await service.rank(request, body.query, body.texts, None, body.budget_ms)
    convert: Callable[[float], float] | None = None
    if body.raw_scores and scale == "probability":
        convert = _logit
    elif not body.raw_scores and scale == "logit":
        convert = _sigmoid
    answer = []
    for result in ranked.results:
        item: dict[str, Any] = {
            "index": result.index,
            "score": convert(result.score) if convert else result.score,
        }
        if body.return_text:
            item["text"] = body.texts[result.index]
        answer.append(item)
    return JSONResponse(answer)


class TEIInfo(BaseModel):
    """TEI's ``/info`` fields (what ``tei-client`` parses), and this server's limits."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: dict[str, Any]
    max_concurrent_requests: int | None
    max_input_length: int | None
    max_batch_tokens: int | None
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int | None
    version: str
    sha: str | None = None
    docker_label: str | None = None
    router: str
    max_request_tokens: int | None
    max_body_bytes: int
    max_query_tokens: int | None


router = Router()


@router.status(
    "/info",
    response_model=TEIInfo,
    summary="The served model and limits (text-embeddings-inference's fields)",
)
async def info(service: ServiceDep) -> Response:
    dtype = getattr(service.reranker, "dtype", None)
    dtype_name = "auto" if dtype is None else str(dtype).removeprefix("torch.")
    body = {
        "model_id": service.model_name,
        "model_sha": None,
        "model_dtype": dtype_name,
        "model_type": {"reranker": {"id2label": {"0": "relevance"}, "label2id": {"relevance": 0}}},
        "max_concurrent_requests": None,
        "max_input_length": service.model_limit("max_length"),
        "max_batch_tokens": service.model_limit("max_batch_tokens"),
        "max_batch_requests": None,
        "max_client_batch_size": service.max_documents,
        "auto_truncate": True,
        "tokenization_workers": service.tokenizer_workers,
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "router": "memos-rerank-integrations",
        "max_request_tokens": service.max_request_tokens,
        "max_body_bytes": service.max_body_bytes,
        "max_query_tokens": service.model_limit("max_query_length"),
    }
    return JSONResponse(body)
