"""``POST /rerank`` in the MemOS cloud "Rerank Memory" shape.

Clients: :class:`~memos_rerank_integrations.MemOSReranker`, the MemOS
documentation's ``requests.post``, infinity's client, this package's
:class:`~memos_rerank_integrations.HTTPReranker` (``Bearer``).
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from ._core import ApiError, Dialect, Query, Service, Text

__all__ = ["MEMOS", "MemOSError", "MemOSRerankRequest", "MemOSRerankResponse", "rerank"]


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


class MemOSRerankRequest(BaseModel):
    """The MemOS "Rerank Memory" request."""

    model_config = ConfigDict(strict=True, title="MemOSRerankRequest")

    model: str | None = Field(None, description="Ignored: the server serves its one model.")
    query: Query
    documents: list[Text] = Field(min_length=1, description="Texts to rank against the query.")
    top_n: int | None = Field(None, ge=1, description="Keep the best N (default: all).")


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


async def rerank(service: Service, request: Request, body: MemOSRerankRequest) -> JSONResponse:
    ranked = await service.rank(request, body.query, body.documents, body.top_n)
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
