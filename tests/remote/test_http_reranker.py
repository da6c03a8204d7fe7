"""What is particular to HTTPReranker (vLLM / infinity / TEI servers), against a real
HTTP server on 127.0.0.1: its path and model options, the Qwen3 template for vLLM,
running without a key, and TEI's own options. What every remote backend does, in
both wire formats, is in test_contract.py."""

from __future__ import annotations

from typing import Any

import pytest

from memos_rerank_integrations import HTTPReranker, InvalidInputError, Stage

from ..support.loopback import (
    FAST,
    MODES,
    LoopbackServer,
    Recorded,
    Reply,
    cohere_shaped,
    expected_order,
    invoke,
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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"api_format": "jina"},
        {"path": 3},
        {"template": "llama"},
        {"instruction": "no template"},
        {"template": "qwen3", "instruction": 5},
    ],
)
def test_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        HTTPReranker("http://127.0.0.1:9", **kwargs)
