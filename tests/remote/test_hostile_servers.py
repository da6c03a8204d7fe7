"""Every remote backend against hostile servers on 127.0.0.1: one deadline per call
(connect, headers and body of every attempt and every split request), one cap on the
decoded answer, and the LangChain adapter giving every document back when they trip.

Each call runs under :func:`within`, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    MalformedResponseError,
    MemOSReranker,
    RerankTimeoutError,
)

from ..support.loopback import MODES, LoopbackServer, Recorded, Reply, cohere_results, cohere_shaped
from ..support.remote import BACKENDS as REMOTE_BACKENDS
from ..support.remote import COHERE, KEY, MEMOS, RemoteBackend

T = TypeVar("T")

DOCS = ["doc 1", "doc 2", "doc 3"]
OK = cohere_results(DOCS)
SLACK = 1.0  # what a test allows on top of the documented bound
MiB = 1 << 20


def _maker(backend: RemoteBackend) -> Callable[..., Any]:
    """``make(server, **options)``: ``backend`` against ``server`` (with the key)."""

    def make(server: LoopbackServer, **options: Any) -> Any:
        return backend.make(server.url, **options)

    return make


# The four backends of the contract (tests/support/remote.py), HTTPReranker in its
# Cohere-like format: the answers scripted here are in that shape.
BACKENDS: dict[str, Callable[..., Any]] = {b.name: _maker(b) for b in REMOTE_BACKENDS if not b.tei}
_memos, _cohere = _maker(MEMOS), _maker(COHERE)


def bound(timeout: float, max_retries: int = 0, backoff_max: float = 8.0) -> float:
    """The README's bound on one call."""
    return (max_retries + 1) * timeout + max_retries * backoff_max


