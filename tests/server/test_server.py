"""The rerank server, tested over real HTTP on a loopback port."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    CrossEncoderReranker,
    MemOSReranker,
    QwenReranker,
)
from memos_rerank_integrations.server import create_app
from memos_rerank_integrations.server._batcher import MicroBatcher
from memos_rerank_integrations.testing import build_tiny_cross_encoder, build_tiny_qwen_reranker

from ..support.server import DOCUMENTS, QUERY, LiveServer, WordOverlapReranker


@pytest.fixture
def backend() -> WordOverlapReranker:
    return WordOverlapReranker()


@pytest.fixture
def live(backend: WordOverlapReranker) -> Iterator[LiveServer]:
    app = create_app(backend, model_name="tiny-test", api_key="s3cret-key", max_documents=10)
    with LiveServer(app) as server:
        yield server


def memos_post(live: LiveServer, body: object, key: str | None = "s3cret-key") -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Token {key}"}
    return httpx.post(f"{live.url}/rerank", json=body, headers=headers, timeout=10)


def cohere_post(live: LiveServer, body: object, key: str | None = "s3cret-key") -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{live.url}/v2/rerank", json=body, headers=headers, timeout=10)


def test_memos_shape_matches_in_process_backend(
    live: LiveServer, backend: WordOverlapReranker
) -> None:
    response = memos_post(live, {"model": "x", "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    assert response.status_code == 200
    body = response.json()
    expected = backend.rerank(QUERY, DOCUMENTS, 3)
    assert body["model"] == "tiny-test"
    assert isinstance(body["id"], str) and body["id"]
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == [
        (e.index, e.score) for e in expected
    ]
    assert [r["document"]["text"] for r in body["results"]] == [
        DOCUMENTS[e.index] for e in expected
    ]


def test_cohere_sdk_against_server(live: LiveServer, backend: WordOverlapReranker) -> None:
    client = cohere.ClientV2(api_key="s3cret-key", base_url=live.url, max_retries=0, timeout=10)
    response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, top_n=2)
    expected = backend.rerank(QUERY, DOCUMENTS, 2)
    assert [(r.index, r.relevance_score) for r in response.results] == [
        (e.index, e.score) for e in expected
    ]
    assert response.meta is not None and response.meta.billed_units is not None
    assert response.meta.billed_units.search_units == 1


async def test_async_cohere_sdk_against_server(
    live: LiveServer, backend: WordOverlapReranker
) -> None:
    client = cohere.AsyncClientV2(
        api_key="s3cret-key", base_url=live.url, max_retries=0, timeout=10
    )
    response = await client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    assert [r.relevance_score for r in response.results] == [
        e.score for e in backend.rerank(QUERY, DOCUMENTS)
    ]


@pytest.mark.parametrize("post", [memos_post, cohere_post])
def test_auth_missing_wrong_right(live: LiveServer, post: object) -> None:
    body = {"query": QUERY, "documents": DOCUMENTS}
    send = post  # type: ignore[assignment]
    missing = send(live, body, key=None)
    wrong = send(live, body, key="s3cret-kez")
    right = send(live, body)
    assert missing.status_code == 401 and "message" in missing.json()
    assert wrong.status_code == 401 and "message" in wrong.json()
    assert right.status_code == 200
    # The key itself never comes back in an error.
    assert "s3cret" not in missing.text + wrong.text


@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
@pytest.mark.parametrize("scheme", ["Token", "Bearer", "bearer", "TOKEN", "BeArEr"])
def test_both_schemes_in_any_case_on_every_route(live: LiveServer, path: str, scheme: str) -> None:
    body = {"query": QUERY, "documents": DOCUMENTS}
    response = httpx.post(
        f"{live.url}{path}", json=body, headers={"Authorization": f"{scheme} s3cret-key"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        "Token s3cret-key-and-more",  # the right key plus a suffix
        "Bearer s3cret-ke",  # a prefix of it
        "Basic s3cret-key",  # another scheme
        "s3cret-key",  # no scheme
        "Token",
        "Bearer s3cret-key extra",
    ],
)
def test_near_miss_keys_get_401(
    live: LiveServer, backend: WordOverlapReranker, header: str
) -> None:
    response = httpx.post(
        f"{live.url}/rerank",
        json={"query": QUERY, "documents": DOCUMENTS},
        headers={"Authorization": header},
    )
    assert response.status_code == 401
    assert response.json()["code"] == 40132
    assert response.json()["detail"] == response.json()["message"]
    assert "s3cret" not in response.text
    assert backend.model_calls == 0


def test_memos_error_codes(live: LiveServer) -> None:
    assert (
        memos_post(live, {"query": QUERY, "documents": DOCUMENTS}, key=None).json()["code"] == 40100
    )


BAD_BODIES = [
    pytest.param(b"{not json", 40000, id="invalid-json"),
    pytest.param(b"[1, 2]", 40000, id="not-an-object"),
    pytest.param(b'{"documents": ["a"]}', 40000, id="missing-query"),
    pytest.param(b'{"query": 5, "documents": ["a"]}', 40000, id="query-not-string"),
    pytest.param(b'{"query": "  ", "documents": ["a"]}', 40002, id="empty-query"),
    pytest.param(b'{"query": "q"}', 40000, id="missing-documents"),
    pytest.param(b'{"query": "q", "documents": "a"}', 40000, id="documents-not-list"),
    pytest.param(b'{"query": "q", "documents": []}', 40003, id="empty-documents"),
    pytest.param(b'{"query": "q", "documents": ["a", 3]}', 40000, id="document-not-string"),
    pytest.param(b'{"query": "q", "documents": ["a"], "top_n": -2}', 40000, id="top-n-negative"),
    pytest.param(b'{"query": "q", "documents": ["a"], "top_n": 1.5}', 40000, id="top-n-float"),
    pytest.param(b'{"query": "q", "documents": ["a"], "top_n": "2"}', 40000, id="top-n-string"),
    pytest.param(b'{"query": "q", "documents": ["a"], "top_n": true}', 40000, id="top-n-bool"),
    pytest.param(b'{"query": "q", "documents": ["a"], "model": 7}', 40000, id="model-not-string"),
    # JSON that json.loads itself gives up on (RecursionError, ValueError), not a syntax error.
    pytest.param(b"[" * 100_000, 40000, id="nested-too-deeply"),
    pytest.param(
        b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}",
        40000,
        id="integer-too-long",
    ),
    pytest.param(
        b'{"query": "q", "documents": ["a"], "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        40000,
        id="field-nested-too-deeply",
    ),
]


@pytest.mark.parametrize(("raw", "code"), BAD_BODIES)
@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
def test_bad_bodies_get_4xx_json_and_no_model_work(
    live: LiveServer, backend: WordOverlapReranker, raw: bytes, code: int, path: str
) -> None:
    scheme = "Token" if path == "/rerank" else "Bearer"
    response = httpx.post(
        f"{live.url}{path}",
        content=raw,
        headers={"Authorization": f"{scheme} s3cret-key", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    body = response.json()
    assert body["message"] and body["detail"] == body["message"]
    if path == "/rerank":
        assert body["code"] == code
    else:
        assert "code" not in body
    assert backend.model_calls == 0


def test_too_many_documents_rejected_before_model_work(
    live: LiveServer, backend: WordOverlapReranker
) -> None:
    response = memos_post(live, {"query": QUERY, "documents": ["doc"] * 11})
    assert response.status_code == 400
    assert "at most 10" in response.json()["message"]
    assert cohere_post(live, {"query": QUERY, "documents": ["doc"] * 11}).status_code == 400
    assert backend.model_calls == 0
    assert memos_post(live, {"query": QUERY, "documents": ["doc"] * 10}).status_code == 200
    assert backend.model_calls == 1


def test_body_limit_stops_reading_and_skips_model_work() -> None:
    backend = WordOverlapReranker()
    app = create_app(backend, model_name="m", max_body_bytes=1000)
    with LiveServer(app) as live:
        declared = memos_post(live, {"query": QUERY, "documents": ["x" * 1200]}, key=None)
        assert declared.status_code == 413
        assert "1000 bytes" in declared.json()["message"]

        # A chunked body declares no length: the server must count as it reads.
        def chunks() -> Iterator[bytes]:
            yield b'{"query": "q", "documents": ["'
            for _ in range(50):
                yield b"y" * 100
            yield b'"]}'

        streamed = httpx.post(f"{live.url}/v2/rerank", content=chunks(), timeout=10)
        assert streamed.status_code == 413
        assert set(streamed.json()) == {"message", "detail"}
        fits = memos_post(live, {"query": QUERY, "documents": ["x" * 800]}, key=None)
        assert fits.status_code == 200
    assert backend.model_calls == 1


def test_backend_failure_is_a_json_5xx_and_server_keeps_serving(live: LiveServer) -> None:
    failed = memos_post(live, {"query": "EXPLODE", "documents": DOCUMENTS})
    assert failed.status_code == 500
    assert failed.json()["code"] == 50000
    assert memos_post(live, {"query": QUERY, "documents": DOCUMENTS}).status_code == 200


def test_no_key_configured_means_open_server(backend: WordOverlapReranker) -> None:
    with LiveServer(create_app(backend, model_name="m")) as live:
        assert memos_post(live, {"query": QUERY, "documents": DOCUMENTS}, key=None).is_success
        assert cohere_post(live, {"query": QUERY, "documents": DOCUMENTS}, key=None).is_success


def make_requests(count: int) -> list[tuple[str, list[str], int | None]]:
    requests = []
    for i in range(count):
        documents = [f"{DOCUMENTS[(i + j) % 5]} variant {j}" for j in range(1 + i % 4)]
        requests.append((f"{QUERY} {i}", documents, None if i % 3 else 2))
    return requests


@pytest.mark.parametrize("batching", [True, False])
async def test_64_concurrent_requests_equal_sequential(batching: bool) -> None:
    backend = WordOverlapReranker(delay=0.01)
    app = create_app(backend, model_name="m", batching=batching)
    requests = make_requests(64)
    expected = [backend.rerank(q, docs, top_n) for q, docs, top_n in requests]
    backend.rerank_calls = 0
    with LiveServer(app) as live:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live.url, timeout=30, limits=limits) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/rerank", json={"query": q, "documents": d, "top_n": n})
                    for q, d, n in requests
                )
            )
    assert all(r.status_code == 200 for r in responses)
    for response, want in zip(responses, expected, strict=True):
        got = [(r["index"], r["relevance_score"]) for r in response.json()["results"]]
        assert got == [(e.index, e.score) for e in want]
    if batching:
        # Concurrent requests shared model calls.
        assert backend.model_calls < 64 and max(backend.many_calls) > 1
    else:
        assert backend.rerank_calls == 64 and backend.many_calls == []


async def test_health_answers_while_model_is_busy() -> None:
    backend = WordOverlapReranker(delay=2.0)
    with LiveServer(create_app(backend, model_name="slow")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as client:
            busy = asyncio.ensure_future(
                client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
            )
            await asyncio.sleep(0.2)
            started = time.monotonic()
            health = await client.get("/health")
            elapsed = time.monotonic() - started
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert health.json()["busy"] is True
            # Had /health waited for the model, it would take the ~1.8 s still left.
            assert elapsed < 1.0
            assert not busy.done()
            assert (await busy).status_code == 200


def test_health_needs_no_key(live: LiveServer) -> None:
    response = httpx.get(f"{live.url}/health")
    assert response.status_code == 200
    assert response.json()["model"] == "tiny-test"


def test_batcher_isolates_a_failing_call_from_its_batch_mates() -> None:
    backend = WordOverlapReranker(delay=0.05)
    batcher = MicroBatcher(backend, batch_window_ms=20)
    try:
        first = batcher.submit(QUERY, DOCUMENTS)  # occupies the worker
        time.sleep(0.01)
        good = batcher.submit(QUERY, DOCUMENTS[:2])
        bad = batcher.submit("EXPLODE", DOCUMENTS)
        also_good = batcher.submit(QUERY, DOCUMENTS[2:])
        assert first.result(5) == backend.rerank(QUERY, DOCUMENTS)
        assert good.result(5) == backend.rerank(QUERY, DOCUMENTS[:2])
        assert also_good.result(5) == backend.rerank(QUERY, DOCUMENTS[2:])
        with pytest.raises(RuntimeError, match="exploded"):
            bad.result(5)
        assert 3 in backend.many_calls  # the three queued calls were tried together first
    finally:
        batcher.close()


def test_batcher_respects_document_budget_and_starts_idle_calls_at_once() -> None:
    backend = WordOverlapReranker(delay=0.05)
    batcher = MicroBatcher(backend, batch_window_ms=2000, max_batch_documents=6)
    try:
        started = time.monotonic()
        assert batcher.submit(QUERY, DOCUMENTS).result(5)
        # Idle worker: no batch window wait before the first call.
        assert time.monotonic() - started < 1.5
        futures = [batcher.submit(QUERY, DOCUMENTS[:2]) for _ in range(4)]
        for future in futures:
            assert future.result(5) == backend.rerank(QUERY, DOCUMENTS[:2])
        assert all(size * 2 <= 6 for size in backend.many_calls)
    finally:
        batcher.close()


def test_batcher_forms_batches_by_tokens_in_arrival_order() -> None:
    backend = WordOverlapReranker(delay=0.05)
    batcher = MicroBatcher(
        backend, batch_window_ms=2000, max_batch_documents=1000, max_batch_tokens=1000
    )
    try:
        batcher.submit(QUERY, DOCUMENTS, tokens=10).result(5)  # the worker is warm
        backend.many_calls.clear()
        # 300 tokens each: three calls fit in 1000, the fourth starts the next batch.
        futures = [batcher.submit(QUERY, DOCUMENTS[:2], tokens=300) for _ in range(7)]
        for future in futures:
            assert future.result(5) == backend.rerank(QUERY, DOCUMENTS[:2])
        assert backend.many_calls and max(backend.many_calls) == 3
        # A call of unknown size is never fused past the token bound.
        assert batcher.submit(QUERY, DOCUMENTS[:2]).result(5)
    finally:
        batcher.close()


def test_batcher_close_finishes_queued_work_and_stops_thread() -> None:
    backend = WordOverlapReranker(delay=0.02)
    batcher = MicroBatcher(backend)
    futures = [batcher.submit(QUERY, DOCUMENTS) for _ in range(5)]
    batcher.close()
    assert all(f.result(0) == backend.rerank(QUERY, DOCUMENTS) for f in futures)
    assert not any(t.name == "memos-rerank-model" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(QUERY, DOCUMENTS)


def test_missing_server_extra_names_it() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None\n"
        "try:\n"
        "    import memos_rerank_integrations.server\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    assert "memos-rerank-integrations[server]" in result.stdout


def test_each_dialect_module_owns_its_routes_in_an_api_router() -> None:
    from fastapi import APIRouter
    from fastapi.routing import APIRoute

    from memos_rerank_integrations.server import _cohere, _memos, _status, _tei, _vllm

    owned = {}
    for module in (_memos, _tei, _cohere, _vllm, _status):
        assert isinstance(module.router, APIRouter)
        owned[module.__name__.rsplit(".", 1)[1]] = {
            route.path for route in module.router.routes if isinstance(route, APIRoute)
        }
    assert owned == {
        "_memos": {"/rerank"},
        "_tei": {"/info"},
        "_cohere": {"/v1/rerank", "/v2/rerank"},
        "_vllm": {"/score", "/v1/score", "/v1/models"},
        "_status": {"/health"},
    }
    app = create_app(WordOverlapReranker(), model_name="m", metrics=False)
    assert set(app.openapi()["paths"]) == set().union(*owned.values())


# -- real tiny models behind the server ----------------------------------------------


# float32: with bfloat16, batch composition alone moves scores by ~1e-3.
@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> QwenReranker:
    directory = tmp_path_factory.mktemp("server-models") / "qwen"
    return QwenReranker(build_tiny_qwen_reranker(directory), dtype="float32")


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> CrossEncoderReranker:
    directory = tmp_path_factory.mktemp("server-models") / "cross-encoder"
    return CrossEncoderReranker(build_tiny_cross_encoder(directory), dtype="float32")


@pytest.fixture(params=["tiny_qwen", "tiny_cross_encoder"])
def real_backend(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def test_real_backend_scores_equal_in_process_over_both_apis(real_backend: Any) -> None:
    expected = real_backend.rerank(QUERY, DOCUMENTS)
    app = create_app(real_backend, model_name="tiny", api_key="k")
    with LiveServer(app) as live:
        client = cohere.ClientV2(api_key="k", base_url=live.url, max_retries=0, timeout=30)
        via_cohere = client.rerank(model="tiny", query=QUERY, documents=DOCUMENTS).results
        via_memos = memos_post(live, {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}, key="k")
    assert [r.index for r in via_cohere] == [e.index for e in expected]
    assert [r.relevance_score for r in via_cohere] == pytest.approx([e.score for e in expected])
    results = via_memos.json()["results"]
    assert [r["index"] for r in results] == [e.index for e in expected[:2]]
    assert [r["relevance_score"] for r in results] == pytest.approx([e.score for e in expected[:2]])


async def test_tiny_qwen_64_concurrent_requests_equal_sequential(tiny_qwen: QwenReranker) -> None:
    requests = make_requests(64)
    expected = [tiny_qwen.rerank(q, docs, top_n) for q, docs, top_n in requests]
    with LiveServer(create_app(tiny_qwen, model_name="tiny")) as live:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=limits) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/v2/rerank", json={"query": q, "documents": d, "top_n": n})
                    for q, d, n in requests
                )
            )
    assert all(r.status_code == 200 for r in responses)
    for response, want in zip(responses, expected, strict=True):
        results = response.json()["results"]
        assert [r["index"] for r in results] == [e.index for e in want]
        assert [r["relevance_score"] for r in results] == pytest.approx(
            [e.score for e in want], abs=1e-5
        )


def test_memos_reranker_client_against_server(real_backend: Any) -> None:
    expected = real_backend.rerank(QUERY, DOCUMENTS)
    with LiveServer(create_app(real_backend, model_name="tiny", api_key="k")) as live:
        client = MemOSReranker(api_key="k", base_url=live.url, max_retries=0, timeout=30)
        got = client.rerank(QUERY, DOCUMENTS)
        top = client.rerank(QUERY, DOCUMENTS, top_n=1)
    assert [r.index for r in got] == [e.index for e in expected]
    assert [r.score for r in got] == pytest.approx([e.score for e in expected], abs=1e-5)
    assert [r.index for r in top] == [expected[0].index]


async def test_memos_reranker_async_split_calls_and_bad_key(backend: WordOverlapReranker) -> None:
    documents = [f"{DOCUMENTS[i % 5]} #{i}" for i in range(25)]
    app = create_app(backend, model_name="m", api_key="k", max_documents=10)
    with LiveServer(app) as live:
        # The client splits to the server's per-request limit and merges the answers.
        client = MemOSReranker(
            api_key="k", base_url=live.url, max_retries=0, max_documents_per_request=10
        )
        got = await client.arerank(QUERY, documents)
        wrong = MemOSReranker(api_key="nope", base_url=live.url, max_retries=0)
        with pytest.raises(AuthenticationError) as error:
            await wrong.arerank(QUERY, DOCUMENTS)
    assert [(r.index, r.score) for r in got] == [
        (e.index, e.score) for e in backend.rerank(QUERY, documents)
    ]
    assert error.value.status_code == 401
    assert "nope" not in str(error.value)
