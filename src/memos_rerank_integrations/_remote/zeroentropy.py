"""Zero Entropy's hosted rerankers (``zerank-1``, ``zerank-1-small``, ...)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import httpx

from .._exceptions import InvalidInputError
from .._types import check_text
from .base import RemoteOptions, read_scored_results, resolve_api_key
from .http import HTTPBackend, join_url

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DEFAULT_ZEROENTROPY_BASE_URL", "ZeroEntropyReranker"]

DEFAULT_ZEROENTROPY_BASE_URL = "https://api.zeroentropy.dev"


class ZeroEntropyReranker(HTTPBackend):
    """Rerank with Zero Entropy's ``POST /v1/models/rerank``.

    The key comes from ``api_key``, ``ZERO_ENTROPY_API_KEY`` (Mem0's name) or
    ``ZEROENTROPY_API_KEY`` (the official SDK's); the endpoint from ``base_url``,
    ``ZEROENTROPY_BASE_URL`` or ``https://api.zeroentropy.dev``. A base URL that
    already ends in ``/v1`` (as the SDK's variable does) is not given a second one.
    ``latency`` (e.g. ``"fast"`` or ``"slow"``) is sent only when set. Retries,
    limits, splitting and validation are those of every remote backend (see
    :class:`~memos_rerank_integrations._remote.RemoteOptions`).
    """

    backend_name = "zeroentropy"

    def __init__(
        self,
        model: str = "zerank-1",
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 2,
        latency: str | None = None,
        http_client: httpx.Client | None = None,
        async_http_client: httpx.AsyncClient | None = None,
        **options: Unpack[RemoteOptions],
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError(f"model must be a non-empty str, got {model!r}.")
        check_text("model", model)
        if latency is not None and not isinstance(latency, str):
            raise InvalidInputError(f"latency must be a str or None, got {latency!r}.")
        key = resolve_api_key(
            api_key,
            ["ZERO_ENTROPY_API_KEY", "ZEROENTROPY_API_KEY"],
            owner="ZeroEntropyReranker",
            backend=self.backend_name,
        )
        base = base_url or os.environ.get("ZEROENTROPY_BASE_URL") or DEFAULT_ZEROENTROPY_BASE_URL
        if not isinstance(base, str):
            raise InvalidInputError(f"base_url must be a str, got {type(base).__name__}.")
        path = "models/rerank" if base.rstrip("/").endswith("/v1") else "v1/models/rerank"
        self.latency = latency
        super().__init__(
            join_url(base, path),
            model=model,
            api_key=key,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
            async_http_client=async_http_client,
            **options,
        )

    def _auth_headers(self) -> dict[str, str]:
        assert self._api_key is not None
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}

    def _body(self, query: str, documents: list[str], top_n: int | None) -> object:
        body: dict[str, object] = {"model": self.model, "query": query, "documents": documents}
        if top_n is not None:
            body["top_n"] = top_n
        if self.latency is not None:
            body["latency"] = self.latency
        return body

    def _read_results(self, payload: object) -> list[tuple[object, object]]:
        return read_scored_results(payload, backend=self.backend_name)
