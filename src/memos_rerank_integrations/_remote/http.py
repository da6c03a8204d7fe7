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
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from pydantic import SecretStr

from .. import _exceptions as errors
from .base import RemoteOptions, RemoteReranker, read_scored_results
from .deadline import guard_sockets
from .json_bounds import MAX_RESPONSE_DEPTH, NOT_JSON, json_shape_problem, max_response_items

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ACCEPT_ENCODING",
    "MAX_RESPONSE_BYTES",
    "HTTPBackend",
    "HTTPClients",
    "HTTPOptions",
    "answer_bound",
    "check_url",
    "error_for_status",
    "error_for_transport",
    "join_url",
    "retry_after_seconds",
]

logger = logging.getLogger(__name__)

# A response larger than this, decoded, is not a ranking of any sane request.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_MAX_MESSAGE_CHARS = 300


# --------------------------------------------------------------------------- errors


def _clean(text: object, secret: SecretStr | None) -> str:
    """A server-provided message made safe to show: no key, one line, bounded length."""
    message = " ".join(str(text).split())
    # A server may send lone surrogates ("\\ud800" in JSON); they would break printing.
    message = message.encode("utf-8", "replace").decode("utf-8")
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
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        return max(0.0, seconds)
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
) -> errors.RerankError:
    """The error for a non-2xx answer, with the server's message made safe."""
    detail = _server_message(payload)
    suffix = f": {_clean(detail, secret)}" if detail else ""
    kwargs: dict[str, Any] = {"status_code": status, "code": code, "backend": backend}
    if status in (401, 403):
        return errors.AuthenticationError(
            f"The {backend} service rejected the credentials{suffix}. Check the API key.",
            **kwargs,
        )
    if status == 429:
        return errors.RateLimitError(
            f"The {backend} service is rate limiting requests{suffix}",
            retry_after=retry_after_seconds(headers or {}),
            **kwargs,
        )
    if status == 408:
        return errors.RerankTimeoutError(
            f"The {backend} service timed out the request{suffix}", **kwargs
        )
    if status >= 500:
        return errors.BackendUnavailableError(f"The {backend} service failed{suffix}", **kwargs)
    if status == 404:
        return errors.InvalidInputError(
            f"The {backend} endpoint was not found{suffix}. Check base_url.", **kwargs
        )
    if 400 <= status < 500:
        return errors.InvalidInputError(
            f"The {backend} service rejected the request{suffix}", **kwargs
        )
    return errors.MalformedResponseError(
        f"The {backend} service answered with unexpected HTTP status {status}{suffix}", **kwargs
    )


def error_for_transport(exc: Exception, *, backend: str, timeout: float) -> errors.RerankError:
    """The error for a request that got no HTTP answer."""
    if isinstance(exc, httpx.TimeoutException):
        return errors.RerankTimeoutError(
            f"The {backend} service did not answer within {timeout:.3g} s ({type(exc).__name__}).",
            backend=backend,
        )
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return errors.InvalidInputError(
            f"Cannot send a request to the {backend} service: check base_url "
            f"({type(exc).__name__}).",
            backend=backend,
        )
    return errors.BackendUnavailableError(
        f"Could not reach the {backend} service ({type(exc).__name__}).", backend=backend
    )


# --------------------------------------------------------------------------- HTTP


# Only encodings _BodyDecoder reads are asked for (httpx would add br and zstd when
# their packages are installed, and decode those without a size bound).
ACCEPT_ENCODING = "gzip, deflate"


