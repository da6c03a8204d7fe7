"""The contract every remote backend keeps, tested once for all of them against a real
HTTP server on 127.0.0.1: MemOS, Cohere (through its SDK), Zero Entropy, and the
HTTP reranker in both its wire formats (Cohere-like, as vLLM and infinity speak it,
and text-embeddings-inference).

Each test takes a :class:`~tests.support.remote.RemoteBackend`, which says how that
backend is built and how its service talks; what is particular to one backend (MemOS
business codes, the Cohere SDK, TEI options and the Qwen3 template, Zero Entropy's
latency and base URLs) is in that backend's own test module.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
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
    exception_texts,
    expected_order,
    invoke,
    score_of,
    timeout_for,
)
from ..support.remote import BACKENDS, ENVIRONMENT, KEY, RemoteBackend

DOCS = ["doc 1", "doc 2", "doc 3"]

each_backend = pytest.mark.parametrize("backend", BACKENDS, ids=str)
# Backends whose key is required (HTTPReranker's is optional).
each_keyed_backend = pytest.mark.parametrize("backend", [b for b in BACKENDS if b.key_env], ids=str)
# Backends that speak HTTP through httpx clients of their own (not a vendor SDK).
each_httpx_backend = pytest.mark.parametrize("backend", [b for b in BACKENDS if not b.sdk], ids=str)
# Backends that send top_n to the service.
each_top_n_backend = pytest.mark.parametrize(
    "backend", [b for b in BACKENDS if b.sends_top_n], ids=str
)


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def make(backend: RemoteBackend, server: LoopbackServer, **options: Any) -> Any:
    """The backend against ``server``, with a short backoff."""
    return backend.make(server.url, **{**FAST, **options})


# ---------------------------------------------------------------- the request and the answer


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_success_sends_the_documented_request(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(backend.serve)
    results = invoke(make(backend, server), mode, "which doc?", DOCS)
    assert [r.index for r in results] == expected_order(DOCS)
    assert [r.score for r in results] == sorted((score_of(d) for d in DOCS), reverse=True)
    assert all(type(r.index) is int and type(r.score) is float for r in results)
    assert all(isinstance(r.stage, Stage) for r in results)
    (request,) = server.requests
    assert request.path == backend.path
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert headers["authorization"] == backend.authorization()
    assert headers["content-type"] == "application/json"
    assert request.body == backend.body("which doc?", DOCS)


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_top_n_is_honoured(server: LoopbackServer, backend: RemoteBackend, mode: str) -> None:
    server.script(backend.serve)
    results = invoke(make(backend, server), mode, "q", DOCS, top_n=2)
    assert [r.index for r in results] == expected_order(DOCS)[:2]
    assert [r.score for r in results] == [score_of(DOCS[i]) for i in expected_order(DOCS)[:2]]
    (request,) = server.requests
    assert request.body == backend.body("q", DOCS, top_n=2 if backend.sends_top_n else None)


@pytest.mark.parametrize("mode", MODES)
@each_top_n_backend
def test_more_results_than_the_top_n_sent_is_malformed(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(Reply(200, backend.answer(DOCS)))  # ignores top_n and answers all three
    with pytest.raises(MalformedResponseError, match="expected 2"):
        invoke(make(backend, server), mode, "q", DOCS, top_n=2)


@each_backend
def test_ties_keep_input_order_whatever_order_the_server_lists_them(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    def reversed_ties(request: Recorded) -> Reply:
        n = len(backend.documents(request))
        return Reply(200, backend.scored((i, 0.5) for i in reversed(range(n))))

    server.script(*[reversed_ties] * 3)
    docs = [f"doc {i}" for i in range(7)]
    reranker = make(backend, server, max_documents_per_request=3)
    assert [r.index for r in reranker.rerank("q", docs)] == list(range(7))
    assert sorted(len(backend.documents(r)) for r in server.requests) == [1, 3, 3]


# ---------------------------------------------------------------- retries and errors


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_429_then_success_honours_retry_after(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(Reply(429, backend.error("slow"), headers={"Retry-After": "1"}), backend.serve)
    started = time.monotonic()
    results = invoke(make(backend, server), mode, "q", DOCS)
    assert time.monotonic() - started >= 0.95
    assert [r.index for r in results] == expected_order(DOCS)
    assert len(server.requests) == 2


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_transient_failures_then_success(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(
        Reply(503, backend.error("warming up")),
        Reply(429, backend.error("slow"), headers={"Retry-After-Ms": "50"}),
        Reply(429, backend.error("slow"), headers={"Retry-After": "0"}),
        backend.serve,
    )
    results = invoke(make(backend, server, max_retries=3), mode, "q", DOCS)
    assert [r.index for r in results] == expected_order(DOCS)
    assert len(server.requests) == 4


@dataclass(frozen=True)
class Failure:
    replies: list[Reply]
    error: type[RerankError]
    requests: int  # made with max_retries=1: 2 for what is retried, 1 for the rest
    status: int | None = None  # the error's status_code, where one is checked


def _scores(backend: RemoteBackend, pairs: list[tuple[Any, Any]]) -> Reply:
    return Reply(200, backend.scored(pairs))


FAILURES: dict[str, Callable[[RemoteBackend], Failure]] = {
    "500 always": lambda b: Failure(
        [Reply(500, b.error("boom"))] * 2, BackendUnavailableError, 2, 500
    ),
    "503 html page always": lambda b: Failure(
        [Reply(503, "<html>busy</html>")] * 2, BackendUnavailableError, 2, 503
    ),
    "429 always": lambda b: Failure([Reply(429, b.error("slow down"))] * 2, RateLimitError, 2, 429),
    "slower than timeout": lambda b: Failure(
        [Reply(200, b.answer(DOCS), delay=SLOWER)] * 2, RerankTimeoutError, 2
    ),
    "401": lambda b: Failure(
        [Reply(401, b.error("invalid api token"))], AuthenticationError, 1, 401
    ),
    "403": lambda b: Failure([Reply(403, b.error("forbidden"))], AuthenticationError, 1, 403),
    "400": lambda b: Failure([Reply(400, b.error("too long"))], InvalidInputError, 1, 400),
    "413": lambda b: Failure([Reply(413, b.error("payload"))], InvalidInputError, 1, 413),
    "422": lambda b: Failure([Reply(422, b.error("bad model"))], InvalidInputError, 1, 422),
    "invalid json": lambda b: Failure([Reply(200, b'{"results": [')], MalformedResponseError, 1),
    "html page": lambda b: Failure([Reply(200, "<html>hello</html>")], MalformedResponseError, 1),
    "no results": lambda b: Failure([Reply(200, {"id": "x"})], MalformedResponseError, 1),
    "the other wire format": lambda b: Failure(
        [Reply(200, b.wrong_shape(3))], MalformedResponseError, 1
    ),
    "index out of range": lambda b: Failure(
        [_scores(b, [(0, 0.5), (1, 0.5), (3, 0.5)])], MalformedResponseError, 1
    ),
    "negative index": lambda b: Failure(
        [_scores(b, [(0, 0.5), (1, 0.5), (-1, 0.5)])], MalformedResponseError, 1
    ),
    "duplicate index": lambda b: Failure(  # as many results as documents, one twice
        [_scores(b, [(0, 0.5), (1, 0.5), (1, 0.6), (2, 0.5)])], MalformedResponseError, 1
    ),
    "missing result": lambda b: Failure(
        [_scores(b, [(0, 0.5), (2, 0.5)])], MalformedResponseError, 1
    ),
    "string index": lambda b: Failure([_scores(b, [("a", 0.1)] * 3)], MalformedResponseError, 1),
    "numeric string index": lambda b: Failure(
        [_scores(b, [(str(i), 0.1) for i in range(3)])], MalformedResponseError, 1
    ),
    "non-numeric score": lambda b: Failure(
        [_scores(b, [(i, "high") for i in range(3)])], MalformedResponseError, 1
    ),
    "numeric string score": lambda b: Failure(
        [_scores(b, [(i, "0.5") for i in range(3)])], MalformedResponseError, 1
    ),
    "null score": lambda b: Failure(
        [_scores(b, [(i, None) for i in range(3)])], MalformedResponseError, 1
    ),
    "NaN score": lambda b: Failure(
        [_scores(b, [(0, float("nan")), (1, 0.1), (2, 0.2)])], MalformedResponseError, 1
    ),
    "boolean score": lambda b: Failure(
        [_scores(b, [(i, True) for i in range(3)])], MalformedResponseError, 1
    ),
    "result without score": lambda b: Failure(
        [Reply(200, b.results({"index": i} for i in range(3)))], MalformedResponseError, 1
    ),
    "result without index": lambda b: Failure(
        [Reply(200, b.results({"score": 0.5} for _ in range(3)))], MalformedResponseError, 1
    ),
}

FAILURE_CASES = [
    pytest.param(backend, name, id=f"{backend}-{name}")
    for backend in BACKENDS
    for name in FAILURES
    if name not in backend.sdk_coerces
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend, name", FAILURE_CASES)
def test_each_failure_gives_the_right_error(
    server: LoopbackServer, backend: RemoteBackend, name: str, mode: str
) -> None:
    failure = FAILURES[name](backend)
    server.script(*failure.replies)
    reranker = make(backend, server, max_retries=1, timeout=timeout_for(failure.replies))
    with pytest.raises(failure.error) as caught:
        invoke(reranker, mode, "q", DOCS)
    assert caught.value.backend == backend.backend
    if failure.status is not None:
        assert caught.value.status_code == failure.status
    # Retried only when the error is transient (the Cohere SDK's own retries are off).
    assert len(server.wait_for_requests(failure.requests)) == failure.requests


@each_backend
def test_the_servers_message_reaches_the_user(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    server.script(Reply(400, backend.error("query is too long")))
    with pytest.raises(InvalidInputError, match="query is too long"):
        make(backend, server, max_retries=0).rerank("q", DOCS)


@each_backend
def test_retry_after_longer_than_backoff_max_is_not_waited(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    server.script(Reply(429, backend.error("slow"), headers={"Retry-After": "120"}))
    started = time.monotonic()
    with pytest.raises(RateLimitError) as caught:
        make(backend, server, max_retries=3).rerank("q", DOCS)
    assert time.monotonic() - started < 5  # not the 120 s asked for
    assert caught.value.retry_after == 120.0 and caught.value.status_code == 429
    assert len(server.requests) == 1


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_connection_refused_is_backend_unavailable(backend: RemoteBackend, mode: str) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago; nothing listens
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    reranker = backend.make(url, max_retries=1, **FAST)
    with pytest.raises(BackendUnavailableError) as caught:
        invoke(reranker, mode, "q", DOCS)
    assert caught.value.backend == backend.backend


@each_backend
def test_total_time_is_bounded_by_timeout_and_retries(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    server.script(*[Reply(200, backend.answer(DOCS), delay=0.5)] * 3)
    started = time.monotonic()
    with pytest.raises(RerankTimeoutError):
        make(backend, server, timeout=0.15, max_retries=2).rerank("q", DOCS)
    elapsed = time.monotonic() - started
    assert elapsed < 3 * 0.15 + 2 * 2.0
    assert len(server.wait_for_requests(3)) == 3


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_a_trickling_answer_cannot_outlast_the_timeout(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    # Each byte arrives well within httpx's per-read timeout; the whole takes ~4 s.
    server.script(Reply(200, backend.answer(DOCS), trickle=0.05))
    started = time.monotonic()
    with pytest.raises(RerankTimeoutError) as raised:
        invoke(make(backend, server, timeout=0.3, max_retries=0), mode, "q", DOCS)
    assert time.monotonic() - started < 1.5
    # The message names the timeout (or, on a loaded machine, the little less of it left).
    seconds = re.search(r"\b(\d+(?:\.\d+)?) s\b", str(raised.value))
    assert seconds is not None and 0 < float(seconds.group(1)) <= 0.3, str(raised.value)


# ---------------------------------------------------------------- answers bounded in objects

# The documented bound: 4,096 JSON items plus 64 per document of the request, nesting at
# most 32 deep (docs/backends.md).
MAX_ITEMS = 4096 + 64 * len(DOCS)
MAX_DEPTH = 32


def json_items(value: Any) -> int:
    """Items as the bound counts them: each array and object, and each comma in one."""
    if isinstance(value, (list, dict)):
        inner = value.values() if isinstance(value, dict) else value
        return 1 + max(len(value) - 1, 0) + sum(json_items(v) for v in inner)
    return 0


def json_depth(value: Any) -> int:
    if isinstance(value, (list, dict)):
        inner = value.values() if isinstance(value, dict) else value
        return 1 + max((json_depth(v) for v in inner), default=0)
    return 0


def padded(backend: RemoteBackend, *, items: int = 0, depth: int = 0) -> Any:
    """The service's answer for DOCS with an extra field in its first result: a list
    bringing the whole answer to ``items`` JSON items, or lists nested so that the
    answer is ``depth`` deep."""
    answer = backend.answer(DOCS)
    first = (answer if backend.tei else answer["results"])[0]
    if items:
        # The new key adds a comma, the list itself and one comma per element after the first.
        first["padding"] = [0] * (items - json_items(answer) - 1)
    else:
        nested: list[Any] = []
        for _ in range(depth - json_depth(answer) - 1):
            nested = [nested]
        first["padding"] = nested
    assert json_items(answer) == items or json_depth(answer) == depth
    return answer


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_an_answer_at_the_item_and_depth_bounds_is_read(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(
        Reply(200, padded(backend, items=MAX_ITEMS)), Reply(200, padded(backend, depth=MAX_DEPTH))
    )
    for _ in range(2):
        results = invoke(make(backend, server, max_retries=0), mode, "q", DOCS)
        assert [r.index for r in results] == expected_order(DOCS)


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_an_answer_over_the_item_bound_is_refused_unparsed(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(Reply(200, padded(backend, items=MAX_ITEMS + 1)))
    with pytest.raises(MalformedResponseError, match=f"more than {MAX_ITEMS:,} JSON items"):
        invoke(make(backend, server, max_retries=1), mode, "q", DOCS)
    assert len(server.requests) == 1  # not retried


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_an_answer_nested_deeper_than_the_bound_is_refused(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(Reply(200, padded(backend, depth=MAX_DEPTH + 1)))
    with pytest.raises(MalformedResponseError, match=f"nested deeper than {MAX_DEPTH} levels"):
        invoke(make(backend, server, max_retries=0), mode, "q", DOCS)


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_an_error_status_over_the_bound_is_still_that_statuss_error(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    hostile = b'{"message": [' + b"{}," * 100_000 + b"{}]}"
    server.script(
        Reply(429, hostile, headers={"Retry-After": "0"}),
        Reply(500, hostile),
        Reply(401, hostile),
    )
    with pytest.raises(AuthenticationError) as caught:
        invoke(make(backend, server, max_retries=2), mode, "q", DOCS)
    assert caught.value.status_code == 401
    assert len(server.requests) == 3  # 429 and 500 were retried, as always


# ---------------------------------------------------------------- big and concurrent calls


def _counting(responder: Callable[[Recorded], Reply]) -> tuple[Callable[[Recorded], Reply], Any]:
    """``responder`` slowed down by 0.05 s, and a function giving the peak number of
    requests it served at once."""
    inflight, peak, lock = 0, 0, threading.Lock()

    def counting(request: Recorded) -> Reply:
        nonlocal inflight, peak
        with lock:
            inflight += 1
            peak = max(peak, inflight)
        time.sleep(0.05)
        with lock:
            inflight -= 1
        return responder(request)

    return counting, lambda: peak


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_n", [None, 10])
@each_backend
def test_300_documents_are_split_and_merged(
    server: LoopbackServer, backend: RemoteBackend, mode: str, top_n: int | None
) -> None:
    docs = [f"doc {i}" for i in range(300)]
    counting, peak = _counting(backend.serve)
    server.script(*[counting] * 5)
    # Three requests or more, two at a time.
    results = invoke(make(backend, server, max_concurrency=2), mode, "q", docs, top_n=top_n)
    expected = expected_order(docs)
    assert [r.index for r in results] == (expected if top_n is None else expected[:top_n])
    assert [r.score for r in results] == [score_of(docs[i]) for i in expected][: len(results)]
    # In requests of the backend's default size, the rest in the last one.
    size = backend.documents_per_request
    sent = [backend.documents(request) for request in server.requests]
    sizes = [size] * (300 // size) + ([300 % size] if 300 % size else [])
    assert sorted(map(len, sent), reverse=True) == sizes
    assert sorted(d for chunk in sent for d in chunk) == sorted(docs)
    # Each request's top_n holds the call's (TEI has none: the cut follows the merge).
    sent_top_n = top_n if backend.sends_top_n else None
    assert all(request.body.get("top_n") == sent_top_n for request in server.requests)
    assert peak() == 2


@each_backend
def test_token_budget_splits_requests(server: LoopbackServer, backend: RemoteBackend) -> None:
    server.script(*[backend.serve] * 10)
    docs = [f"{'x' * 400} doc {i}" for i in range(6)]  # about 103 tokens each
    results = make(backend, server, max_tokens_per_request=250).rerank("q", docs)
    assert [r.index for r in results] == expected_order(docs)
    assert [len(backend.documents(r)) for r in server.requests] == [2, 2, 2]


@each_backend
def test_a_failed_part_fails_the_whole_call(server: LoopbackServer, backend: RemoteBackend) -> None:
    server.script(backend.serve, Reply(401, backend.error("no")), backend.serve)
    docs = [f"doc {i}" for i in range(150)]
    reranker = make(backend, server, max_documents_per_request=64, max_concurrency=1)
    with pytest.raises(AuthenticationError):
        reranker.rerank("q", docs)


@each_backend
def test_64_concurrent_arerank_calls_on_one_instance(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    counting, peak = _counting(backend.serve)
    server.script(*[counting] * 64)
    reranker = make(backend, server)
    calls = [[f"doc {i}", f"doc {i + 1}", f"doc {i + 2}"] for i in range(64)]

    async def main() -> list[Any]:
        async with reranker:
            return list(await asyncio.gather(*(reranker.arerank("q", d) for d in calls)))

    answers = asyncio.run(main())
    for docs, results in zip(calls, answers, strict=True):
        assert [r.index for r in results] == expected_order(docs)
    assert len(server.requests) == 64
    assert peak() > 2  # the calls really overlap on the shared client


# ---------------------------------------------------------------- keys and configuration


@each_keyed_backend
def test_missing_key_is_a_clear_error_at_construction(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    with pytest.raises(AuthenticationError, match=" or ".join(backend.key_env)) as caught:
        backend.make(server.url, api_key=None)
    assert "api_key" in str(caught.value)
    assert caught.value.backend == backend.backend


@each_keyed_backend
def test_key_from_each_environment_variable_the_first_winning(
    server: LoopbackServer, backend: RemoteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script(*[backend.serve] * (len(backend.key_env) + 1))
    for name in reversed(backend.key_env):
        monkeypatch.setenv(name, f"key-from-{name}")
        backend.make(server.url, api_key=None, **FAST).rerank("q", DOCS)
    backend.make(server.url, api_key=KEY, **FAST).rerank("q", DOCS)  # the argument wins
    names = list(reversed(backend.key_env))
    assert [r.headers["Authorization"] for r in server.requests] == [
        *(backend.authorization(f"key-from-{name}") for name in names),
        backend.authorization(KEY),
    ]


@each_backend
def test_a_base_url_keeps_its_path(server: LoopbackServer, backend: RemoteBackend) -> None:
    server.script(backend.serve)
    backend.make(server.url + "/proxy/api/", **FAST).rerank("q", DOCS)
    assert server.requests[0].path == "/proxy/api" + backend.path


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.base_url_env], ids=str)
def test_base_url_and_key_from_the_environment(
    server: LoopbackServer, backend: RemoteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert backend.base_url_env is not None
    monkeypatch.setenv(backend.base_url_env, server.url + "/from/env/")
    monkeypatch.setenv(backend.key_env[-1], KEY)
    server.script(backend.serve)
    reranker = backend.factory(None, None, **FAST)  # neither given
    assert [r.index for r in reranker.rerank("q", DOCS)] == expected_order(DOCS)
    assert server.requests[0].path == "/from/env" + backend.path
    assert server.requests[0].headers["Authorization"] == backend.authorization(KEY)


@each_backend
def test_key_never_in_repr_str_errors_or_logs(
    server: LoopbackServer, backend: RemoteBackend, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (None, "httpx", "httpcore", "cohere", "memos_rerank_integrations"):
        caplog.set_level("DEBUG", logger=name)

    def echo_key(request: Recorded) -> Reply:
        return Reply(401, backend.error(f"invalid key {request.headers['Authorization']}"))

    server.script(
        backend.serve,
        echo_key,
        Reply(429, backend.error(f"slow {KEY}")),
        Reply(500, backend.error(KEY)),
        Reply(503, f"<html>{KEY}</html>"),
        Reply(200, backend.scored([(0, KEY), (1, 0.5), (2, 0.5)])),
        Reply(200, backend.answer(DOCS), delay=1.5),
    )
    reranker = make(backend, server, max_retries=0, timeout=1.0)
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
        BackendUnavailableError,
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
    assert "**********" in str(errors[0])  # the server's message is kept, the key masked


@pytest.mark.parametrize(
    "option",
    [
        {"timeout": 0},
        {"max_retries": -1},
        {"backoff_base": -1},
        {"max_documents_per_request": 0},
        {"max_tokens_per_request": -5},
        {"max_concurrency": 0},
        {"max_query_tokens": 0},
        {"on_too_long": "ignore"},
        {"model": ""},
    ],
    ids=lambda option: "-".join(f"{k}={v!r}" for k, v in option.items()),
)
@each_backend
def test_bad_options_are_rejected(backend: RemoteBackend, option: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        backend.make("http://127.0.0.1:9", **option)


@pytest.mark.parametrize("url", ["ftp://example.com", "http://user:pw@example.com", "http://"])
@each_httpx_backend
def test_bad_base_urls_are_rejected(backend: RemoteBackend, url: str) -> None:
    with pytest.raises(InvalidInputError):
        backend.make(url)


# ---------------------------------------------------------------- input


@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_a_long_query_is_cut_to_its_limit_with_a_warning(
    server: LoopbackServer, backend: RemoteBackend, mode: str
) -> None:
    server.script(backend.serve)
    query = "q" * 400  # about 100 estimated tokens
    with pytest.warns(UserWarning, match="query"):
        invoke(make(backend, server, max_query_tokens=16), mode, query, DOCS)
    sent = server.requests[0].body
    assert sent["query"] == "q" * 64
    assert backend.documents(server.requests[0]) == DOCS


@each_backend
def test_a_long_document_is_cut_to_its_limit(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    server.script(backend.serve_neutral)
    with pytest.warns(UserWarning, match=r"documents\[1\]"):
        make(backend, server, max_document_tokens=10).rerank("q", ["short", "y" * 100])
    assert backend.documents(server.requests[0]) == ["short", "y" * 40]


@each_backend
def test_too_long_raises_when_asked(server: LoopbackServer, backend: RemoteBackend) -> None:
    reranker = make(backend, server, max_query_tokens=100, on_too_long="raise")
    with pytest.raises(InvalidInputError, match="over the limit of 100"):
        reranker.rerank("字" * 101, DOCS)
    assert server.requests == []


@each_backend
def test_empty_documents_make_no_request(server: LoopbackServer, backend: RemoteBackend) -> None:
    assert make(backend, server).rerank("q", []) == []
    assert asyncio.run(make(backend, server).arerank("q", [])) == []
    assert server.requests == []


@pytest.mark.parametrize(
    "query, docs, top_n",
    [(None, DOCS, None), ("q", "doc", None), ("q", [1, 2], None), ("q", DOCS, 0)],
    ids=["query None", "documents a str", "documents not str", "top_n 0"],
)
@pytest.mark.parametrize("mode", MODES)
@each_backend
def test_bad_input_is_rejected_before_any_request(
    server: LoopbackServer, backend: RemoteBackend, mode: str, query: Any, docs: Any, top_n: Any
) -> None:
    with pytest.raises(InvalidInputError):
        invoke(make(backend, server), mode, query, docs, top_n=top_n)
    assert server.requests == []


# ---------------------------------------------------------------- HTTP clients


@each_httpx_backend
def test_injected_clients_are_used_and_left_open(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    seen: list[str] = []
    client = httpx.Client(event_hooks={"request": [lambda r: seen.append("sync")]})

    async def hook(request: httpx.Request) -> None:
        seen.append("async")

    server.script(backend.serve, backend.serve)

    async def main() -> None:
        async_client = httpx.AsyncClient(event_hooks={"request": [hook]})
        reranker = make(backend, server, http_client=client, async_http_client=async_client)
        async with reranker:
            await reranker.arerank("q", DOCS)
        assert not async_client.is_closed
        await async_client.aclose()

    with make(backend, server, http_client=client) as reranker:
        reranker.rerank("q", DOCS)
    assert not client.is_closed
    asyncio.run(main())
    assert seen == ["sync", "async"]
    client.close()


@each_backend
def test_own_clients_are_closed_and_remade(server: LoopbackServer, backend: RemoteBackend) -> None:
    server.script(backend.serve, backend.serve, backend.serve)
    reranker = make(backend, server)
    reranker.rerank("q", DOCS)
    first = reranker._clients.sync()
    reranker.close()
    assert first.is_closed
    reranker.rerank("q", DOCS)  # a closed reranker makes a new client when used again
    assert reranker._clients.sync() is not first
    assert asyncio.run(reranker.arerank("q", DOCS))  # and async works on a fresh loop
    reranker.close()


@each_backend
def test_connections_are_pooled(server: LoopbackServer, backend: RemoteBackend) -> None:
    server.script(*[backend.serve] * 6)
    reranker = make(backend, server)
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


@each_backend
def test_async_calls_from_two_event_loops(server: LoopbackServer, backend: RemoteBackend) -> None:
    server.script(backend.serve, backend.serve)
    reranker = make(backend, server)
    for _ in range(2):  # each asyncio.run has its own loop
        assert len(asyncio.run(reranker.arerank("q", DOCS))) == 3


# ---------------------------------------------------------------- through the adapters


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend, name", FAILURE_CASES)
def test_compressor_falls_back_to_original_order_on_each_failure(
    server: LoopbackServer,
    backend: RemoteBackend,
    name: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    failure = FAILURES[name](backend)
    server.script(*failure.replies)
    documents = [
        Document(page_content=text, metadata={"source": i}, id=f"id-{i}")
        for i, text in enumerate(DOCS)
    ]
    compressor = RerankCompressor(
        reranker=make(backend, server, max_retries=1, timeout=timeout_for(failure.replies))
    )
    if mode == "sync":
        out = compressor.compress_documents(documents, "q")
    else:
        out = asyncio.run(compressor.acompress_documents(documents, "q"))
    assert [d.page_content for d in out] == DOCS
    assert [d.id for d in out] == [d.id for d in documents]
    assert all(d.metadata == {"source": i, "rerank_fallback": True} for i, d in enumerate(out))
    assert all("rerank_fallback" not in d.metadata for d in documents)  # inputs untouched
    assert failure.error.__name__ in caplog.text
    assert KEY not in caplog.text


@each_backend
def test_compressor_without_fallback_raises(server: LoopbackServer, backend: RemoteBackend) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    server.script(Reply(401, backend.error("no")))
    compressor = RerankCompressor(reranker=make(backend, server), fallback=False)
    with pytest.raises(AuthenticationError):
        compressor.compress_documents([Document(page_content=d) for d in DOCS], "q")


@each_backend
def test_compressor_with_a_working_service_ranks(
    server: LoopbackServer, backend: RemoteBackend
) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    server.script(backend.serve)
    compressor = RerankCompressor(reranker=make(backend, server), top_n=2)
    out = compressor.compress_documents([Document(page_content=d) for d in DOCS], "q")
    assert [d.page_content for d in out] == [DOCS[i] for i in expected_order(DOCS)[:2]]
    assert [d.metadata["relevance_score"] for d in out] == [score_of(d.page_content) for d in out]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["500 always", "401", "invalid json", "duplicate index"])
@each_backend
def test_llama_index_postprocessor_falls_back_too(
    server: LoopbackServer, backend: RemoteBackend, mode: str, name: str
) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from memos_rerank_integrations.llama_index import RerankPostprocessor

    failure = FAILURES[name](backend)
    server.script(*failure.replies)
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=0.1) for i, t in enumerate(DOCS)
    ]
    postprocessor = RerankPostprocessor(
        reranker=make(backend, server, max_retries=1, timeout=timeout_for(failure.replies))
    )
    if mode == "sync":
        out = postprocessor.postprocess_nodes(nodes, query_bundle=QueryBundle("q"))
    else:
        out = asyncio.run(postprocessor.apostprocess_nodes(nodes, query_bundle=QueryBundle("q")))
    assert [n.node.node_id for n in out] == ["n0", "n1", "n2"]
    assert all(n.node.metadata.get("rerank_fallback") is True for n in out)


@each_backend
def test_a_base_url_with_credentials_is_refused_without_showing_them(
    backend: RemoteBackend,
) -> None:
    """Credentials belong in ``api_key`` (a secret): a URL holding them would show in
    reprs, logs and ``to_config()``."""
    with pytest.raises(InvalidInputError, match="must not contain credentials") as info:
        backend.make("http://user:hunter2-pass@127.0.0.1:9/")
    assert "hunter2-pass" not in str(info.value)
