"""The server as a hostile client and a misbehaving model see it: real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from memos_rerank_integrations import (
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    QwenReranker,
)
from memos_rerank_integrations._types import estimate_tokens
from memos_rerank_integrations.server import config, create_app
from memos_rerank_integrations.server._batcher import MicroBatcher
from memos_rerank_integrations.server._cohere import document_texts
from memos_rerank_integrations.server._core import MAX_FIELDS, ApiError
from memos_rerank_integrations.testing import build_tiny_qwen_reranker

from ..support.server import (
    DOCUMENTS,
    QUERY,
    Boom,
    HostileReranker,
    LiveServer,
    WordOverlapReranker,
    address,
    read_head,
    request_head,
)

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def post(live: LiveServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json=body, headers=AUTH, timeout=20, **kwargs)


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- the pinned limits -----------------------------------------------------------------


def body_of_size(size: int) -> bytes:
    """A valid request body of exactly ``size`` bytes."""
    head, tail = b'{"query": "q", "documents": ["', b'"]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_body_bytes_is_accepted_one_more_is_413(chunked: bool) -> None:
    backend = WordOverlapReranker()
    limit = 2000
    with LiveServer(create_app(backend, model_name="m", max_body_bytes=limit)) as live:

        def send(body: bytes) -> httpx.Response:
            if chunked:
                pieces = [body[i : i + 100] for i in range(0, len(body), 100)]
                content: Any = iter(pieces)  # no length: sent chunked
            else:
                content = body
            return httpx.post(f"{live.url}/rerank", content=content, timeout=20)

        fits = send(body_of_size(limit))
        over = send(body_of_size(limit + 1))
    assert fits.status_code == 200, fits.text
    assert over.status_code == 413
    assert f"{limit} bytes" in over.json()["message"]
    assert backend.model_calls == 1


def test_api_key_is_stripped_and_checked_at_start_up() -> None:
    backend = WordOverlapReranker()
    with LiveServer(create_app(backend, model_name="m", api_key=f"  {KEY}\n")) as live:
        assert post(live, "/rerank", {"query": QUERY, "documents": DOCUMENTS}).status_code == 200
    for bad, what in [
        ("s3cret\x00key", "control character"),
        ("s3cret\tkey", "control character"),
        ("s3cretключ", "non-ASCII"),
    ]:
        with pytest.raises(InvalidInputError, match=what) as error:
            create_app(backend, model_name="m", api_key=bad)
        assert "s3cret" not in str(error.value)
    with pytest.raises(InvalidInputError, match="empty"):
        create_app(backend, model_name="m", api_key=" \n")


# -- bad text ----------------------------------------------------------------------------


BAD_TEXT = [
    pytest.param(
        b'{"query": "q", "documents": ["fine", "bad \\ud800 half"]}',
        "'documents[1]' holds a lone surrogate (U+D800) at character 4",
        id="lone-high-surrogate-in-a-document",
    ),
    pytest.param(
        b'{"query": "\\udc00", "documents": ["fine"]}',
        "'query' holds a lone surrogate (U+DC00) at character 0",
        id="lone-low-surrogate-in-the-query",
    ),
    pytest.param(
        b'{"query": "q", "documents": ["caf\xe9"]}',
        "not valid UTF-8: byte 33 (0xe9)",
        id="latin-1-byte",
    ),
    pytest.param(
        b'{"query": "q", "documents": ["\xed\xa0\x80"]}',
        "not valid UTF-8: byte 30 (0xed)",
        id="utf-8-encoded-surrogate",
    ),
]


@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
@pytest.mark.parametrize(("raw", "message"), BAD_TEXT)
def test_bad_text_is_a_400_naming_the_field(path: str, raw: bytes, message: str) -> None:
    backend = WordOverlapReranker()
    with LiveServer(create_app(backend, model_name="m")) as live:
        response = httpx.post(f"{live.url}{path}", content=raw, timeout=20)
        pair = httpx.post(
            f"{live.url}{path}",
            content=b'{"query": "\\ud83d\\ude00 q", "documents": ["\\ud83d\\ude00"]}',
            timeout=20,
        )
    assert response.status_code == 400
    assert message in response.json()["message"]
    assert response.json()["detail"] == response.json()["message"]
    assert backend.model_calls == 1  # only the valid surrogate pair (an emoji) was scored
    assert pair.status_code == 200


# -- a model that misbehaves -----------------------------------------------------------


@pytest.mark.parametrize("cue", ["BASE", "CANCEL", "INTERRUPT"])
async def test_a_base_exception_in_a_fused_batch_fails_only_its_request(cue: str) -> None:
    backend = HostileReranker(delay=0.4)
    with LiveServer(create_app(backend, model_name="m")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as client:

            async def send(query: str) -> httpx.Response:
                return await client.post("/rerank", json={"query": query, "documents": DOCUMENTS})

            first = asyncio.ensure_future(send(QUERY))
            await wait_until(lambda: app_batcher(live).busy)
            fused = await asyncio.gather(send(f"{QUERY} b"), send(f"{cue} c"), send(f"{QUERY} d"))
            assert (await first).status_code == 200
            after = await send(f"{QUERY} after")
    good, bad, also_good = fused
    assert good.status_code == also_good.status_code == after.status_code == 200
    assert good.json()["results"][0]["relevance_score"] > 0
    assert bad.status_code == 503
    assert "The model failed" in bad.json()["message"]
    assert 3 in backend.many_calls  # tried together, then one by one


def app_batcher(live: LiveServer) -> MicroBatcher:
    batcher: MicroBatcher = live.app.state.batcher
    return batcher


async def test_a_short_answer_for_one_call_fails_that_request_only() -> None:
    backend = HostileReranker(delay=0.4)
    with LiveServer(create_app(backend, model_name="m")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as client:

            async def send(query: str) -> httpx.Response:
                return await client.post(
                    "/v2/rerank", json={"query": query, "documents": DOCUMENTS}
                )

            first = asyncio.ensure_future(send(QUERY))
            await wait_until(lambda: app_batcher(live).busy)
            fused = await asyncio.gather(send(f"{QUERY} b"), send("SHORT c"), send(f"{QUERY} d"))
            await first
            alone = await send("SHORT alone")
    good, short, also_good = fused
    assert good.status_code == also_good.status_code == 200
    assert len(good.json()["results"]) == len(DOCUMENTS)
    for response in (short, alone):
        assert response.status_code == 500
        assert response.json()["message"] == (
            "The model gave an invalid answer: The model answer ranks 4 documents, expected 5."
        )
    assert 3 in backend.many_calls


def test_batcher_retries_alone_when_rerank_many_answers_for_the_wrong_number_of_calls() -> None:
    backend = HostileReranker(delay=0.1)
    batcher = MicroBatcher(backend, batch_window_ms=50)
    try:
        first = batcher.submit(QUERY, DOCUMENTS)
        time.sleep(0.03)
        futures = [batcher.submit(f"DROPCALL {i}", DOCUMENTS[:2]) for i in range(3)]
        assert first.result(10) == backend.rerank(QUERY, DOCUMENTS)
        for i, future in enumerate(futures):
            assert future.result(10) == backend.rerank(f"DROPCALL {i}", DOCUMENTS[:2])
        assert 3 in backend.many_calls
    finally:
        batcher.close()


def test_batcher_wraps_base_exceptions_and_keeps_its_worker() -> None:
    backend = HostileReranker()
    batcher = MicroBatcher(backend)
    try:
        for cue in ("BASE", "CANCEL", "INTERRUPT"):
            with pytest.raises(BackendUnavailableError, match="The model failed") as error:
                batcher.submit(cue, DOCUMENTS).result(10)
            assert isinstance(error.value.__cause__, BaseException)
            assert not isinstance(error.value.__cause__, Exception)
        assert batcher.submit(QUERY, DOCUMENTS).result(10) == backend.rerank(QUERY, DOCUMENTS)
        with pytest.raises(MalformedResponseError, match="expected 5"):
            batcher.submit("SHORT", DOCUMENTS).result(10)
        assert batcher.submit(QUERY, DOCUMENTS, 2).result(10) == backend.rerank(QUERY, DOCUMENTS, 2)
        assert isinstance(Boom(), BaseException)
    finally:
        batcher.close()


async def test_health_is_503_with_a_reason_while_the_model_fails_then_recovers() -> None:
    backend = HostileReranker()
    with LiveServer(create_app(backend, model_name="m")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as client:
            assert (await client.get("/health")).status_code == 200
            backend.broken = True
            failed = await client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
            assert failed.status_code == 500
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "unavailable"
            assert health.json()["reason"] == (
                "The last model call failed (RuntimeError); the server log has the details."
            )
            backend.broken = False
            # /health itself sends a tiny probe to the model, so it recovers unprompted.
            deadline = time.monotonic() + 15
            while (await client.get("/health")).status_code != 200:
                assert time.monotonic() < deadline, "health did not recover"
                await asyncio.sleep(0.2)
            assert "health check" in backend.queries
            ok = await client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
            assert ok.status_code == 200


async def test_health_is_503_while_shutting_down() -> None:
    app = create_app(WordOverlapReranker(), model_name="m")
    with LiveServer(app) as live:
        app.state.batcher.close()
        response = httpx.get(f"{live.url}/health", timeout=10)
        refused = httpx.post(
            f"{live.url}/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=10
        )
    assert response.status_code == 503
    assert response.json()["reason"] == "The server is shutting down."
    assert refused.status_code == 503


# -- clients that leave ------------------------------------------------------------------


def raw_request(live: LiveServer, body: dict[str, Any]) -> socket.socket:
    """Send a complete request on a raw socket and leave it open (unread)."""
    payload = json.dumps(body).encode()
    host, port = live.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


async def test_requests_whose_clients_left_cost_no_model_work() -> None:
    backend = HostileReranker(delay=1.0)
    with LiveServer(create_app(backend, model_name="m", batching=False)) as live:
        batcher = app_batcher(live)
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            first = asyncio.ensure_future(
                client.post("/rerank", json={"query": "first", "documents": DOCUMENTS})
            )
            await wait_until(lambda: batcher.busy)
            leavers = [
                raw_request(live, {"query": f"abandoned {i}", "documents": DOCUMENTS})
                for i in range(3)
            ]
            await wait_until(lambda: batcher.queued == 3)
            for sock in leavers:
                sock.close()
            await wait_until(lambda: batcher.queued == 0)
            last = await client.post("/rerank", json={"query": "last", "documents": DOCUMENTS})
            assert (await first).status_code == 200
    assert last.status_code == 200
    assert backend.queries == ["first", "last"]


def test_a_withdrawn_call_is_never_computed() -> None:
    backend = HostileReranker(delay=0.3)
    batcher = MicroBatcher(backend)
    try:
        running = batcher.submit("first", DOCUMENTS)
        time.sleep(0.05)
        withdrawn = batcher.submit("withdrawn", DOCUMENTS)
        assert batcher.queued == 1
        assert withdrawn.cancel()
        assert batcher.queued == 0
        assert batcher.submit("next", DOCUMENTS).result(10)
        assert running.result(10)
    finally:
        batcher.close()
    assert backend.queries == ["first", "next"]


# -- the token budget --------------------------------------------------------------------


def test_token_budget_refuses_before_model_work_and_says_how_to_split() -> None:
    backend = HostileReranker(tokens_per_doc=30)
    app = create_app(backend, model_name="m", max_request_tokens=100)
    with LiveServer(app) as live:
        over = httpx.post(
            f"{live.url}/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=20
        )
        fits = httpx.post(
            f"{live.url}/rerank", json={"query": QUERY, "documents": DOCUMENTS[:3]}, timeout=20
        )
    assert over.status_code == 413
    assert over.json()["message"].startswith(
        "This request would score 150 tokens; this server scores at most 100 per request. "
        "Split it into at least 2 requests (about 3 documents each)"
    )
    assert fits.status_code == 200
    assert fits.json()["usage"] == {"prompt_tokens": 90, "total_tokens": 90}
    assert backend.queries == [QUERY]  # only the request that fits was scored
    # Tokenized in a worker thread, never on the event loop.
    assert backend.count_threads and all(
        name.startswith("memos-rerank-tokenize") for name in backend.count_threads
    )


def test_without_count_tokens_the_budget_uses_an_estimate() -> None:
    backend = HostileReranker()
    app = create_app(backend, model_name="m", max_request_tokens=1000)
    with LiveServer(app) as live:
        long_query = "word " * 200  # 250 tokens by the estimate: 4 ASCII characters a token
        over = httpx.post(
            f"{live.url}/v2/rerank", json={"query": long_query, "documents": DOCUMENTS}, timeout=20
        )
        fits = httpx.post(
            f"{live.url}/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=20
        )
    assert over.status_code == 413 and "would score" in over.json()["message"]
    assert fits.status_code == 200
    assert backend.model_calls == 1


def test_the_budget_estimates_cjk_text_as_the_clients_do() -> None:
    """Without ``count_tokens``, the server counts a request as the clients'
    ``estimate_tokens`` counts it: one token per CJK character, not one per four."""
    query, document = "用户的爱好是什么？", "用户喜欢打羽毛球。" * 10
    tokens = estimate_tokens(query) + estimate_tokens(document)
    assert tokens == 99
    backend = HostileReranker()
    app = create_app(backend, model_name="m", max_request_tokens=tokens)
    with LiveServer(app) as live:
        fits = httpx.post(
            f"{live.url}/rerank", json={"query": query, "documents": [document]}, timeout=20
        )
        over = httpx.post(
            f"{live.url}/rerank", json={"query": query, "documents": [document, "球"]}, timeout=20
        )
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert over.status_code == 413
    assert over.json()["message"].startswith(f"This request would score {tokens + 10} tokens")
    assert backend.model_calls == 1


class CountingBackend:
    """Forwards to a real backend and counts the calls that reach the model."""

    def __init__(self, inner: QwenReranker) -> None:
        self.inner = inner
        self.model_calls = 0
        self.max_query_length = inner.max_query_length
        count = getattr(inner, "count_tokens", None)
        if count is not None:
            self.count_tokens = count

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        self.model_calls += 1
        return self.inner.rerank(query, documents, top_n)

    async def arerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        return self.rerank(query, documents, top_n)

    def rerank_many(self, calls: Sequence[tuple[str, Sequence[str], int | None]]) -> Any:
        self.model_calls += 1
        return self.inner.rerank_many(calls)


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_reranker(tmp_path_factory.mktemp("hardening") / "qwen")


def test_the_amplifying_request_is_refused_without_model_work(tiny_qwen_dir: Path) -> None:
    """100 kB query x 400 one-character documents: 105 kB on the wire, but every
    document is scored with the whole query. The timing target (< 5 s, RSS < 300 MB)
    is measured in benchmarks/bench_hostile.py; here only a hang would fail."""
    backend = CountingBackend(QwenReranker(tiny_qwen_dir, dtype="float32", max_query_length=2048))
    backend.rerank(QUERY, DOCUMENTS)  # load the model first
    backend.model_calls = 0
    words = ("memory", "hobby", "badminton", "travel", "Beijing", "user", "prefers")
    query = " ".join(words[i % len(words)] for i in range(15_000))[:100_000]
    with LiveServer(create_app(backend, model_name="tiny")) as live:
        started = time.monotonic()
        response = httpx.post(
            f"{live.url}/rerank", json={"query": query, "documents": ["x"] * 400}, timeout=120
        )
        elapsed = time.monotonic() - started
    assert response.status_code == 413, response.text[:300]
    assert "Split it into at least" in response.json()["message"]
    assert backend.model_calls == 0
    assert elapsed < 60


# -- connections that never send a request ----------------------------------------------


def test_idle_and_trickling_connections_are_closed_and_never_lock_clients_out() -> None:
    app = create_app(WordOverlapReranker(), model_name="m")
    live_config = config(
        app, host="127.0.0.1", port=0, log_level="warning", limit_concurrency=20, header_timeout=1.0
    )
    with LiveServer(app, live_config) as live:
        host, port = live.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(40)]
        trickling = [socket.create_connection((host, int(port)), timeout=10) for _ in range(10)]
        request_line = b"POST /rerank HTTP/1.1\r\nHost: x\r\n"
        opened = time.monotonic()
        # 50 half-open connections against a limit of 20: a real client still gets in.
        response = httpx.post(
            f"{live.url}/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=20
        )
        assert response.status_code == 200
        for step in range(len(request_line)):
            for sock in trickling:
                # OSError: already closed by the server, which is what we want.
                with contextlib.suppress(OSError):
                    sock.send(request_line[step : step + 1])
            time.sleep(0.1)
            if time.monotonic() - opened > 4:
                break
        for sock in idle + trickling:
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""  # closed by the server, nothing sent
            sock.close()
        closed_after = time.monotonic() - opened
        assert len(live.server.server_state.connections) <= 1
    assert closed_after < 10


@pytest.fixture
def stream_server() -> Iterator[LiveServer]:
    app = create_app(WordOverlapReranker(), model_name="m", body_timeout=1.0)
    with LiveServer(app) as live:
        yield live


def test_a_body_trickled_past_the_body_timeout_gets_408(stream_server: LiveServer) -> None:
    def slow() -> Iterator[bytes]:
        yield b'{"query": "q", "documents": ["'
        for _ in range(30):
            time.sleep(0.1)
            yield b"x"
        yield b'"]}'

    started = time.monotonic()
    response = httpx.post(f"{stream_server.url}/rerank", content=slow(), timeout=20)
    assert response.status_code == 408
    assert "did not arrive within 1 s" in response.json()["message"]
    assert time.monotonic() - started < 10


# -- exact limits, on every rerank route ---------------------------------------------------

# Each shape as (path, body for these documents, dialect's message key).
SHAPES = {
    "memos": ("/rerank", lambda docs: {"query": QUERY, "documents": docs}, "message"),
    "tei": ("/rerank", lambda docs: {"query": QUERY, "texts": docs}, "error"),
    "cohere-v1": ("/v1/rerank", lambda docs: {"query": QUERY, "documents": docs}, "message"),
    "cohere-v2": ("/v2/rerank", lambda docs: {"query": QUERY, "documents": docs}, "message"),
    "score": ("/score", lambda docs: {"text_1": QUERY, "text_2": docs}, "message"),
    # Pairwise: every pair counts against the limits.
    "score-pairs": (
        "/score",
        lambda docs: {"text_1": [QUERY] * len(docs), "text_2": docs},
        "message",
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exactly_the_document_limit_fits_one_more_is_refused(shape: str) -> None:
    path, make, key = SHAPES[shape]
    backend = HostileReranker()
    with LiveServer(create_app(backend, model_name="m", api_key=KEY, max_documents=4)) as live:
        fits = post(live, path, make(DOCUMENTS[:4]))
        over = post(live, path, make(DOCUMENTS[:5]))
    assert fits.status_code == 200, fits.text
    assert over.status_code == 400
    assert over.json()[key].startswith("Too many documents: 5; this server accepts at most 4")
    assert QUERY in backend.queries and len(set(backend.queries)) == 1  # only what fits


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exactly_the_token_budget_fits_one_more_token_is_refused(shape: str) -> None:
    path, make, key = SHAPES[shape]
    backend = HostileReranker(tokens_per_doc=1)  # one token per document (per pair)
    app = create_app(backend, model_name="m", api_key=KEY, max_request_tokens=4)
    with LiveServer(app) as live:
        fits = post(live, path, make(DOCUMENTS[:4]))
        over = post(live, path, make(DOCUMENTS[:5]))
    assert fits.status_code == 200, fits.text
    assert over.status_code == 413
    assert over.json()[key].startswith(
        "This request would score 5 tokens; this server scores at most 4"
    )
    assert len(set(backend.queries)) == 1


# -- the order of refusals ---------------------------------------------------------------


GUARDED = ["/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score"]


def raw_answer(live: LiveServer, head: bytes) -> tuple[bytes, float]:
    """Send only a request head (a body is declared, none follows); the answer's head
    and how long it took."""
    with socket.create_connection(address(live.url), timeout=20) as sock:
        started = time.monotonic()
        sock.sendall(head)
        return read_head(sock), time.monotonic() - started


@pytest.mark.parametrize("path", GUARDED)
def test_a_wrong_key_is_refused_before_the_body_is_read(path: str) -> None:
    backend = HostileReranker()
    app = create_app(backend, model_name="m", api_key=KEY, body_timeout=30)
    with LiveServer(app) as live:
        wrong = request_head("POST", path, "Content-Length: 1000", "Authorization: Bearer nope")
        answer, waited = raw_answer(live, wrong)
        # A body over the limit, from a client without the key: the key comes first.
        both = request_head("POST", path, "Content-Length: 999999999")
        first, _ = raw_answer(live, both)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert waited < 10  # not the 30 s the body could take
    assert first.startswith(b"HTTP/1.1 401"), first
    assert backend.model_calls == 0


@pytest.mark.parametrize("path", GUARDED)
def test_an_over_limit_content_length_is_refused_without_waiting_for_the_bytes(path: str) -> None:
    backend = HostileReranker()
    app = create_app(backend, model_name="m", api_key=KEY, max_body_bytes=1000, body_timeout=30)
    with LiveServer(app) as live:
        head = request_head("POST", path, "Content-Length: 1001", f"Authorization: Bearer {KEY}")
        answer, waited = raw_answer(live, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert waited < 10
    assert backend.model_calls == 0


# -- what the model refuses, and what /health shows ------------------------------------------


async def test_a_backend_refusing_its_input_is_a_400_and_health_stays_ok() -> None:
    backend = HostileReranker(delay=0.3)
    with LiveServer(create_app(backend, model_name="m", api_key=KEY)) as live:
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=20) as client:

            async def send(query: str) -> httpx.Response:
                return await client.post(
                    "/v2/rerank", json={"query": query, "documents": DOCUMENTS}
                )

            alone = await send("REFUSE alone")
            right_after = await client.get("/health")  # before any call succeeds
            first = asyncio.ensure_future(send(QUERY))
            await wait_until(lambda: app_batcher(live).busy)
            refused, fine = await asyncio.gather(send("REFUSE fused"), send(f"{QUERY} fused"))
            assert (await first).status_code == 200
            health = await client.get("/health")
    for response in (alone, refused):
        assert response.status_code == 400
        assert response.json()["message"] == "The query is longer than this model accepts."
    assert fine.status_code == 200
    for state in (right_after, health):
        assert state.status_code == 200 and state.json()["status"] == "ok"
    assert 2 in backend.many_calls  # the refused call was fused, then retried alone


def test_health_never_shows_what_another_client_sent() -> None:
    backend = HostileReranker()
    secret = "LEAK my diary: the safe code is 4711"
    with LiveServer(create_app(backend, model_name="m", api_key=KEY)) as live:
        failed = post(live, "/rerank", {"query": secret, "documents": DOCUMENTS})
        health = httpx.get(f"{live.url}/health", timeout=10)
    assert failed.status_code == 500
    assert health.status_code == 503
    assert health.json()["reason"].startswith("The last model call failed (RuntimeError)")
    assert "4711" not in health.text and "diary" not in health.text


# -- withdrawn calls -----------------------------------------------------------------------


def test_a_call_withdrawn_just_as_its_batch_is_taken_is_never_computed() -> None:
    backend = HostileReranker(delay=0.3)
    batcher = MicroBatcher(backend, batch_window_ms=0)
    take = batcher._take_batch

    def take_then_withdraw() -> Any:
        jobs = take()
        for job in jobs:
            if job.query == "withdrawn":
                assert job.future.cancel()  # its client left right then
        return jobs

    batcher._take_batch = take_then_withdraw  # type: ignore[method-assign]
    try:
        running = batcher.submit("first", DOCUMENTS)
        time.sleep(0.1)
        withdrawn = batcher.submit("withdrawn", DOCUMENTS)
        kept = batcher.submit("kept", DOCUMENTS)
        assert kept.result(10) == backend.rerank("kept", DOCUMENTS)
        assert running.result(10)
        assert withdrawn.cancelled()
        assert batcher.queued == 0
    finally:
        batcher.close()
    assert "withdrawn" not in backend.queries


def test_calls_still_queued_when_shutdown_passes_its_bound_are_withdrawn() -> None:
    backend = HostileReranker(delay=1.5)
    app = create_app(backend, model_name="m", batching=False)
    live_config = config(app, host="127.0.0.1", port=0, log_level="critical", shutdown_timeout=0.3)
    live = LiveServer(app, live_config)
    with live:
        batcher = app_batcher(live)

        def send(query: str) -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    f"{live.url}/rerank", json={"query": query, "documents": DOCUMENTS}, timeout=20
                )

        clients = [threading.Thread(target=send, args=("first",), daemon=True)]
        clients[0].start()
        deadline = time.monotonic() + 10
        while not batcher.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        clients += [
            threading.Thread(target=send, args=(f"queued {i}",), daemon=True) for i in range(2)
        ]
        for client in clients[1:]:
            client.start()
        while batcher.queued < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert backend.queries == ["first"]


# -- object documents and rank_fields ------------------------------------------------------


def test_fields_per_document_and_rank_fields_are_limited_exactly() -> None:
    backend = HostileReranker()
    with LiveServer(create_app(backend, model_name="m", api_key=KEY)) as live:
        full = {f"f{i}": f"value {i}" for i in range(MAX_FIELDS)}
        fits = post(live, "/v1/rerank", {"query": QUERY, "documents": [{**full}]})
        over = post(
            live, "/v1/rerank", {"query": QUERY, "documents": ["x", {**full, "one": "more"}]}
        )
        named = list(full)
        ranked = post(
            live, "/v1/rerank", {"query": QUERY, "documents": [full], "rank_fields": named}
        )
        too_many = post(
            live,
            "/v1/rerank",
            {"query": QUERY, "documents": [full], "rank_fields": [*named, "one more"]},
        )
        not_text = post(live, "/v1/rerank", {"query": QUERY, "documents": [{"text": "a", "n": 3}]})
    assert fits.status_code == 400  # no 'text' field, but its size was fine
    assert "must be a string or an object with a 'text' field" in fits.json()["message"]
    assert over.status_code == 400
    assert over.json()["message"] == (
        f"'documents[1]' has {MAX_FIELDS + 1} fields; this server accepts at most "
        f"{MAX_FIELDS} per object."
    )
    assert ranked.status_code == 200, ranked.text
    assert too_many.status_code == 400
    assert too_many.json()["message"] == (
        f"'rank_fields' names {MAX_FIELDS + 1} fields; this server accepts at most {MAX_FIELDS}."
    )
    assert not_text.status_code == 400
    assert not_text.json()["message"] == "'documents[0].n' must be a string, got a number."
    assert len(backend.queries) == 1


def test_a_rank_field_named_twice_is_ranked_once() -> None:
    backend = HostileReranker()
    documents = [{"title": f"memory {i}", "body": text} for i, text in enumerate(DOCUMENTS)]
    with LiveServer(create_app(backend, model_name="m", api_key=KEY)) as live:
        once = post(
            live,
            "/v1/rerank",
            {"query": QUERY, "documents": documents, "rank_fields": ["title", "body"]},
        )
        twice = post(
            live,
            "/v1/rerank",
            {"query": QUERY, "documents": documents, "rank_fields": ["title", "body", "title"]},
        )
    assert once.status_code == twice.status_code == 200
    assert twice.json()["results"] == once.json()["results"]


def test_the_texts_to_rank_are_measured_before_they_are_built() -> None:
    """The total length is checked against the limit before any text is joined (the
    body limit keeps real requests under it; here the service's limit is tiny)."""
    app = create_app(WordOverlapReranker(), model_name="m", max_body_bytes=64)
    service = app.state.service
    documents: list[str | dict[str, str]] = ["a" * 20, {"title": "b" * 20, "body": "c" * 20}]
    with pytest.raises(ApiError) as refused:
        document_texts(service, documents, ["title", "body"])
    assert refused.value.status == 413
    assert refused.value.message.startswith("The texts to rank would hold 74 characters")
    assert document_texts(service, [documents[0], {"title": "b"}], ["title"]) == [
        "a" * 20,
        "title: b",
    ]
    service.close()
    app.state.batcher.close()
