"""FallbackReranker over real backends (loopback servers) and duck-typed ones."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    FallbackReranker,
    HTTPReranker,
    InvalidInputError,
    MalformedResponseError,
    MemOSReranker,
    RerankResult,
    RerankTimeoutError,
    Stage,
)
from memos_rerank_integrations._fallback import FallbackAnswer
from memos_rerank_integrations._types import rank_scores

from ._loopback import (
    MODES,
    LoopbackServer,
    Reply,
    cohere_shaped,
    expected_order,
    score_of,
    tei_shaped,
    timeout_for,
)

KEY = "sk-fallback-SECRET-1234"
FAST: dict[str, Any] = {"backoff_base": 0.001, "backoff_max": 1.0}
DOCS = ["doc 8", "doc 9", "doc 10"]


@pytest.fixture
def primary() -> Iterator[LoopbackServer]:
    srv = LoopbackServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def secondary() -> Iterator[LoopbackServer]:
    srv = LoopbackServer().start()
    yield srv
    srv.stop()


def detailed(chain: FallbackReranker, mode: str, *args: Any, **kwargs: Any) -> FallbackAnswer:
    if mode == "sync":
        return chain.rerank_detailed(*args, **kwargs)
    return asyncio.run(chain.arerank_detailed(*args, **kwargs))


class LengthReranker:
    """A small in-process reranker (sync only): shorter documents score higher."""

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return rank_scores([1 / (1 + len(d)) for d in documents], top_n=top_n)


class AsyncOnlyReranker:
    """An async-only in-process reranker: scores by the number in the document."""

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        await asyncio.sleep(0)
        return rank_scores([score_of(d) for d in documents], top_n=top_n)


class FlakyReranker:
    """Fails for queries ending in an odd digit, after a random pause, so that
    concurrent calls interleave; answers for the others."""

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        await asyncio.sleep(random.uniform(0, 0.01))
        if int(query[-1]) % 2:
            raise BackendUnavailableError("odd query", backend="flaky")
        return rank_scores([score_of(d) for d in documents], top_n=top_n)

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return asyncio.run(self.arerank(query, documents, top_n))


class GarbageReranker:
    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        return [RerankResult(0, 1.0, Stage.RELEVANT) for _ in documents]  # index 0 repeated


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "failure, error_class",
    [
        (Reply(401, {"message": "bad key"}), AuthenticationError),
        (Reply(500, {"message": "down"}), BackendUnavailableError),
        (Reply(200, {}, delay=0.5), RerankTimeoutError),
        (Reply(200, {"results": [{"index": 7, "relevance_score": 1}]}), MalformedResponseError),
    ],
)
def test_memos_fails_and_the_tei_server_answers(
    primary: LoopbackServer,
    secondary: LoopbackServer,
    mode: str,
    failure: Reply,
    error_class: type[Exception],
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary.script(failure)
    secondary.script(tei_shaped)
    memos = MemOSReranker(
        api_key=KEY, base_url=primary.url, max_retries=0, timeout=timeout_for([failure])
    )
    tei = HTTPReranker(secondary.url, api_format="tei")
    chain = FallbackReranker([memos, tei])
    with caplog.at_level(logging.WARNING):
        answer = detailed(chain, mode, "q", DOCS, top_n=2)
    assert [r.index for r in answer.results] == expected_order(DOCS)[:2]
    assert answer.backend is tei and answer.position == 1
    assert [type(e) for e in answer.errors] == [error_class]
    assert error_class.__name__ in caplog.text and "falling back to 2/2" in caplog.text
    assert KEY not in caplog.text
    if mode == "sync":  # same thread: the record is visible to the caller
        assert chain.last_backend is tei


def test_first_backend_answers_without_warnings(
    primary: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    primary.script(cohere_shaped)
    memos = MemOSReranker(api_key=KEY, base_url=primary.url)
    chain = FallbackReranker([memos, LengthReranker()])
    with caplog.at_level(logging.WARNING):
        results = chain.rerank("q", DOCS)
    assert [r.index for r in results] == expected_order(DOCS)
    assert chain.last_backend is memos
    assert not caplog.records


@pytest.mark.parametrize("mode", MODES)
def test_all_fail_raises_the_last_error_with_the_chain(
    primary: LoopbackServer, secondary: LoopbackServer, mode: str
) -> None:
    primary.script(Reply(401, {}))
    secondary.script(Reply(503, {}))
    chain = FallbackReranker(
        [
            MemOSReranker(api_key=KEY, base_url=primary.url, max_retries=0),
            HTTPReranker(secondary.url, max_retries=0),
            GarbageReranker(),
        ]
    )
    with pytest.raises(MalformedResponseError, match="twice") as caught:
        detailed(chain, mode, "q", DOCS)
    chained = []
    error: BaseException | None = caught.value
    while error is not None:
        chained.append(type(error))
        error = error.__context__
    assert chained.index(BackendUnavailableError) < chained.index(AuthenticationError)
    assert chain.last_backend is None


@pytest.mark.parametrize("mode", MODES)
def test_duck_typed_sync_only_and_async_only_backends(mode: str) -> None:
    broken = FallbackReranker([GarbageReranker(), AsyncOnlyReranker()])
    answer = detailed(broken, mode, "q", DOCS)
    assert answer.position == 1
    assert [r.index for r in answer.results] == expected_order(DOCS)
    sync_only = FallbackReranker([LengthReranker()])
    answer = detailed(sync_only, mode, "q", ["long document", "short", "mid one"])
    assert [r.index for r in answer.results] == [1, 2, 0]


def test_async_only_backend_inside_a_running_loop_is_skipped() -> None:
    chain = FallbackReranker([AsyncOnlyReranker(), LengthReranker()])

    async def main() -> FallbackAnswer:
        return chain.rerank_detailed("q", DOCS)  # sync call from async code

    answer = asyncio.run(main())
    assert answer.position == 1
    assert isinstance(answer.errors[0], InvalidInputError)


def test_64_concurrent_calls_each_see_their_own_backend() -> None:
    flaky, steady = FlakyReranker(), LengthReranker()
    chain = FallbackReranker([flaky, steady])

    async def one(number: int) -> tuple[int, Any, int]:
        answer = await chain.arerank_detailed(f"query {number}", DOCS)
        return number, chain.last_backend, answer.position

    async def main() -> list[tuple[int, Any, int]]:
        return list(await asyncio.gather(*(one(n) for n in range(64))))

    for number, seen, position in asyncio.run(main()):
        expected = steady if number % 2 else flaky
        assert seen is expected
        assert position == (1 if number % 2 else 0)


def test_threads_each_see_their_own_backend() -> None:
    flaky, steady = FlakyReranker(), LengthReranker()
    chain = FallbackReranker([flaky, steady])

    def one(number: int) -> bool:
        chain.rerank(f"query {number}", DOCS)
        return chain.last_backend is (steady if number % 2 else flaky)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(32)))
    # A fresh context has made no call through this chain.
    assert contextvars.Context().run(lambda: chain.last_backend) is None


def test_bad_input_fails_fast_without_trying_backends() -> None:
    chain = FallbackReranker([GarbageReranker()])
    with pytest.raises(InvalidInputError):
        chain.rerank("q", DOCS, top_n=0)
    with pytest.raises(InvalidInputError):
        chain.rerank("q", "not a list")


@pytest.mark.parametrize("rerankers", [[], "abc", [object()], None])
def test_bad_chains_are_rejected(rerankers: Any) -> None:
    with pytest.raises(InvalidInputError):
        FallbackReranker(rerankers)


def test_close_closes_the_backends(primary: LoopbackServer) -> None:
    primary.script(cohere_shaped)
    memos = MemOSReranker(api_key=KEY, base_url=primary.url)
    with FallbackReranker([memos, LengthReranker()]) as chain:
        chain.rerank("q", DOCS)
        client = memos._clients.sync()
    assert client.is_closed


def test_through_the_langchain_compressor(
    primary: LoopbackServer, secondary: LoopbackServer
) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    primary.script(Reply(500, {}))
    secondary.script(tei_shaped)
    tei = HTTPReranker(secondary.url, api_format="tei")
    chain = FallbackReranker([MemOSReranker(api_key=KEY, base_url=primary.url, max_retries=0), tei])
    compressor = RerankCompressor(reranker=chain, top_n=2)
    out = compressor.compress_documents([Document(page_content=d) for d in DOCS], "q")
    assert [d.page_content for d in out] == [DOCS[i] for i in expected_order(DOCS)[:2]]
    assert all("rerank_fallback" not in d.metadata for d in out)
    assert chain.last_backend is tei  # the record survives the adapter
    assert "FallbackReranker" in repr(chain) and KEY not in repr(chain)


@pytest.mark.parametrize("mode", MODES)
def test_memos_cloud_then_a_local_qwen_reranker(
    primary: LoopbackServer, tmp_path_factory: pytest.TempPathFactory, mode: str
) -> None:
    from memos_rerank_integrations import QwenReranker
    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    local = QwenReranker(build_tiny_qwen_reranker(tmp_path_factory.mktemp("qwen")), device="cpu")
    primary.script(Reply(503, {"message": "maintenance"}))
    memos = MemOSReranker(api_key=KEY, base_url=primary.url, max_retries=0)
    chain = FallbackReranker([memos, local])
    docs = ["User likes playing badminton.", "User prefers concise replies."]
    answer = detailed(chain, mode, "What are the user's hobbies?", docs)
    assert answer.backend is local
    assert answer.results == local.rerank("What are the user's hobbies?", docs)
