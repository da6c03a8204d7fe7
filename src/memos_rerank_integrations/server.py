"""A self-hosted rerank server: one local model behind the MemOS and Cohere v2 APIs.

``POST /rerank`` speaks the MemOS "Rerank Memory" shape (auth ``Token <key>``),
``POST /v2/rerank`` the Cohere v2 shape (auth ``Bearer <key>``), so
:class:`~memos_rerank_integrations.MemOSReranker` and ``cohere.ClientV2`` work
against it unchanged. ``GET /health`` needs no key and never waits for the model.

Every request is authenticated, size-checked and validated on the event loop
before any model work; the model runs in one worker thread through a
:class:`~memos_rerank_integrations._batcher.MicroBatcher`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ._batcher import MicroBatcher
from ._exceptions import InvalidInputError, RerankError
from ._extras import missing_extra
from ._types import Reranker, RerankResult

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra("server", exc.name or "starlette", feature="The rerank server") from exc

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

# MemOS business codes (see the MemOS API docs); Cohere errors carry only a message.
_BAD_BODY = 40000
_EMPTY_FIELD = 40002
_EMPTY_DOCUMENTS = 40003
_KEY_REQUIRED = 40100
_KEY_INVALID = 40132
_INTERNAL = 50000

# Cohere bills one search unit per query and up to 100 documents.
_DOCUMENTS_PER_SEARCH_UNIT = 100
# usage counts are an estimate: exact counts would need the model's tokenizer on the
# event loop for every request; ~4 characters per token is the usual rule of thumb.
_CHARS_PER_TOKEN = 4


class _RequestError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _RerankRequest:
    query: str
    documents: list[str]
    top_n: int | None


@dataclass(frozen=True)
class _Dialect:
    """What differs between the two APIs: auth scheme, error body, response body."""

    scheme: str
    error_body: Callable[[_RequestError], dict[str, Any]]
    response_body: Callable[[_RerankRequest, list[RerankResult], str], dict[str, Any]]


def _memos_error(error: _RequestError) -> dict[str, Any]:
    return {"code": error.code, "message": error.message}


def _cohere_error(error: _RequestError) -> dict[str, Any]:
    return {"message": error.message}


def _estimate_tokens(request: _RerankRequest) -> int:
    characters = len(request.query) * len(request.documents) + sum(map(len, request.documents))
    return math.ceil(characters / _CHARS_PER_TOKEN)


def _memos_response(
    request: _RerankRequest, results: list[RerankResult], model_name: str
) -> dict[str, Any]:
    tokens = _estimate_tokens(request)
    return {
        "id": str(uuid.uuid4()),
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": [
            {
                "index": result.index,
                "document": {"text": request.documents[result.index]},
                "relevance_score": result.score,
            }
            for result in results
        ],
    }


def _cohere_response(
    request: _RerankRequest, results: list[RerankResult], model_name: str
) -> dict[str, Any]:
    search_units = math.ceil(len(request.documents) / _DOCUMENTS_PER_SEARCH_UNIT)
    return {
        "id": str(uuid.uuid4()),
        "results": [{"index": r.index, "relevance_score": r.score} for r in results],
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {"search_units": search_units},
        },
    }


_MEMOS = _Dialect(scheme="Token", error_body=_memos_error, response_body=_memos_response)
_COHERE = _Dialect(scheme="Bearer", error_body=_cohere_error, response_body=_cohere_response)


def _check_key(request: Request, dialect: _Dialect, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization")
    if not header:
        raise _RequestError(
            401,
            _KEY_REQUIRED,
            f"An API key is required: send the header 'Authorization: {dialect.scheme} <key>'.",
        )
    expected = f"{dialect.scheme} {api_key}".encode()
    if not hmac.compare_digest(header.strip().encode(), expected):
        raise _RequestError(
            401,
            _KEY_INVALID,
            f"The API key is invalid; send 'Authorization: {dialect.scheme} <key>' "
            "with the key the server was started with.",
        )


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = _RequestError(
        413, _BAD_BODY, f"The request body is larger than the server's limit of {limit} bytes."
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _bad(message: str, code: int = _BAD_BODY) -> _RequestError:
    return _RequestError(400, code, message)


def _parse(body: bytes, max_documents: int) -> _RerankRequest:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise _bad("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise _bad("The request body must be a JSON object with 'query' and 'documents'.")
    query = payload.get("query")
    if not isinstance(query, str):
        raise _bad(f"'query' must be a string, got {_json_type(query)}.")
    if not query.strip():
        raise _bad("'query' must not be empty.", _EMPTY_FIELD)
    documents = payload.get("documents")
    if not isinstance(documents, list):
        raise _bad(f"'documents' must be a list of strings, got {_json_type(documents)}.")
    if not documents:
        raise _bad("'documents' must not be empty.", _EMPTY_DOCUMENTS)
    if len(documents) > max_documents:
        raise _bad(
            f"Too many documents: {len(documents)}; this server accepts at most "
            f"{max_documents} per request. Split the call."
        )
    for position, document in enumerate(documents):
        if not isinstance(document, str):
            raise _bad(f"documents[{position}] must be a string, got {_json_type(document)}.")
    top_n = payload.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise _bad(f"'top_n' must be a positive integer or omitted, got {json.dumps(top_n)}.")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {_json_type(model)}.")
    max_tokens = payload.get("max_tokens_per_doc")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _bad("'max_tokens_per_doc' must be a positive integer or omitted.")
    return _RerankRequest(query=query, documents=documents, top_n=top_n)


def _json_type(value: object) -> str:
    if value is None:
        return "null (or nothing)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object"})
    return names.get(type(value), type(value).__name__)


def create_app(
    reranker: Reranker,
    *,
    model_name: str,
    api_key: str | None = None,
    max_documents: int = 1000,
    max_body_bytes: int = 4 * 1024 * 1024,
    batching: bool = True,
    batch_window_ms: float = 5.0,
    max_batch_documents: int = 128,
) -> Starlette:
    """Build the ASGI app serving ``reranker`` (typically a local backend).

    ``model_name`` is reported in responses and ``/health``. With ``api_key`` set,
    both rerank endpoints require it (``/health`` never does). Requests with more
    than ``max_documents`` documents get 400, bodies over ``max_body_bytes`` get 413,
    both before any model work. ``batching``, ``batch_window_ms`` and
    ``max_batch_documents`` configure the :class:`MicroBatcher` (``app.state.batcher``),
    whose worker thread stops when the app shuts down.
    """
    for name, value in (("max_documents", max_documents), ("max_body_bytes", max_body_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive int, got {value!r}.")
    if api_key is not None and not api_key.strip():
        raise InvalidInputError("api_key must not be empty; pass None to disable authentication.")
    batcher = MicroBatcher(
        reranker,
        enabled=batching,
        batch_window_ms=batch_window_ms,
        max_batch_documents=max_batch_documents,
    )

    def endpoint(dialect: _Dialect) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                _check_key(request, dialect, api_key)
                parsed = _parse(await _read_body(request, max_body_bytes), max_documents)
                results = await _score(batcher, parsed)
            except _RequestError as error:
                headers = {"WWW-Authenticate": dialect.scheme} if error.status == 401 else None
                return JSONResponse(dialect.error_body(error), error.status, headers=headers)
            return JSONResponse(dialect.response_body(parsed, results, model_name))

        return handle

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": model_name,
                "busy": batcher.busy,
                "queued_requests": batcher.queued,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = Starlette(
        routes=[
            Route("/rerank", endpoint(_MEMOS), methods=["POST"]),
            Route("/v2/rerank", endpoint(_COHERE), methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return app


async def _score(batcher: MicroBatcher, request: _RerankRequest) -> list[RerankResult]:
    try:
        return await batcher.rerank(request.query, request.documents, request.top_n)
    except InvalidInputError as exc:
        # The backend's own limits (e.g. a query longer than it accepts).
        raise _bad(exc.message) from None
    except RerankError as exc:
        logger.warning("Reranking failed: %s", exc)
        raise _RequestError(503, _INTERNAL, f"The model failed: {exc.message}") from None
    except Exception:
        logger.exception("Unexpected error while reranking")
        raise _RequestError(500, _INTERNAL, "Internal error while reranking.") from None
