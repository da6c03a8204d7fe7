"""HTTPReranker (vLLM / infinity / TEI servers) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    HTTPReranker,
    InvalidInputError,
    MalformedResponseError,
    RateLimitError,
    RerankError,
    RerankTimeoutError,
    Stage,
)

from ..support.loopback import (
    FAST,
    MODES,
    SLOWER,
    LoopbackServer,
    Recorded,
    Reply,
    cohere_shaped,
    expected_order,
    invoke,
    tei_shaped,
    timeout_for,
)

KEY = "tei-token-SECRET-55aa"
DOCS = ["doc 4", "doc 5", "doc 6", "doc 7"]


def tei_list(scores: list[tuple[Any, Any]]) -> Reply:
    return Reply(200, [{"index": i, "score": s} for i, s in scores])


@pytest.mark.parametrize("mode", MODES)
def test_cohere_format_like_vllm(server: LoopbackServer, mode: str) -> None:
    server.script(cohere_shaped)
    reranker = HTTPReranker(
        server.url, model="Qwen/Qwen3-Reranker-0.6B", api_key=KEY, path="/v1/rerank", **FAST
    )
    results = invoke(reranker, mode, "q", DOCS, top_n=3)
    assert [r.index for r in results] == expected_order(DOCS)[:3]
    (request,) = server.requests
    assert request.path == "/v1/rerank"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body == {
        "query": "q",
        "documents": DOCS,
        "model": "Qwen/Qwen3-Reranker-0.6B",
        "top_n": 3,
    }


@pytest.mark.parametrize("instruction", [None, "Find memories about the user's hobbies"])
def test_qwen3_template_for_vllm(server: LoopbackServer, instruction: str | None) -> None:
    from memos_rerank_integrations._qwen_prompt import (
        DEFAULT_INSTRUCTION,
        PROMPT_PREFIX,
        PROMPT_SUFFIX,
        format_body,
    )

    def answer(request: Recorded) -> Reply:
        n = len(request.body["documents"])
        return Reply(200, {"results": [{"index": i, "relevance_score": 0.5} for i in range(n)]})

    server.script(answer)
    query, docs = "What are the user's hobbies?", ["User likes badminton.", "Lives in Hangzhou."]
    HTTPReranker(server.url, template="qwen3", instruction=instruction).rerank(query, docs)
    body = server.requests[0].body
    used = instruction or DEFAULT_INSTRUCTION
    # vLLM scores query + document: together they must be the model card's prompt.
    for sent, original in zip(body["documents"], docs, strict=True):
        expected = PROMPT_PREFIX + format_body(used, query, original) + PROMPT_SUFFIX
        assert body["query"] + sent == expected


def test_no_key_no_model_sends_neither(server: LoopbackServer) -> None:
    server.script(cohere_shaped)
    HTTPReranker(server.url).rerank("q", DOCS)
    (request,) = server.requests
    assert request.path == "/rerank"
    assert "Authorization" not in request.headers
    assert request.body == {"query": "q", "documents": DOCS}


@pytest.mark.parametrize("mode", MODES)
def test_tei_format(server: LoopbackServer, mode: str) -> None:
    server.script(tei_shaped)
    reranker = HTTPReranker(server.url, api_format="tei", api_key=KEY, **FAST)
    results = invoke(reranker, mode, "q", DOCS, top_n=2)
    assert [r.index for r in results] == expected_order(DOCS)[:2]
    (request,) = server.requests
    assert request.body == {"query": "q", "texts": DOCS, "raw_scores": False, "truncate": True}
    assert request.headers["Authorization"] == f"Bearer {KEY}"


def test_tei_raw_scores_are_kept_and_staged(server: LoopbackServer) -> None:
    server.script(tei_list([(1, 4.5), (0, -2.25)]))
    reranker = HTTPReranker(server.url, api_format="tei", raw_scores=True, truncate=False)
    results = reranker.rerank("q", ["a", "b"])
    assert [(r.index, r.score, r.stage) for r in results] == [
        (1, 4.5, Stage.HIGHLY_RELEVANT),
        (0, -2.25, Stage.IRRELEVANT),
    ]
    assert server.requests[0].body["raw_scores"] is True
    assert server.requests[0].body["truncate"] is False


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_n", [None, 7])
def test_tei_300_documents_split_merged_cut_after_merge(
    server: LoopbackServer, mode: str, top_n: int | None
) -> None:
    docs = [f"doc {i}" for i in range(300)]
    server.script(*[tei_shaped] * 3)
    reranker = HTTPReranker(server.url, api_format="tei", max_documents_per_request=100)
    results = invoke(reranker, mode, "q", docs, top_n=top_n)
    expected = expected_order(docs)
    assert [r.index for r in results] == (expected if top_n is None else expected[:top_n])
    assert [len(r.body["texts"]) for r in server.requests] == [100, 100, 100]
    assert all("top_n" not in r.body for r in server.requests)


# api_format -> name -> (replies, error class, requests with max_retries=1)
FAILURES: dict[str, dict[str, tuple[list[Reply], type[RerankError], int]]] = {
    "cohere": {
        "500 always": ([Reply(500, {"message": "x"})] * 2, BackendUnavailableError, 2),
        "slow": ([Reply(200, {}, delay=SLOWER)] * 2, RerankTimeoutError, 2),
        "invalid json": ([Reply(200, "not json")], MalformedResponseError, 1),
        "bare list": ([tei_list([(0, 0.1)])], MalformedResponseError, 1),
        "401": ([Reply(401, {"message": "no"})], AuthenticationError, 1),
        "vllm 400": (
            [Reply(400, {"object": "error", "message": "too long", "code": 400})],
            InvalidInputError,
            1,
        ),
        "duplicate": (
            [Reply(200, {"results": [{"index": 0, "relevance_score": 0.1}] * 4})],
            MalformedResponseError,
            1,
        ),
    },
    "tei": {
        "503 always": ([Reply(503, {"error": "loading"})] * 2, BackendUnavailableError, 2),
        "429 always": ([Reply(429, {"error": "overloaded"})] * 2, RateLimitError, 2),
        "413": (
            [Reply(413, {"error": "payload", "error_type": "Validation"})],
            InvalidInputError,
            1,
        ),
        "dict instead of list": (
            [Reply(200, {"results": []})],
            MalformedResponseError,
            1,
        ),
        "out of range": ([tei_list([(0, 1), (1, 1), (2, 1), (4, 1)])], MalformedResponseError, 1),
        "missing": ([tei_list([(0, 1), (1, 1), (2, 1)])], MalformedResponseError, 1),
        "non-numeric": ([tei_list([(i, None) for i in range(4)])], MalformedResponseError, 1),
    },
}
CASES = [(fmt, name) for fmt, table in FAILURES.items() for name in table]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api_format, name", CASES)
def test_failures(server: LoopbackServer, mode: str, api_format: Any, name: str) -> None:
    replies, error_class, requests = FAILURES[api_format][name]
    server.script(*replies)
    reranker = HTTPReranker(
        server.url, api_format=api_format, max_retries=1, timeout=timeout_for(replies), **FAST
    )
    with pytest.raises(error_class) as caught:
        invoke(reranker, mode, "q", DOCS)
    assert caught.value.backend == "http"
    assert len(server.wait_for_requests(requests)) == requests


@pytest.mark.parametrize("mode", MODES)
def test_503_then_429_then_success(server: LoopbackServer, mode: str) -> None:
    server.script(
        Reply(503, {"error": "warming up"}),
        Reply(429, {}, headers={"Retry-After-Ms": "50"}),
        tei_shaped,
    )
    reranker = HTTPReranker(server.url, api_format="tei", max_retries=2, **FAST)
    assert [r.index for r in invoke(reranker, mode, "q", DOCS)] == expected_order(DOCS)
    assert len(server.requests) == 3


def test_vllm_error_message_reaches_the_user(server: LoopbackServer) -> None:
    server.script(Reply(400, {"object": "error", "message": "query is too long", "code": 400}))
    with pytest.raises(InvalidInputError, match="query is too long"):
        HTTPReranker(server.url, max_retries=0).rerank("q", DOCS)


def test_key_not_in_repr_or_logs(server: LoopbackServer, caplog: pytest.LogCaptureFixture) -> None:
    for name in (None, "httpx", "httpcore"):
        caplog.set_level("DEBUG", logger=name)
    server.script(Reply(500, {"error": f"bad {KEY}"}), tei_shaped)
    reranker = HTTPReranker(server.url, api_format="tei", api_key=KEY, **FAST)
    reranker.rerank("q", DOCS)
    assert caplog.records
    assert KEY not in caplog.text and KEY not in repr(reranker) and KEY not in repr(vars(reranker))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"api_format": "jina"},
        {"model": ""},
        {"path": 3},
        {"max_concurrency": 0},
        {"max_tokens_per_request": -5},
        {"template": "llama"},
        {"instruction": "no template"},
        {"template": "qwen3", "instruction": 5},
    ],
)
def test_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        HTTPReranker("http://127.0.0.1:9", **kwargs)
