"""Connections that never finish a request, clients that never read, and shutdown with
both connected: real uvicorn on loopback, raw sockets, real clients, and
``memos-rerank serve`` as a process."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from memos_rerank_integrations.server import config, create_app
from memos_rerank_integrations.testing import build_tiny_cross_encoder

from ..support.server import (
    DOCUMENTS,
    QUERY,
    LiveServer,
    WordOverlapReranker,
    address,
    free_port,
    read_head,
    request_head,
    small_buffer_listener,
    start_serve,
    wait_healthy,
)

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = json.dumps({"query": QUERY, "documents": DOCUMENTS}).encode()


# Each opener leaves one socket in a state where the server waits for its client.


def silent(url: str) -> socket.socket:
    """Connects and sends nothing."""
    return socket.create_connection(address(url), timeout=10)


def unread_body(method: str, path: str, *headers: str) -> Callable[[str], socket.socket]:
    """Declares a body the server answers without reading, then sends one byte of it."""

    def opener(url: str) -> socket.socket:
        sock = socket.create_connection(address(url), timeout=10)
        sock.sendall(request_head(method, path, "Content-Length: 100", *headers))
        read_head(sock)
        with contextlib.suppress(OSError):
            sock.sendall(b"x")
        return sock

    return opener


def body_pending(url: str) -> socket.socket:
    """A rerank request with the key whose body stops after one byte."""
    sock = socket.create_connection(address(url), timeout=10)
    length = f"Content-Length: {len(BODY)}"
    sock.sendall(request_head("POST", "/rerank", length, f"Authorization: Bearer {KEY}"))
    sock.sendall(BODY[:1])
    return sock


def never_reading(url: str, requests: int = 1) -> socket.socket:
    """Asks for a large answer (or several, pipelined) and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(address(url))
    sock.sendall(request_head("GET", "/openapi.json") * requests)
    return sock


OPENERS: dict[str, Callable[[str], socket.socket]] = {
    "silent": silent,
    "unread-health": unread_body("GET", "/health"),
    "unread-404": unread_body("GET", "/no/such/path"),
    "rerank-without-key": unread_body("POST", "/rerank"),
    "body-pending": body_pending,
    "never-reading": never_reading,
    "never-reading-pipelined": lambda url: never_reading(url, requests=40),
}


@contextlib.contextmanager
def held(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def legitimate_clients_get_in(live: LiveServer, rounds: int = 3) -> None:
    """``/health`` and a rerank request, each on a new connection, answered at once."""
    for _ in range(rounds):
        started = time.monotonic()
        health = httpx.get(f"{live.url}/health", timeout=20)
        rerank = httpx.post(f"{live.url}/rerank", content=BODY, headers=AUTH, timeout=20)
        assert health.status_code == 200, health.text
        assert rerank.status_code == 200, rerank.text
        # Every timer of the server is 60 s: only eviction can have let them in.
        assert time.monotonic() - started < 10


def patient_server(limit: int | None) -> tuple[LiveServer, socket.socket]:
    """A server whose every timer is 60 s, with small kernel send buffers."""
    app = create_app(WordOverlapReranker(), model_name="m", api_key=KEY, body_timeout=60)
    live_config = config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="error",
        limit_concurrency=limit,
        header_timeout=60,
        write_timeout=60,
        timeout_keep_alive=60,
    )
    listener = small_buffer_listener()
    return LiveServer(app, live_config, sockets=[listener]), listener


def open_connections(live: LiveServer) -> int:
    return len(live.server.server_state.connections)


@pytest.mark.parametrize("kind", list(OPENERS))
def test_sockets_waiting_in_any_state_cannot_lock_clients_out(kind: str) -> None:
    limit = 16
    live, listener = patient_server(limit)
    with live, held([OPENERS[kind](live.url) for _ in range(limit - 1)]) as sockets:
        time.sleep(0.3)  # the never-reading ones fill the buffers
        legitimate_clients_get_in(live)
        # Twice as many as the limit: still, and the server holds no more than it.
        sockets += [OPENERS[kind](live.url) for _ in range(limit)]
        time.sleep(0.3)
        legitimate_clients_get_in(live)
        assert open_connections(live) <= limit
    listener.close()


