"""Zero Entropy's hosted rerankers (``zerank-1``, ``zerank-1-small``, ...)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .._exceptions import InvalidInputError
from .._types import nonempty_text
from .http import HTTPBackend, HTTPOptions, join_url

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
    :class:`~memos_rerank_integrations._remote.http.HTTPOptions`).
    """

    backend_name = "zeroentropy"
    key_env = ("ZERO_ENTROPY_API_KEY", "ZEROENTROPY_API_KEY")

    def __init__(
        self,
        model: str = "zerank-1",
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        latency: str | None = None,
        **options: Unpack[HTTPOptions],
    ) -> None:
        if latency is not None and not isinstance(latency, str):
            raise InvalidInputError(f"latency must be a str or None, got {latency!r}.")
        base = base_url or os.environ.get("ZEROENTROPY_BASE_URL") or DEFAULT_ZEROENTROPY_BASE_URL
        if not isinstance(base, str):
            raise InvalidInputError(f"base_url must be a str, got {type(base).__name__}.")
        path = "models/rerank" if base.rstrip("/").endswith("/v1") else "v1/models/rerank"
        self.latency = latency
        model = nonempty_text("model", model)
        super().__init__(join_url(base, path), model=model, api_key=api_key, **options)

    def _body(self, query: str, documents: list[str], top_n: int | None) -> dict[str, object]:
        body = super()._body(query, documents, top_n)
        if self.latency is not None:
            body["latency"] = self.latency
        return body
