"""What every remote backend shares, whatever carries its requests: input limits,
splitting big calls and merging the answers, the retry policy, strict response
validation and the key lookup.

A remote backend is a :class:`RemoteReranker` that provides ``_score_chunk`` /
``_ascore_chunk`` (one request for some documents, returning raw ``(index,
score)`` pairs or raising a :class:`RerankError`); everything else is here, once,
for the sync and async paths. HTTP backends build on :mod:`._http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import math
import os
import random
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, TypedDict, TypeVar

from pydantic import SecretStr

from .. import _exceptions as errors
from .._calls import Budget
from .._configurable import Configurable
from .._types import (
    DEFAULT_THRESHOLDS,
    RerankResult,
    StageThresholds,
    check_call,
    estimate_tokens,
    rank_scores,
    validate_ranking,
)
from .deadline import Deadline, run_in_threads

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "InputLimits",
    "OnTooLong",
    "RemoteOptions",
    "RemoteReranker",
    "RetryPolicy",
    "plan_requests",
    "read_scored_results",
    "resolve_api_key",
    "validate_ranking",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
OnTooLong = Literal["truncate", "raise"]


# --------------------------------------------------------------------------- limits


def _truncate(text: str, limit: int, count: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` that ``count`` puts at or under ``limit``."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if count(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    return text[:low]


@dataclass(frozen=True)
class InputLimits:
    """Client-side size limits and how a call is split into requests.

    ``max_query_tokens`` / ``max_document_tokens`` (``None`` = unlimited) are checked
    with ``count_tokens`` (an estimate unless you pass a real tokenizer's counter);
    ``on_too_long="truncate"`` cuts the text's tail with a warning, ``"raise"``
    raises :class:`InvalidInputError`. A call is split so that no request holds more
    than ``max_documents_per_request`` documents or (query included)
    ``max_tokens_per_request`` estimated tokens; a single document over that budget
    goes alone. At most ``max_concurrency`` requests of one call are in flight.
    """

    max_query_tokens: int | None = None
    max_document_tokens: int | None = None
    on_too_long: OnTooLong = "truncate"
    max_documents_per_request: int = 64
    max_tokens_per_request: int | None = None
    max_concurrency: int = 4
    count_tokens: Callable[[str], int] = estimate_tokens

    def __post_init__(self) -> None:
        for name in ("max_query_tokens", "max_document_tokens", "max_tokens_per_request"):
            _check_positive(name, getattr(self, name), optional=True)
        for name in ("max_documents_per_request", "max_concurrency"):
            _check_positive(name, getattr(self, name), optional=False)
        if self.on_too_long not in ("truncate", "raise"):
            raise errors.InvalidInputError(
                f"on_too_long must be 'truncate' or 'raise', got {self.on_too_long!r}."
            )
        if not callable(self.count_tokens):
            raise errors.InvalidInputError("count_tokens must be a callable str -> int.")

    def fit(self, what: str, text: str, limit: int | None) -> str:
        """``text`` within ``limit`` tokens: unchanged, truncated with a warning, or an error."""
        if limit is None:
            return text
        tokens = self.count_tokens(text)
        if tokens <= limit:
            return text
        if self.on_too_long == "raise":
            raise errors.InvalidInputError(
                f"{what} is about {tokens} tokens, over the limit of {limit}. Shorten it, "
                "raise the limit, or pass on_too_long='truncate'."
            )
        warnings.warn(
            f"{what} is about {tokens} tokens, over the limit of {limit}; its end was cut. "
            "Pass on_too_long='raise' to get an error instead.",
            UserWarning,
            stacklevel=4,
        )
        return _truncate(text, limit, self.count_tokens)


def _check_positive(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or None" if optional else "a positive int"
        raise errors.InvalidInputError(f"{name} must be {allowed}, got {value!r}.")


def plan_requests(
    document_tokens: Sequence[int],
    *,
    query_tokens: int,
    max_documents: int,
    max_tokens: int | None,
) -> list[list[int]]:
    """Split document positions, in order, into requests within both caps."""
    requests: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, tokens in enumerate(document_tokens):
        over_count = len(current) >= max_documents
        over_tokens = max_tokens is not None and query_tokens + used + tokens > max_tokens
        if current and (over_count or over_tokens):
            requests.append(current)
            current, used = [], 0
        current.append(index)
        used += tokens
    if current:
        requests.append(current)
    return requests


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, within one deadline per call.

    Retried: connection failures, timeouts, rate limits (``Retry-After`` honoured)
    and server-side failures (:class:`BackendUnavailableError`). Never retried:
    authentication, input and malformed-response errors. A call (all its requests
    and their retries together) must be over :attr:`total_budget` seconds after it
    started, ``(max_retries + 1) * timeout + max_retries * backoff_max``; each
    attempt (connect, headers and body) gets at most ``timeout`` of them, and a
    backoff is slept only when an attempt can still follow it. A ``Retry-After``
    longer than ``backoff_max`` is not waited for: the :class:`RateLimitError` is
    raised with ``retry_after`` set, so the caller decides.
    """

    timeout: float = 10.0
    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0

    def __post_init__(self) -> None:
        for name in ("timeout", "backoff_base", "backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise errors.InvalidInputError(
                    f"{name} must be a number of seconds, got {value!r}."
                )
            if not math.isfinite(value) or value < 0 or (name == "timeout" and value == 0):
                raise errors.InvalidInputError(
                    f"{name} must be a finite, positive number, got {value!r}."
                )
        retries = self.max_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise errors.InvalidInputError(f"max_retries must be an int >= 0, got {retries!r}.")

    @property
    def total_budget(self) -> float:
        return (self.max_retries + 1) * self.timeout + self.max_retries * self.backoff_max

    def deadline(self) -> Deadline:
        """A fresh deadline for one call, :attr:`total_budget` seconds from now."""
        return Deadline(self.total_budget)

    def delay(self, attempt: int, error: errors.RerankError, remaining: float) -> float | None:
        """Seconds to wait before retrying after ``error``, or ``None`` to give up."""
        if attempt >= self.max_retries or not _is_retryable(error):
            return None
        if isinstance(error, errors.RateLimitError) and error.retry_after is not None:
            wait = max(0.0, error.retry_after)
            if wait > self.backoff_max:
                return None
        else:
            ceiling = min(self.backoff_max, self.backoff_base * 2**attempt)
            wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        # Waiting must leave time for another attempt inside the call's deadline.
        return wait if wait < remaining else None

    def _attempt_timeout(self, deadline: Deadline, what: str, backend: str | None) -> float:
        remaining = deadline.remaining()
        if deadline.cancelled or remaining <= 0:
            raise errors.RerankTimeoutError(
                f"No time was left for the {what} within the call's deadline of "
                f"{deadline.seconds:.3g} s.",
                backend=backend,
            )
        return min(self.timeout, remaining)

    def run(
        self,
        attempt: Callable[[float], T],
        *,
        what: str,
        deadline: Deadline | None = None,
        backend: str | None = None,
    ) -> T:
        """``attempt(timeout)`` until it succeeds, retries run out or ``deadline``
        (default: a fresh one) leaves no time; each try runs in
        :meth:`Deadline.attempt`, which our HTTP clients' sockets keep."""
        deadline = self.deadline() if deadline is None else deadline
        for number in itertools.count():
            timeout = self._attempt_timeout(deadline, what, backend)
            try:
                with deadline.attempt(timeout):
                    return attempt(timeout)
            except errors.RerankError as error:
                wait = self.delay(number, error, deadline.remaining())
                if wait is None:
                    raise
                _log_retry(what, error, number, wait)
                if deadline.sleep(wait):
                    raise  # the call was decided meanwhile (a sibling request failed)
        raise AssertionError("unreachable")  # pragma: no cover

    async def arun(
        self,
        attempt: Callable[[float], Awaitable[T]],
        *,
        what: str,
        deadline: Deadline | None = None,
        backend: str | None = None,
    ) -> T:
        """The async twin of :meth:`run`; each try also runs under ``asyncio.wait_for``,
        so connect, headers and body end at its timeout whatever the client."""
        deadline = self.deadline() if deadline is None else deadline
        for number in itertools.count():
            timeout = self._attempt_timeout(deadline, what, backend)
            try:
                with deadline.attempt(timeout):
                    return await asyncio.wait_for(attempt(timeout), timeout)
            except errors.RerankError as error:
                failure = error
            except asyncio.TimeoutError:
                failure = errors.RerankTimeoutError(
                    f"The {what} got no complete answer within {timeout:.3g} s.",
                    backend=backend,
                )
            wait = self.delay(number, failure, deadline.remaining())
            if wait is None:
                raise failure
            _log_retry(what, failure, number, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _is_retryable(error: errors.RerankError) -> bool:
    if isinstance(error, errors.ModelLoadError):
        return False
    return isinstance(
        error, (errors.RateLimitError, errors.RerankTimeoutError, errors.BackendUnavailableError)
    )


def _log_retry(what: str, error: errors.RerankError, attempt: int, wait: float) -> None:
    logger.info(
        "%s failed with %s (%s); retry %d in %.2f s",
        what,
        type(error).__name__,
        error,
        attempt + 1,
        wait,
    )


# --------------------------------------------------------------------------- keys


def resolve_api_key(
    api_key: str | SecretStr | None,
    env_names: Sequence[str],
    *,
    owner: str,
    backend: str,
    required: bool = True,
) -> SecretStr | None:
    """The key from the argument or the first set environment variable, stripped of
    surrounding whitespace. A missing key is an :class:`AuthenticationError`; one
    that no HTTP header can carry (control or non-ASCII characters) is an
    :class:`InvalidInputError`, raised here, when the backend is made."""
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    if api_key is None:
        api_key = next((os.environ[name] for name in env_names if os.environ.get(name)), None)
    if api_key is not None and not isinstance(api_key, str):
        raise errors.InvalidInputError(f"api_key must be a str, got {type(api_key).__name__}.")
    if api_key is not None:
        api_key = api_key.strip()
    if not api_key:
        if not required:
            return None
        names = " or ".join(env_names)
        raise errors.AuthenticationError(
            f"{owner} needs an API key: pass api_key=... or set {names}.", backend=backend
        )
    problem = _key_problem(api_key)
    if problem is not None:
        # Caller input, not a rejected credential: nothing was sent. The key itself is
        # never part of the message.
        raise errors.InvalidInputError(f"The API key given to {owner} {problem}.", backend=backend)
    return SecretStr(api_key)


def _key_problem(key: str) -> str | None:
    """Why ``key`` cannot go into an HTTP header, or ``None``."""
    for char in key:
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            what = "a line break" if char in "\r\n" else "a control character"
            return (
                f"contains {what} (U+{code:04X}); an HTTP header cannot carry it. Check "
                "how the key was read (a trailing newline inside quotes, a pasted tab)"
            )
        if code > 0x7E:
            return (
                f"contains a non-ASCII character (U+{code:04X}); keys are ASCII and an "
                "HTTP header cannot carry it. Check for a typographic quote, a non-breaking "
                "space or an ellipsis pasted with the key"
            )
    return None


# --------------------------------------------------------------------------- validation


def read_scored_results(
    payload: object, *, backend: str, score_key: str = "relevance_score", bare_list: bool = False
) -> list[tuple[object, object]]:
    """Raw ``(index, score)`` pairs from ``{"results": [{"index", score_key}]}`` or,
    with ``bare_list``, from a bare list of such items (text-embeddings-inference)."""
    if bare_list:
        items = payload
    else:
        items = payload.get("results") if isinstance(payload, Mapping) else None
    if not isinstance(items, list):
        raise errors.MalformedResponseError(
            f"The {backend} answer has no list of results.", backend=backend
        )
    pairs = []
    for position, item in enumerate(items):
        if not isinstance(item, Mapping) or "index" not in item or score_key not in item:
            raise errors.MalformedResponseError(
                f"Result {position} of the {backend} answer lacks 'index' or {score_key!r}.",
                backend=backend,
            )
        pairs.append((item["index"], item[score_key]))
    return pairs


# --------------------------------------------------------------------------- the reranker


class RemoteOptions(TypedDict, total=False):
    """Keyword options every remote backend accepts besides its own: ``timeout``
    (seconds per attempt, default 10) and ``max_retries`` (default 2) with the
    backoff of :class:`RetryPolicy`, the :class:`InputLimits`, and ``thresholds``."""

    timeout: float
    max_retries: int
    backoff_base: float
    backoff_max: float
    max_documents_per_request: int
    max_tokens_per_request: int | None
    max_concurrency: int
    max_query_tokens: int | None
    max_document_tokens: int | None
    on_too_long: OnTooLong
    count_tokens: Callable[[str], int]
    thresholds: StageThresholds


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "memos_rerank_remote_budget", default=None
)


@contextlib.contextmanager
def _within(budget: Budget) -> Iterator[None]:
    token = _BUDGET.set(budget)
    try:
        yield
    finally:
        _BUDGET.reset(token)


class _Clients(Protocol):
    """The HTTP clients a backend made (``http.HTTPClients``)."""

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _Request:
    positions: list[int]
    documents: list[str]
    top_n: int | None


class RemoteReranker(Configurable):
    """Input checks, limits, splitting, bounded concurrency, retries and the merge.

    Subclasses implement ``_score_chunk`` and ``_ascore_chunk``: one request for
    some documents, returning raw ``(index, score)`` pairs or raising a
    :class:`RerankError`.
    """

    backend_name: ClassVar[str] = "remote"
    # Environment variables read, in order, for a key not passed as ``api_key``.
    key_env: ClassVar[tuple[str, ...]] = ()
    # The names the ``**options`` of a subclass's constructor take.
    options_type: ClassVar[type] = RemoteOptions

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        max_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_documents_per_request: int = 64,
        max_tokens_per_request: int | None = None,
        max_concurrency: int = 4,
        max_query_tokens: int | None = None,
        max_document_tokens: int | None = None,
        on_too_long: OnTooLong = "truncate",
        count_tokens: Callable[[str], int] = estimate_tokens,
        thresholds: StageThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        self.retry = RetryPolicy(
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
        )
        self.limits = InputLimits(
            max_query_tokens=max_query_tokens,
            max_document_tokens=max_document_tokens,
            on_too_long=on_too_long,
            max_documents_per_request=max_documents_per_request,
            max_tokens_per_request=max_tokens_per_request,
            max_concurrency=max_concurrency,
            count_tokens=count_tokens,
        )
        if not isinstance(thresholds, StageThresholds):
            raise errors.InvalidInputError("thresholds must be a StageThresholds.")
        self.thresholds = thresholds
        self._clients: _Clients | None = None

    @classmethod
    def keyword_options(cls) -> frozenset[str]:
        """The option names a subclass's ``**options`` accept."""
        typed = cls.options_type
        return frozenset(typed.__required_keys__ | typed.__optional_keys__)  # type: ignore[attr-defined]

    def _key(self, api_key: str | SecretStr | None, *, required: bool = True) -> SecretStr | None:
        """The key from ``api_key`` or the first of :attr:`key_env` that is set."""
        return resolve_api_key(
            api_key,
            self.key_env,
            owner=type(self).__name__,
            backend=self.backend_name,
            required=required,
        )

    def close(self) -> None:
        """Close the HTTP client this object made (clients passed in stay open)."""
        if self._clients is not None:
            self._clients.close()

    async def aclose(self) -> None:
        """Close the HTTP clients this object made (clients passed in stay open)."""
        if self._clients is not None:
            await self._clients.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _sends_top_n(self) -> bool:
        """Whether the service takes ``top_n``; if not, the cut happens after the merge."""
        return True

    def _prepare(self) -> None:
        """Local set-up a sync call needs, done before its deadline starts (no I/O)."""

    def _aprepare(self) -> None:
        """The same for an async call (runs in the event loop, so: quick, no I/O)."""

    # Subclasses provide these two.
    def _score_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        raise NotImplementedError

    async def _ascore_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        raise NotImplementedError

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Rerank ``documents`` for ``query``: results sorted best first.

        The call is over within :attr:`RetryPolicy.total_budget` seconds, however many
        requests it is split into: they run on worker threads and this thread waits
        for them only until the call's deadline, or until one of them fails.
        """
        query, requests, top_n = self._plan(query, documents, top_n)
        if not requests:
            return []
        self._prepare()
        deadline = self._deadline()
        answers = run_in_threads(
            [functools.partial(self._run_request, query, r, deadline) for r in requests],
            deadline=deadline,
            workers=min(self.limits.max_concurrency, len(requests)),
            expired=lambda: self._expired(deadline, len(requests)),
        )
        return self._merge(requests, answers, top_n)

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Async twin of :meth:`rerank`, on one reused async client and one deadline."""
        query, requests, top_n = self._plan(query, documents, top_n)
        if not requests:
            return []
        self._aprepare()
        deadline = self._deadline()
        if len(requests) == 1:
            answers = [await self._arun_request(query, requests[0], deadline)]
        else:
            gate = asyncio.Semaphore(self.limits.max_concurrency)

            async def gated(request: _Request) -> dict[int, float]:
                async with gate:
                    return await self._arun_request(query, request, deadline)

            tasks = [asyncio.ensure_future(gated(r)) for r in requests]
            try:
                answers = list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return self._merge(requests, answers, top_n)

    def rerank_within(
        self, query: str, documents: Sequence[str], *, budget: Budget
    ) -> list[RerankResult]:
        """:meth:`rerank` with the budget as the call's deadline where it is the
        sooner: every document's result, or none when the budget ends first (the
        service's answer to a request cut short never arrives)."""
        with _within(budget):
            try:
                return self.rerank(query, documents)
            except errors.RerankTimeoutError:
                return []

    async def arerank_within(
        self, query: str, documents: Sequence[str], *, budget: Budget
    ) -> list[RerankResult]:
        """The async twin of :meth:`rerank_within`."""
        with _within(budget):
            try:
                return await self.arerank(query, documents)
            except errors.RerankTimeoutError:
                return []

    def _deadline(self) -> Deadline:
        """This call's deadline: :attr:`RetryPolicy.total_budget` from now, or the end
        of the latency budget it runs under (see :meth:`rerank_within`), if sooner."""
        budget = _BUDGET.get()
        seconds = self.retry.total_budget
        if budget is not None:
            seconds = min(seconds, max(budget.remaining(), 0.0))
        return Deadline(seconds)

    def _expired(self, deadline: Deadline, count: int) -> errors.RerankTimeoutError:
        parts = "" if count == 1 else f" ({count} requests)"
        return errors.RerankTimeoutError(
            f"The {self.backend_name} call{parts} took longer than its deadline of "
            f"{deadline.seconds:.3g} s.",
            backend=self.backend_name,
        )

    def _plan(
        self, query: str, documents: Sequence[str], top_n: int | None
    ) -> tuple[str, list[_Request], int | None]:
        query, docs, top_n = check_call(query, documents, top_n)
        if not docs:
            return query, [], top_n
        limits = self.limits
        query = limits.fit("The query", query, limits.max_query_tokens)
        docs = [
            limits.fit(f"documents[{i}]", doc, limits.max_document_tokens)
            for i, doc in enumerate(docs)
        ]
        groups = plan_requests(
            [limits.count_tokens(doc) for doc in docs],
            query_tokens=limits.count_tokens(query),
            max_documents=limits.max_documents_per_request,
            max_tokens=limits.max_tokens_per_request,
        )
        requests = []
        for positions in groups:
            # Each request's own top_n holds the global top_n: anything cut there
            # is beaten by top_n documents of the same request.
            sent = top_n if self._sends_top_n() else None
            if sent is not None and sent >= len(positions):
                sent = None
            requests.append(_Request(positions, [docs[i] for i in positions], sent))
        return query, requests, top_n

    def _what(self, request: _Request) -> str:
        return f"{self.backend_name} request for {len(request.documents)} documents"

    def _run_request(self, query: str, request: _Request, deadline: Deadline) -> dict[int, float]:
        def attempt(timeout: float) -> dict[int, float]:
            pairs = self._score_chunk(query, request.documents, request.top_n, timeout)
            return self._validate(pairs, request)

        return self.retry.run(
            attempt, what=self._what(request), deadline=deadline, backend=self.backend_name
        )

    async def _arun_request(
        self, query: str, request: _Request, deadline: Deadline
    ) -> dict[int, float]:
        async def attempt(timeout: float) -> dict[int, float]:
            pairs = await self._ascore_chunk(query, request.documents, request.top_n, timeout)
            return self._validate(pairs, request)

        return await self.retry.arun(
            attempt, what=self._what(request), deadline=deadline, backend=self.backend_name
        )

    def _validate(self, pairs: list[tuple[object, object]], request: _Request) -> dict[int, float]:
        return validate_ranking(
            pairs,
            n_documents=len(request.documents),
            top_n_sent=request.top_n,
            backend=self.backend_name,
        )

    def _merge(
        self,
        requests: list[_Request],
        answers: list[dict[int, float]],
        top_n: int | None,
    ) -> list[RerankResult]:
        scores: dict[int, float] = {}
        for request, answer in zip(requests, answers, strict=True):
            for local, score in answer.items():
                scores[request.positions[local]] = score
        # Every document is here unless top_n was sent: validate_ranking saw to it.
        ranked_positions = sorted(scores)  # input order, so ties keep it
        ranked = rank_scores(
            [scores[i] for i in ranked_positions], top_n=top_n, thresholds=self.thresholds
        )
        return [
            RerankResult(index=ranked_positions[r.index], score=r.score, stage=r.stage)
            for r in ranked
        ]
