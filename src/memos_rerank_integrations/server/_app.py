"""The ASGI app: routes of every dialect over one :class:`Service`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Discriminator, Tag
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from .._exceptions import InvalidInputError
from .._types import Reranker
from . import _cohere, _memos, _tei, _vllm
from ._batcher import MicroBatcher
from ._core import (
    INTERNAL,
    ApiError,
    ClientGone,
    Dialect,
    Service,
    check_api_key,
    error_response,
    from_validation_errors,
)
from ._guard import Guard

__all__ = ["create_app"]

logger = logging.getLogger("memos_rerank_integrations.server")

DEFAULT_MAX_REQUEST_TOKENS = 262_144


@dataclass(frozen=True)
class _Route:
    dialect: Dialect
    scheme: str  # the auth scheme the dialect's clients send
    what: str  # the body it expects, for error messages


_RERANK_BODY = (
    "a JSON object with 'query' and 'documents' (MemOS shape) or 'query' and 'texts' "
    "(text-embeddings-inference shape)"
)
_COHERE_BODY = "a JSON object with 'query' and 'documents' (Cohere {} shape)"
_SCORE_BODY = "a JSON object with 'text_1' and 'text_2' (vLLM score shape)"

_ROUTES = {
    "/rerank": _Route(_memos.MEMOS, "Token", _RERANK_BODY),
    "/v1/rerank": _Route(_cohere.COHERE, "Bearer", _COHERE_BODY.format("v1")),
    "/v2/rerank": _Route(_cohere.COHERE, "Bearer", _COHERE_BODY.format("v2")),
    "/score": _Route(_cohere.COHERE, "Bearer", _SCORE_BODY),
    "/v1/score": _Route(_cohere.COHERE, "Bearer", _SCORE_BODY),
}
_UNION_TAGS = frozenset({"memos", "tei"})
_STATUS_ROUTES = ("/health", "/info", "/v1/models", "/metrics", "/openapi.json", "/docs")


def _rerank_shape(body: Any) -> str:
    """Which of the two /rerank dialects a body speaks: TEI's has 'texts'."""
    if isinstance(body, dict):
        return "tei" if "texts" in body and "documents" not in body else "memos"
    return "tei" if isinstance(body, _tei.TEIRerankRequest) else "memos"


RerankBody = Annotated[
    Annotated[_memos.MemOSRerankRequest, Tag("memos")]
    | Annotated[_tei.TEIRerankRequest, Tag("tei")],
    Discriminator(_rerank_shape),
]