class _BodyDecoder:
    """Undoes a ``Content-Encoding`` as the body arrives, never producing more than
    ``limit`` bytes: a gzip bomb stops at the cap instead of filling the memory.

    zlib is asked for at most ``limit + 1`` bytes per input piece, so a stage holds
    no more than that however well the input compresses.
    """

    def __init__(self, content_encoding: str | None, *, limit: int, backend: str) -> None:
        self._limit = limit
        self._backend = backend
        self.size = 0
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        self._stages: list[_ZlibStage] = []
        for coding in reversed([c for c in codings if c and c != "identity"]):
            if coding not in ("gzip", "x-gzip", "deflate"):
                raise errors.MalformedResponseError(
                    f"The {backend} answer uses Content-Encoding {_clean(coding, None)!r}, "
                    f"which this client did not ask for ({ACCEPT_ENCODING}).",
                    backend=backend,
                )
            self._stages.append(_ZlibStage(coding, limit, self._too_large))

    def _too_large(self) -> errors.MalformedResponseError:
        return errors.MalformedResponseError(
            f"The {self._backend} answer is larger than {self._limit} bytes.",
            backend=self._backend,
        )

    def decode(self, data: bytes) -> bytes:
        try:
            for stage in self._stages:
                data = stage.decode(data)
        except zlib.error as exc:
            raise self._unreadable(exc) from None
        return self._counted(data)

    def flush(self) -> bytes:
        data = b""
        try:
            for stage in self._stages:
                data = stage.decode(data) + stage.flush()
        except zlib.error as exc:
            raise self._unreadable(exc) from None
        return self._counted(data)

    def _counted(self, data: bytes) -> bytes:
        self.size += len(data)
        if self.size > self._limit:
            raise self._too_large()
        return data

    def _unreadable(self, exc: zlib.error) -> errors.MalformedResponseError:
        return errors.MalformedResponseError(
            f"The {self._backend} answer could not be decompressed ({exc}).",
            backend=self._backend,
        )


class _ZlibStage:
    # Input kept while a "deflate" body may still turn out to be raw deflate.
    _SNIFF_BYTES = 64 * 1024

    def __init__(
        self, coding: str, limit: int, too_large: Callable[[], errors.MalformedResponseError]
    ) -> None:
        gzip = coding in ("gzip", "x-gzip")
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
        # "deflate" means zlib-wrapped, but some servers send raw deflate (as httpx
        # accepts): until the first output, a zlib error retries the input seen as raw.
        self._seen: bytearray | None = None if gzip else bytearray()
        self._limit = limit
        self._produced = 0
        self._too_large = too_large

    def decode(self, data: bytes) -> bytes:
        if not data or self._zlib.eof:
            return b""
        room = self._limit - self._produced
        if self._seen is not None:
            self._seen += data
        try:
            out = self._zlib.decompress(data, room + 1)
        except zlib.error:
            if self._seen is None:
                raise
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            data, self._seen = bytes(self._seen), None
            out = self._zlib.decompress(data, room + 1)
        if self._seen is not None and (out or len(self._seen) > self._SNIFF_BYTES):
            self._seen = None
        self._produced += len(out)
        if self._produced > self._limit:
            raise self._too_large()
        return out

    def flush(self) -> bytes:
        out = self._zlib.flush()
        self._produced += len(out)
        if self._produced > self._limit:
            raise self._too_large()
        return out


class _DecodedStream(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, decoder: _BodyDecoder) -> None:
        self._stream, self._decoder = stream, decoder

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            yield self._decoder.decode(chunk)
        yield self._decoder.flush()

    def close(self) -> None:
        self._stream.close()


class _AsyncDecodedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, decoder: _BodyDecoder) -> None:
        self._stream, self._decoder = stream, decoder

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield self._decoder.decode(chunk)
        yield self._decoder.flush()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _decoder_for(response: httpx.Response, backend: str) -> _BodyDecoder:
    """A capped decoder for ``response``'s body; the response then reads as identity."""
    decoder = _BodyDecoder(
        response.headers.get("content-encoding"), limit=MAX_RESPONSE_BYTES, backend=backend
    )
    for name in ("content-encoding", "content-length"):
        response.headers.pop(name, None)
    return decoder


# The documents of the request whose answer our clients read whole (set around an SDK
# call by answer_bound; None: no bound on the answer's JSON items).
_ANSWER_DOCUMENTS: ContextVar[int | None] = ContextVar("answer_documents", default=None)


@contextmanager
def answer_bound(n_documents: int) -> Iterator[None]:
    """Within this block, an answer that our clients read whole (``stream=False``: what a
    vendor SDK such as Cohere's asks for) is refused before anyone parses it when it
    holds more JSON items than a ranking of ``n_documents`` documents could need, or is
    nested deeper than :data:`~._remote.json_bounds.MAX_RESPONSE_DEPTH`. Async code sees
    the bound in the task that entered the block."""
    token = _ANSWER_DOCUMENTS.set(n_documents)
    try:
        yield
    finally:
        _ANSWER_DOCUMENTS.reset(token)


