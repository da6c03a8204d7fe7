"""A self-hosted rerank server: one local model behind the APIs its clients speak.

======================  =====================================================
``POST /rerank``        MemOS "Rerank Memory" shape (``documents``), or
                        text-embeddings-inference's (``texts``)
``POST /v1/rerank``     Cohere v1 / Jina / vLLM shape
``POST /v2/rerank``     Cohere v2 shape
``POST /score``         vLLM's score shape (also ``/v1/score``)
``GET /info``           text-embeddings-inference's model info, with the limits
``GET /v1/models``      the served model, OpenAI/vLLM list
``GET /health``         whether the model can serve (503 with a reason if not;
                        ``HEAD`` too)
``GET /metrics``        Prometheus metrics (``create_app(..., metrics=False)``: off)
``GET /openapi.json``   OpenAPI description generated from the request models
======================  =====================================================

Every rerank route accepts ``Authorization: Bearer <key>`` and ``Token <key>``
(schemes in any case). Every request is authenticated, size-checked, validated
and budgeted on the event loop before any model work; the model runs in one
worker thread through a :class:`MicroBatcher`. :func:`config` builds the
``uvicorn.Config`` that ``memos-rerank serve`` runs: a timer for every state of a
connection (request head, unread body, unread answer), eviction of connections
that wait for their clients at the connection limit, and a bounded shutdown.
"""

from __future__ import annotations

from .._extras import missing_extra
from ._batcher import BatcherHealth, BatchReport, MicroBatcher

try:
    import fastapi  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra("server", exc.name or "fastapi", feature="The rerank server") from exc

from ._app import DEFAULT_MAX_REQUEST_TOKENS, create_app
from ._uvicorn import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_SHUTDOWN_TIMEOUT,
    HeaderTimeoutProtocol,
    config,
)

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_LIMIT_CONCURRENCY",
    "DEFAULT_MAX_REQUEST_TOKENS",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "BatchReport",
    "BatcherHealth",
    "HeaderTimeoutProtocol",
    "MicroBatcher",
    "config",
    "create_app",
]
