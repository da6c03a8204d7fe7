"""``POST /rerank`` in the MemOS cloud "Rerank Memory" shape.

Clients: :class:`~memos_rerank_integrations.MemOSReranker`, the MemOS
documentation's ``requests.post``, infinity's client, this package's
:class:`~memos_rerank_integrations.HTTPReranker` (``Bearer``).

This module's :data:`router` owns ``/rerank``, which text-embeddings-inference's
clients call too: its body is a tagged union of the two requests (TEI's has
``texts`` instead of ``documents``), and a TEI body is answered by
:func:`._tei.rerank`, in TEI's shapes.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import _tei
from ._core import (
    ApiError,
    Dialect,
    RerankRequest,
    Route,
    Router,
    ServiceDep,
    Text,
    check_sizes,
)

__all__ = [
    "MEMOS",
    "MemOSError",
    "MemOSRerankRequest",
    "MemOSRerankResponse",
    "RerankBody",
    "rerank",
    "router",
]


def _error_body(error: ApiError) -> dict[str, Any]:
    return {"code": error.code, "message": error.message, "detail": error.message}


MEMOS = Dialect("memos", _error_body)


class MemOSError(BaseModel):
    """A MemOS error: its business code (40000 bad body, 40002 empty field, 40003 empty
    documents, 40100 key required, 40132 key invalid, 50000 internal), the message, and
    the same message as ``detail`` (the FastAPI/Jina convention)."""

    code: int
    message: str
    detail: str


class MemOSRerankRequest(RerankRequest):
    """The MemOS "Rerank Memory" request."""

    documents: list[Text] = Field(min_length=1, description="Texts to rank against the query.")
    top_n: int | None = Field(None, ge=1, description="Keep the best N (default: all).")

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data: Any) -> Any:
        return check_sizes(data, lists=("documents",))


class MemOSDocument(BaseModel):
    text: str


class MemOSResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    document: MemOSDocument
    relevance_score: float = Field(description="Relevance in [0, 1], higher is better.")


class MemOSUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class MemOSRerankResponse(BaseModel):
    """Results best first (MemOS does not wrap them in code/message/data)."""

    id: str
    model: str
    usage: MemOSUsage
    results: list[MemOSResult]


def _shape(body: Any) -> str:
    """Which of the two /rerank dialects a body speaks: TEI's has 'texts'."""
    if isinstance(body, dict):
        return "tei" if "texts" in body and "documents" not in body else "memos"
    return "tei" if isinstance(body, _tei.TEIRerankRequest) else "memos"


RerankBody = Annotated[
    Annotated[MemOSRerankRequest, Tag("memos")] | Annotated[_tei.TEIRerankRequest, Tag("tei")],
    Discriminator(_shape),
]

_ROUTE = Route(
    MEMOS,
    "Token",
    "a JSON object with 'query' and 'documents' (MemOS shape) or 'query' and 'texts' "
    "(text-embeddings-inference shape)",
    union_tags=frozenset({"memos", "tei"}),
    speaks=lambda body: _tei.TEI if _shape(body) == "tei" else MEMOS,
)

router = Router()


@router.rerank(
    "/rerank",
    _ROUTE,
    errors=(MemOSError, _tei.TEIError),
    response_model=MemOSRerankResponse | list[_tei.TEIRank],
    summary="Rerank (MemOS shape, or TEI's with 'texts')",
    description="With 'documents': the MemOS shape, answered with 'results'. With "
    "'texts': text-embeddings-inference's shape, answered with a bare list.",
)
async def rerank(body: RerankBody, request: Request, service: ServiceDep) -> Response:
    if isinstance(body, _tei.TEIRerankRequest):
        return await _tei.rerank(service, request, body)
    ranked = await service.rank(request, body.query, body.documents, body.top_n, body.budget_ms)
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "model": service.model_name,
            "usage": {"prompt_tokens": ranked.tokens, "total_tokens": ranked.tokens},
            "results": [
                {
                    "index": result.index,
                    "document": {"text": body.documents[result.index]},
                    "relevance_score": result.score,
                }
                for result in ranked.results
            ],
        }
    )
