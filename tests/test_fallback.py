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

from .support.loopback import (
    MODES,
    SLOWER,
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
        (Reply(200, {}, delay=SLOWER), RerankTimeoutError),
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


# ---------------------------------------------------------------- duck-typed answers


class ListedReranker:
    """Answers with the given items as they are (any order, any number types)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        return list(self.items)

    async def arerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        return list(self.items)


def _item(index: Any, score: Any) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(index=index, score=score)


@pytest.mark.parametrize("mode", MODES)
def test_a_valid_but_unsorted_ranking_comes_back_best_first(mode: str) -> None:
    # In input order, not by score; 1 and 3 tie and keep input order.
    backend = ListedReranker([_item(0, 0.1), _item(1, 0.7), _item(2, 0.9), _item(3, 0.7)])
    answer = detailed(FallbackReranker([backend]), mode, "q", ["a", "b", "c", "d"])
    assert [(r.index, r.score) for r in answer.results] == [(2, 0.9), (1, 0.7), (3, 0.7), (0, 0.1)]
    assert [r.stage for r in answer.results] == [
        Stage.HIGHLY_RELEVANT,
        Stage.RELEVANT,
        Stage.RELEVANT,
        Stage.IRRELEVANT,
    ]


def _numpy_backend() -> ListedReranker:
    import numpy as np

    return ListedReranker(
        [_item(np.int64(1), np.float32(0.75)), _item(np.int32(0), np.float64(0.25))]
    )


@pytest.mark.parametrize("mode", MODES)
def test_numpy_scored_backends_are_used_and_give_plain_numbers(mode: str) -> None:
    chain = FallbackReranker([_numpy_backend(), LengthReranker()])
    answer = detailed(chain, mode, "q", ["a", "b"])
    assert answer.position == 0 and answer.errors == ()
    assert [(r.index, r.score) for r in answer.results] == [(1, 0.75), (0, 0.25)]
    assert all(type(r.index) is int and type(r.score) is float for r in answer.results)


@pytest.mark.parametrize("mode", MODES)
def test_numpy_scored_backends_are_used_by_both_adapters(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from memos_rerank_integrations.langchain import RerankCompressor
    from memos_rerank_integrations.llama_index import RerankPostprocessor

    compressor = RerankCompressor(reranker=_numpy_backend())
    postprocessor = RerankPostprocessor(reranker=_numpy_backend())
    docs = [Document(page_content=t) for t in ("a", "b")]
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in ("a", "b")]
    if mode == "sync":
        out = compressor.compress_documents(docs, "q")
        ranked = postprocessor.postprocess_nodes(nodes, query_bundle=QueryBundle("q"))
    else:
        out = asyncio.run(compressor.acompress_documents(docs, "q"))
        ranked = asyncio.run(postprocessor.apostprocess_nodes(nodes, query_bundle=QueryBundle("q")))
    assert [d.page_content for d in out] == ["b", "a"]
    assert [type(d.metadata["relevance_score"]) for d in out] == [float, float]
    assert [n.node.get_content() for n in ranked] == ["b", "a"]
    assert [n.score for n in ranked] == [0.75, 0.25]
    assert "rerank_fallback" not in caplog.text and not caplog.records


@pytest.mark.parametrize(
    "items",
    [
        "numpy bool score",
        "numpy bool index",
        "numpy nan",
        "numpy inf",
        "float index",
        "string score",
        "huge int score",
    ],
)
def test_numbers_that_are_not_scores_are_still_rejected(items: str) -> None:
    import numpy as np

    bad = {
        "numpy bool score": [_item(0, np.bool_(True)), _item(1, 0.5)],
        "numpy bool index": [_item(np.bool_(False), 0.1), _item(1, 0.5)],
        "numpy nan": [_item(0, np.float32("nan")), _item(1, 0.5)],
        "numpy inf": [_item(0, np.float64("inf")), _item(1, 0.5)],
        "float index": [_item(np.float64(0.0), 0.1), _item(1, 0.5)],
        "string score": [_item(0, "0.1"), _item(1, 0.5)],
        "huge int score": [_item(0, 10**400), _item(1, 0.5)],
    }[items]
    chain = FallbackReranker([ListedReranker(bad), LengthReranker()])
    answer = chain.rerank_detailed("q", ["a", "b"])
    assert answer.position == 1
    assert [type(error) for error in answer.errors] == [MalformedResponseError]


# ---------------------------------------------------------------- secrets in foreign errors


class LeakyReranker:
    """Raises an exception that is not a RerankError and whose text holds the key
    (as a provider SDK's error echoing a request header might)."""

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        try:
            raise ValueError(f"upstream said: Authorization: Bearer {KEY}")
        except ValueError as inner:
            raise RuntimeError(f"request failed with key={KEY}") from inner

    async def arerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        return self.rerank(query, documents, top_n)


@pytest.mark.parametrize("mode", MODES)
def test_a_foreign_error_holding_the_key_is_never_logged(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from memos_rerank_integrations.langchain import RerankCompressor
    from memos_rerank_integrations.llama_index import RerankPostprocessor

    caplog.set_level(logging.DEBUG)
    docs = [Document(page_content=t) for t in ("a", "b")]
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in ("a", "b")]
    compressor = RerankCompressor(reranker=LeakyReranker(), fallback=True)
    postprocessor = RerankPostprocessor(reranker=LeakyReranker(), fallback=True)
    rescued = FallbackReranker([LeakyReranker(), LengthReranker()])
    alone = FallbackReranker([LeakyReranker()])
    if mode == "sync":
        out = compressor.compress_documents(docs, "q")
        ranked = postprocessor.postprocess_nodes(nodes, query_bundle=QueryBundle("q"))
        answer = rescued.rerank_detailed("q", ["a", "b"])
        with pytest.raises(RuntimeError):
            alone.rerank("q", ["a"])
    else:
        out = asyncio.run(compressor.acompress_documents(docs, "q"))
        ranked = asyncio.run(postprocessor.apostprocess_nodes(nodes, query_bundle=QueryBundle("q")))
        answer = asyncio.run(rescued.arerank_detailed("q", ["a", "b"]))
        with pytest.raises(RuntimeError):
            asyncio.run(alone.arerank("q", ["a"]))
    assert all(d.metadata["rerank_fallback"] for d in out)
    assert all(n.node.metadata["rerank_fallback"] for n in ranked)
    assert answer.position == 1
    # Each failure was logged, by its type, and nowhere with the key or a traceback.
    assert caplog.text.count("RuntimeError") >= 4
    assert KEY not in caplog.text
    for record in caplog.records:
        assert record.exc_info is None and KEY not in record.getMessage()
