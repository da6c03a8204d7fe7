"""A latency budget per request: the ``budget_ms`` field or the ``X-Rerank-Budget-Ms``
header, on a real server, through real clients."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import cohere
import httpx
import pytest

from memos_rerank_integrations import RerankResult
from memos_rerank_integrations.server import create_app

from ..support.backends import FirstK
from ..support.server import LiveServer

DOCS = [f"memory {i}" for i in range(8)]


class Slow(FirstK):
    """No budget support, and slow: the server waits for it only as long as the budget."""

    rerank_within = None  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__(3, base=0.5)

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        time.sleep(3.0)
        return super().rerank(query, documents, top_n)


@pytest.fixture
def backend() -> FirstK:
    """Scores the first three documents within a budget (later ones score higher)."""
    return FirstK(3, base=0.5)


@pytest.fixture
def live(backend: FirstK) -> Iterator[LiveServer]:
    with LiveServer(create_app(backend, model_name="budget-test")) as server:
        yield server


def test_a_budget_in_the_body_gives_a_partial_answer_with_every_document(
    live: LiveServer, backend: FirstK
) -> None:
    body = {"query": "q", "documents": DOCS, "budget_ms": 250}
    response = httpx.post(f"{live.url}/rerank", json=body, timeout=10)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [2, 1, 0, 3, 4, 5, 6, 7]
    assert [r["relevance_score"] for r in results[3:]] == [0.0] * 5
    assert response.headers["x-rerank-scored"] == "3"
    assert response.headers["x-rerank-partial"] == "true"
    assert response.headers["x-rerank-budget-ms"] == "250"
    assert backend.budgets[0].milliseconds == 250


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_the_header_works_for_clients_that_cannot_add_a_field(live: LiveServer, path: str) -> None:
    response = httpx.post(
        f"{live.url}{path}",
        json={"query": "q", "documents": DOCS, "top_n": 4},
        headers={"X-Rerank-Budget-Ms": "100"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert [r["index"] for r in response.json()["results"]] == [2, 1, 0, 3]  # top_n counts both
    assert response.headers["x-rerank-partial"] == "true"


def test_the_tei_shape_and_score_take_it_too(live: LiveServer) -> None:
    tei = httpx.post(
        f"{live.url}/rerank", json={"query": "q", "texts": DOCS, "budget_ms": 100}, timeout=10
    )
    assert tei.status_code == 200 and tei.headers["x-rerank-scored"] == "3"
    score = httpx.post(
        f"{live.url}/score", json={"text_1": "q", "text_2": DOCS, "budget_ms": 100}, timeout=10
    )
    assert score.status_code == 200 and score.headers["x-rerank-scored"] == "3"
    pairs = httpx.post(
        f"{live.url}/score",
        json={"text_1": ["q"] * 8, "text_2": DOCS, "budget_ms": 100},
        timeout=10,
    )
    assert pairs.status_code == 400


def test_the_cohere_sdk_reads_a_partial_answer(live: LiveServer) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=live.url)
    response = client.rerank(
        model="m",
        query="q",
        documents=DOCS,
        request_options={"additional_headers": {"X-Rerank-Budget-Ms": "200"}},
    )
    assert [r.index for r in response.results] == [2, 1, 0, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon", "1" * 40, "86400001"])
def test_a_bad_budget_header_is_a_400(live: LiveServer, value: str) -> None:
    response = httpx.post(
        f"{live.url}/rerank",
        json={"query": "q", "documents": DOCS},
        headers={"X-Rerank-Budget-Ms": value},
        timeout=10,
    )
    assert response.status_code == 400
    assert "X-Rerank-Budget-Ms" in response.text


@pytest.mark.parametrize("value", [0, -1, "100", True, 1e300])
def test_a_bad_budget_field_is_refused(live: LiveServer, value: object) -> None:
    response = httpx.post(
        f"{live.url}/v2/rerank",
        json={"query": "q", "documents": DOCS, "budget_ms": value},
        timeout=10,
    )
    assert response.status_code in (400, 422)
    assert "budget_ms" in response.text


def test_without_a_budget_there_are_no_budget_headers(live: LiveServer) -> None:
    response = httpx.post(f"{live.url}/rerank", json={"query": "q", "documents": DOCS}, timeout=10)
    assert response.status_code == 200
    assert "x-rerank-scored" not in response.headers
    assert [r["index"] for r in response.json()["results"]] == list(range(7, -1, -1))


def test_a_slow_backend_is_waited_for_only_as_long_as_the_budget() -> None:
    with LiveServer(create_app(Slow(), model_name="slow")) as server:
        started = time.monotonic()
        response = httpx.post(
            f"{server.url}/rerank",
            json={"query": "q", "documents": DOCS, "budget_ms": 300},
            timeout=10,
        )
        assert time.monotonic() - started < 2.0
    assert response.status_code == 200
    assert response.headers["x-rerank-scored"] == "0"
    assert [r["index"] for r in response.json()["results"]] == list(range(8))


def test_the_outcome_is_in_the_metrics(live: LiveServer) -> None:
    for budget in (100, 200):
        httpx.post(
            f"{live.url}/rerank",
            json={"query": "q", "documents": DOCS, "budget_ms": budget},
            timeout=10,
        )
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert 'memos_rerank_budget_calls_total{partial="true"} 2.0' in text
    assert "memos_rerank_budget_unscored_documents_total 10.0" in text
    assert "memos_rerank_budget_elapsed_seconds_count 2.0" in text