def within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``'s result (or exception), failing the test if it runs longer than
    ``seconds``; the call runs in a daemon thread so that a hang cannot stall the suite."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call()
        except BaseException as error:  # handed to the test below
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the call was still running after {seconds:.2f} s")
    box["elapsed"] = time.monotonic() - started
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def call(reranker: Any, mode: str, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    if mode == "sync":
        return lambda: reranker.rerank(*args, **kwargs)
    return lambda: asyncio.run(reranker.arerank(*args, **kwargs))


@functools.lru_cache(maxsize=1)
def gzip_bomb(decoded_mib: int = 256) -> bytes:
    """About 1 MB that gunzips to ``decoded_mib`` MiB of JSON whitespace (level 1:
    three times faster to make than level 9, for a bomb four times the size)."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b" " * MiB
    parts = [packer.compress(b'{"results": [')]
    parts += [packer.compress(block) for _ in range(decoded_mib)]
    return b"".join([*parts, packer.flush()])


def spaces(total: int) -> Callable[[], Iterator[bytes]]:
    def produce() -> Iterator[bytes]:
        piece = b" " * MiB
        for _ in range(total // MiB):
            yield piece

    return produce


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return BACKENDS[request.param]


# ---------------------------------------------------------------- one deadline per call


@pytest.mark.parametrize("mode", MODES)
def test_trickled_headers_end_within_the_bound(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    # One header byte every 0.2 s: each read is quick, the headers take ~20 s.
    server.script(Reply(200, OK, header_trickle=0.2))
    reranker = backend(server, timeout=0.5, max_retries=0)
    started = time.monotonic()
    with pytest.raises(RerankTimeoutError):
        within(bound(0.5) + SLACK, call(reranker, mode, "q", DOCS))
    # ... and the connection is dropped, not left reading in the background.
    deadline = started + bound(0.5) + 2 * SLACK
    while not server.hangups and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.hangups and server.hangups[0] < deadline


@pytest.mark.parametrize("mode", MODES)
def test_a_trickled_body_ends_within_the_bound(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    server.script(Reply(200, OK, trickle=0.2))
    reranker = backend(server, timeout=0.5, max_retries=0)
    with pytest.raises(RerankTimeoutError):
        within(bound(0.5) + SLACK, call(reranker, mode, "q", DOCS))


@pytest.mark.parametrize("mode", MODES)
def test_retried_attempts_share_the_bound(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    server.script(*[Reply(200, OK, header_trickle=0.2)] * 3)
    reranker = backend(server, timeout=0.4, max_retries=1, backoff_base=0.05, backoff_max=0.1)
    with pytest.raises(RerankTimeoutError):
        within(bound(0.4, 1, 0.1) + SLACK, call(reranker, mode, "q", DOCS))
    assert len(server.wait_for_requests(2)) == 2  # both attempts were made, each cut at its timeout


@pytest.mark.parametrize("mode", MODES)
def test_a_split_call_keeps_one_deadline(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    # Four one-document requests, one at a time, each answered after 0.4 s: fine for
    # any one request, but the call as a whole would take 1.6 s against a 0.7 s bound.
    server.script(*[Reply(200, cohere_results(["doc 1"]), delay=0.4)] * 4)
    reranker = backend(
        server, timeout=0.7, max_retries=0, max_documents_per_request=1, max_concurrency=1
    )
    docs = ["doc 1", "doc 2", "doc 3", "doc 4"]
    started = time.monotonic()
    with pytest.raises(RerankTimeoutError):
        within(bound(0.7) + SLACK, call(reranker, mode, "q", docs))
    assert time.monotonic() - started < bound(0.7) + SLACK
    assert len(server.wait_for_requests(2)) == 2  # the third never started: no time was left


def _401_or_trickle(request: Recorded) -> Reply:
    if request.body["documents"] == ["doc 1"]:
        return Reply(401, {"message": "no"})
    return Reply(200, cohere_results(request.body["documents"]), header_trickle=0.2)


@pytest.mark.parametrize("mode", MODES)
def test_one_failed_request_fails_the_call_at_once(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    server.script(*[_401_or_trickle] * 3)
    reranker = backend(
        server, timeout=6.0, max_retries=0, max_documents_per_request=1, max_concurrency=3
    )
    started = time.monotonic()
    with pytest.raises(AuthenticationError):
        within(bound(6.0) + SLACK, call(reranker, mode, "q", DOCS))
    # Not after the other two requests' twenty seconds ...
    assert time.monotonic() - started < 2.0

    # ... which are stopped (those that had started), not left running to their timeouts.
    def all_stopped() -> bool:
        return len(server.hangups) == len(server.requests) - 1

    while not all_stopped() and time.monotonic() < started + 3.0:
        time.sleep(0.05)
    assert all_stopped()


def test_with_a_client_passed_in_the_call_still_fails_at_once(server: LoopbackServer) -> None:
    import httpx

    # Its sockets are not ours to stop: the caller must not wait for them.
    server.script(*[_401_or_trickle] * 3)
    with httpx.Client() as client:
        reranker = _memos(
            server,
            timeout=6.0,
            max_retries=0,
            max_documents_per_request=1,
            max_concurrency=3,
            http_client=client,
        )
        started = time.monotonic()
        with pytest.raises(AuthenticationError):
            within(bound(6.0) + SLACK, call(reranker, "sync", "q", DOCS))
        assert time.monotonic() - started < 2.0


# ---------------------------------------------------------------- one size cap


@pytest.mark.parametrize("mode", MODES)
def test_a_gzip_bomb_is_cut_at_the_cap(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    server.script(Reply(200, gzip_bomb(), headers={"Content-Encoding": "gzip"}))
    reranker = backend(server, timeout=5.0, max_retries=0)
    with pytest.raises(MalformedResponseError, match="larger than"):
        within(bound(5.0) + SLACK, call(reranker, mode, "q", DOCS))


def test_a_gzip_bomb_never_takes_much_more_memory_than_the_cap(server: LoopbackServer) -> None:
    # 256 MiB decoded from ~1 MB: reading it all would cost at least that much.
    server.script(Reply(200, gzip_bomb(), headers={"Content-Encoding": "gzip"}))
    reranker = _cohere(server, timeout=5.0, max_retries=0)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedResponseError, match="larger than"):
            reranker.rerank("q", DOCS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 160 * MiB


@pytest.mark.parametrize("mode", MODES)
def test_two_million_objects_under_the_cap_cost_a_few_times_their_size(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    # 26 kB of gzip, 6 MiB of "{}," decoded: parsed, two million dicts (some 150 MB;
    # gigabytes at the cap, more through the Cohere SDK's models). Refused unparsed,
    # it costs what reading its bytes does.
    body = b'{"results": [' + b"{}," * 2_000_000 + b"{}]}"
    size = len(body)
    packed = gzip.compress(body, 1)
    server.script(Reply(200, OK), Reply(200, packed, headers={"Content-Encoding": "gzip"}))
    reranker = backend(server, timeout=60.0, max_retries=0)
    within(60.0, call(reranker, mode, "q", DOCS))  # clients and SDK built outside the trace
    tracemalloc.start()
    try:
        with pytest.raises(MalformedResponseError) as caught:
            within(60.0, call(reranker, mode, "q", DOCS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * size, f"{peak / size:.1f} times the answer's size"
    assert "more than 4,288 JSON items" in str(caught.value)


@pytest.mark.parametrize("mode", MODES)
def test_a_200_mib_answer_is_cut_at_the_cap(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    server.script(Reply(200, stream=spaces(200 * MiB)))
    reranker = backend(server, timeout=5.0, max_retries=0)
    with pytest.raises(MalformedResponseError, match="larger than"):
        within(bound(5.0) + SLACK, call(reranker, mode, "q", DOCS))


@pytest.mark.parametrize("mode", MODES)
def test_an_unknown_content_encoding_is_malformed(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    server.script(Reply(200, b"\x00\x01garbage", headers={"Content-Encoding": "compress"}))
    reranker = backend(server, timeout=5.0, max_retries=0)
    with pytest.raises(MalformedResponseError):
        within(bound(5.0) + SLACK, call(reranker, mode, "q", DOCS))


@pytest.mark.parametrize("mode", MODES)
def test_a_small_gzipped_answer_is_read(
    server: LoopbackServer, backend: Callable[..., Any], mode: str
) -> None:
    import gzip
    import json

    body = gzip.compress(json.dumps(OK).encode())
    server.script(Reply(200, body, headers={"Content-Encoding": "gzip"}))
    results = within(10.0, call(backend(server, max_retries=0), mode, "q", DOCS))
    assert [r.index for r in results] == [item["index"] for item in OK["results"]]
    assert "gzip" in server.requests[0].headers.get("Accept-Encoding", "")


@pytest.mark.parametrize("mode", MODES)
def test_a_client_passed_in_reads_gzip_and_asks_only_for_what_we_decode(
    server: LoopbackServer, mode: str
) -> None:
    import gzip
    import json

    import httpx

    # httpx would decode each compressed chunk whole, and ask for br / zstd when their
    # packages are installed: the backend reads raw bytes and asks for its own list.
    headers = {"Accept-Encoding": "gzip, deflate, br, zstd"}
    body = gzip.compress(json.dumps(OK).encode())
    server.script(
        Reply(200, body, headers={"Content-Encoding": "gzip"}),
        Reply(200, gzip_bomb(), headers={"Content-Encoding": "gzip"}),
    )

    async def both(reranker: MemOSReranker) -> tuple[Any, BaseException | None]:
        results = await reranker.arerank("q", DOCS)
        try:
            await reranker.arerank("q", DOCS)
        except MalformedResponseError as error:
            return results, error
        return results, None

    with httpx.Client(headers=headers) as client:
        reranker = _memos(server, max_retries=0, http_client=client)
        if mode == "sync":
            results = within(10.0, call(reranker, mode, "q", DOCS))
            with pytest.raises(MalformedResponseError, match="larger than"):
                within(10.0, call(reranker, mode, "q", DOCS))
        else:
            reranker = _memos(
                server, max_retries=0, async_http_client=httpx.AsyncClient(headers=headers)
            )
            results, error = within(20.0, lambda: asyncio.run(both(reranker)))
            assert error is not None and "larger than" in str(error)
    assert [r.index for r in results] == [item["index"] for item in OK["results"]]
    assert [r.headers["Accept-Encoding"] for r in server.requests] == ["gzip, deflate"] * 2


# ---------------------------------------------------------------- through the adapter

HAZARDS: dict[str, tuple[list[Reply], dict[str, Any]]] = {
    "trickled headers": ([Reply(200, OK, header_trickle=0.2)], {"timeout": 0.5}),
    "trickled body": ([Reply(200, OK, trickle=0.2)], {"timeout": 0.5}),
    "gzip bomb": (
        [Reply(200, b"", headers={"Content-Encoding": "gzip"})],  # body set below
        {"timeout": 5.0},
    ),
    "slow split call": (
        [Reply(200, cohere_results(["doc 1"]), delay=0.4)] * 3,
        {"timeout": 0.7, "max_documents_per_request": 1, "max_concurrency": 1},
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hazard", list(HAZARDS))
def test_the_compressor_gives_every_document_back_in_time(
    server: LoopbackServer,
    backend: Callable[..., Any],
    mode: str,
    hazard: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    replies, options = HAZARDS[hazard]
    if hazard == "gzip bomb":
        replies = [Reply(200, gzip_bomb(), headers={"Content-Encoding": "gzip"})]
    server.script(*replies)
    compressor = RerankCompressor(reranker=backend(server, max_retries=0, **options), fallback=True)
    documents = [Document(page_content=d, metadata={"n": i}) for i, d in enumerate(DOCS)]
    if mode == "sync":
        out = within(
            bound(options["timeout"]) + SLACK,
            lambda: compressor.compress_documents(documents, "q"),
        )
    else:
        out = within(
            bound(options["timeout"]) + SLACK,
            lambda: asyncio.run(compressor.acompress_documents(documents, "q")),
        )
    assert [d.page_content for d in out] == DOCS
    assert all(d.metadata == {"n": i, "rerank_fallback": True} for i, d in enumerate(out))
    assert KEY not in caplog.text


def test_healthy_calls_still_work_after_a_hostile_one(server: LoopbackServer) -> None:
    server.script(Reply(200, OK, header_trickle=0.2), cohere_shaped, cohere_shaped)
    reranker = _memos(server, timeout=0.5, max_retries=0)
    with pytest.raises(RerankTimeoutError):
        within(bound(0.5) + SLACK, call(reranker, "sync", "q", DOCS))
    for mode in MODES:
        assert len(within(10.0, call(reranker, mode, "q", DOCS))) == 3


@pytest.mark.parametrize("mode", MODES)
def test_clients_passed_in_are_held_to_the_bound_too(server: LoopbackServer, mode: str) -> None:
    import httpx

    server.script(Reply(200, OK, header_trickle=0.2))
    with httpx.Client() as client:
        reranker = _memos(
            server,
            timeout=0.5,
            max_retries=0,
            http_client=client,
            async_http_client=httpx.AsyncClient(),
        )
        with pytest.raises(RerankTimeoutError):
            within(bound(0.5) + SLACK, call(reranker, mode, "q", DOCS))


@pytest.mark.parametrize("mode", MODES)
def test_a_trickled_body_through_a_client_passed_in_stops_being_read_at_the_deadline(
    server: LoopbackServer, mode: str
) -> None:
    import httpx

    # Each byte well within httpx's per-read timeout; the whole answer takes ~8 s.
    server.script(Reply(200, OK, trickle=0.05))
    started = time.monotonic()
    with httpx.Client() as client:
        reranker = _memos(
            server,
            timeout=0.5,
            max_retries=0,
            http_client=client,
            async_http_client=httpx.AsyncClient(),
        )
        with pytest.raises(RerankTimeoutError):
            within(bound(0.5) + SLACK, call(reranker, mode, "q", DOCS))
        # The call returns at its deadline whatever the client does; the attempt itself
        # must stop reading then too, not read on in its thread to the answer's end.
        while not server.hangups and time.monotonic() < started + 15.0:
            time.sleep(0.01)
    assert server.hangups, "the answer was read to its end"
    assert server.hangups[0] - started < bound(0.5) + SLACK


def test_a_straggler_on_a_client_passed_in_does_not_hold_up_interpreter_exit() -> None:
    import subprocess
    import sys
    from pathlib import Path

    from ..support.backends import SUBPROCESS_ENV

    script = """
import httpx
from memos_rerank_integrations import MemOSReranker, RerankTimeoutError
from tests.support.loopback import Reply, cohere_results, loopback

with loopback() as server:
    server.script(Reply(200, cohere_results(["doc 1"]), header_trickle=0.2))  # ~20 s
    reranker = MemOSReranker(
        api_key="k", base_url=server.url, timeout=0.5, max_retries=0,
        http_client=httpx.Client(),  # sockets that are not ours to stop
    )
    try:
        reranker.rerank("q", ["doc 1"])
    except RerankTimeoutError:
        print("timed out")
"""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "timed out"
    assert time.monotonic() - started < 15.0  # not the ~20 s the straggler would take