def _shape_problem(content: bytes | bytearray, n_documents: int) -> str | None:
    return json_shape_problem(
        content, max_items=max_response_items(n_documents), max_depth=MAX_RESPONSE_DEPTH
    )


def _unparsed(
    backend: str, problem: str, status: int, n_documents: int
) -> errors.MalformedResponseError:
    """The error for a 2xx answer refused by :func:`json_shape_problem` or the parser."""
    message = f"The {backend} answer {problem}"
    if problem != NOT_JSON:
        message += f", beyond what a ranking of {n_documents} documents holds; it was not parsed"
    return errors.MalformedResponseError(message + ".", status_code=status, backend=backend)


def _check_shape(response: httpx.Response, backend: str) -> None:
    """Raise for a read answer over the bound of :func:`answer_bound`: the status's own
    error for a non-2xx answer (its body is not read), else MalformedResponseError."""
    n_documents = _ANSWER_DOCUMENTS.get()
    if n_documents is None:
        return
    problem = _shape_problem(response.content, n_documents)
    if problem is None:
        return
    status = response.status_code
    if not 200 <= status < 300:
        raise error_for_status(status, backend=backend, headers=response.headers)
    raise _unparsed(backend, problem, status, n_documents)


class _GuardedClient(httpx.Client):
    """The sync client this package makes: sockets that keep the attempt deadline
    (:func:`~._deadline.guard_sockets`) and answers decoded under the size cap, for
    every caller of :meth:`send` (``stream``, ``request``, the Cohere SDK); an answer
    read whole within :func:`answer_bound` is held to its bound on JSON items."""

    def __init__(self, *, backend: str, **options: Any) -> None:
        super().__init__(**options)
        self._backend_name = backend
        guard_sockets(self)

    def send(
        self, request: httpx.Request, *, stream: bool = False, **options: Any
    ) -> httpx.Response:
        request.headers["Accept-Encoding"] = ACCEPT_ENCODING
        response = super().send(request, stream=True, **options)
        try:
            decoder = _decoder_for(response, self._backend_name)
            assert isinstance(response.stream, httpx.SyncByteStream)
            response.stream = _DecodedStream(response.stream, decoder)
            if not stream:
                response.read()
                _check_shape(response, self._backend_name)
        except BaseException:
            response.close()
            raise
        return response


class _GuardedAsyncClient(httpx.AsyncClient):
    """The async client this package makes: answers decoded under the size cap (the
    deadline is kept by ``asyncio.wait_for`` around each attempt) and, read whole
    within :func:`answer_bound`, held to its bound on JSON items."""

    def __init__(self, *, backend: str, **options: Any) -> None:
        super().__init__(**options)
        self._backend_name = backend

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **options: Any
    ) -> httpx.Response:
        request.headers["Accept-Encoding"] = ACCEPT_ENCODING
        response = await super().send(request, stream=True, **options)
        try:
            decoder = _decoder_for(response, self._backend_name)
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = _AsyncDecodedStream(response.stream, decoder)
            if not stream:
                await response.aread()
                _check_shape(response, self._backend_name)
        except BaseException:
            await response.aclose()
            raise
        return response


