"""uvicorn settings that keep idle and half-open connections from holding the server.

uvicorn times out idle keep-alive connections only after a first response: a
client that connects and sends nothing, or trickles its request line and headers
a byte at a time, is held for ever (each byte resets the keep-alive timer), and
counts against ``limit_concurrency`` meanwhile, so 500 of them lock every real
client out. :class:`HeaderTimeoutProtocol` gives every connection
``header_timeout`` seconds to deliver a complete request head (from its opening,
and again after each response), and when the connection limit is reached, a new
connection evicts the connection that has waited longest for a request head
(never one whose request is being served).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DEFAULT_HEADER_TIMEOUT", "DEFAULT_LIMIT_CONCURRENCY", "HeaderTimeoutProtocol", "config"]

DEFAULT_LIMIT_CONCURRENCY = 256
DEFAULT_HEADER_TIMEOUT = 10.0


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None
        super().connection_made(transport)
        self._wait_for_head()
        self._evict_idle()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_since is not None and self.conn.their_state is not h11.IDLE:
            self._stop_waiting()  # a complete request head arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self._waiting_since = time.monotonic()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_waiting(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        self._head_timer = None
        self._waiting_since = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def _evict_idle(self) -> None:
        limit = self.limit_concurrency
        if limit is None:
            return
        # Connections already closing leave ``connections`` a moment later: skip them.
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        excess = len(open_) - limit + 1
        if excess <= 0:
            return
        waiting = [
            connection
            for connection in open_
            if connection is not self
            and isinstance(connection, HeaderTimeoutProtocol)
            and connection._waiting_since is not None
        ]
        waiting.sort(key=lambda connection: connection._waiting_since or 0.0)
        for connection in waiting[:excess]:
            connection.transport.close()


def config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
    timeout_keep_alive: float = 5.0,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    log_level: str = "info",
    **options: Any,
) -> Any:
    """A ``uvicorn.Config`` serving ``app`` with these limits (``options`` go to uvicorn).

    ``limit_concurrency``: connections or in-flight requests beyond which new
    requests get 503; ``timeout_keep_alive``: seconds an idle keep-alive
    connection stays open; ``header_timeout``: seconds a connection has to send a
    complete request head.
    """
    import uvicorn

    protocol = type(
        "HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout}
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]
        log_level=log_level,
        **options,
    )
