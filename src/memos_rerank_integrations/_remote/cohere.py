"""Cohere's rerank v2, through the official SDK (``pip install '...[cohere]'``)."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import httpx

from .._exceptions import MalformedResponseError, RerankError
from .._extras import missing_extra
from .._types import nonempty_text, optional_positive_int
from .base import RemoteOptions, RemoteReranker
from .http import HTTPClients, answer_bound, check_url, error_for_status, error_for_transport

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CohereReranker"]


def _import_cohere() -> Any:
    try:
        import cohere
    except ImportError as exc:
        raise missing_extra("cohere", "cohere", feature="CohereReranker") from exc
    return cohere


class CohereReranker(RemoteReranker):
    """Rerank with Cohere (``rerank-v3.5``, ``rerank-english-v3.0``,
    ``rerank-multilingual-v3.0``) over ``cohere.ClientV2`` / ``cohere.AsyncClientV2``.

    The key comes from ``api_key``, ``CO_API_KEY`` or ``COHERE_API_KEY``; the
    endpoint from ``base_url``, ``CO_API_URL`` or the SDK's default (a custom base
    keeps its path: requests go to ``{base_url}/v2/rerank``). ``max_tokens_per_doc``
    is passed to Cohere as is. The SDK's own retries are off: retries, limits,
    splitting (100 documents per request by default, one Cohere search unit) and
    validation are those of every remote backend (see
    :class:`~memos_rerank_integrations._remote.RemoteOptions`), and SDK errors map onto
    this package's error tree. The SDK reads its answers through this package's
    ``httpx`` clients, so they are held to the same bounds as every remote backend's
    (64 MiB decoded, JSON items and depth, checked before the SDK parses them).
    ``client`` / ``async_client`` take ready-made SDK clients (any object with a
    Cohere-v2 ``rerank``; their answers are theirs to bound); the key is then not
    needed.
    """

    backend_name = "cohere"
    key_env = ("CO_API_KEY", "COHERE_API_KEY")

    def __init__(
        self,
        model: str = "rerank-v3.5",
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens_per_doc: int | None = None,
        client: Any = None,
        async_client: Any = None,
        **options: Unpack[RemoteOptions],
    ) -> None:
        self.model = nonempty_text("model", model)
        self.max_tokens_per_doc = optional_positive_int("max_tokens_per_doc", max_tokens_per_doc)
        self._cohere = _import_cohere()
        defaults: RemoteOptions = {"max_documents_per_request": 100}
        super().__init__(**defaults | options)
        self.base_url = base_url or os.environ.get("CO_API_URL") or None
        if self.base_url is not None:
            check_url(self.base_url)  # no credentials, to show in reprs and configs
        self._api_key = self._key(api_key, required=client is None or async_client is None)
        self._given_client, self._given_async_client = client, async_client
        self._clients: HTTPClients = HTTPClients(
            self.retry.timeout, None, None, backend=self.backend_name
        )
        # SDK clients wrap our httpx clients; remade when those are (new loop, close).
        self._sdk: tuple[object, Any] | None = None
        self._async_sdk: tuple[object, Any] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CohereReranker(model={self.model!r}, base_url={self.base_url!r})"

    def _sdk_options(self) -> dict[str, Any]:
        assert self._api_key is not None
        options: dict[str, Any] = {
            "api_key": self._api_key.get_secret_value(),
            "timeout": self.retry.timeout,
        }
        if self.base_url is not None:
            options["base_url"] = self.base_url.rstrip("/")
        return options

    def _sync_client(self) -> Any:
        if self._given_client is not None:
            return self._given_client
        http = self._clients.sync()
        with self._lock:
            if self._sdk is None or self._sdk[0] is not http:
                sdk = self._cohere.ClientV2(httpx_client=http, **self._sdk_options())
                self._sdk = (http, sdk)
            return self._sdk[1]

    def _async_sdk_client(self) -> Any:
        if self._given_async_client is not None:
            return self._given_async_client
        http = self._clients.async_()
        with self._lock:
            if self._async_sdk is None or self._async_sdk[0] is not http:
                sdk = self._cohere.AsyncClientV2(httpx_client=http, **self._sdk_options())
                self._async_sdk = (http, sdk)
            return self._async_sdk[1]

    def _prepare(self) -> None:
        # The first SDK client of a process takes about a second to build (the SDK's
        # imports): not time a call's deadline should spend.
        self._sync_client()

    def _aprepare(self) -> None:
        self._async_sdk_client()

    def _arguments(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": self.model,
            "query": query,
            "documents": documents,
            "request_options": {"timeout_in_seconds": timeout, "max_retries": 0},
        }
        if top_n is not None:
            arguments["top_n"] = top_n
        if self.max_tokens_per_doc is not None:
            arguments["max_tokens_per_doc"] = self.max_tokens_per_doc
        return arguments

    def _score_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        arguments = self._arguments(query, documents, top_n, timeout)
        try:
            with answer_bound(len(documents)):
                response = self._sync_client().rerank(**arguments)
        except Exception as exc:
            error, cause = self._mapped(exc, timeout), _safe_cause(exc)
        else:
            return self._pairs(response)
        # Raised outside the handler so that an unsafe SDK error is not even __context__.
        raise error from cause

    async def _ascore_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        arguments = self._arguments(query, documents, top_n, timeout)
        try:
            with answer_bound(len(documents)):
                response = await self._async_sdk_client().rerank(**arguments)
        except Exception as exc:
            error, cause = self._mapped(exc, timeout), _safe_cause(exc)
        else:
            return self._pairs(response)
        # Raised outside the handler so that an unsafe SDK error is not even __context__.
        raise error from cause

    def _mapped(self, exc: Exception, timeout: float) -> RerankError:
        if isinstance(exc, RerankError):
            return exc
        if isinstance(exc, httpx.HTTPError):
            return error_for_transport(exc, backend=self.backend_name, timeout=timeout)
        status = getattr(exc, "status_code", None)
        # cohere.core.api_error.ApiError and its typed subclasses carry these.
        if isinstance(status, int) and not 200 <= status < 300:
            return error_for_status(
                status,
                backend=self.backend_name,
                payload=getattr(exc, "body", None),
                headers=getattr(exc, "headers", None) or {},
                secret=self._api_key,
            )
        # A 2xx the SDK could not parse (invalid JSON, unexpected shape).
        return MalformedResponseError(
            f"The cohere answer could not be read ({type(exc).__name__}).",
            status_code=status if isinstance(status, int) else None,
            backend=self.backend_name,
        )

    def _pairs(self, response: Any) -> list[tuple[object, object]]:
        results = getattr(response, "results", None)
        if not isinstance(results, list):
            raise MalformedResponseError(
                "The cohere answer has no list of results.", backend=self.backend_name
            )
        return [
            (getattr(item, "index", None), getattr(item, "relevance_score", None))
            for item in results
        ]


def _safe_cause(exc: Exception) -> Exception | None:
    # SDK API errors print the response body, which a server may fill with anything
    # (the key included); their status, code and message are already in our error.
    return exc if isinstance(exc, httpx.HTTPError) else None
