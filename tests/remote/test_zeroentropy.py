"""ZeroEntropyReranker against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    RateLimitError,
    RerankError,
    RerankTimeoutError,
    ZeroEntropyReranker,
)
from memos_rerank_integrations._remote.zeroentropy import DEFAULT_ZEROENTROPY_BASE_URL

from ..support.loopback import (
    FAST,
    MODES,
    SLOWER,
    LoopbackServer,
    Reply,
    cohere_shaped,
    expected_order,
    invoke,
    timeout_for,
)

KEY = "ze-SECRET-key-0099"
DOCS = ["doc 11", "doc 12", "doc 13"]


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ZERO_ENTROPY_API_KEY", "ZEROENTROPY_API_KEY", "ZEROENTROPY_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def make(server: LoopbackServer, **kwargs: Any) -> ZeroEntropyReranker:
    return ZeroEntropyReranker(**{"api_key": KEY, "base_url": server.url, **FAST, **kwargs})


@pytest.mark.parametrize("mode", MODES)
def test_request_and_answer_shape(server: LoopbackServer, mode: str) -> None:
    server.script(cohere_shaped)
    results = invoke(make(server), mode, "q", DOCS, top_n=2)
    assert [r.index for r in results] == expected_order(DOCS)[:2]
    (request,) = server.requests
    assert request.path == "/v1/models/rerank"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body == {"model": "zerank-1", "query": "q", "documents": DOCS, "top_n": 2}


def test_latency_is_sent_when_set(server: LoopbackServer) -> None:
    server.script(cohere_shaped)
    make(server, model="zerank-1-small", latency="fast").rerank("q", DOCS)
    assert server.requests[0].body["latency"] == "fast"
    assert server.requests[0].body["model"] == "zerank-1-small"


def test_keys_from_either_environment_variable(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script(cohere_shaped, cohere_shaped)
    monkeypatch.setenv("ZEROENTROPY_API_KEY", "sdk-name")
    ZeroEntropyReranker(base_url=server.url).rerank("q", DOCS)
    monkeypatch.setenv("ZERO_ENTROPY_API_KEY", "mem0-name")  # Mem0's name wins
    ZeroEntropyReranker(base_url=server.url).rerank("q", DOCS)
    assert [r.headers["Authorization"] for r in server.requests] == [
        "Bearer sdk-name",
        "Bearer mem0-name",
    ]


def test_missing_key_names_both_variables() -> None:
    with pytest.raises(AuthenticationError, match="ZERO_ENTROPY_API_KEY or ZEROENTROPY_API_KEY"):
        ZeroEntropyReranker()


def test_base_urls(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        ZeroEntropyReranker(api_key=KEY).url == DEFAULT_ZEROENTROPY_BASE_URL + "/v1/models/rerank"
    )
    # The official SDK's variable already carries /v1.
    monkeypatch.setenv("ZEROENTROPY_BASE_URL", server.url + "/v1")
    server.script(cohere_shaped)
    ZeroEntropyReranker(api_key=KEY).rerank("q", DOCS)
    assert server.requests[0].path == "/v1/models/rerank"


FAILURES: dict[str, tuple[list[Reply], type[RerankError], int]] = {
    "500 always": ([Reply(500, {"detail": "x"})] * 2, BackendUnavailableError, 2),
    "429 always": ([Reply(429, {"detail": "x"})] * 2, RateLimitError, 2),
    "slow": ([Reply(200, {}, delay=SLOWER)] * 2, RerankTimeoutError, 2),
    "401": ([Reply(401, {"detail": "Invalid API key"})], AuthenticationError, 1),
    "422": ([Reply(422, {"detail": [{"msg": "field required"}]})], InvalidInputError, 1),
    "invalid json": ([Reply(200, "{")], MalformedResponseError, 1),
    "duplicate": (
        [Reply(200, {"results": [{"index": 0, "relevance_score": 0.5}] * 3})],
        MalformedResponseError,
        1,
    ),
    "string score": (
        [Reply(200, {"results": [{"index": i, "relevance_score": "0.5"} for i in range(3)]})],
        MalformedResponseError,
        1,
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAILURES))
def test_failures(server: LoopbackServer, mode: str, name: str) -> None:
    replies, error_class, requests = FAILURES[name]
    server.script(*replies)
    with pytest.raises(error_class) as caught:
        invoke(make(server, max_retries=1, timeout=timeout_for(replies)), mode, "q", DOCS)
    assert caught.value.backend == "zeroentropy"
    assert len(server.wait_for_requests(requests)) == requests


@pytest.mark.parametrize("mode", MODES)
def test_429_then_success(server: LoopbackServer, mode: str) -> None:
    server.script(Reply(429, {}, headers={"Retry-After": "0"}), cohere_shaped)
    assert [r.index for r in invoke(make(server), mode, "q", DOCS)] == expected_order(DOCS)
    assert len(server.requests) == 2


def test_300_documents(server: LoopbackServer) -> None:
    docs = [f"doc {i}" for i in range(300)]
    server.script(*[cohere_shaped] * 3)
    results = make(server, max_documents_per_request=100).rerank("q", docs, top_n=20)
    assert [r.index for r in results] == expected_order(docs)[:20]
    assert [len(r.body["documents"]) for r in server.requests] == [100, 100, 100]


def test_key_not_in_repr_errors_or_logs(
    server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (None, "httpx", "httpcore"):
        caplog.set_level("DEBUG", logger=name)
    server.script(Reply(401, {"detail": f"Invalid API key {KEY}"}))
    reranker = make(server)
    with pytest.raises(AuthenticationError) as caught:
        reranker.rerank("q", DOCS)
    assert caplog.records
    for text in (str(caught.value), repr(caught.value), caplog.text, repr(reranker)):
        assert KEY not in text
