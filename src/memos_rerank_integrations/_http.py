"""The one HTTP transport of the remote backends: a reused sync and async
``httpx`` client, per-attempt deadlines, mapping HTTP answers onto the error tree,
and :class:`HTTPBackend`, whose subclasses only say how to build the request body
and headers and how to read the results out of the JSON answer. The sync and
async paths run through the same builder and parser; retries, limits, splitting
and validation come from :class:`~._remote.RemoteReranker`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr

from ._exceptions import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    RateLimitError,
    RerankError,
    RerankTimeoutError,
)
from ._remote import RemoteReranker

__all__ = [
    "HTTPBackend",
    "HTTPClients",
    "error_for_status",
    "error_for_transport",
    "join_url",
    "retry_after_seconds",
]

logger = logging.getLogger(__name__)

# A response larger than this is not a ranking of any sane request.
_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_MAX_MESSAGE_CHARS = 300


# --------------------------------------------------------------------------- errors


def _clean(text: object, secret: SecretStr | None) -> str:
    """A server-provided message made safe to show: no key, one line, bounded length."""
    message = " ".join(str(text).split())
    if secret is not None:
        value = secret.get_secret_value()
        if value:
            message = message.replace(value, "**********")
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "..."
    return message


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``Retry-After`` (delta or HTTP date) or ``Retry-After-Ms``."""
    lowered = {key.lower(): value for key, value in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return value if math.isfinite(value) and value >= 0 else None


def _server_message(payload: object) -> str | None:
    if isinstance(payload, Mapping):
        for key in ("message", "detail", "error", "msg"):
            value = payload.get(key)
            if isinstance(value, Mapping):
                value = value.get("message", value)
            if value:
                return str(value)
    if isinstance(payload, str) and payload.strip():
        return payload
    return None


def error_for_status(
    status: int,
    *,
    backend: str,
    payload: object = None,
    headers: Mapping[str, str] | None = None,
    code: int | str | None = None,
    secret: SecretStr | None = None,
) -> RerankError:
    """The error for a non-2xx answer, with the server's message made safe."""
    detail = _server_message(payload)
    suffix = f": {_clean(detail, secret)}" if detail else ""
    kwargs: dict[str, Any] = {"status_code": status, "code": code, "backend": backend}
    if status in (401, 403):
        return AuthenticationError(
            f"The {backend} service rejected the credentials{suffix}. Check the API key.",
            **kwargs,
        )
    if status == 429:
        return RateLimitError(
            f"The {backend} service is rate limiting requests{suffix}",
            retry_after=retry_after_seconds(headers or {}),
            **kwargs,
        )
    if status == 408:
        return RerankTimeoutError(f"The {backend} service timed out the request{suffix}", **kwargs)
    if status >= 500:
        return BackendUnavailableError(f"The {backend} service failed{suffix}", **kwargs)
    if status == 404:
        return InvalidInputError(
            f"The {backend} endpoint was not found{suffix}. Check base_url.", **kwargs
        )
    if 400 <= status < 500:
        return InvalidInputError(f"The {backend} service rejected the request{suffix}", **kwargs)
    return MalformedResponseError(
        f"The {backend} service answered with unexpected HTTP status {status}{suffix}", **kwargs
    )


def error_for_transport(exc: Exception, *, backend: str, timeout: float) -> RerankError:
    """The error for a request that got no HTTP answer."""
    if isinstance(exc, httpx.TimeoutException):
        return RerankTimeoutError(
            f"The {backend} service did not answer within {timeout:.3g} s ({type(exc).__name__}).",
            backend=backend,
        )
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return InvalidInputError(
            f"Cannot send a request to the {backend} service: check base_url "
            f"({type(exc).__name__}).",
            backend=backend,
        )
    return BackendUnavailableError(
        f"Could not reach the {backend} service ({type(exc).__name__}).", backend=backend
    )


# --------------------------------------------------------------------------- HTTP


class HTTPClients:
    """One sync and one async ``httpx`` client, made on first use and reused.

    Clients passed in are used as they are and never closed here. An async client
    belongs to the event loop that first used it; one we made is replaced when a
    call comes from another loop (``asyncio.run`` twice, per-test loops).
    """

    def __init__(
        self,
        timeout: float,
        client: httpx.Client | None,
        async_client: httpx.AsyncClient | None,
    ) -> None:
        if client is not None and not isinstance(client, httpx.Client):
            raise InvalidInputError(f"http_client must be an httpx.Client, got {client!r}.")
        if async_client is not None and not isinstance(async_client, httpx.AsyncClient):
            raise InvalidInputError(
                f"async_http_client must be an httpx.AsyncClient, got {async_client!r}."
            )
        self._timeout = timeout
        self._sync = client
        self._owns_sync = client is None
        self._async = async_client
        self._owns_async = async_client is None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def sync(self) -> httpx.Client:
        with self._lock:
            if self._sync is None:
                self._sync = httpx.Client(timeout=self._timeout)
            return self._sync

    def async_(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._owns_async and (self._async is None or self._async_loop is not loop):
                self._async = httpx.AsyncClient(timeout=self._timeout)
                self._async_loop = loop
            assert self._async is not None
            return self._async

    def close(self) -> None:
        with self._lock:
            if self._owns_sync and self._sync is not None:
                self._sync.close()
                self._sync = None

    async def aclose(self) -> None:
        self.close()
        with self._lock:
            client, loop = self._async, self._async_loop
            if self._owns_async:
                self._async, self._async_loop = None, None
        if self._owns_async and client is not None and loop is asyncio.get_running_loop():
            await client.aclose()


_Self = TypeVar("_Self", bound="HTTPBackend")


class HTTPBackend(RemoteReranker):
    """A remote reranker spoken to with JSON over HTTP.

    Subclasses set ``backend_name`` and implement ``_body``, ``_auth_headers`` and
    ``_read_results`` (and ``_business_error`` when the service reports errors in
    a 2xx body). Everything else is shared by the sync and async paths.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None,
        api_key: SecretStr | None,
        timeout: float,
        max_retries: int,
        http_client: httpx.Client | None = None,
        async_http_client: httpx.AsyncClient | None = None,
        **options: Any,
    ) -> None:
        super().__init__(timeout=timeout, max_retries=max_retries, **options)
        self.url = _check_url(url)
        self.model = model
        self._api_key = api_key
        self._clients = HTTPClients(timeout, http_client, async_http_client)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, url={self.url!r})"

    # Wire format hooks.
    def _body(self, query: str, documents: list[str], top_n: int | None) -> object:
        raise NotImplementedError

    def _auth_headers(self) -> dict[str, str]:
        return {}

    def _read_results(self, payload: object) -> list[tuple[object, object]]:
        raise NotImplementedError

    def _business_error(
        self, payload: object, status: int, headers: Mapping[str, str]
    ) -> RerankError | None:
        """An error the service reports inside a parsed body (None: not an error)."""
        return None

    # One request, sync and async, over the shared builder and parser.
    def _request_args(
        self, query: str, documents: list[str], top_n: int | None
    ) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(self._body(query, documents, top_n), ensure_ascii=False)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update(self._auth_headers())
        return body.encode("utf-8"), headers

    def _score_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        content, headers = self._request_args(query, documents, top_n)
        deadline = time.monotonic() + timeout
        logger.debug("POST %s (%d documents)", self.url, len(documents))
        try:
            with self._clients.sync().stream(
                "POST", self.url, content=content, headers=headers, timeout=timeout
            ) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += self._checked_chunk(chunk, body, deadline, timeout)
                return self._parse(response.status_code, response.headers, bytes(body))
        except httpx.HTTPError as exc:
            raise error_for_transport(exc, backend=self.backend_name, timeout=timeout) from exc

    async def _ascore_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        content, headers = self._request_args(query, documents, top_n)
        deadline = time.monotonic() + timeout
        logger.debug("POST %s (%d documents)", self.url, len(documents))
        try:
            async with self._clients.async_().stream(
                "POST", self.url, content=content, headers=headers, timeout=timeout
            ) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += self._checked_chunk(chunk, body, deadline, timeout)
                return self._parse(response.status_code, response.headers, bytes(body))
        except httpx.HTTPError as exc:
            raise error_for_transport(exc, backend=self.backend_name, timeout=timeout) from exc

    def _checked_chunk(
        self, chunk: bytes, body: bytearray, deadline: float, timeout: float
    ) -> bytes:
        # httpx's read timeout is per chunk; a server trickling bytes would never trip it.
        if time.monotonic() > deadline:
            raise RerankTimeoutError(
                f"The {self.backend_name} answer took longer than {timeout:.3g} s.",
                backend=self.backend_name,
            )
        if len(body) + len(chunk) > _MAX_RESPONSE_BYTES:
            raise MalformedResponseError(
                f"The {self.backend_name} answer is larger than {_MAX_RESPONSE_BYTES} bytes.",
                backend=self.backend_name,
            )
        return chunk

    def _parse(
        self, status: int, headers: Mapping[str, str], content: bytes
    ) -> list[tuple[object, object]]:
        try:
            payload: object = json.loads(content)
            parsed = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload, parsed = content.decode("utf-8", "replace")[:_MAX_MESSAGE_CHARS], False
        if not 200 <= status < 300:
            error = self._business_error(payload, status, headers) if parsed else None
            raise error or error_for_status(
                status,
                backend=self.backend_name,
                payload=payload,
                headers=headers,
                secret=self._api_key,
            )
        if not parsed:
            raise MalformedResponseError(
                f"The {self.backend_name} answer is not valid JSON.",
                status_code=status,
                backend=self.backend_name,
            )
        error = self._business_error(payload, status, headers)
        if error is not None:
            raise error
        return self._read_results(payload)

    def _clean(self, text: object) -> str:
        return _clean(text, self._api_key)

    def close(self) -> None:
        """Close the sync client this object made (clients passed in stay open)."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close the clients this object made (clients passed in stay open)."""
        await self._clients.aclose()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url.strip():
        raise InvalidInputError(f"base_url must be a non-empty str, got {url!r}.")
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise InvalidInputError(f"base_url is not a valid URL: {exc}.") from exc
    if parsed.userinfo:
        raise InvalidInputError(
            "base_url must not contain credentials; pass the key as api_key instead."
        )
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInputError(
            f"base_url must be an http:// or https:// URL with a host, got {url!r}."
        )
    return str(parsed)


def join_url(base_url: str, path: str) -> str:
    """``base_url`` (its own path kept) followed by ``path``."""
    return base_url.strip().rstrip("/") + "/" + path.lstrip("/")
