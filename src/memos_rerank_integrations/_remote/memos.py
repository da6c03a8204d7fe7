"""The MemOS cloud "Rerank Memory" API."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .. import _exceptions as errors
from .._types import nonempty_text
from .base import read_scored_results
from .http import HTTPBackend, HTTPOptions, error_for_status, join_url, retry_after_seconds

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DEFAULT_MEMOS_BASE_URL", "MEMOS_ERROR_CODES", "MemOSReranker"]

DEFAULT_MEMOS_BASE_URL = "https://memos.memtensor.cn/api/openmem/v1"

# Business codes from the MemOS documentation. They may come with HTTP 200 or with
# a non-2xx status; either way the code decides the error class.
MEMOS_ERROR_CODES: Mapping[int, type[errors.RerankError]] = {
    40000: errors.InvalidInputError,  # malformed body
    40002: errors.InvalidInputError,  # a required field is empty
    40003: errors.InvalidInputError,  # empty documents
    40100: errors.AuthenticationError,  # key required
    40130: errors.AuthenticationError,  # key required
    40132: errors.AuthenticationError,  # key invalid or expired
    40309: errors.RateLimitError,  # token rate limit
    50000: errors.BackendUnavailableError,  # internal error
}

_SUCCESS_CODES = (0, 200)


class MemOSReranker(HTTPBackend):
    """Rerank with the MemOS cloud reranker (``memos-reranker-0.6b`` or ``-4b``).

    The key comes from ``api_key`` or ``MEMOS_API_KEY``; the endpoint from
    ``base_url``, ``MEMOS_BASE_URL`` or the public MemOS endpoint. Queries over
    2,048 and documents over 32,768 estimated tokens are cut with a warning (or
    rejected with ``on_too_long="raise"``); the per-request document count and
    token budget split big calls into several requests whose answers are merged.
    See :class:`~memos_rerank_integrations._remote.http.HTTPOptions` for the other
    options (timeout, retries, splitting, concurrency, thresholds, your own clients).
    """

    backend_name = "memos"
    key_env = ("MEMOS_API_KEY",)
    auth_scheme = "Token"

    def __init__(
        self,
        model: str = "memos-reranker-0.6b",
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        **options: Unpack[HTTPOptions],
    ) -> None:
        base = base_url or os.environ.get("MEMOS_BASE_URL") or DEFAULT_MEMOS_BASE_URL
        limits: HTTPOptions = {
            "max_query_tokens": 2048,
            "max_document_tokens": 32768,
            # One version of the docs caps a call at 8k document tokens in total.
            "max_tokens_per_request": 8192,
        }
        model = nonempty_text("model", model)
        super().__init__(join_url(base, "rerank"), model=model, api_key=api_key, **limits | options)

    def _read_results(self, payload: object) -> list[tuple[object, object]]:
        # Documented unwrapped; accept the {"code": 0, "data": {...}} envelope the
        # rest of the MemOS API uses, in case the service adopts it.
        if isinstance(payload, Mapping) and "results" not in payload:
            data = payload.get("data")
            if isinstance(data, Mapping):
                payload = data
        return read_scored_results(payload, backend=self.backend_name)

    def _business_error(
        self, payload: object, status: int, headers: Mapping[str, str]
    ) -> errors.RerankError | None:
        if not isinstance(payload, Mapping) or "code" not in payload:
            return None
        raw = payload["code"]
        code = _business_code(raw)
        if code is None:
            return errors.MalformedResponseError(
                f"The memos answer has a code that is not an integer: {self._clean(raw)[:40]!r}.",
                status_code=status,
                backend=self.backend_name,
            )
        if code in _SUCCESS_CODES and 200 <= status < 300:
            return None
        message = self._clean(payload.get("message") or "no message")
        kind = MEMOS_ERROR_CODES.get(code)
        if kind is None:
            # Unknown five-digit codes follow the documented ones: HTTP status * 100 + n.
            like_status = code // 100 if 10000 <= code < 60000 else status
            if 200 <= like_status < 300:
                return errors.MalformedResponseError(
                    f"The memos service answered with code {code}: {message}",
                    status_code=status,
                    code=code,
                    backend=self.backend_name,
                )
            error = error_for_status(
                like_status,
                backend=self.backend_name,
                payload=payload,
                headers=headers,
                secret=self._api_key,
            )
            error.status_code, error.code = status, code
            return error
        text = f"The memos service answered with code {code}: {message}"
        if kind is errors.RateLimitError:
            return errors.RateLimitError(
                text,
                retry_after=retry_after_seconds(headers),
                status_code=status,
                code=code,
                backend=self.backend_name,
            )
        if kind is errors.AuthenticationError:
            text += ". Check MEMOS_API_KEY or the api_key argument."
        return kind(text, status_code=status, code=code, backend=self.backend_name)


def _business_code(raw: object) -> int | None:
    """The integer in a MemOS ``code`` field (``40132``, ``"40132"``, ``40132.0``), or
    ``None`` for anything else: booleans, fractions, ``1e999``, NaN, huge numbers."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, int):
        return raw if abs(raw) < _MAX_CODE else None
    if isinstance(raw, str) and _CODE_TEXT.fullmatch(raw.strip()):
        return int(raw.strip())
    return None


_MAX_CODE = 10**18
_CODE_TEXT = re.compile(r"[+-]?[0-9]{1,18}")
