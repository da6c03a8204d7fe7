"""Helpers of the server tests: a deterministic stand-in model, a live uvicorn, and
``memos-rerank serve`` as a real process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from memos_rerank_integrations import RerankResult
from memos_rerank_integrations._types import rank_scores

QUERY = "What are the user's hobbies?"
DOCUMENTS = [
    "User likes playing badminton.",
    "User is a backend developer in Hangzhou.",
    "User prefers concise replies.",
    "User prefers Jiangxiang-flavored baijiu.",
    "User is going on a business trip to Beijing next Wednesday.",
]


class WordOverlapReranker:
    """A deterministic pointwise scorer with call counters, standing in for a model."""

    def __init__(self, *, delay: float = 0.0, batched: bool = True) -> None:
        self.delay = delay
        self.rerank_calls = 0
        self.many_calls: list[int] = []
        self.lock = threading.Lock()
        if not batched:
            self.rerank_many = None  # type: ignore[assignment]

    @staticmethod
    def score(query: str, document: str) -> float:
        words = set(query.lower().split())
        hits = sum(word.strip(".,?") in words for word in document.lower().split())
        return (hits + 1) / (len(document) + 2)

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        with self.lock:
            self.rerank_calls += 1
        time.sleep(self.delay)
        if "EXPLODE" in query:
            raise RuntimeError("the model exploded")
        return rank_scores([self.score(query, d) for d in documents], top_n=top_n)

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return self.rerank(query, documents, top_n)

    def rerank_many(
        self, calls: Sequence[tuple[str, Sequence[str], int | None]]
    ) -> list[list[RerankResult]]:
        with self.lock:
            self.many_calls.append(len(calls))
        time.sleep(self.delay)
        if any("EXPLODE" in query for query, _, _ in calls):
            raise RuntimeError("the model exploded")
        return [
            rank_scores([self.score(q, d) for d in docs], top_n=top_n) for q, docs, top_n in calls
        ]

    @property
    def model_calls(self) -> int:
        return self.rerank_calls + len(self.many_calls)


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a background thread
    (on ``sockets``, listening sockets of the caller's, when given)."""

    def __init__(
        self, app: Any, config: Any = None, *, sockets: list[socket.socket] | None = None
    ) -> None:
        self.app = app
        if config is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: self.server.run(sockets=sockets), daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


def small_buffer_listener(send_buffer: int = 2048) -> socket.socket:
    """A loopback listening socket whose connections keep at most ``send_buffer``
    bytes in the kernel (accepted sockets inherit it), so that a client that reads
    nothing stalls the server after a few answers instead of after megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


SRC = Path(__file__).resolve().parents[2] / "src"


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def request_head(method: str, path: str, *headers: str) -> bytes:
    """An HTTP/1.1 request line and headers, as raw bytes."""
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: x", *headers, "", ""]).encode()


def read_head(sock: socket.socket) -> bytes:
    """The response head (or whatever arrived before the server closed)."""
    received = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    return received.partition(b"\r\n\r\n")[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_serve(args: list[str]) -> subprocess.Popen[str]:
    """``memos-rerank serve *args`` as a real process (this checkout's sources, offline,
    no key from the environment), its output captured."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    env.pop("MEMOS_RERANK_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "memos_rerank_integrations.cli", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_healthy(process: subprocess.Popen[str], url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


class Boom(BaseException):
    """Neither an ``Exception`` nor a cancellation: what no backend should leak."""


class HostileReranker(WordOverlapReranker):
    """A word-overlap model that misbehaves on cue, and records every query it scores.

    A query containing ``BASE`` raises :class:`Boom`, ``CANCEL`` an
    ``asyncio.CancelledError``, ``INTERRUPT`` a ``KeyboardInterrupt``, ``LEAK`` a
    ``RuntimeError`` quoting the query, ``REFUSE`` an ``InvalidInputError`` (the
    backend's own limit; from ``rerank`` and from any ``rerank_many`` batch
    holding it); ``SHORT`` answers
    that call one result short; ``DROPCALL`` makes ``rerank_many`` answer one list
    short. ``broken`` makes every call raise ``RuntimeError``. With ``tokens_per_doc``
    it has a ``count_tokens`` that records the thread it ran in.
    """

    def __init__(self, *, delay: float = 0.0, tokens_per_doc: int | None = None) -> None:
        super().__init__(delay=delay)
        self.queries: list[str] = []
        self.broken = False
        self.count_threads: list[str] = []
        if tokens_per_doc is not None:
            self.tokens_per_doc = tokens_per_doc
        else:
            self.count_tokens = None  # type: ignore[assignment]

    def count_tokens(self, query: str, documents: Sequence[str]) -> int:
        self.count_threads.append(threading.current_thread().name)
        return self.tokens_per_doc * len(documents)

    @staticmethod
    def _raise_for(query: str) -> None:
        import asyncio

        if "BASE" in query:
            raise Boom("the model hit a BaseException")
        if "CANCEL" in query:
            raise asyncio.CancelledError
        if "INTERRUPT" in query:
            raise KeyboardInterrupt
        if "LEAK" in query:
            raise RuntimeError(f"the model choked on {query!r}")
        if "REFUSE" in query:
            from memos_rerank_integrations import InvalidInputError

            raise InvalidInputError("The query is longer than this model accepts.")

    def _answer(self, query: str, documents: Sequence[str], top_n: int | None) -> Any:
        results = rank_scores([self.score(query, d) for d in documents], top_n=top_n)
        return results[:-1] if "SHORT" in query else results

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        with self.lock:
            self.rerank_calls += 1
            self.queries.append(query)
        time.sleep(self.delay)
        if self.broken:
            raise RuntimeError("the model is broken")
        self._raise_for(query)
        answer: list[RerankResult] = self._answer(query, documents, top_n)
        return answer

    def rerank_many(
        self, calls: Sequence[tuple[str, Sequence[str], int | None]]
    ) -> list[list[RerankResult]]:
        with self.lock:
            self.many_calls.append(len(calls))
            self.queries.extend(query for query, _, _ in calls)
        time.sleep(self.delay)
        if self.broken:
            raise RuntimeError("the model is broken")
        for query, _, _ in calls:
            self._raise_for(query)
        answers = [self._answer(q, docs, top_n) for q, docs, top_n in calls]
        return answers[:-1] if any("DROPCALL" in q for q, _, _ in calls) else answers
