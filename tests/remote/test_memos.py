"""What is particular to MemOSReranker, against a real HTTP server on 127.0.0.1: the
MemOS business codes (in a 200 or with an error status), the wrapped answer, the
public endpoint and the MemOS length limits. What every remote backend does is in
test_contract.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    MemOSReranker,
    RateLimitError,
    RerankError,
)
from memos_rerank_integrations._remote.memos import DEFAULT_MEMOS_BASE_URL, MEMOS_ERROR_CODES

from ..support.loopback import (
    FAST,
    MODES,
    LoopbackServer,
    Reply,
    cohere_results,
    cohere_shaped,
    exception_texts,
    expected_order,
    invoke,
)

KEY = "sk-memos-SECRET-7f3a9c"
DOCS = ["doc 1", "doc 2", "doc 3"]
OK = cohere_results(DOCS)


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MEMOS_API_KEY", "MEMOS_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def make(server: LoopbackServer, **kwargs: Any) -> MemOSReranker:
    options = {"api_key": KEY, "base_url": server.url, **FAST, **kwargs}
    return MemOSReranker(**options)


# ---------------------------------------------------------------- business codes


@pytest.mark.parametrize("mode", MODES)
def test_memos_rate_limit_code_in_200_is_retried(server: LoopbackServer, mode: str) -> None:
    server.script(Reply(200, {"code": 40309, "message": "token rate limit"}), cohere_shaped)
    results = invoke(make(server), mode, "q", DOCS)
    assert len(results) == 3 and len(server.requests) == 2


@pytest.mark.parametrize("mode", MODES)
def test_an_auth_code_in_200_fails_without_a_retry(server: LoopbackServer, mode: str) -> None:
    server.script(*[Reply(200, {"code": 40132, "message": "key invalid"})] * 2)
    with pytest.raises(AuthenticationError) as caught:
        invoke(make(server, max_retries=1), mode, "q", DOCS)
    assert caught.value.backend == "memos"
    assert len(server.wait_for_requests(1)) == 1


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
    assert caught.value.backend == "memos"
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


def test_a_key_in_a_business_message_is_masked(
    server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    server.script(Reply(200, {"code": 40132, "message": f"expired: {KEY}"}))
    with pytest.raises(AuthenticationError) as caught:
        make(server, max_retries=0).rerank("q", DOCS)
    for text in [*exception_texts(caught.value), caplog.text]:
        assert KEY not in text
    assert "expired: **********" in str(caught.value)


@pytest.mark.parametrize("mode", MODES)
def test_compressor_falls_back_on_a_business_code(
    server: LoopbackServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    server.script(Reply(200, {"code": 40132, "message": "key invalid"}))
    documents = [Document(page_content=text, metadata={"source": i}) for i, text in enumerate(DOCS)]
    compressor = RerankCompressor(reranker=make(server, max_retries=1))
    if mode == "sync":
        out = compressor.compress_documents(documents, "q")
    else:
        out = asyncio.run(compressor.acompress_documents(documents, "q"))
    assert [d.page_content for d in out] == DOCS
    assert all(d.metadata == {"source": i, "rerank_fallback": True} for i, d in enumerate(out))
    assert "AuthenticationError" in caplog.text
    assert KEY not in caplog.text


def test_wrapped_success_envelope_is_read(server: LoopbackServer) -> None:
    server.script(Reply(200, {"code": 0, "message": "ok", "data": OK}))
    assert [r.index for r in make(server).rerank("q", DOCS)] == expected_order(DOCS)


# ---------------------------------------------------------------- the service's defaults


def test_default_endpoint() -> None:
    reranker = MemOSReranker(api_key=KEY)
    assert reranker.url == DEFAULT_MEMOS_BASE_URL + "/rerank"
    assert DEFAULT_MEMOS_BASE_URL == "https://memos.memtensor.cn/api/openmem/v1"


@pytest.mark.parametrize("mode", MODES)
def test_a_query_over_2048_tokens_is_truncated_with_a_warning(
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


def test_a_query_over_2048_tokens_raises_when_asked(server: LoopbackServer) -> None:
    with pytest.raises(InvalidInputError, match="over the limit of 2048"):
        make(server, on_too_long="raise").rerank("字" * 2049, DOCS)
    assert server.requests == []
