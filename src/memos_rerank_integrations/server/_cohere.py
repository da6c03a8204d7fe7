"""``POST /v1/rerank`` (Cohere v1, Jina, vLLM) and ``POST /v2/rerank`` (Cohere v2).

Clients of ``/v1/rerank``: ``cohere.Client`` (and Mem0's cohere provider), LangChain's
``JinaRerank``, MemOS's ``http_bge`` reranker (its default path), vLLM-style clients.
Clients of ``/v2/rerank``: ``cohere.ClientV2`` / ``AsyncClientV2`` with ``base_url``,
langchain-cohere ``CohereRerank``, LlamaIndex ``CohereRerank``.

vLLM's clients use both routes: ``top_n: 0`` means all documents, and
``/v1/rerank`` echoes each document (``document: {"text": ...}``) unless
``return_documents`` is false, as vLLM and Jina do; Cohere's SDKs, which omit
``return_documents``, get no documents, as Cohere answers them.

This module's :data:`router` owns both routes.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from pydantic import BaseModel, Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._core import (
    ApiError,
    Dialect,
    RerankRequest,
    Route,
    Router,
    Service,
    ServiceDep,
    Text,
    check_sizes,
)

__all__ = [
    "COHERE",
    "CohereError",
    "CohereV1RerankRequest",
    "CohereV1RerankResponse",
    "CohereV2RerankRequest",
    "CohereV2RerankResponse",
    "rerank_v1",
    "rerank_v2",
    "route",
    "router",
]

# Cohere bills one search unit per query and up to 100 documents.
_DOCUMENTS_PER_SEARCH_UNIT = 100


def _error_body(error: ApiError) -> dict[str, Any]:
    return {"message": error.message, "detail": error.message}


COHERE = Dialect("cohere", _error_body)


def route(what: str) -> Route:
    """A route answered in Cohere's error shape, whose clients send ``Bearer``."""
    return Route(COHERE, "Bearer", what)


_BODY = "a JSON object with 'query' and 'documents' (Cohere {} shape)"
_TOP_N = "Keep the best N; 0 (vLLM's default) or none: all."

router = Router()


class CohereError(BaseModel):
    """An error: the message, also as ``detail`` (the FastAPI/Jina convention)."""

    message: str
    detail: str


def _search_units(documents: int) -> int:
    return math.ceil(documents / _DOCUMENTS_PER_SEARCH_UNIT)


class CohereApiVersion(BaseModel):
    version: str


class CohereBilledUnits(BaseModel):
    search_units: int


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereV1RerankRequest(RerankRequest):
    """The Cohere v1 rerank request, also spoken by Jina and vLLM."""

    documents: list[Text | dict[Text, Text]] = Field(
        min_length=1,
        description="Strings, or objects whose 'text' field (or the rank_fields) is ranked.",
    )
    top_n: int | None = Field(None, ge=0, description=_TOP_N)
    return_documents: bool | None = Field(
        None,
        description="Echo each document (as sent) in its result. Default: echo, as vLLM "
        "and Jina do; not to Cohere's SDKs, which Cohere answers without documents.",
    )
    rank_fields: list[Text] | None = Field(
        None,
        description="For object documents: the fields ranked, in this order, each as a "
        "'field: value' line (default: 'text').",
    )
    max_chunks_per_doc: int | None = Field(
        None, ge=1, description="Accepted and ignored: documents are not chunked."
    )

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data: Any) -> Any:
        return check_sizes(data, lists=("documents",), objects="documents", fields="rank_fields")


class CohereV1Document(BaseModel):
    text: str


class CohereV1Result(BaseModel):
    index: int
    relevance_score: float
    document: CohereV1Document | dict[str, str] | None = None


class CohereUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CohereV1RerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereV1Result]
    meta: CohereMeta
    usage: CohereUsage


def _ranked_fields(position: int, document: dict[str, str], rank_fields: list[str]) -> list[str]:
    """The fields of an object document that are ranked."""
    present = [field for field in rank_fields if field in document]
    if not present:
        raise ApiError(400, f"'documents[{position}]' has none of the rank_fields {rank_fields!r}.")
    return present


