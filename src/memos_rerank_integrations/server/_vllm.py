"""vLLM's (and OpenAI's) other routes: ``POST /score`` (``/v1/score``), ``GET /v1/models``.

``/score`` scores ``text_1`` against ``text_2``: one query against one text or a
list of texts, or two lists of equal length pair by pair. Scores come back in
input order (not ranked), like vLLM's. Errors come in Cohere's shape (``message``
and ``detail``). This module's :data:`router` owns the three routes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._cohere import CohereError, route
from ._core import (
    BUDGET_HEADER,
    ApiError,
    Budgeted,
    Query,
    Router,
    ServiceDep,
    Text,
    check_sizes,
)

__all__ = ["ModelList", "ScoreRequest", "ScoreResponse", "models", "router", "score"]


class ScoreRequest(Budgeted):
    """vLLM's score request."""

    model_config = ConfigDict(strict=True)

    model: str | None = Field(None, description="Ignored: the server serves its one model.")
    text_1: Query | list[Query] = Field(description="The query, or one query per pair.")
    text_2: Text | list[Text] = Field(description="The texts to score.")
    truncate_prompt_tokens: int | None = Field(
        None,
        ge=-1,
        description="Accepted and ignored: the model's own max_length applies (vLLM's -1).",
    )

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data: Any) -> Any:
        return check_sizes(data, lists=("text_1", "text_2"))


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


router = Router()
_ROUTE = route("a JSON object with 'text_1' and 'text_2' (vLLM score shape)")


async def score(body: ScoreRequest, request: Request, service: ServiceDep) -> Response:
    queries = body.text_1 if isinstance(body.text_1, list) else [body.text_1]
    texts = body.text_2 if isinstance(body.text_2, list) else [body.text_2]
    if not queries or not texts:
        raise ApiError(400, "'text_1' and 'text_2' must not be empty.")
    if len(queries) == 1:
        ranked = await service.rank(request, queries[0], texts, None, body.budget_ms)
        scores = {result.index: result.score for result in ranked.results}
        ordered = [scores[index] for index in range(len(texts))]
    elif len(queries) == len(texts):
        if body.budget_ms is not None or request.headers.get(BUDGET_HEADER) is not None:
            raise ApiError(
                400,
                "A latency budget ranks one query's documents; pairwise /score (one query "
                "per text) takes none.",
            )
        ranked = await service.rank_pairs(
            request, [(query, [text]) for query, text in zip(queries, texts, strict=True)]
        )
        ordered = [result.score for result in ranked.results]
    else:
        raise ApiError(
            400,
            f"'text_1' has {len(queries)} texts and 'text_2' {len(texts)}: send one "
            "query, or two lists of the same length (scored pair by pair).",
        )
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": service.model_name,
            "data": [
                {"index": index, "object": "score", "score": value}
                for index, value in enumerate(ordered)
            ],
            "usage": {"prompt_tokens": ranked.tokens, "total_tokens": ranked.tokens},
        }
    )


for _path in ("/score", "/v1/score"):
    router.rerank(
        _path,
        _ROUTE,
        errors=(CohereError,),
        response_model=ScoreResponse,
        summary="Score text pairs (vLLM shape; scores in input order)",
    )(score)


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@router.status(
    "/v1/models", response_model=ModelList, summary="The served model (OpenAI / vLLM list)"
)
async def models(service: ServiceDep) -> Response:
    body = {
        "object": "list",
        "data": [
            {
                "id": service.model_name,
                "object": "model",
                "created": service.started_at,
                "owned_by": "memos-rerank-integrations",
                "root": service.model_name,
                "max_model_len": service.model_limit("max_length"),
            }
        ],
    }
    return JSONResponse(body)
