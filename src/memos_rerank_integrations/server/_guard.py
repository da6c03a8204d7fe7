"""The gate in front of every rerank route, before any parsing.

In this order: the API key (401, before a byte of the body is read), the body
size (413 from a declared ``Content-Length``, and again while a chunked body
streams in), the time to receive the body (408), and the body's encoding (400
naming the first byte that is not UTF-8). Only then does the app see the body,
replayed from memory, with a JSON content type (the routes speak nothing else),
and with the request's :class:`RequestLimits` set, which the request models check
before they validate anything.
A client that disconnects mid-body gets nothing and costs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._core import REQUEST_LIMITS, ApiError, RequestLimits, Route, authorize, error_response

__all__ = ["Guard"]


class _Disconnected(Exception):
    pass


class Guard:
    """Pure ASGI middleware; ``routes`` maps each guarded POST path to its
    :class:`Route` (the dialect of its errors, the auth scheme its clients use)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, Route],
        api_key: str | None,
        limits: RequestLimits,
        max_body_bytes: int,
        body_timeout: float,
        on_error: Callable[[ApiError], None],
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.key = None if api_key is None else api_key.encode("ascii")
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            if self.key is not None:
                authorize(scope["headers"], self.key, scheme=route.scheme)
            body = await self._read_body(scope, receive)
            _check_utf8(body)
        except ApiError as error:
            self.on_error(error)
            await error_response(route.dialect, error, close=error.status in (408, 413))(
                scope, receive, send
            )
            return
        except _Disconnected:
            self.on_error(ApiError(499, "client disconnected", kind="client_disconnected"))
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        token = REQUEST_LIMITS.set(self.limits)
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            REQUEST_LIMITS.reset(token)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        too_large = ApiError(
            413,
            f"The request body is larger than the server's limit of {limit} bytes. "
            "Split the documents over several requests.",
            kind="too_large",
        )
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_large
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    f"The request body did not arrive within {self.body_timeout:g} s.",
                    kind="timeout",
                ) from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _check_utf8(body: bytes) -> None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400,
            f"The request body is not valid UTF-8: byte {exc.start} (0x{body[exc.start]:02x}) "
            "cannot be decoded. Send JSON encoded as UTF-8.",
        ) from None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # After the body: the real channel, which reports the client leaving.
        return await receive()

    return replay