class HTTPClients:
    """One sync and one async ``httpx`` client, made on first use and reused.

    Clients passed in are used as they are and never closed here. An async client
    belongs to the event loop that first used it; one we made is replaced when a
    call comes from another loop (``asyncio.run`` twice, per-test loops). The
    clients we make keep the attempt deadline on their sockets and cap decoded
    answers at :data:`MAX_RESPONSE_BYTES` (see :class:`_GuardedClient`).

    Not picklable as is: ``_sync``, ``_async`` (live clients), ``_async_loop`` and
    ``_lock``.
    """

    def __init__(
        self,
        timeout: float,
        client: httpx.Client | None,
        async_client: httpx.AsyncClient | None,
        *,
        backend: str = "remote",
    ) -> None:
        if client is not None and not isinstance(client, httpx.Client):
            raise errors.InvalidInputError(f"http_client must be an httpx.Client, got {client!r}.")
        if async_client is not None and not isinstance(async_client, httpx.AsyncClient):
            raise errors.InvalidInputError(
                f"async_http_client must be an httpx.AsyncClient, got {async_client!r}."
            )
        self._timeout = timeout
        self._backend = backend
        self._sync = client
        self._owns_sync = client is None
        self._async = async_client
        self._owns_async = async_client is None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def sync(self) -> httpx.Client:
        with self._lock:
            if self._sync is None:
                self._sync = _GuardedClient(backend=self._backend, timeout=self._timeout)
            return self._sync

    def async_(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._owns_async and (self._async is None or self._async_loop is not loop):
                self._async = _GuardedAsyncClient(backend=self._backend, timeout=self._timeout)
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


class HTTPOptions(RemoteOptions, total=False):
    """Keyword options every HTTP backend accepts besides its own: those of every
    remote backend, and your own ``httpx`` clients (``http_client``,
    ``async_http_client``; yours stay open when the backend is closed)."""

    http_client: httpx.Client | None
    async_http_client: httpx.AsyncClient | None


class HTTPBackend(RemoteReranker):
    """A remote reranker spoken to with JSON over HTTP.

    Subclasses set ``backend_name``, :attr:`key_env` and :attr:`auth_scheme`, and
    override ``_body`` and ``_read_results`` where their service differs from the
    Cohere-style ``{model, query, documents, top_n}`` -> ``{"results": [{"index",
    "relevance_score"}]}`` (and ``_business_error`` when the service reports errors
    in a 2xx body). Everything else is shared by the sync and async paths.
    """

    # ``Authorization: <auth_scheme> <key>`` on every request that has a key.
    auth_scheme: ClassVar[str] = "Bearer"
    options_type: ClassVar[type] = HTTPOptions

    def __init__(
        self,
        url: str,
        *,
        model: str | None,
        api_key: str | SecretStr | None,
        key_required: bool = True,
        http_client: httpx.Client | None = None,
        async_http_client: httpx.AsyncClient | None = None,
        **options: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(**options)
        self.url = check_url(url)
        self.model = model
        self._api_key = self._key(api_key, required=key_required)
        self._clients: HTTPClients = HTTPClients(
            self.retry.timeout, http_client, async_http_client, backend=self.backend_name
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, url={self.url!r})"

    # Wire format hooks.
    def _body(self, query: str, documents: list[str], top_n: int | None) -> dict[str, object]:
        body: dict[str, object] = {"query": query, "documents": documents}
        if self.model is not None:
            body["model"] = self.model
        if top_n is not None:
            body["top_n"] = top_n
        return body

    def _auth_headers(self) -> dict[str, str]:
        if self._api_key is None:
            return {}
        return {"Authorization": f"{self.auth_scheme} {self._api_key.get_secret_value()}"}

    def _read_results(self, payload: object) -> list[tuple[object, object]]:
        return read_scored_results(payload, backend=self.backend_name)

    def _business_error(
        self, payload: object, status: int, headers: Mapping[str, str]
    ) -> errors.RerankError | None:
        """An error the service reports inside a parsed body (None: not an error)."""
        return None

    # One request, sync and async, over the shared builder and parser.
    def _request_args(
        self, query: str, documents: list[str], top_n: int | None
    ) -> tuple[bytes, dict[str, str]]:
        try:
            body = json.dumps(self._body(query, documents, top_n), ensure_ascii=False)
            content = body.encode("utf-8")
        except (UnicodeEncodeError, ValueError, RecursionError) as exc:
            # check_inputs has vetted query and documents; this is an option's text.
            raise errors.InvalidInputError(
                f"The {self.backend_name} request cannot be encoded as JSON in UTF-8 "
                f"({type(exc).__name__}); check the text options (model, instruction).",
                backend=self.backend_name,
            ) from None
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": ACCEPT_ENCODING,
        }
        headers.update(self._auth_headers())
        return content, headers

    def _score_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        exchange = _Exchange(self, query, documents, top_n, timeout)
        try:
            with self._clients.sync().stream(**exchange.request) as response:
                for chunk in response.iter_raw():
                    exchange.feed(response, chunk)
                return exchange.finish(response)
        except httpx.HTTPError as exc:
            raise error_for_transport(exc, backend=self.backend_name, timeout=timeout) from exc

    async def _ascore_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        exchange = _Exchange(self, query, documents, top_n, timeout)
        try:
            async with self._clients.async_().stream(**exchange.request) as response:
                async for chunk in response.aiter_raw():
                    exchange.feed(response, chunk)
                return exchange.finish(response)
        except httpx.HTTPError as exc:
            raise error_for_transport(exc, backend=self.backend_name, timeout=timeout) from exc

    def _check_time(self, deadline: float, timeout: float) -> None:
        # For clients passed in: httpx's read timeout is per chunk, so a server
        # trickling bytes would never trip it. (Our own clients' sockets stop anyway.)
        if time.monotonic() > deadline:
            raise errors.RerankTimeoutError(
                f"The {self.backend_name} answer took longer than {timeout:.3g} s.",
                backend=self.backend_name,
            )

    def _parse(
        self,
        status: int,
        headers: Mapping[str, str],
        content: bytes | bytearray,
        *,
        n_documents: int,
    ) -> list[tuple[object, object]]:
        """The raw ``(index, score)`` pairs of an answer to a request for ``n_documents``
        documents, or the error it stands for. The body is parsed only when it holds
        no more JSON items than such a ranking could need
        (:func:`~._remote.json_bounds.max_response_items`) and nests no deeper than
        :data:`~._remote.json_bounds.MAX_RESPONSE_DEPTH`."""
        problem = _shape_problem(content, n_documents)
        payload: object = None
        parsed = False
        if problem is None:
            try:
                payload, parsed = json.loads(content), True
            except (ValueError, RecursionError):
                # Invalid JSON or UTF-8, an integer of over 4,300 digits.
                problem = NOT_JSON
        if not parsed:
            payload = bytes(content[:_MAX_MESSAGE_CHARS]).decode("utf-8", "replace")
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
            assert problem is not None
            raise _unparsed(self.backend_name, problem, status, n_documents)
        error = self._business_error(payload, status, headers)
        if error is not None:
            raise error
        return self._read_results(payload)

    def _clean(self, text: object) -> str:
        return _clean(text, self._api_key)


class _Exchange:
    """One attempt's request, and its answer read as raw bytes, decoded here under the
    size cap (a client passed in would otherwise inflate each compressed chunk whole)
    and within the attempt's time, then parsed. The sync and async paths share it."""

    def __init__(
        self,
        backend: HTTPBackend,
        query: str,
        documents: list[str],
        top_n: int | None,
        timeout: float,
    ) -> None:
        content, headers = backend._request_args(query, documents, top_n)
        self.request: dict[str, Any] = {
            "method": "POST",
            "url": backend.url,
            "content": content,
            "headers": headers,
            "timeout": timeout,
        }
        self._backend = backend
        self._n_documents = len(documents)
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._decoder: _BodyDecoder | None = None
        self._body = bytearray()
        logger.debug("POST %s (%d documents)", backend.url, len(documents))

    def _decoder_of(self, response: httpx.Response) -> _BodyDecoder:
        if self._decoder is None:
            self._decoder = _BodyDecoder(
                response.headers.get("content-encoding"),
                limit=MAX_RESPONSE_BYTES,
                backend=self._backend.backend_name,
            )
        return self._decoder

    def feed(self, response: httpx.Response, chunk: bytes) -> None:
        self._backend._check_time(self._deadline, self._timeout)
        self._body += self._decoder_of(response).decode(chunk)

    def finish(self, response: httpx.Response) -> list[tuple[object, object]]:
        self._body += self._decoder_of(response).flush()
        return self._backend._parse(
            response.status_code, response.headers, self._body, n_documents=self._n_documents
        )


def check_url(url: object) -> str:
    """``url`` as an http(s) URL with a host and no credentials, else an
    :class:`InvalidInputError`."""
    if not isinstance(url, str) or not url.strip():
        raise errors.InvalidInputError(f"base_url must be a non-empty str, got {url!r}.")
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise errors.InvalidInputError(f"base_url is not a valid URL: {exc}.") from exc
    if parsed.userinfo:
        raise errors.InvalidInputError(
            "base_url must not contain credentials; pass the key as api_key instead."
        )
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise errors.InvalidInputError(
            f"base_url must be an http:// or https:// URL with a host, got {url!r}."
        )
    return str(parsed)


def join_url(base_url: str, path: str) -> str:
    """``base_url`` (its own path kept) followed by ``path``."""
    return base_url.strip().rstrip("/") + "/" + path.lstrip("/")
