"""``GET /metrics``, parsed with prometheus_client's own parser after real requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from memos_rerank_integrations.cli import _parser
from memos_rerank_integrations.server import create_app

from ..support.server import DOCUMENTS, QUERY, HostileReranker, LiveServer, WordOverlapReranker

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def scrape(live: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}; /metrics needs no key."""
    response = httpx.get(f"{live.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_real_requests() -> None:
    backend = HostileReranker(tokens_per_doc=10)
    app = create_app(backend, model_name="m", api_key=KEY, max_request_tokens=60)
    with LiveServer(app) as live:
        before = scrape(live)
        body = {"query": QUERY, "documents": DOCUMENTS}
        assert httpx.post(f"{live.url}/rerank", json=body, headers=AUTH).status_code == 200
        assert httpx.post(f"{live.url}/v2/rerank", json=body, headers=AUTH).status_code == 200
        assert httpx.post(f"{live.url}/v2/rerank", json=body).status_code == 401
        bad = httpx.post(f"{live.url}/v1/rerank", json={"query": QUERY}, headers=AUTH)
        assert bad.status_code == 400
        over = {"query": QUERY, "documents": DOCUMENTS * 2}
        assert httpx.post(f"{live.url}/rerank", json=over, headers=AUTH).status_code == 413
        backend.broken = True
        assert httpx.post(f"{live.url}/rerank", json=body, headers=AUTH).status_code == 500
        after = scrape(live)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "memos_rerank_requests_total"
    assert moved(requests, route="/rerank", method="POST", status="200") == 1
    assert moved(requests, route="/v2/rerank", method="POST", status="200") == 1
    assert moved(requests, route="/v2/rerank", method="POST", status="401") == 1
    assert moved(requests, route="/v1/rerank", method="POST", status="400") == 1
    assert moved(requests, route="/rerank", method="POST", status="413") == 1
    assert moved(requests, route="/rerank", method="POST", status="500") == 1
    # The first scrape itself was counted before the second one.
    assert moved(requests, route="/metrics", method="GET", status="200") == 1
    latency = "memos_rerank_request_duration_seconds"
    assert moved(f"{latency}_count", route="/rerank") == 3
    assert moved(f"{latency}_bucket", route="/rerank", le="+Inf") == 3
    assert moved(f"{latency}_sum", route="/rerank") > 0
    # Two answered calls of 5 documents; the failed one scored nothing.
    assert moved("memos_rerank_documents_scored_total") == 10
    errors = "memos_rerank_errors_total"
    assert moved(errors, kind="unauthorized") == 1
    assert moved(errors, kind="invalid_request") == 1
    assert moved(errors, kind="token_budget") == 1
    assert moved(errors, kind="internal") == 1
    assert moved("memos_rerank_batch_requests_count") == 3  # three model turns
    assert moved("memos_rerank_batch_documents_sum") == 15
    assert value(after, "memos_rerank_model_up") == 0  # the last model call failed
    assert value(before, "memos_rerank_model_up") == 1


async def test_queue_depth_fused_batch_sizes_and_busy_seconds() -> None:
    backend = HostileReranker(delay=0.5)
    with LiveServer(create_app(backend, model_name="m")) as live:
        batcher = live.app.state.batcher
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as client:

            async def send(query: str) -> httpx.Response:
                return await client.post("/rerank", json={"query": query, "documents": DOCUMENTS})

            first = asyncio.ensure_future(send("first"))
            deadline = time.monotonic() + 10
            while not batcher.busy:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            queued = [asyncio.ensure_future(send(f"queued {i}")) for i in range(3)]
            while batcher.queued < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            during = await asyncio.to_thread(scrape, live)
            responses = await asyncio.gather(first, *queued)
        after = await asyncio.to_thread(scrape, live)
    assert all(r.status_code == 200 for r in responses)
    assert value(during, "memos_rerank_queue_depth") == 3
    assert value(after, "memos_rerank_queue_depth") == 0
    # Turns: the first call alone, then the three queued ones fused.
    assert value(after, "memos_rerank_batch_requests_count") == 2
    assert value(after, "memos_rerank_batch_requests_sum") == 4
    assert value(after, "memos_rerank_batch_requests_bucket", le="2.0") == 1
    assert value(after, "memos_rerank_batch_requests_bucket", le="4.0") == 2
    assert value(after, "memos_rerank_batch_documents_sum") == 20
    # Read at scrape time: the running turn already counts.
    assert value(during, "memos_rerank_model_busy_seconds_total") > 0
    assert value(after, "memos_rerank_model_busy_seconds_total") >= 2 * 0.5


def test_several_apps_in_one_process_keep_their_own_counts() -> None:
    first = create_app(WordOverlapReranker(), model_name="a")
    second = create_app(WordOverlapReranker(), model_name="b")
    body = {"query": QUERY, "documents": DOCUMENTS}
    with LiveServer(first) as one, LiveServer(second) as two:
        for _ in range(3):
            httpx.post(f"{one.url}/rerank", json=body)
        httpx.post(f"{two.url}/rerank", json=body)
        counts = [
            value(
                scrape(live),
                "memos_rerank_requests_total",
                route="/rerank",
                method="POST",
                status="200",
            )
            for live in (one, two)
        ]
    assert counts == [3, 1]


def test_unknown_paths_share_one_label() -> None:
    with LiveServer(create_app(WordOverlapReranker(), model_name="m")) as live:
        for i in range(5):
            httpx.get(f"{live.url}/scan/{i}")
        samples = scrape(live)
    assert (
        value(samples, "memos_rerank_requests_total", route="other", method="GET", status="404")
        == 5
    )
    assert not any("/scan" in dict(labels).get("route", "") for _, labels in samples)


def test_metrics_can_be_turned_off() -> None:
    app = create_app(WordOverlapReranker(), model_name="m", metrics=False)
    assert app.state.metrics is None
    with LiveServer(app) as live:
        assert httpx.get(f"{live.url}/metrics").status_code == 404
        assert httpx.post(
            f"{live.url}/rerank", json={"query": QUERY, "documents": DOCUMENTS}
        ).is_success
    assert _parser().parse_args(["serve", "--model", "m", "--no-metrics"]).no_metrics is True
    assert _parser().parse_args(["serve", "--model", "m"]).no_metrics is False


@pytest.mark.parametrize("path", ["/metrics", "/health", "/info"])
def test_status_routes_need_no_key(path: str) -> None:
    with LiveServer(create_app(WordOverlapReranker(), model_name="m", api_key=KEY)) as live:
        assert httpx.get(f"{live.url}{path}").status_code == 200


ROUTES = ["/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score", "/health", "/info"]


def test_series_stay_few_whatever_methods_paths_and_models_are_sent() -> None:
    """Strangers choose methods, paths and model names; the labels come from closed
    sets, so the series (and the scrape) stay small."""
    with LiveServer(create_app(WordOverlapReranker(), model_name="m", api_key=KEY)) as live:
        with httpx.Client(base_url=live.url, timeout=20) as client:
            for i in range(600):
                client.request(f"M{i}X", f"/scan/{i}")  # an odd method on an odd path
                client.request(f"N{i}Y", ROUTES[i % len(ROUTES)])  # ... on a real route
            for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                for path in [*ROUTES, "/metrics", "/nope"]:
                    client.request(method, path)
            for i in range(100):
                body = {"model": f"model-{i}", "query": QUERY, "documents": DOCUMENTS}
                assert client.post("/v1/rerank", json=body, headers=AUTH).status_code == 200
        response = httpx.get(f"{live.url}/metrics", timeout=10)
    samples = scrape_text(response.text)
    series = {labels for name, labels in samples if name == "memos_rerank_requests_total"}
    assert 20 < len(series) < 100
    assert {dict(labels)["method"] for labels in series} == {"GET", "HEAD", "POST", "other"}
    assert "model-" not in response.text and "/scan" not in response.text
    assert len(response.content) < 64_000


def scrape_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class SlowCollector(Collector):
    """A collector that takes a while: what a large registry costs to render."""

    def collect(self) -> Iterator[Metric]:
        time.sleep(1.5)
        yield from ()

    def describe(self) -> Iterator[Metric]:
        yield from ()


async def test_a_slow_scrape_does_not_hold_health() -> None:
    app = create_app(WordOverlapReranker(), model_name="m")
    app.state.metrics.registry.register(SlowCollector())
    with LiveServer(app) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as client:
            scraping = asyncio.ensure_future(client.get("/metrics"))
            await asyncio.sleep(0.3)  # the scrape is rendering now
            started = time.monotonic()
            health = await client.get("/health")
            waited = time.monotonic() - started
            assert not scraping.done()
            assert (await scraping).status_code == 200
    assert health.status_code == 200
    assert waited < 1.0, f"/health waited {waited:.2f} s behind a scrape"
