"""uvicorn settings under which no client can hold a connection, or the server, for long.

uvicorn alone leaves several connection states without any timer: a connection
that never sends a request, or trickles its head a byte at a time (each byte
resets the keep-alive timer); a connection whose declared body the app never
read (``GET /health`` with a ``Content-Length``), which then sends a byte now and
then; a client that never reads a large answer (there is no write timeout), which
also keeps ``SIGTERM`` from ever finishing. All of them count against
``limit_concurrency``, so a few hundred such sockets lock every real client out.

:class:`HeaderTimeoutProtocol` gives every state a timer, and makes every state in
which the server waits for the client evictable:

==============================  ==============================================
waiting for a request head      closed after ``header_timeout`` (from the
                                opening, and again after each response)
an answer sent before its       the answer carries ``Connection: close``; the
request's body arrived          server ends its output, discards what still
                                comes for up to 2 s (at most
                                ``header_timeout``; so the client reads the
                                answer, not a reset), then closes
the client reads nothing        aborted after ``write_timeout`` seconds
                                without progress, whether the answer is being
                                written or the connection is closing
waiting for a request body      the app's own timer (the guard's
                                ``body_timeout``)
==============================  ==============================================

When the connection limit is reached, a new connection evicts the connection that
has waited longest for its client in any of these states (never one whose
request the server is working on), and a request gets 503 only when more than
``limit_concurrency`` requests are being served at once. On shutdown, idle
connections close at once and the others within the same timers; uvicorn's
``timeout_graceful_shutdown`` bounds the wait for requests in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import h11
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_LIMIT_CONCURRENCY",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "HeaderTimeoutProtocol",
    "config",
]

DEFAULT_LIMIT_CONCURRENCY = 256
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
# The most seconds a connection closed before its request body arrived keeps
# reading (and discarding) that body, so that its client sees the answer.
_MAX_LINGER = 2.0

logger = logging.getLogger("uvicorn.error")


async def _service_unavailable(send: Send) -> None:
    """uvicorn's own answer to a request over the limit."""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"19"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": b"Service Unavailable"})


