"""A real HTTP server on 127.0.0.1 for tests of the remote backends.

Each request takes the next scripted :class:`Reply` (or, once the script is used
up, the ``default`` responder's answer) and is recorded with its path, headers
and JSON body. The server runs in a daemon thread and serves requests in
parallel, so concurrency tests hit it for real.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer. ``body``: bytes/str sent as is, anything else as JSON."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # Seconds between single-byte writes of the body: a server that keeps each
    # read short but the whole answer long.
    trickle: float = 0.0
    # The same for the status line and headers (the body follows at once).
    header_trickle: float = 0.0
    # A body produced piece by piece (a huge or endless answer): sent chunked, after
    # ``body`` (if any) is ignored. Called once per reply.
    stream: Callable[[], Iterable[bytes]] | None = None


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    client_port: int = 0  # the same port for two requests means one pooled connection


Responder = Callable[[Recorded], Reply]


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 makes a burst of 64 connections wait for SYN retries.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-request (a cancelled attempt) is expected here.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class LoopbackServer:
    def __init__(self, default: Responder | None = None) -> None:
        self.requests: list[Recorded] = []
        # time.monotonic() of each answer the client stopped reading (it hung up).
        self.hangups: list[float] = []
        self._script: deque[Reply | Responder] = deque()
        self._default = default
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *replies: Reply | Responder) -> None:
        with self._lock:
            self._script.extend(replies)

    def wait_for_requests(self, count: int, *, within: float = 5.0) -> list[Recorded]:
        """The requests recorded once ``count`` of them are in, or after ``within`` s.

        A request the client sent just before it gave up (a timed-out attempt) may
        still sit in the socket when the call returns; its handler thread records it
        a moment later, so counting ``requests`` at once races with it on a loaded
        machine. Waiting for the count keeps the check (a missing retry still leaves
        the count short) without the race."""
        ends = time.monotonic() + within
        while True:
            with self._lock:
                if len(self.requests) >= count or time.monotonic() >= ends:
                    return list(self.requests)
            time.sleep(0.005)

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            planned = self._script.popleft() if self._script else None
        if planned is None:
            if self._default is None:
                return Reply(500, {"message": "loopback server: no scripted reply left"})
            planned = self._default
        return planned if isinstance(planned, Reply) else planned(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if len(raw) < length:
                    # The client hung up before its body was sent (a cancelled
                    # request): recorded, and counted as stopped.
                    with server._lock:
                        server.requests.append(
                            Recorded("POST", self.path, dict(self.headers.items()), None)
                        )
                        server.hangups.append(time.monotonic())
                    self.close_connection = True
                    return
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw
                request = Recorded(
                    "POST", self.path, dict(self.headers.items()), body, self.client_address[1]
                )
                reply = server._next(request)
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self._answer(reply)
                except (BrokenPipeError, ConnectionResetError):
                    with server._lock:
                        server.hangups.append(time.monotonic())

            def _answer(self, reply: Reply) -> None:
                if isinstance(reply.body, bytes):
                    payload = reply.body
                elif isinstance(reply.body, str):
                    payload = reply.body.encode()
                else:
                    payload = json.dumps(reply.body).encode()
                headers = {"Content-Type": "application/json", **reply.headers}
                if reply.stream is not None:
                    headers["Transfer-Encoding"] = "chunked"
                else:
                    headers["Content-Length"] = str(len(payload))
                phrase = self.responses.get(reply.status, ("",))[0]
                head = f"HTTP/1.1 {reply.status} {phrase}\r\n"
                head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                head_bytes = (head + "\r\n").encode("latin-1")
                if reply.header_trickle:
                    for byte in head_bytes:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(reply.header_trickle)
                elif reply.stream is None and not reply.trickle:
                    # One write: split writes meet delayed ACKs (40 ms per request).
                    self.wfile.write(head_bytes + payload)
                    self.wfile.flush()
                    return
                else:
                    self.wfile.write(head_bytes)
                if reply.stream is not None:
                    for piece in reply.stream():
                        if piece:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                elif reply.trickle:
                    for byte in payload:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(reply.trickle)
                else:
                    self.wfile.write(payload)
                self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


@contextmanager
def loopback(default: Responder | None = None) -> Iterator[LoopbackServer]:
    server = LoopbackServer(default).start()
    try:
        yield server
    finally:
        server.stop()


# ---- answers in the services' shapes


def score_of(document: str) -> float:
    """A deterministic score the fake services give a document, from its text.

    Documents named ``"doc <n>"`` score ``((n * 37) % 101) / 100``; tests derive
    the expected order from the same formula, independently of the code under test.
    """
    number = int(document.split()[-1])
    return ((number * 37) % 101) / 100


def cohere_results(documents: Iterable[str], top_n: int | None = None) -> dict[str, Any]:
    ranked = sorted(
        ({"index": i, "relevance_score": score_of(d)} for i, d in enumerate(documents)),
        key=lambda item: -item["relevance_score"],
    )
    return {"id": "test", "results": ranked[:top_n] if top_n else ranked}


def cohere_shaped(request: Recorded) -> Reply:
    """A Cohere/Jina/vLLM/MemOS-shaped ``/rerank`` service."""
    body = request.body
    return Reply(200, cohere_results(body["documents"], body.get("top_n")))


def tei_shaped(request: Recorded) -> Reply:
    """A text-embeddings-inference ``/rerank`` service: a bare list."""
    texts = request.body["texts"]
    ranked = sorted(
        ({"index": i, "score": score_of(t)} for i, t in enumerate(texts)),
        key=lambda item: -item["score"],
    )
    return Reply(200, ranked)


def exception_texts(error: BaseException) -> list[str]:
    """``str`` and ``repr`` of an exception and of everything reachable from it
    through ``__cause__`` and ``__context__``."""
    texts: list[str] = []
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), repr(vars(current))]
        pending += [current.__cause__, current.__context__]
    return texts


def timeout_for(replies: Iterable[Reply]) -> float:
    """A client timeout for a scripted scenario: short where the script is meant to
    be slower than it, generous otherwise so that a loaded CI machine never turns
    an expected 401 or 500 into a timeout."""
    return 0.4 if any(reply.delay for reply in replies) else 10.0


# The delay of a scripted answer meant to be slower than :func:`timeout_for`'s short
# timeout: three times it, so that a stalled client thread or event loop on a loaded
# machine still times out before the answer comes.
SLOWER = 1.2


# ---- what the remote-backend test modules share

# Backoff small enough to keep retry tests fast.
FAST: dict[str, Any] = {"backoff_base": 0.001, "backoff_max": 2.0}
MODES = ["sync", "async"]


def invoke(reranker: Any, mode: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``rerank`` or, in a fresh event loop, ``arerank``."""
    if mode == "sync":
        return reranker.rerank(*args, **kwargs)
    return asyncio.run(reranker.arerank(*args, **kwargs))


def expected_order(docs: Sequence[str]) -> list[int]:
    """The ranking the fake services' scores imply, ties in input order."""
    return sorted(range(len(docs)), key=lambda i: (-score_of(docs[i]), i))