def test_255_idle_sockets_of_every_kind_at_the_default_limit() -> None:
    live, listener = patient_server(256)
    # Every kind but the silent one (evictable for long): the others were not.
    kinds = [opener for kind, opener in OPENERS.items() if kind != "silent"]
    with live, held([kinds[i % len(kinds)](live.url) for i in range(255)]):
        time.sleep(0.5)
        legitimate_clients_get_in(live)
        # And while they stay: a second wave of legitimate clients, all at once.
        with httpx.Client(timeout=20) as client:
            answers = [client.get(f"{live.url}/health").status_code for _ in range(20)]
        assert answers == [200] * 20
    listener.close()


@pytest.mark.parametrize("kind", list(OPENERS))
def test_every_connection_state_has_a_timer(kind: str) -> None:
    """Without any pressure from the connection limit, the server still closes a
    connection in each state within its timers (here 1 s each)."""
    app = create_app(WordOverlapReranker(), model_name="m", api_key=KEY, body_timeout=1.0)
    live_config = config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="error",
        limit_concurrency=None,
        header_timeout=1.0,
        write_timeout=1.0,
        timeout_keep_alive=1.0,
    )
    listener = small_buffer_listener()
    live = LiveServer(app, live_config, sockets=[listener])
    with live, held([OPENERS[kind](live.url) for _ in range(4)]):
        deadline = time.monotonic() + 5
        while open_connections(live) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # accepted (unless already closed: unread bodies)
        deadline = time.monotonic() + 15
        while open_connections(live):
            assert time.monotonic() < deadline, f"{kind} connections still open"
            time.sleep(0.05)
    listener.close()


def test_an_answer_sent_before_the_body_arrived_closes_the_connection() -> None:
    """The answer says ``Connection: close``; the server then drops what the client
    still sends for a moment (the client is not reset mid-upload) and ends the
    connection cleanly after the whole answer."""
    live, listener = patient_server(None)
    with live, held([socket.create_connection(address(live.url), timeout=10)]) as (sock,):
        sock.sendall(request_head("POST", "/rerank", "Content-Length: 1000000"))
        sock.sendall(b"x" * 200_000)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        time.sleep(0.3)  # the answer is complete: a server that closed now resets us
        sock.sendall(b"x" * 100_000)
        while chunk := sock.recv(4096):
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401")
        assert b"connection: close" in head.lower()
        assert json.loads(body)["message"].startswith("An API key is required")
    listener.close()


def test_head_health_answers_like_get() -> None:
    app = create_app(WordOverlapReranker(), model_name="m")
    with LiveServer(app) as live:
        get = httpx.get(f"{live.url}/health", timeout=10)
        head = httpx.head(f"{live.url}/health", timeout=10)
        app.state.batcher.close()
        head_down = httpx.head(f"{live.url}/health", timeout=10)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head_down.status_code == 503


# -- shutdown ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("connections") / "tiny-ce")


SHUTDOWN_BOUND = 10.0  # config()'s shutdown_timeout, the documented bound


def test_sigterm_exits_within_its_bound_with_idle_and_never_reading_clients(
    cross_encoder_dir: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_serve(
        [
            *("--model", str(cross_encoder_dir), "--backend", "cross-encoder"),
            *("--dtype", "float32", "--port", str(port), "--log-level", "warning"),
            *("--header-timeout", "3", "--body-timeout", "3"),
        ]
    )
    sockets: list[socket.socket] = []
    try:
        wait_healthy(process, url)
        for opener in OPENERS.values():
            sockets += [opener(url) for _ in range(5)]
        # The server's kernel buffers grow to megabytes: ask for more than that.
        sockets += [never_reading(url, requests=400) for _ in range(3)]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        time.sleep(2)  # the server fills its buffers for the never-reading clients
    finally:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=SHUTDOWN_BOUND + 20)
        except Exception:
            process.kill()
            process.communicate()
            raise
        finally:
            for sock in sockets:
                sock.close()
    elapsed = time.monotonic() - started
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert elapsed < SHUTDOWN_BOUND + 5, f"exited {elapsed:.1f} s after SIGTERM"
