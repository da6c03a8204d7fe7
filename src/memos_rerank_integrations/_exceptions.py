"""The package's exception tree, written down in one place.

::

    RerankError                      base of everything a backend raises
    ├── InvalidInputError            the caller's input is unusable (also a ValueError)
    ├── AuthenticationError          missing, invalid or expired credentials
    ├── RateLimitError               the service asked us to slow down (HTTP 429, MemOS 40309)
    ├── RerankTimeoutError           no answer within the configured timeout (also a TimeoutError)
    ├── BackendUnavailableError      connection failures, 5xx, MemOS 50000
    │   └── ModelLoadError           local weights could not be loaded
    └── MalformedResponseError       the backend answered, but not with a valid ranking

Remote errors carry the HTTP ``status_code`` and the service's business ``code``
where there is one. Messages never contain credentials.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "InvalidInputError",
    "MalformedResponseError",
    "ModelLoadError",
    "RateLimitError",
    "RerankError",
    "RerankTimeoutError",
]


class RerankError(Exception):
    """Base class of every error raised by a reranker of this package."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: int | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.backend = backend

    def __str__(self) -> str:
        details = []
        if self.backend is not None:
            details.append(f"backend={self.backend}")
        if self.status_code is not None:
            details.append(f"status={self.status_code}")
        if self.code is not None:
            details.append(f"code={self.code}")
        return f"{self.message} ({', '.join(details)})" if details else self.message


class InvalidInputError(RerankError, ValueError):
    """The query, documents or options cannot be reranked as given."""


class AuthenticationError(RerankError):
    """Credentials are missing, invalid or expired. Never retried."""


class RateLimitError(RerankError):
    """The service is rate limiting us; ``retry_after`` is in seconds when known."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status_code: int | None = None,
        code: int | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, code=code, backend=backend)
        self.retry_after = retry_after


class RerankTimeoutError(RerankError, TimeoutError):
    """The backend did not answer within the configured time."""


class BackendUnavailableError(RerankError):
    """The backend could not be reached or failed on its side (retryable)."""


class ModelLoadError(BackendUnavailableError):
    """Local model weights could not be loaded (offline, wrong path, missing files)."""


class MalformedResponseError(RerankError):
    """The backend answered with something that is not a valid ranking."""
