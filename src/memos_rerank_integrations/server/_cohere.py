"""``POST /v2/rerank`` in the Cohere v2 shape.

Clients: ``cohere.ClientV2`` / ``AsyncClientV2`` with ``base_url``, langchain-cohere
``CohereRerank``, LlamaIndex ``CohereRerank``.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from ._core import ApiError, Dialect, Query, Service, Text

__all__ = ["COHERE", "CohereV2RerankRequest", "CohereV2RerankResponse", "rerank_v2"]

# Cohere bills one search unit per query and up to 100 documents.
_DOCUMENTS_PER_SEARCH_UNIT = 100


def _error_body(error: ApiError) -> dict[str, Any]:
    return {"message": error.message, "detail": error.message}


COHERE = Dialect("cohere", _error_body)


def _search_units(documents: int) -> int:
    return math.ceil(documents / _DOCUMENTS_PER_SEARCH_UNIT)


class CohereV2RerankRequest(BaseModel):
    """The Cohere v2 rerank request."""

    model_config = ConfigDict(strict=True, title="CohereV2RerankRequest")

    model: str | None = Field(None, description="Ignored: the server serves its one model.")
    query: Query
    documents: list[Text] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="Accepted and ignored: the model's own max_length applies."
    )


class CohereV2Result(BaseModel):
    index: int
    relevance_score: float


class CohereApiVersion(BaseModel):
    version: str


class CohereBilledUnits(BaseModel):
    search_units: int


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereV2RerankResponse(BaseModel):
    id: str
    results: list[CohereV2Result]
    meta: CohereMeta


async def rerank_v2(
    service: Service, request: Request, body: CohereV2RerankRequest
) -> JSONResponse:
    ranked = await service.rank(request, body.query, body.documents, body.top_n)
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "results": [{"index": r.index, "relevance_score": r.score} for r in ranked.results],
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"search_units": _search_units(len(body.documents))},
            },
        }
    )
