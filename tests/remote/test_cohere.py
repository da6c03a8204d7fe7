"""What is particular to CohereReranker: the real Cohere SDK talking to a
Cohere-v2-shaped server on 127.0.0.1 (its request options, its clients, its response
model). What every remote backend does is in test_contract.py."""

from __future__ import annotations

import sys
from typing import Any

import cohere
import pytest

from memos_rerank_integrations import CohereReranker, InvalidInputError

from ..support.loopback import (
    FAST,
    MODES,
    LoopbackServer,
    Reply,
    cohere_shaped,
    expected_order,
    invoke,
    score_of,
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


@pytest.mark.parametrize("value", [0, -1, True, "512", 1.5])
def test_bad_max_tokens_per_doc_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidInputError, match="max_tokens_per_doc"):
        CohereReranker(api_key=KEY, max_tokens_per_doc=value)


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cohere", None)  # makes `import cohere` fail
    with pytest.raises(ImportError, match=r"memos-rerank-integrations\[cohere\]"):
        CohereReranker(api_key=KEY)


def test_injected_sdk_client_needs_no_key(server: LoopbackServer) -> None:
    server.script(cohere_shaped)
    client = cohere.ClientV2(api_key="injected", base_url=server.url, max_retries=0)
    reranker = CohereReranker(client=client, async_client=object())
    assert [r.index for r in reranker.rerank("q", DOCS)] == expected_order(DOCS)
    assert server.requests[0].headers["Authorization"] == "Bearer injected"


@pytest.mark.parametrize("mode", MODES)
def test_the_sdk_reads_a_numeric_string_index_as_the_number(
    server: LoopbackServer, mode: str
) -> None:
    # The one malformed answer of the contract the SDK's response model turns into a
    # valid one (the other backends reject it).
    answer = {"results": [{"index": str(i), "relevance_score": 0.1 * i} for i in range(3)]}
    server.script(Reply(200, answer))
    results = invoke(make(server), mode, "q", DOCS)
    assert [(r.index, type(r.index)) for r in results] == [(2, int), (1, int), (0, int)]


@pytest.mark.parametrize(("count", "sizes"), [(100, [100]), (101, [100, 1]), (200, [100, 100])])
def test_one_request_per_search_unit_of_100_documents(
    server: LoopbackServer, count: int, sizes: list[int]
) -> None:
    # Cohere bills a search unit per query of up to 100 documents: a call of exactly
    # 100 is one request, and one more document makes a second.
    server.script(*[cohere_shaped] * len(sizes))
    docs = [f"doc {i}" for i in range(count)]
    results = make(server, max_concurrency=1).rerank("q", docs)
    assert [r.index for r in results] == expected_order(docs)
    assert [len(request.body["documents"]) for request in server.requests] == sizes
