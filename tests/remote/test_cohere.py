"""CohereReranker: the real Cohere SDK talking to a Cohere-v2-shaped server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import cohere
import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    CohereReranker,
    InvalidInputError,
    MalformedResponseError,
    RateLimitError,
    RerankError,
    RerankTimeoutError,
)

from ..support.loopback import (
    FAST,
    MODES,
    SLOWER,
    LoopbackServer,
    Reply,
    cohere_shaped,
    exception_texts,
    expected_order,
    invoke,
    score_of,
    timeout_for,
)

KEY = "co-SECRET-abcdef-42"
DOCS = ["doc 21", "doc 22", "doc 23"]


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CO_API_KEY", "COHERE_API_KEY", "CO_API_URL"):
        monkeypatch.delenv(name, raising=False)


def make(server: LoopbackServer, **kwargs: Any) -> CohereReranker:
    return CohereReranker(**{"api_key": KEY, "base_url": server.url, **FAST, **kwargs})


@pytest.mark.parametrize("mode", MODES)
def test_sdk_against_a_cohere_v2_server(server: LoopbackServer, mode: str) -> None:
    server.script(cohere_shaped)
    reranker = make(server, model="rerank-multilingual-v3.0", max_tokens_per_doc=512)
    results = invoke(reranker, mode, "q", DOCS, top_n=2)
    assert [r.index for r in results] == expected_order(DOCS)[:2]
    assert [r.score for r in results] == [score_of(DOCS[i]) for i in expected_order(DOCS)[:2]]
    (request,) = server.requests
    assert request.path == "/v2/rerank"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body == {
        "model": "rerank-multilingual-v3.0",
        "query": "q",
        "documents": DOCS,
        "top_n": 2,
        "max_tokens_per_doc": 512,
    }


def test_base_url_keeps_its_path_and_env_keys(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script(cohere_shaped, cohere_shaped)
    monkeypatch.setenv("COHERE_API_KEY", "second")
    CohereReranker(base_url=server.url + "/proxy/cohere/").rerank("q", DOCS)
    monkeypatch.setenv("CO_API_KEY", "first")
    monkeypatch.setenv("CO_API_URL", server.url + "/other")
    CohereReranker().rerank("q", DOCS)
    assert [(r.path, r.headers["Authorization"]) for r in server.requests] == [
        ("/proxy/cohere/v2/rerank", "Bearer second"),
        ("/other/v2/rerank", "Bearer first"),
    ]


def test_missing_key_names_both_variables() -> None:
    with pytest.raises(AuthenticationError, match="CO_API_KEY or COHERE_API_KEY"):
        CohereReranker()


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cohere", None)  # makes `import cohere` fail
    with pytest.raises(ImportError, match=r"memos-rerank-integrations\[cohere\]"):
        CohereReranker(api_key=KEY)


FAILURES: dict[str, tuple[list[Reply], type[RerankError], int]] = {
    "500 always": ([Reply(500, {"message": "x"})] * 2, BackendUnavailableError, 2),
    "503 always": ([Reply(503, {"message": "x"})] * 2, BackendUnavailableError, 2),
    "429 always": ([Reply(429, {"message": "x"})] * 2, RateLimitError, 2),
    "slow": ([Reply(200, {}, delay=SLOWER)] * 2, RerankTimeoutError, 2),
    "401": ([Reply(401, {"message": "invalid api token"})], AuthenticationError, 1),
    "400": ([Reply(400, {"message": "too many documents"})], InvalidInputError, 1),
    "422": ([Reply(422, {"message": "bad model"})], InvalidInputError, 1),
    "invalid json": ([Reply(200, "{nope")], MalformedResponseError, 1),
    "bare list": ([Reply(200, [{"index": 0, "relevance_score": 1}])], MalformedResponseError, 1),
    "no results": ([Reply(200, {"id": "x"})], MalformedResponseError, 1),
    "out of range": (
        [Reply(200, {"results": [{"index": i, "relevance_score": 0.1} for i in (0, 1, 9)]})],
        MalformedResponseError,
        1,
    ),
    "string index": (
        [Reply(200, {"results": [{"index": "a", "relevance_score": 0.1}] * 3})],
        MalformedResponseError,
        1,
    ),
    "null score": (
        [Reply(200, {"results": [{"index": i, "relevance_score": None} for i in range(3)]})],
        MalformedResponseError,
        1,
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAILURES))
def test_failures_map_onto_the_error_tree(server: LoopbackServer, mode: str, name: str) -> None:
    replies, error_class, requests = FAILURES[name]
    server.script(*replies)
    with pytest.raises(error_class) as caught:
        invoke(make(server, max_retries=1, timeout=timeout_for(replies)), mode, "q", DOCS)
    assert caught.value.backend == "cohere"
    assert len(server.wait_for_requests(requests)) == requests  # the SDK's own retries are off


@pytest.mark.parametrize("mode", MODES)
def test_429_then_503_then_success(server: LoopbackServer, mode: str) -> None:
    server.script(
        Reply(429, {"message": "slow"}, headers={"Retry-After": "0"}),
        Reply(503, {"message": "busy"}),
        cohere_shaped,
    )
    results = invoke(make(server), mode, "q", DOCS)
    assert [r.index for r in results] == expected_order(DOCS)
    assert len(server.requests) == 3


def test_rate_limit_keeps_retry_after(server: LoopbackServer) -> None:
    server.script(Reply(429, {"message": "slow"}, headers={"Retry-After": "30"}))
    with pytest.raises(RateLimitError) as caught:
        make(server).rerank("q", DOCS)
    assert caught.value.retry_after == 30.0 and caught.value.status_code == 429


@pytest.mark.parametrize("mode", MODES)
def test_300_documents_in_search_unit_sized_requests(server: LoopbackServer, mode: str) -> None:
    docs = [f"doc {i}" for i in range(300)]
    server.script(*[cohere_shaped] * 3)
    results = invoke(make(server), mode, "q", docs)
    assert [r.index for r in results] == expected_order(docs)
    assert [len(r.body["documents"]) for r in server.requests] == [100, 100, 100]


def test_injected_sdk_client_needs_no_key(server: LoopbackServer) -> None:
    server.script(cohere_shaped)
    client = cohere.ClientV2(api_key="injected", base_url=server.url, max_retries=0)
    reranker = CohereReranker(client=client, async_client=object())
    assert [r.index for r in reranker.rerank("q", DOCS)] == expected_order(DOCS)
    assert server.requests[0].headers["Authorization"] == "Bearer injected"


def test_async_calls_from_two_event_loops(server: LoopbackServer) -> None:
    server.script(cohere_shaped, cohere_shaped)
    reranker = make(server)
    for _ in range(2):
        assert len(asyncio.run(reranker.arerank("q", DOCS))) == 3


def test_key_not_in_errors_repr_or_logs(
    server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (None, "httpx", "httpcore", "cohere"):
        caplog.set_level("DEBUG", logger=name)
    server.script(
        Reply(401, {"message": f"invalid api token {KEY}"}),
        Reply(500, {"message": KEY}),
        cohere_shaped,
    )
    reranker = make(server, max_retries=0)
    errors = []
    for _ in range(2):
        with pytest.raises(RerankError) as caught:
            reranker.rerank("q", DOCS)
        errors.append(caught.value)
    reranker.rerank("q", DOCS)
    texts = [caplog.text, repr(reranker), str(reranker)]
    for error in errors:
        texts += exception_texts(error)
    assert caplog.records
    for text in texts:
        assert KEY not in text
