"""MemOSReranker against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    MemOSReranker,
    RateLimitError,
    RerankError,
    RerankTimeoutError,
    Stage,
)
from memos_rerank_integrations._remote.memos import DEFAULT_MEMOS_BASE_URL, MEMOS_ERROR_CODES

from ..support.loopback import (
    FAST,
    MODES,
    SLOWER,
    LoopbackServer,
    Recorded,
    Reply,
    cohere_results,
    cohere_shaped,
    exception_texts,
    expected_order,
    invoke,
    score_of,
    timeout_for,
)

KEY = "sk-memos-SECRET-7f3a9c"
DOCS = ["doc 1", "doc 2", "doc 3"]
OK = cohere_results(DOCS)


def make(server: LoopbackServer, **kwargs: Any) -> MemOSReranker:
    options = {"api_key": KEY, "base_url": server.url, **FAST, **kwargs}
    return MemOSReranker(**options)


# name -> (replies the server gives, error class, requests made with max_retries=1)
FAILURES: dict[str, tuple[list[Reply], type[RerankError], int]] = {
    "500 always": ([Reply(500, {"message": "boom"})] * 2, BackendUnavailableError, 2),
    "503 always": ([Reply(503, "<html>busy</html>")] * 2, BackendUnavailableError, 2),
    "429 always": ([Reply(429, {"message": "slow down"})] * 2, RateLimitError, 2),
    "slower than timeout": ([Reply(200, OK, delay=SLOWER)] * 2, RerankTimeoutError, 2),
    "invalid json": ([Reply(200, b'{"results": [')], MalformedResponseError, 1),
    "html page": ([Reply(200, "<html>hello</html>")], MalformedResponseError, 1),
    "memos code in 200": (
        [Reply(200, {"code": 40132, "message": "key invalid"})],
        AuthenticationError,
        1,
    ),
    "401": ([Reply(401, {"message": "unauthorized"})], AuthenticationError, 1),
    "400": ([Reply(400, {"message": "bad"})], InvalidInputError, 1),
    "index out of range": (
        [Reply(200, {"results": [{"index": i, "relevance_score": 0.5} for i in (0, 1, 3)]})],
        MalformedResponseError,
        1,
    ),
    "negative index": (
        [Reply(200, {"results": [{"index": i, "relevance_score": 0.5} for i in (0, 1, -1)]})],
        MalformedResponseError,
        1,
    ),
    "duplicate index": (
        [Reply(200, {"results": [{"index": i, "relevance_score": 0.5} for i in (0, 1, 1)]})],
        MalformedResponseError,
        1,
    ),
    "missing result": (
        [Reply(200, {"results": [{"index": i, "relevance_score": 0.5} for i in (0, 2)]})],
        MalformedResponseError,
        1,
    ),
    "non-numeric score": (
        [Reply(200, {"results": [{"index": i, "relevance_score": "high"} for i in range(3)]})],
        MalformedResponseError,
        1,
    ),
    "NaN score": (
        [
            Reply(
                200,
                '{"results": [{"index": 0, "relevance_score": NaN}, '
                '{"index": 1, "relevance_score": 0.1}, {"index": 2, "relevance_score": 0.2}]}',
            )
        ],
        MalformedResponseError,
        1,
    ),
    "boolean score": (
        [Reply(200, {"results": [{"index": i, "relevance_score": True} for i in range(3)]})],
        MalformedResponseError,
        1,
    ),
    "string index": (
        [Reply(200, {"results": [{"index": str(i), "relevance_score": 0.1} for i in range(3)]})],
        MalformedResponseError,
        1,
    ),
    "no results": ([Reply(200, {"id": "x"})], MalformedResponseError, 1),
    "result without score": (
        [Reply(200, {"results": [{"index": i} for i in range(3)]})],
        MalformedResponseError,
        1,
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_success_sends_the_documented_request(server: LoopbackServer, mode: str) -> None:
    server.script(cohere_shaped)
    results = invoke(make(server), mode, "which doc?", DOCS)
    assert [r.index for r in results] == expected_order(DOCS)
    assert [r.score for r in results] == sorted((score_of(d) for d in DOCS), reverse=True)
    assert all(type(r.score) is float and isinstance(r.stage, Stage) for r in results)
    (request,) = server.requests
    assert request.path == "/rerank"
    assert request.headers["Authorization"] == f"Token {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == {
        "model": "memos-reranker-0.6b",
        "query": "which doc?",
        "documents": DOCS,
    }


@pytest.mark.parametrize("mode", MODES)
def test_top_n_is_sent_and_honoured(server: LoopbackServer, mode: str) -> None:
    server.script(cohere_shaped)
    results = invoke(make(server), mode, "q", DOCS, top_n=2)
    assert [r.index for r in results] == expected_order(DOCS)[:2]
    assert server.requests[0].body["top_n"] == 2


@pytest.mark.parametrize("mode", MODES)
def test_top_n_sent_but_too_many_results_is_malformed(server: LoopbackServer, mode: str) -> None:
    server.script(Reply(200, OK))  # ignores top_n and answers all three
    with pytest.raises(MalformedResponseError, match="expected 2"):
        invoke(make(server), mode, "q", DOCS, top_n=2)


@pytest.mark.parametrize("mode", MODES)
def test_429_then_success_honours_retry_after(server: LoopbackServer, mode: str) -> None:
    server.script(Reply(429, {"message": "slow"}, headers={"Retry-After": "1"}), cohere_shaped)
    started = time.monotonic()
    results = invoke(make(server), mode, "q", DOCS)
    assert time.monotonic() - started >= 0.95
    assert [r.index for r in results] == expected_order(DOCS)
    assert len(server.requests) == 2


@pytest.mark.parametrize("mode", MODES)
def test_503_then_success(server: LoopbackServer, mode: str) -> None:
    server.script(Reply(503, "unavailable"), cohere_shaped)
    results = invoke(make(server), mode, "q", DOCS)
    assert [r.index for r in results] == expected_order(DOCS)
    assert len(server.requests) == 2


@pytest.mark.parametrize("mode", MODES)
def test_memos_rate_limit_code_in_200_is_retried(server: LoopbackServer, mode: str) -> None:
    server.script(Reply(200, {"code": 40309, "message": "token rate limit"}), cohere_shaped)
    results = invoke(make(server), mode, "q", DOCS)
    assert len(results) == 3 and len(server.requests) == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAILURES))
def test_each_failure_gives_the_right_error(server: LoopbackServer, mode: str, name: str) -> None:
    replies, error_class, requests = FAILURES[name]
    server.script(*replies)
    reranker = make(server, max_retries=1, timeout=timeout_for(replies))
    with pytest.raises(error_class) as caught:
        invoke(reranker, mode, "q", DOCS)
    assert caught.value.backend == "memos"
    assert len(server.wait_for_requests(requests)) == requests


@pytest.mark.parametrize("code, error_class", sorted(MEMOS_ERROR_CODES.items()))
@pytest.mark.parametrize("status", [200, 400])
def test_memos_business_codes(
    server: LoopbackServer, code: int, error_class: type[RerankError], status: int
) -> None:
    server.script(*[Reply(status, {"code": code, "message": "nope"})] * 3)
    with pytest.raises(error_class) as caught:
        make(server, max_retries=0).rerank("q", DOCS)
    assert caught.value.code == code
    assert caught.value.status_code == status
    assert "nope" in str(caught.value)


def test_unknown_business_code_follows_its_status_prefix(server: LoopbackServer) -> None:
    server.script(Reply(200, {"code": 50321, "message": "overloaded"}))
    with pytest.raises(BackendUnavailableError) as caught:
        make(server, max_retries=0).rerank("q", DOCS)
    assert caught.value.code == 50321


def test_rate_limit_code_with_429_keeps_retry_after(server: LoopbackServer) -> None:
    server.script(Reply(429, {"code": 40309, "message": "slow"}, headers={"Retry-After": "7"}))
    with pytest.raises(RateLimitError) as caught:
        make(server, max_retries=0).rerank("q", DOCS)
    assert caught.value.retry_after == 7.0
    assert (caught.value.status_code, caught.value.code) == (429, 40309)


def test_retry_after_longer_than_backoff_max_is_not_waited(server: LoopbackServer) -> None:
    server.script(Reply(429, {}, headers={"Retry-After": "120"}))
    started = time.monotonic()
    with pytest.raises(RateLimitError) as caught:
        make(server, max_retries=3).rerank("q", DOCS)
    assert time.monotonic() - started < 5  # not the 120 s asked for
    assert caught.value.retry_after == 120.0
    assert len(server.requests) == 1


def test_wrapped_success_envelope_is_read(server: LoopbackServer) -> None:
    server.script(Reply(200, {"code": 0, "message": "ok", "data": OK}))
    assert [r.index for r in make(server).rerank("q", DOCS)] == expected_order(DOCS)


@pytest.mark.parametrize("mode", MODES)
def test_connection_refused_is_backend_unavailable(mode: str) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago; nothing listens
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    reranker = MemOSReranker(api_key=KEY, base_url=url, max_retries=1, **FAST)
    with pytest.raises(BackendUnavailableError):
        invoke(reranker, mode, "q", DOCS)


def test_total_time_is_bounded_by_timeout_and_retries(server: LoopbackServer) -> None:
    server.script(*[Reply(200, OK, delay=0.5)] * 3)
    started = time.monotonic()
    with pytest.raises(RerankTimeoutError):
        make(server, timeout=0.15, max_retries=2).rerank("q", DOCS)
    elapsed = time.monotonic() - started
    assert elapsed < 3 * 0.15 + 2 * 2.0
    assert len(server.wait_for_requests(3)) == 3


@pytest.mark.parametrize("mode", MODES)
def test_a_trickling_answer_cannot_outlast_the_timeout(server: LoopbackServer, mode: str) -> None:
    # Each byte arrives well within httpx's per-read timeout; the whole takes ~4 s.
    server.script(Reply(200, OK, trickle=0.05))
    started = time.monotonic()
    with pytest.raises(RerankTimeoutError, match=r"\b0\.3 s\b"):
        invoke(make(server, timeout=0.3, max_retries=0), mode, "q", DOCS)
    assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------- big and concurrent calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_n", [None, 10])
def test_300_documents_are_split_and_merged(
    server: LoopbackServer, mode: str, top_n: int | None
) -> None:
    docs = [f"doc {i}" for i in range(300)]
    server = server
    inflight, peak, lock = 0, 0, threading.Lock()

    def counting(request: Recorded) -> Reply:
        nonlocal inflight, peak
        with lock:
            inflight += 1
            peak = max(peak, inflight)
        time.sleep(0.05)
        with lock:
            inflight -= 1
        return cohere_shaped(request)

    server.script(*[counting] * 5)
    results = invoke(make(server, max_concurrency=3), mode, "q", docs, top_n=top_n)
    expected = expected_order(docs)
    assert [r.index for r in results] == (expected if top_n is None else expected[:top_n])
    assert [r.score for r in results] == [score_of(docs[i]) for i in expected][: len(results)]
    sent = [request.body["documents"] for request in server.requests]
    assert sorted(map(len, sent)) == [44, 64, 64, 64, 64]
    assert sorted(d for chunk in sent for d in chunk) == sorted(docs)
    assert all(request.body.get("top_n") == top_n for request in server.requests)
    assert 1 < peak <= 3


def test_token_budget_splits_requests(server: LoopbackServer) -> None:
    server.script(*[cohere_shaped] * 10)
    docs = [f"{'x' * 400} doc {i}" for i in range(6)]  # about 103 tokens each
    results = make(server, max_tokens_per_request=250).rerank("q", docs)
    assert [r.index for r in results] == expected_order(docs)
    assert [len(r.body["documents"]) for r in server.requests] == [2, 2, 2]


def test_a_failed_part_fails_the_whole_call(server: LoopbackServer) -> None:
    server.script(cohere_shaped, Reply(401, {}), cohere_shaped)
    docs = [f"doc {i}" for i in range(150)]
    with pytest.raises(AuthenticationError):
        make(server, max_concurrency=1).rerank("q", docs)


def test_64_concurrent_arerank_calls_on_one_instance(server: LoopbackServer) -> None:
    inflight, peak, lock = 0, 0, threading.Lock()

    def counting(request: Recorded) -> Reply:
        nonlocal inflight, peak
        with lock:
            inflight += 1
            peak = max(peak, inflight)
        time.sleep(0.05)
        with lock:
            inflight -= 1
        return cohere_shaped(request)

    server.script(*[counting] * 64)
    reranker = make(server)
    calls = [[f"doc {i}", f"doc {i + 1}", f"doc {i + 2}"] for i in range(64)]

    async def main() -> list[Any]:
        async with reranker:
            return list(await asyncio.gather(*(reranker.arerank("q", d) for d in calls)))

    answers = asyncio.run(main())
    for docs, results in zip(calls, answers, strict=True):
        assert [r.index for r in results] == expected_order(docs)
    assert len(server.requests) == 64
    assert peak > 2  # the calls really overlap on the shared client


# ---------------------------------------------------------------- keys, config, limits


def test_missing_key_is_a_clear_error_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOS_API_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="MEMOS_API_KEY") as caught:
        MemOSReranker()
    assert "api_key" in str(caught.value)


def test_key_and_base_url_from_environment(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMOS_API_KEY", KEY)
    monkeypatch.setenv("MEMOS_BASE_URL", server.url + "/api/openmem/v1/")
    server.script(cohere_shaped)
    MemOSReranker(**FAST).rerank("q", DOCS)
    assert server.requests[0].path == "/api/openmem/v1/rerank"
    assert server.requests[0].headers["Authorization"] == f"Token {KEY}"


def test_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOS_BASE_URL", raising=False)
    reranker = MemOSReranker(api_key=KEY)
    assert reranker.url == DEFAULT_MEMOS_BASE_URL + "/rerank"
    assert DEFAULT_MEMOS_BASE_URL == "https://memos.memtensor.cn/api/openmem/v1"


def test_key_never_in_repr_str_errors_or_logs(
    server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (None, "httpx", "httpcore", "memos_rerank_integrations"):
        caplog.set_level("DEBUG", logger=name)

    def echo_key(request: Recorded) -> Reply:
        return Reply(401, {"message": f"invalid key {request.headers['Authorization']}"})

    server.script(
        cohere_shaped,
        echo_key,
        Reply(429, {"message": f"slow {KEY}"}),
        Reply(500, {"detail": KEY}),
        Reply(200, {"code": 40132, "message": f"expired: {KEY}"}),
        Reply(200, {"results": [{"index": 0, "relevance_score": KEY}]}),
        Reply(200, OK, delay=1.5),
    )
    reranker = make(server, max_retries=0, timeout=1.0)
    errors: list[BaseException] = []
    reranker.rerank("q", DOCS)
    for _ in range(6):
        with pytest.raises(RerankError) as caught:
            reranker.rerank("q", DOCS)
        errors.append(caught.value)
    assert [type(e) for e in errors] == [
        AuthenticationError,
        RateLimitError,
        BackendUnavailableError,
        AuthenticationError,
        MalformedResponseError,
        RerankTimeoutError,
    ]
    texts = [repr(reranker), str(reranker), repr(vars(reranker))]
    for error in errors:
        texts += exception_texts(error)
    assert caplog.records, "DEBUG logging produced no records to check"
    texts += [record.getMessage() for record in caplog.records]
    texts += [caplog.text]
    assert KEY in server.requests[0].headers["Authorization"]  # it was really sent
    for text in texts:
        assert KEY not in text
    assert "**********" in str(errors[0])


@pytest.mark.parametrize("mode", MODES)
def test_long_query_and_documents_are_truncated_with_a_warning(
    server: LoopbackServer, mode: str
) -> None:
    server.script(cohere_shaped)
    query = "q" * 9000  # about 2250 estimated tokens > 2048
    docs = ["a" * 20 + " doc 1", "doc 2"]
    with pytest.warns(UserWarning, match="query"):
        invoke(make(server), mode, query, docs)
    sent = server.requests[0].body
    assert 0 < len(sent["query"]) <= 2048 * 4 and query.startswith(sent["query"])
    assert sent["documents"] == docs


def test_long_document_is_cut_to_its_limit(server: LoopbackServer) -> None:
    def answer(request: Recorded) -> Reply:
        n = len(request.body["documents"])
        return Reply(200, {"results": [{"index": i, "relevance_score": 0.5} for i in range(n)]})

    server.script(answer)
    with pytest.warns(UserWarning, match=r"documents\[1\]"):
        make(server, max_document_tokens=10).rerank("q", ["short", "y" * 100])
    assert server.requests[0].body["documents"] == ["short", "y" * 40]


def test_too_long_raises_when_asked(server: LoopbackServer) -> None:
    with pytest.raises(InvalidInputError, match="over the limit of 2048"):
        make(server, on_too_long="raise").rerank("字" * 2049, DOCS)
    assert server.requests == []


def test_empty_documents_make_no_request(server: LoopbackServer) -> None:
    assert make(server).rerank("q", []) == []
    assert asyncio.run(make(server).arerank("q", [])) == []
    assert server.requests == []


@pytest.mark.parametrize(
    "query, docs, top_n",
    [(None, DOCS, None), ("q", "doc", None), ("q", [1, 2], None), ("q", DOCS, 0)],
)
def test_bad_input_is_rejected_before_any_request(
    server: LoopbackServer, query: Any, docs: Any, top_n: Any
) -> None:
    with pytest.raises(InvalidInputError):
        make(server).rerank(query, docs, top_n=top_n)
    assert server.requests == []


def test_injected_clients_are_used_and_left_open(server: LoopbackServer) -> None:
    seen: list[str] = []
    client = httpx.Client(event_hooks={"request": [lambda r: seen.append("sync")]})

    async def hook(request: httpx.Request) -> None:
        seen.append("async")

    server.script(cohere_shaped, cohere_shaped)

    async def main() -> None:
        async_client = httpx.AsyncClient(event_hooks={"request": [hook]})
        reranker = make(server, http_client=client, async_http_client=async_client)
        async with reranker:
            await reranker.arerank("q", DOCS)
        assert not async_client.is_closed
        await async_client.aclose()

    with make(server, http_client=client) as reranker:
        reranker.rerank("q", DOCS)
    assert not client.is_closed
    asyncio.run(main())
    assert seen == ["sync", "async"]
    client.close()


def test_own_clients_are_closed_and_remade(server: LoopbackServer) -> None:
    server.script(cohere_shaped, cohere_shaped, cohere_shaped)
    reranker = make(server)
    reranker.rerank("q", DOCS)
    first = reranker._clients.sync()
    reranker.close()
    assert first.is_closed
    reranker.rerank("q", DOCS)  # a closed reranker makes a new client when used again
    assert asyncio.run(reranker.arerank("q", DOCS))  # and async works on a fresh loop
    reranker.close()


def test_connections_are_pooled(server: LoopbackServer) -> None:
    server.script(*[cohere_shaped] * 6)
    reranker = make(server)
    for _ in range(3):
        reranker.rerank("q", DOCS)

    async def three_calls() -> None:
        for _ in range(3):
            await reranker.arerank("q", DOCS)

    asyncio.run(three_calls())
    ports = [request.client_port for request in server.requests]
    assert len(set(ports[:3])) == 1  # one reused sync connection
    assert len(set(ports[3:])) == 1  # one reused async connection
    assert ports[0] != ports[3]


def test_async_calls_from_two_event_loops(server: LoopbackServer) -> None:
    server.script(cohere_shaped, cohere_shaped)
    reranker = make(server)
    for _ in range(2):  # each asyncio.run has its own loop
        assert len(asyncio.run(reranker.arerank("q", DOCS))) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "ftp://example.com"},
        {"base_url": "http://user:pw@example.com"},
        {"timeout": 0},
        {"max_retries": -1},
        {"max_documents_per_request": 0},
        {"on_too_long": "ignore"},
        {"model": ""},
    ],
)
def test_bad_options_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        MemOSReranker(**{"api_key": KEY, **kwargs})


# ---------------------------------------------------------------- through the LangChain adapter


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAILURES))
def test_compressor_falls_back_to_original_order_on_each_failure(
    server: LoopbackServer, mode: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    replies, error_class, _ = FAILURES[name]
    server.script(*replies)
    documents = [
        Document(page_content=text, metadata={"source": i}, id=f"id-{i}")
        for i, text in enumerate(DOCS)
    ]
    compressor = RerankCompressor(
        reranker=make(server, max_retries=1, timeout=timeout_for(replies))
    )
    if mode == "sync":
        out = compressor.compress_documents(documents, "q")
    else:
        out = asyncio.run(compressor.acompress_documents(documents, "q"))
    assert [d.page_content for d in out] == DOCS
    assert [d.id for d in out] == [d.id for d in documents]
    assert all(d.metadata == {"source": i, "rerank_fallback": True} for i, d in enumerate(out))
    assert all("rerank_fallback" not in d.metadata for d in documents)  # inputs untouched
    assert error_class.__name__ in caplog.text
    assert KEY not in caplog.text


def test_compressor_without_fallback_raises(server: LoopbackServer) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    server.script(Reply(401, {}))
    compressor = RerankCompressor(reranker=make(server), fallback=False)
    with pytest.raises(AuthenticationError):
        compressor.compress_documents([Document(page_content=d) for d in DOCS], "q")


def test_compressor_with_a_working_service_ranks(server: LoopbackServer) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    server.script(cohere_shaped)
    compressor = RerankCompressor(reranker=make(server), top_n=2)
    out = compressor.compress_documents([Document(page_content=d) for d in DOCS], "q")
    assert [d.page_content for d in out] == [DOCS[i] for i in expected_order(DOCS)[:2]]
    assert [d.metadata["relevance_score"] for d in out] == [score_of(d.page_content) for d in out]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["500 always", "401", "invalid json", "duplicate index"])
def test_llama_index_postprocessor_falls_back_too(
    server: LoopbackServer, mode: str, name: str
) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from memos_rerank_integrations.llama_index import RerankPostprocessor

    replies, _, _ = FAILURES[name]
    server.script(*replies)
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=0.1) for i, t in enumerate(DOCS)
    ]
    postprocessor = RerankPostprocessor(
        reranker=make(server, max_retries=1, timeout=timeout_for(replies))
    )
    if mode == "sync":
        out = postprocessor.postprocess_nodes(nodes, query_bundle=QueryBundle("q"))
    else:
        out = asyncio.run(postprocessor.apostprocess_nodes(nodes, query_bundle=QueryBundle("q")))
    assert [n.node.node_id for n in out] == ["n0", "n1", "n2"]
    assert all(n.node.metadata.get("rerank_fallback") is True for n in out)