class _Transport:
    """The connection's transport as uvicorn sees it: every ``close()`` goes
    through :meth:`HeaderTimeoutProtocol._close`, which lingers or bounds the flush."""

    def __init__(self, transport: asyncio.Transport, protocol: HeaderTimeoutProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._protocol._lingering

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a timer in every state and eviction of the
    connections that wait for their clients (see the module's table)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    write_timeout: float = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check counts idle connections and finished requests:
        # this protocol checks in _serve instead.
        self._limit = self.limit_concurrency
        self.limit_concurrency = None
        inner = self.app

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            await self._serve(inner, scope, receive, send)

        self.app = serve
        self._real: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        # Since when the connection has waited for a request head, for the rest of
        # a request body, or for its client to take what was written (or to finish
        # a body nobody reads): None when it does not.
        self._waiting_since: float | None = None
        self._body_since: float | None = None
        self._stalled_since: float | None = None
        self._lingering = False

    # -- asyncio protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._real = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        self._track()
        self._evict_idle()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a body nobody reads
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stalled_since is None or self._lingering:
            return
        self._cancel_stall()
        real = self._real
        if real is not None and real.is_closing() and real.get_write_buffer_size():
            self._stall()  # still flushing before the close

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head()
        self._cancel_stall()
        self._body_since = None
        self._lingering = False
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._lingering:
            self._hard_close()
            return
        try:
            super().shutdown()
        except h11.LocalProtocolError:  # h11 in its ERROR state: nothing more to send
            self._close()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self._close()

    # -- the app ---------------------------------------------------------------------

    async def _serve(self, app: Any, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request: 503 when too many are being served; ``Connection:
        close`` on an answer that starts before the request's body has arrived."""

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.conn.their_state is h11.SEND_BODY:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        if self._overloaded():
            logger.warning("Exceeded concurrency limit.")
            await _service_unavailable(send)
            return
        await app(scope, receive, send_closing)

    def _overloaded(self) -> bool:
        if self._limit is None:
            return False
        serving = sum(
            1
            for connection in self.connections
            if isinstance(connection, HeaderTimeoutProtocol) and connection._serving()
        )
        return serving > self._limit

    def _serving(self) -> bool:
        """Whether the server is working on a request of this connection."""
        cycle = self.cycle
        return (
            cycle is not None
            and not cycle.response_complete
            and not cycle.disconnected
            and self._idle_since() is None
        )

    # -- timers ------------------------------------------------------------------------

    def _idle_since(self) -> float | None:
        """Since when the connection has waited for its client, if it does."""
        if self._waiting_since is not None:
            return self._waiting_since
        if self._stalled_since is not None:
            return self._stalled_since
        cycle = self.cycle
        if self._body_since is not None and cycle is not None and not cycle.response_started:
            return self._body_since
        return None

    def _track(self) -> None:
        """Follow the client's side of the connection after it may have moved."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting_since is None and not self.transport.is_closing():
                # A new request head is due: its deadline runs from now, and bytes
                # trickling in do not move it.
                self._cancel_head()
                self._waiting_since = time.monotonic()
                self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
            return
        if self._waiting_since is not None:
            self._cancel_head()  # a complete request head arrived
        if state is h11.SEND_BODY:
            if self._body_since is None:
                self._body_since = time.monotonic()
        else:
            self._body_since = None

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = None
        self._waiting_since = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._close()

    def _stall(self) -> None:
        """The client does not take what is written: abort unless it moves on."""
        if self._lingering:
            return
        self._cancel_stall()
        self._stalled_since = time.monotonic()
        self._stall_timer = self.loop.call_later(self.write_timeout, self._hard_close)

    def _cancel_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._stall_timer = None
        self._stalled_since = None

    # -- closing -----------------------------------------------------------------------

    def _close(self) -> None:
        """Every close: linger when the client may still be sending a body; bound
        the flush of what it has not read yet."""
        real = self._real
        if real is None or real.is_closing():
            return
        if self._lingering:
            self._hard_close()
            return
        self._cancel_head()
        if self.conn.their_state is h11.SEND_BODY:
            self._linger(real)
            return
        real.close()
        if real.get_write_buffer_size():
            self._stall()

    def _linger(self, real: asyncio.Transport) -> None:
        """End the output after the answer, discard input, and close after a moment:
        closing with unread input would reset the connection, answer included."""
        self._cancel_stall()
        self._lingering = True
        self._stalled_since = time.monotonic()
        self.flow.resume_reading()
        if real.can_write_eof():
            real.write_eof()
        delay = min(_MAX_LINGER, self.header_timeout)
        self._stall_timer = self.loop.call_later(delay, self._hard_close)

    def _hard_close(self) -> None:
        self._stall_timer = None
        real = self._real
        if real is None:
            return
        if real.get_write_buffer_size():
            real.abort()
        elif not real.is_closing():
            real.close()

    def _evict_idle(self) -> None:
        limit = self._limit
        if limit is None:
            return
        # Connections closing with nothing left to write leave ``connections`` a
        # moment later: skip them.
        occupying = [
            connection
            for connection in self.connections
            if not (
                isinstance(connection, HeaderTimeoutProtocol)
                and connection._real is not None
                and connection._real.is_closing()
                and not connection._real.get_write_buffer_size()
            )
        ]
        excess = len(occupying) - limit + 1
        if excess <= 0:
            return
        idle: list[tuple[float, HeaderTimeoutProtocol]] = []
        for connection in occupying:
            if connection is not self and isinstance(connection, HeaderTimeoutProtocol):
                since = connection._idle_since()
                if since is not None:
                    idle.append((since, connection))
        idle.sort(key=lambda item: item[0])
        for _, connection in idle[:excess]:
            connection._evict()

    def _evict(self) -> None:
        self._cancel_head()
        self._cancel_stall()
        if self._real is not None:
            self._real.abort()


def config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
    timeout_keep_alive: float = 5.0,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    write_timeout: float | None = None,
    shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: str = "info",
    **options: Any,
) -> Any:
    """A ``uvicorn.Config`` serving ``app`` with these limits (``options`` go to uvicorn).

    ``limit_concurrency``: requests served at once beyond which new requests get
    503, and open connections beyond which a new connection evicts the one that
    has waited longest for its client; ``timeout_keep_alive``: seconds an idle
    keep-alive connection stays open; ``header_timeout``: seconds a connection
    has to send a complete request head; ``write_timeout``: seconds a client may
    take no part of an answer before the connection is aborted (default:
    ``header_timeout``); ``shutdown_timeout``: seconds a shutdown waits for
    requests in progress before cancelling them (uvicorn's
    ``timeout_graceful_shutdown``; ``None``: for ever).
    """
    import uvicorn

    settings = {
        "header_timeout": header_timeout,
        "write_timeout": header_timeout if write_timeout is None else write_timeout,
    }
    protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), settings)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]
        timeout_graceful_shutdown=shutdown_timeout,  # type: ignore[arg-type]
        log_level=log_level,
        **options,
    )
