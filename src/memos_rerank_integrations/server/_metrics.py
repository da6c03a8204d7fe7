"""``GET /metrics``: Prometheus text format, one registry per app (this module's
:data:`router`, included when the app has metrics).

=============================================  ===========================================
``memos_rerank_requests_total``                HTTP requests by ``route``, ``method``, ``status``
``memos_rerank_request_duration_seconds``      request latency histogram by ``route``
``memos_rerank_documents_scored_total``        documents the model scored (answered calls)
``memos_rerank_batch_requests``                histogram: requests fused per model turn
``memos_rerank_batch_documents``               histogram: documents per model turn
``memos_rerank_queue_depth``                   requests waiting for the model
``memos_rerank_model_busy_seconds_total``      seconds the model spent computing
``memos_rerank_model_up``                      1 while ``/health`` is ok, else 0
``memos_rerank_errors_total``                  error answers by ``kind``
=============================================  ===========================================

Error kinds: ``invalid_request`` (400), ``unauthorized`` (401), ``timeout`` (408),
``too_large`` and ``token_budget`` (413), ``model_error`` and ``unavailable`` (503),
``malformed_answer`` and ``internal`` (500), ``client_disconnected``.

Every label comes from a closed set, whatever clients send: ``route`` is one of the
app's paths or ``other``, ``method`` one of ``GET``, ``HEAD``, ``POST`` or
``other``, ``status`` a code the app answers with, ``kind`` one of the kinds
above. The text is rendered in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._batcher import BatchReport, MicroBatcher
from ._core import ApiError, Router

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware", "router"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_BATCH_DOCUMENT_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096)
# The methods the app serves; any other is counted as "other".
_METHODS = frozenset({"GET", "HEAD", "POST"})


class _BusySeconds(Collector):
    """Read at scrape time, so a long model turn shows while it runs."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "memos_rerank_model_busy_seconds", "Seconds the model spent computing."
        )
        family.add_metric([], self._batcher.busy_seconds)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "memos_rerank_model_busy_seconds", "Seconds the model spent computing."
        )


class Metrics:
    """The app's metrics; ``routes`` are the paths used as the ``route`` label (any
    other path is counted as ``other``, so scanners cannot grow the label set)."""

    def __init__(self, batcher: MicroBatcher, routes: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes = frozenset(routes)
        registry = self.registry
        self.requests = Counter(
            "memos_rerank_requests",
            "HTTP requests by route, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "memos_rerank_request_duration_seconds",
            "Request latency in seconds, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.documents = Counter(
            "memos_rerank_documents_scored",
            "Documents the model scored (calls that got an answer).",
            registry=registry,
        )
        self.batch_requests = Histogram(
            "memos_rerank_batch_requests",
            "Requests fused into one model turn.",
            buckets=_BATCH_REQUEST_BUCKETS,
            registry=registry,
        )
        self.batch_documents = Histogram(
            "memos_rerank_batch_documents",
            "Documents in one model turn.",
            buckets=_BATCH_DOCUMENT_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "memos_rerank_errors", "Error answers by kind.", ["kind"], registry=registry
        )
        self.budget_calls = Counter(
            "memos_rerank_budget_calls",
            "Requests with a latency budget, by whether it ran out before every document "
            "was scored (partial).",
            ["partial"],
            registry=registry,
        )
        self.budget_unscored = Counter(
            "memos_rerank_budget_unscored_documents",
            "Documents a latency budget left unscored.",
            registry=registry,
        )
        self.budget_elapsed = Histogram(
            "memos_rerank_budget_elapsed_seconds",
            "Seconds a request with a latency budget took, from its budget's start.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        queue = Gauge(
            "memos_rerank_queue_depth", "Requests waiting for the model.", registry=registry
        )
        queue.set_function(lambda: batcher.queued)
        up = Gauge(
            "memos_rerank_model_up", "1 while the model can serve, else 0.", registry=registry
        )
        up.set_function(lambda: 1.0 if batcher.health().ok else 0.0)
        registry.register(_BusySeconds(batcher))

    def on_batch(self, report: BatchReport) -> None:
        self.documents.inc(report.scored_documents)
        self.batch_requests.observe(report.calls)
        self.batch_documents.observe(report.documents)

    def on_budget(self, scored: int, documents: int, elapsed: float) -> None:
        """One request with a latency budget: how many of its documents were scored,
        and how long it took."""
        self.budget_calls.labels("true" if scored < documents else "false").inc()
        self.budget_unscored.inc(documents - scored)
        self.budget_elapsed.observe(elapsed)

    def on_error(self, error: ApiError) -> None:
        self.errors.labels(error.kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every request and its latency, whatever answers it (the outermost layer)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.metrics.routes else "other"
        status = 499  # nothing sent: the client left
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()


router = Router()


@router.status(
    "/metrics",
    summary="Prometheus metrics (no key needed)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    text = await asyncio.to_thread(metrics.render)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