def _errors(model: Any, *extra: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    models = (model, *extra)
    schema: Any = models[0] if len(models) == 1 else models[0] | models[1]
    described = {
        400: "Invalid request (names the field), or the model refused its input",
        401: "Missing or invalid API key",
        408: "The body did not arrive in time",
        413: "Body over the size limit, or the request over the token budget",
        500: "The model gave an invalid answer, or an internal error",
        503: "The model failed, or the server is shutting down",
    }
    return {status: {"model": schema, "description": text} for status, text in described.items()}


class HealthResponse(BaseModel):
    status: str
    reason: str | None = None
    model: str
    busy: bool
    queued_requests: int


def _check_positive(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}.")


def create_app(
    reranker: Reranker,
    *,
    model_name: str,
    api_key: str | None = None,
    max_documents: int = 1000,
    max_body_bytes: int = 4 * 1024 * 1024,
    max_request_tokens: int | None = DEFAULT_MAX_REQUEST_TOKENS,
    body_timeout: float = 30.0,
    batching: bool = True,
    batch_window_ms: float = 5.0,
    max_batch_documents: int = 32,
    metrics: bool = True,
) -> FastAPI:
    """Build the ASGI app serving ``reranker`` (typically a local backend).

    ``model_name`` is reported in responses, ``/health``, ``/info`` and
    ``/v1/models``. With ``api_key`` set, every rerank route requires it as
    ``Authorization: Bearer <key>`` or ``Token <key>`` (``/health`` never does);
    surrounding whitespace is stripped, and a key with control or non-ASCII
    characters is an :class:`InvalidInputError` here, at start-up.

    Limits, all checked before any model work: more than ``max_documents``
    documents is a 400; a body over ``max_body_bytes`` a 413 (a declared length
    is refused unread, a chunked body as soon as it passes the limit); a body
    not received within ``body_timeout`` seconds a 408; a request that would
    score more than ``max_request_tokens`` tokens (the backend's
    ``count_tokens`` when it has one, else the clients' estimate: a token per
    non-ASCII character and per four ASCII ones; ``None``: no budget) a 413 that
    says how to split it.

    ``batching``, ``batch_window_ms`` and ``max_batch_documents`` configure the
    :class:`MicroBatcher` (``app.state.batcher``), whose worker thread stops when
    the app shuts down.

    With ``metrics`` (the default), ``GET /metrics`` serves Prometheus metrics (no
    key needed) from a registry of this app's own (``app.state.metrics.registry``),
    so several apps can live in one process.
    """
    _check_positive("max_documents", max_documents)
    _check_positive("max_body_bytes", max_body_bytes)
    _check_positive("max_request_tokens", max_request_tokens, allow_none=True)
    if isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)):
        raise InvalidInputError(f"body_timeout must be a number, got {body_timeout!r}.")
    if not body_timeout > 0:
        raise InvalidInputError(f"body_timeout must be > 0, got {body_timeout!r}.")
    if not isinstance(model_name, str) or not model_name.strip():
        raise InvalidInputError(f"model_name must be a non-empty str, got {model_name!r}.")
    key = check_api_key(api_key)

    telemetry: Any = None
    batcher = MicroBatcher(
        reranker,
        enabled=batching,
        batch_window_ms=batch_window_ms,
        max_batch_documents=max_batch_documents,
        on_batch=lambda report: telemetry.on_batch(report) if telemetry else None,
    )
    if metrics:
        from ._metrics import Metrics

        telemetry = Metrics(batcher, routes=[*_ROUTES, *_STATUS_ROUTES])
    tokenizer_workers = min(4, os.cpu_count() or 1)
    tokenizer = ThreadPoolExecutor(
        max_workers=tokenizer_workers, thread_name_prefix="memos-rerank-tokenize"
    )
    service = Service(
        reranker,
        batcher,
        model_name=model_name,
        max_documents=max_documents,
        max_request_tokens=max_request_tokens,
        tokenizer=tokenizer,
    )
    on_error: Callable[[ApiError], None] = telemetry.on_error if telemetry else _no_op

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.close()
            tokenizer.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="memos-rerank",
        version=__version__,
        description="One reranking model behind the APIs its clients speak: MemOS, "
        "text-embeddings-inference, Cohere v1/v2, Jina and vLLM. Every rerank route takes "
        "'Authorization: Bearer <key>' or 'Token <key>' when the server has a key.",
        lifespan=lifespan,
    )
    scale = _tei.score_scale(reranker)
    started_at = int(time.time())
    app.state.batcher = batcher
    app.state.service = service
    app.state.metrics = telemetry

    def route_dialect(request: Request) -> Dialect:
        chosen = getattr(request.state, "dialect", None)
        if isinstance(chosen, Dialect):
            return chosen
        route = _ROUTES.get(request.url.path)
        return route.dialect if route is not None else _memos.MEMOS

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        route = _ROUTES.get(request.url.path)
        what = route.what if route is not None else "a JSON object"
        error = from_validation_errors(exc.errors(), what=what, tags=_UNION_TAGS)
        on_error(error)
        dialect = route_dialect(request)
        if request.url.path == "/rerank" and _rerank_shape(exc.body) == "tei":
            dialect = _tei.TEI
        return error_response(dialect, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI's own answers (a body its JSON parser gave up on, unknown routes and
        # methods), in the dialect's error shape like every other error.
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            message = (
                "The request body could not be read as JSON: it is nested too deeply or "
                "holds a number too large to parse."
            )
        else:
            message = str(exc.detail)
        error = ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
        on_error(error)
        return error_response(route_dialect(request), error)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        on_error(exc)
        return error_response(route_dialect(request), exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        on_error(ApiError(499, "client disconnected", kind="client_disconnected"))
        return Response(status_code=499)  # never sent: the connection is gone

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        error = ApiError(500, "Internal server error.", code=INTERNAL, kind="internal")
        on_error(error)
        return error_response(route_dialect(request), error)

    @app.post(
        "/rerank",
        response_model=_memos.MemOSRerankResponse | list[_tei.TEIRank],
        summary="Rerank (MemOS shape, or TEI's with 'texts')",
        responses=_errors(_memos.MemOSError, _tei.TEIError),
        description="With 'documents': the MemOS shape, answered with 'results'. With "
        "'texts': text-embeddings-inference's shape, answered with a bare list.",
        tags=["rerank"],
    )
    async def rerank(body: RerankBody, request: Request) -> Response:
        if isinstance(body, _tei.TEIRerankRequest):
            request.state.dialect = _tei.TEI
            return await _tei.rerank(service, request, body, scale)
        return await _memos.rerank(service, request, body)

    @app.post(
        "/v1/rerank",
        response_model=_cohere.CohereV1RerankResponse,
        response_model_exclude_none=True,
        summary="Rerank (Cohere v1, Jina and vLLM shape)",
        responses=_errors(_cohere.CohereError),
        tags=["rerank"],
    )
    async def rerank_v1(body: _cohere.CohereV1RerankRequest, request: Request) -> Response:
        return await _cohere.rerank_v1(service, request, body)

    @app.post(
        "/v2/rerank",
        response_model=_cohere.CohereV2RerankResponse,
        summary="Rerank (Cohere v2 shape)",
        responses=_errors(_cohere.CohereError),
        tags=["rerank"],
    )
    async def rerank_v2(body: _cohere.CohereV2RerankRequest, request: Request) -> Response:
        return await _cohere.rerank_v2(service, request, body)

    for path in ("/score", "/v1/score"):

        @app.post(
            path,
            response_model=_vllm.ScoreResponse,
            summary="Score text pairs (vLLM shape; scores in input order)",
            responses=_errors(_cohere.CohereError),
            tags=["rerank"],
        )
        async def score(body: _vllm.ScoreRequest, request: Request) -> Response:
            return await _vllm.score(service, request, body)

    @app.get(
        "/info",
        response_model=_tei.TEIInfo,
        summary="The served model and limits (text-embeddings-inference's fields)",
        tags=["status"],
    )
    async def info() -> Response:
        return JSONResponse(
            _tei.info(
                service,
                version=__version__,
                max_body_bytes=max_body_bytes,
                workers=tokenizer_workers,
            )
        )

    @app.get(
        "/v1/models",
        response_model=_vllm.ModelList,
        summary="The served model (OpenAI / vLLM list)",
        tags=["status"],
    )
    async def models() -> Response:
        return JSONResponse(_vllm.models(service, created=started_at))

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "The model cannot serve."}},
        summary="Whether the model can serve (no key needed; never waits for the model)",
        tags=["status"],
    )
    async def health() -> Response:
        state = batcher.health()
        if not state.ok:
            batcher.probe()  # finds out, in the background, whether the model recovered
        body: dict[str, Any] = {
            "status": "ok" if state.ok else "unavailable",
            "reason": state.reason,
            "model": model_name,
            "busy": batcher.busy,
            "queued_requests": batcher.queued,
        }
        return JSONResponse(body, 200 if state.ok else 503)

    if telemetry is not None:
        from ._metrics import CONTENT_TYPE_LATEST, MetricsMiddleware

        @app.get(
            "/metrics",
            summary="Prometheus metrics (no key needed)",
            tags=["status"],
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
        )
        async def prometheus_metrics() -> Response:
            return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        # Validation errors are answered with 400 in each dialect's shape, never 422.
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            if key is not None:
                components["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "token": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "Authorization",
                        "description": "'Token <key>', as MemOS clients send it.",
                    },
                }
                for path in _ROUTES:
                    schema["paths"][path]["post"]["security"] = [{"bearer": []}, {"token": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(
        Guard,
        routes={path: (route.dialect, route.scheme) for path, route in _ROUTES.items()},
        api_key=key,
        max_body_bytes=max_body_bytes,
        body_timeout=float(body_timeout),
        on_error=lambda error: on_error(error),
    )
    if telemetry is not None:
        app.add_middleware(MetricsMiddleware, metrics=telemetry)  # outermost: sees everything
    return app


def _no_op(error: ApiError) -> None:
    return None