def document_texts(
    service: Service, documents: list[str | dict[str, str]], rank_fields: list[str] | None
) -> list[str]:
    """The text ranked for each document: a string as it is, an object's ``text``, or
    with ``rank_fields`` its named fields (each once, in that order) as ``field: value``
    lines. Every limit is checked before any text is built: the fields are looked up
    (at most documents x fields, both limited before validation), the total length
    is computed, and a total over the service's limit refused."""
    plain = not rank_fields or rank_fields == ["text"]
    fields = [] if plain or rank_fields is None else list(dict.fromkeys(rank_fields))
    chosen: list[list[str] | None] = []  # None: the document's text as it is
    total = 0
    for position, document in enumerate(documents):
        if isinstance(document, str):
            chosen.append(None)
            total += len(document)
        elif plain:
            if "text" not in document:
                raise ApiError(
                    400,
                    f"'documents[{position}]' must be a string or an object with a 'text' "
                    "field (or name its fields in 'rank_fields').",
                )
            chosen.append(None)
            total += len(document["text"])
        else:
            named = _ranked_fields(position, document, fields)
            chosen.append(named)
            # "field: value" lines joined by newlines
            total += sum(len(field) + 2 + len(document[field]) for field in named) + len(named) - 1
    service.check_text(total)
    texts = []
    for document, present in zip(documents, chosen, strict=True):
        if isinstance(document, str):
            texts.append(document)
        elif present is None:
            texts.append(document["text"])
        else:
            texts.append("\n".join(f"{field}: {document[field]}" for field in present))
    return texts


def _from_cohere_sdk(request: Request) -> bool:
    """Whether the request comes from one of Cohere's SDKs (they name themselves in
    ``X-Fern-SDK-Name``: ``cohere``, ``cohere-ai``...)."""
    return request.headers.get("x-fern-sdk-name", "").lower().startswith("cohere")


@router.rerank(
    "/v1/rerank",
    route(_BODY.format("v1")),
    errors=(CohereError,),
    response_model=CohereV1RerankResponse,
    response_model_exclude_none=True,
    summary="Rerank (Cohere v1, Jina and vLLM shape)",
)
async def rerank_v1(body: CohereV1RerankRequest, request: Request, service: ServiceDep) -> Response:
    texts = document_texts(service, body.documents, body.rank_fields)
    ranked = await service.rank(request, body.query, texts, body.top_n or None, body.budget_ms)
    echo = body.return_documents
    if echo is None:
        echo = not _from_cohere_sdk(request)
    results = []
    for result in ranked.results:
        item: dict[str, Any] = {"index": result.index, "relevance_score": result.score}
        if echo:
            document = body.documents[result.index]
            item["document"] = {"text": document} if isinstance(document, str) else document
        results.append(item)
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "model": service.model_name,
            "results": results,
            "meta": {
                "api_version": {"version": "1"},
                "billed_units": {"search_units": _search_units(len(texts))},
            },
            "usage": {"prompt_tokens": ranked.tokens, "total_tokens": ranked.tokens},
        }
    )


class CohereV2RerankRequest(RerankRequest):
    """The Cohere v2 rerank request."""

    documents: list[Text] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0, description=_TOP_N)
    max_tokens_per_doc: int | None = Field(
        None, ge=1, description="Accepted and ignored: the model's own max_length applies."
    )

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data: Any) -> Any:
        return check_sizes(data, lists=("documents",))


class CohereV2Result(BaseModel):
    index: int
    relevance_score: float


class CohereV2RerankResponse(BaseModel):
    id: str
    results: list[CohereV2Result]
    meta: CohereMeta


@router.rerank(
    "/v2/rerank",
    route(_BODY.format("v2")),
    errors=(CohereError,),
    response_model=CohereV2RerankResponse,
    summary="Rerank (Cohere v2 shape)",
)
async def rerank_v2(body: CohereV2RerankRequest, request: Request, service: ServiceDep) -> Response:
    ranked = await service.rank(
        request, body.query, body.documents, body.top_n or None, body.budget_ms
    )
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
