"""The ASGI app: one :class:`Service` and the routers of every dialect.

==================  ===================================================================
:mod:`._memos`      ``POST /rerank`` (MemOS; a TEI body is answered by :mod:`._tei`)
:mod:`._tei`        ``GET /info``
:mod:`._cohere`     ``POST /v1/rerank``, ``POST /v2/rerank``
:mod:`._vllm`       ``POST /score``, ``POST /v1/score``, ``GET /v1/models``
:mod:`._status`     ``GET /health``
:mod:`._metrics`    ``GET /metrics`` (with ``metrics=True``)
==================  ===================================================================

:func:`create_app` checks the options, builds the service, the batcher, the guard
and the metrics, and includes the routers; :func:`_handle_errors` answers every
error in the dialect of its route, and :func:`_openapi` publishes the schema.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__
from .._exceptions import InvalidInputError
from .._types import Reranker, optional_positive_int, positive_int
from . import _cohere, _memos, _status, _tei, _vllm
from ._batcher import MicroBatcher
from ._core import (
    INTERNAL,
    ApiError,
    ClientGone,
    Dialect,
    RequestLimits,
    Route,
    Router,
    Service,
    check_api_key,
    error_response,
    from_validation_errors,
)
from ._guard import Guard

__all__ = ["create_app"]

logger = logging.getLogger("memos_rerank_integrations.server")

DEFAULT_MAX_REQUEST_TOKENS = 262_144

# In this order in the OpenAPI description.
_ROUTERS: tuple[Router, ...] = (
    _memos.router,
    _cohere.router,
    _vllm.router,
    _tei.router,
    _status.router,
)
# Paths FastAPI serves itself that keep their own label in the metrics.
_DOCS_ROUTES = ("/openapi.json", "/docs")


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
    max_batch_tokens: int | None = None,
    model_workers: int = 1,
    model_cores: int | None = None,
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

    ``batching``, ``batch_window_ms``, ``max_batch_documents``, ``max_batch_tokens``
    (batches bounded by the requests' token counts as well, a longer request scored in
    slices; ``serve`` sets 2048 on a CPU), ``model_workers`` (that
    many threads run batches at once, each on a replica of the reranker) and
    ``model_cores`` (the torch threads the workers share: the first worker runs on
    what the busy others leave free, each other on its share; ``None`` leaves torch's
    threads as they are) configure the :class:`MicroBatcher` (``app.state.batcher``),
    whose worker threads stop when the app shuts down.

    With ``metrics`` (the default), ``GET /metrics`` serves Prometheus metrics (no
    key needed) from a registry of this app's own (``app.state.metrics.registry``),
    so several apps can live in one process.
    """
    positive_int("max_documents", max_documents)
    positive_int("max_body_bytes", max_body_bytes)
    optional_positive_int("max_request_tokens", max_request_tokens)
    if isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)):
        raise InvalidInputError(f"body_timeout must be a number, got {body_timeout!r}.")
    if not body_timeout > 0:
        raise InvalidInputError(f"body_timeout must be > 0, got {body_timeout!r}.")
    if not isinstance(model_name, str) or not model_name.strip():
        raise InvalidInputError(f"model_name must be a non-empty str, got {model_name!r}.")
    key = check_api_key(api_key)

    routers = list(_ROUTERS)
    telemetry: Any = None
    batcher = MicroBatcher(
        reranker,
        enabled=batching,
        batch_window_ms=batch_window_ms,
        max_batch_documents=max_batch_documents,
        max_batch_tokens=max_batch_tokens,
        workers=model_workers,
        cores=model_cores,
        on_batch=lambda report: telemetry.on_batch(report) if telemetry else None,
    )
    if metrics:
        from . import _metrics

        routers.append(_metrics.router)
        paths = [r.path for router in routers for r in router.routes if isinstance(r, APIRoute)]
        telemetry = _metrics.Metrics(batcher, routes=[*paths, *_DOCS_ROUTES])
    service = Service(
        reranker,
        batcher,
        model_name=model_name,
        max_documents=max_documents,
        max_request_tokens=max_request_tokens,
        max_body_bytes=max_body_bytes,
        on_budget=telemetry.on_budget if telemetry else None,
    )
    on_error: Callable[[ApiError], None] = telemetry.on_error if telemetry else _no_op

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.close()
            service.close()

    app = FastAPI(
        title="memos-rerank",
        version=__version__,
        description="One reranking model behind the APIs its clients speak: MemOS, "
        "text-embeddings-inference, Cohere v1/v2, Jina and vLLM. Every rerank route takes "
        "'Authorization: Bearer <key>' or 'Token <key>' when the server has a key.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.service = service
    app.state.metrics = telemetry
    guarded = {path: route for router in routers for path, route in router.guarded.items()}
    for router in routers:
        app.include_router(router)
    _handle_errors(app, guarded, on_error)
    app.openapi = lambda: _openapi(app, guarded if key is not None else {})  # type: ignore[method-assign]

    app.add_middleware(
        Guard,
        routes=guarded,
        api_key=key,
        limits=RequestLimits(max_documents=max_documents),
        max_body_bytes=max_body_bytes,
        body_timeout=float(body_timeout),
        on_error=lambda error: on_error(error),
    )
    if telemetry is not None:
        from ._metrics import MetricsMiddleware

        app.add_middleware(MetricsMiddleware, metrics=telemetry)  # outermost: sees everything
    return app


def _handle_errors(
    app: FastAPI, routes: Mapping[str, Route], on_error: Callable[[ApiError], None]
) -> None:
    """Answer every error in the dialect of its route (MemOS's off the routes), and
    count it with ``on_error``."""

    def route_dialect(request: Request) -> Dialect:
        chosen = getattr(request.state, "dialect", None)
        if isinstance(chosen, Dialect):
            return chosen
        route = routes.get(request.url.path)
        return route.dialect if route is not None else _memos.MEMOS

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        route = routes.get(request.url.path)
        if route is None:
            error = from_validation_errors(exc.errors(), what="a JSON object")
            on_error(error)
            return error_response(route_dialect(request), error)
        error = from_validation_errors(exc.errors(), what=route.what, tags=route.union_tags)
        on_error(error)
        return error_response(route.dialect_of(exc.body), error)

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
        return error_response(exc.dialect or route_dialect(request), exc)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        on_error(ApiError(499, "client disconnected", kind="client_disconnected"))
        return Response(status_code=499)  # never sent: the connection is gone

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        error = ApiError(500, "Internal server error.", code=INTERNAL, kind="internal")
        on_error(error)
        return error_response(route_dialect(request), error)


def _openapi(app: FastAPI, secured: Mapping[str, Route]) -> dict[str, Any]:
    """The app's OpenAPI description, built once: validation errors are answered
    with 400 in each dialect's shape, never 422, and the ``secured`` routes (those
    of a server with a key) take a bearer or a MemOS token."""
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
        if secured:
            components["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "'Token <key>', as MemOS clients send it.",
                },
            }
            for path in secured:
                schema["paths"][path]["post"]["security"] = [{"bearer": []}, {"token": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def _no_op(error: ApiError) -> None:
    return None
