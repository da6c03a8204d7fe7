"""What every dialect shares: errors, the text types, keys, limits, scoring and routes.

A dialect module declares its request models (pydantic: the validation *and* the
OpenAPI schema) and a :class:`Router` whose handlers turn a valid request into
``(query, documents, top_n)``, score it with the app's :class:`Service` (the
:data:`ServiceDep` dependency) and render the answer. Limits, the token budget,
authentication, model calls and their errors live here, once.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.types import DecoratedCallable
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import JSONResponse

from .._calls import MAX_BUDGET_MS, Budget, check_budget_ms
from .._exceptions import InvalidInputError, MalformedResponseError, RerankError
from .._types import Reranker, RerankResult, Stage, estimate_tokens, lone_surrogate
from ._batcher import MicroBatcher

__all__ = [
    "BAD_BODY",
    "EMPTY_DOCUMENTS",
    "EMPTY_FIELD",
    "INTERNAL",
    "KEY_INVALID",
    "KEY_REQUIRED",
    "MAX_FIELDS",
    "REQUEST_LIMITS",
    "ApiError",
    "ClientGone",
    "Dialect",
    "Query",
    "Ranked",
    "RequestLimits",
    "RerankRequest",
    "Route",
    "Router",
    "Service",
    "ServiceDep",
    "Text",
    "authorize",
    "check_api_key",
    "check_sizes",
    "error_response",
    "from_validation_errors",
    "json_type",
    "too_many_documents",
]

logger = logging.getLogger("memos_rerank_integrations.server")

# MemOS business codes (see the MemOS API docs); the other dialects carry only a message.
BAD_BODY = 40000
EMPTY_FIELD = 40002
EMPTY_DOCUMENTS = 40003
KEY_REQUIRED = 40100
KEY_INVALID = 40132
INTERNAL = 50000


class ApiError(Exception):
    """An error answer: HTTP status, MemOS code, message, its kind for metrics, and
    the dialect it is written in when not its route's."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: int = BAD_BODY,
        kind: str = "invalid_request",
        headers: dict[str, str] | None = None,
        dialect: Dialect | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.kind = kind
        self.headers = headers or {}
        # The dialect to answer in, when it is not the route's.
        self.dialect = dialect


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nobody reads it."""


@dataclass(frozen=True)
class Dialect:
    """How one API family writes its errors."""

    name: str
    error_body: Callable[[ApiError], dict[str, Any]]


def error_response(dialect: Dialect, error: ApiError, *, close: bool = False) -> JSONResponse:
    headers = dict(error.headers)
    if close:
        # The rest of an unread body must not be parsed as the next request.
        headers["Connection"] = "close"
    return JSONResponse(dialect.error_body(error), error.status, headers=headers)


@dataclass(frozen=True)
class Route:
    """A guarded POST route: the dialect of its errors, the auth scheme its clients
    send, and the body it expects (for error messages)."""

    dialect: Dialect
    scheme: str
    what: str
    # A route whose body is a tagged union of two dialects' requests: the union's
    # tags, and which dialect a (valid or invalid) body speaks.
    union_tags: frozenset[str] = frozenset()
    speaks: Callable[[Any], Dialect] | None = None

    def dialect_of(self, body: Any) -> Dialect:
        return self.dialect if self.speaks is None else self.speaks(body)


_ERROR_STATUSES = {
    400: "Invalid request (names the field), or the model refused its input",
    401: "Missing or invalid API key",
    408: "The body did not arrive in time",
    413: "Body over the size limit, or the request over the token budget",
    500: "The model gave an invalid answer, or an internal error",
    503: "The model failed, or the server is shutting down",
}


class Router(APIRouter):
    """A dialect's routes; :attr:`guarded` maps each rerank route's path to its
    :class:`Route`, for the guard, the error handlers and the OpenAPI security."""

    def __init__(self) -> None:
        super().__init__()
        self.guarded: dict[str, Route] = {}

    def rerank(
        self, path: str, route: Route, *, errors: tuple[type[BaseModel], ...], **options: Any
    ) -> Callable[[DecoratedCallable], DecoratedCallable]:
        """``@router.rerank(path, route, errors=(ErrorModel, ...), summary=...)``: a
        guarded POST route tagged ``rerank``, its errors documented in ``errors``'
        shapes (one or two models)."""
        self.guarded[path] = route
        schema: Any = errors[0] if len(errors) == 1 else errors[0] | errors[1]
        responses: dict[int | str, dict[str, Any]] = {
            status: {"model": schema, "description": text}
            for status, text in _ERROR_STATUSES.items()
        }
        post = self.post(path, responses=responses, tags=["rerank"], **options)

        def register(handler: DecoratedCallable) -> DecoratedCallable:
            @functools.wraps(handler)
            async def with_budget_headers(*args: Any, **kwargs: Any) -> Any:
                response = await handler(*args, **kwargs)
                response.headers.update(budget_headers(kwargs["request"]))
                return response

            post(with_budget_headers)
            return handler

        return register

    def status(
        self, path: str, *, summary: str, head: bool = False, **options: Any
    ) -> Callable[[DecoratedCallable], DecoratedCallable]:
        """``@router.status(path, summary=..., response_model=...)``: a GET route
        tagged ``status`` (with ``head``, ``HEAD`` answers too: the same status and
        headers, no body)."""
        get = self.get(path, summary=summary, tags=["status"], **options)
        if not head:
            return get
        also_head = self.head(path, include_in_schema=False, **options)

        def register(handler: DecoratedCallable) -> DecoratedCallable:
            return get(also_head(handler))

        return register


# -- text fields ---------------------------------------------------------------------


def _valid_text(value: str) -> str:
    found = lone_surrogate(value)
    if found is not None:
        position, char = found
        raise PydanticCustomError(
            "lone_surrogate",
            "holds a lone surrogate (U+{codepoint}) at character {position}: not valid "
            "Unicode text. Send UTF-8 text (a JSON \\ud800-\\udfff escape must be half "
            "of a pair)",
            {"codepoint": f"{ord(char):04X}", "position": position},
        )
    return value


def _valid_query(value: str) -> str:
    _valid_text(value)
    if not value.strip():
        raise PydanticCustomError("empty", "must not be empty")
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
"""A string that is valid Unicode (no lone surrogates)."""
Query = Annotated[str, AfterValidator(_valid_query)]
"""A non-blank :data:`Text`."""


# -- limits checked before validation ---------------------------------------------------

MAX_FIELDS = 100
"""The most fields a document object may have, and the most ``rank_fields``."""


@dataclass(frozen=True)
class RequestLimits:
    """The sizes a request body may have: set by the guard for the request it lets
    through (:data:`REQUEST_LIMITS`), and checked by the request models *before*
    they validate anything, so that validation, its errors and the texts built
    from a request cost no more than the limits allow."""

    max_documents: int
    max_fields: int = MAX_FIELDS


REQUEST_LIMITS: ContextVar[RequestLimits | None] = ContextVar(
    "memos_rerank_request_limits", default=None
)


def too_many_documents(count: int, limit: int, *, field: str = "documents") -> ApiError:
    return ApiError(
        400,
        f"Too many {field}: {count}; this server accepts at most {limit} per request. "
        "Split the call.",
    )


def check_sizes(
    data: Any,
    *,
    lists: Sequence[str],
    objects: str | None = None,
    fields: str | None = None,
    dialect: Dialect | None = None,
) -> Any:
    """Refuse a parsed body whose ``lists`` hold more items than the documents limit,
    whose ``objects`` list holds an object with more than the fields limit or a
    value that is no string, or whose ``fields`` list names more fields than the
    limit (a 400 :class:`ApiError` in ``dialect``); return ``data`` unchanged.
    Outside a request (no :data:`REQUEST_LIMITS`) nothing is checked. Costs at most
    one look per item and field, all bounded by the limits."""
    limits = REQUEST_LIMITS.get()
    if limits is None or not isinstance(data, dict):
        return data
    for name in lists:
        items = data.get(name)
        if isinstance(items, list) and len(items) > limits.max_documents:
            error = too_many_documents(len(items), limits.max_documents)
            error.dialect = dialect
            raise error
    items = data.get(objects) if objects is not None else None
    if isinstance(items, list):
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            if len(item) > limits.max_fields:
                raise ApiError(
                    400,
                    f"'{objects}[{position}]' has {len(item)} fields; this server accepts "
                    f"at most {limits.max_fields} per object.",
                    dialect=dialect,
                )
            # The first value that is no string, named here: validation would
            # describe every one of up to documents x fields of them.
            for name, value in item.items():
                if not isinstance(value, str):
                    raise ApiError(
                        400,
                        f"'{objects}[{position}].{name}' must be a string, got {json_type(value)}.",
                        dialect=dialect,
                    )
    named = data.get(fields) if fields is not None else None
    if isinstance(named, list) and len(named) > limits.max_fields:
        raise ApiError(
            400,
            f"'{fields}' names {len(named)} fields; this server accepts at most "
            f"{limits.max_fields}.",
            dialect=dialect,
        )
    return data


class Budgeted(BaseModel):
    """The optional latency budget every rerank request may carry (this server's own
    field; the ``X-Rerank-Budget-Ms`` header does the same for clients that cannot add
    a field, the field winning when both are given)."""

    budget_ms: float | None = Field(
        None,
        gt=0,
        le=MAX_BUDGET_MS,
        allow_inf_nan=False,
        description="A latency budget in milliseconds: the documents are scored in their "
        "order until it runs out; the scored ones come first, best first, the rest after "
        "them in their order with score 0. The response's X-Rerank-Scored header says how "
        "many were scored, X-Rerank-Partial whether any was not.",
    )


class RerankRequest(Budgeted):
    """The fields the MemOS and Cohere rerank requests begin with; JSON types are
    not converted (``"3"`` is no ``top_n``)."""

    model_config = ConfigDict(strict=True)

    model: str | None = Field(None, description="Ignored: the server serves its one model.")
    query: Query


# -- validation errors -> one clear message ------------------------------------------


def json_type(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object"})
    return names.get(type(value), type(value).__name__)


def _parts(loc: Sequence[object], tags: frozenset[str]) -> list[str | int]:
    """The location without ``body``, the /rerank dialect tag and pydantic's names
    for the members of a union (``str``, ``function-after[...]``, ``dict[...]``...)."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    if parts and isinstance(parts[0], str) and parts[0] in tags:
        parts = parts[1:]
    return [
        part
        for part in parts
        if isinstance(part, int) or (isinstance(part, str) and not _is_member_name(part))
    ]


def _is_member_name(part: str) -> bool:
    return part in ("str", "int", "bool", "float") or part[:1].isupper() or "[" in part


def _location(loc: Sequence[object], tags: frozenset[str]) -> str:
    path = ""
    for part in _parts(loc, tags):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _anchor(error: dict[str, Any], tags: frozenset[str]) -> tuple[str | int, ...]:
    """Where a problem is: up to the last list position (the members of a union at
    ``documents[3]``, or the fields of an object there, share one anchor)."""
    parts = _parts(error.get("loc", ()), tags)
    positions = [i for i, part in enumerate(parts) if isinstance(part, int)]
    return tuple(parts[: positions[-1] + 1] if positions else parts)


def _related(first: tuple[str | int, ...], second: tuple[str | int, ...]) -> bool:
    length = min(len(first), len(second))
    return first[:length] == second[:length]


def _most_telling(errors: Sequence[dict[str, Any]], tags: frozenset[str]) -> dict[str, Any]:
    # A union (a string or an object) reports one error per member for one problem:
    # the one that is not about the input's type, or else the deepest, says what is wrong.
    anchor = _anchor(errors[0], tags)
    same = [error for error in errors if _related(_anchor(error, tags), anchor)]

    def rank(error: dict[str, Any]) -> tuple[bool, int]:
        kind = str(error["type"])
        return (kind.endswith("_type"), -len(_parts(error.get("loc", ()), tags)))

    return min(same, key=rank)


def _phrase(error: dict[str, Any]) -> str:
    kind = error["type"]
    given = json_type(error.get("input"))
    ctx = error.get("ctx") or {}
    phrases = {
        "missing": "is required",
        "string_type": f"must be a string, got {given}",
        "list_type": f"must be a list, got {given}",
        "int_type": f"must be an integer, got {given}",
        "bool_type": f"must be true or false, got {given}",
        "dict_type": f"must be an object, got {given}",
        "model_type": f"must be an object, got {given}",
        "model_attributes_type": f"must be an object, got {given}",
        "too_short": "must not be empty",
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
        "greater_than": f"must be greater than {ctx.get('gt')}",
    }
    if kind in phrases:
        return phrases[kind]
    message = str(error.get("msg", "is not valid"))
    return message[:1].lower() + message[1:] if kind != "lone_surrogate" else message


def from_validation_errors(
    errors: Sequence[dict[str, Any]], *, tags: frozenset[str] = frozenset(), what: str
) -> ApiError:
    """One 400 naming the first problem and where it is (``documents[3]``).

    ``what`` describes the expected body, for errors about the body as a whole.
    """
    if not errors:
        return ApiError(400, f"The request body is not valid: send {what}.")
    first = _most_telling(errors, tags)
    kind = first["type"]
    path = _location(first.get("loc", ()), tags)
    code = BAD_BODY
    if kind == "json_invalid":
        loc = first.get("loc", ())
        position = loc[-1] if loc and isinstance(loc[-1], int) else None
        reason = (first.get("ctx") or {}).get("error", "invalid syntax")
        where = f" (at character {position})" if position is not None else ""
        message = f"The request body is not valid JSON: {reason}{where}."
    elif not path:
        if kind == "missing":
            message = f"The request body is empty: send {what}."
        else:
            message = f"The request body must be {what}, got {json_type(first.get('input'))}."
    else:
        message = f"'{path}' {_phrase(first)}."
        if kind == "empty" and path == "query":
            code = EMPTY_FIELD
        elif kind == "too_short" and path in ("documents", "texts"):
            code = EMPTY_DOCUMENTS
    # Other problems, not counting the other members of the same union.
    chosen = _anchor(first, tags)
    more = len({a for a in (_anchor(e, tags) for e in errors) if not _related(a, chosen)})
    if more:
        message += f" ({more} more problem{'s' if more > 1 else ''} in the request.)"
    return ApiError(400, message, code=code)


# -- API keys --------------------------------------------------------------------------


def check_api_key(api_key: str | None) -> str | None:
    """The key the server will require, checked at start-up.

    Surrounding whitespace is removed (a key read from a file often ends with a
    newline); a key that is then empty, or holds a control character or a
    non-ASCII character, cannot be sent in an HTTP header and is refused.
    The error never shows the key.
    """
    if api_key is None:
        return None
    if not isinstance(api_key, str):
        raise InvalidInputError(f"api_key must be a str or None, got {type(api_key).__name__}.")
    key = api_key.strip()
    if not key:
        raise InvalidInputError("api_key must not be empty; pass None to disable authentication.")
    for position, char in enumerate(key):
        if not " " <= char <= "~":
            what = "a control character" if char.isascii() else "a non-ASCII character"
            raise InvalidInputError(
                f"api_key holds {what} at position {position}: HTTP headers carry printable "
                "ASCII only, so clients could never send it. Use a key of printable ASCII "
                "characters."
            )
    return key


_SCHEMES = (b"bearer", b"token")


def authorize(headers: Sequence[tuple[bytes, bytes]], key: bytes, *, scheme: str) -> None:
    """Check ``Authorization: Bearer <key>`` or ``Token <key>`` (schemes in any case,
    RFC 7235); the key is compared in constant time. Raises a 401 :class:`ApiError`.

    ``scheme`` is the one the dialect's own clients use, named first in messages.
    """
    header = next((value for name, value in headers if name == b"authorization"), None)
    other = "Token" if scheme == "Bearer" else "Bearer"
    challenge = {"WWW-Authenticate": f'{scheme} realm="memos-rerank", {other} realm="memos-rerank"'}
    if header is None or not header.strip():
        raise ApiError(
            401,
            f"An API key is required: send the header 'Authorization: {scheme} <key>' "
            f"('{other} <key>' works too).",
            code=KEY_REQUIRED,
            kind="unauthorized",
            headers=challenge,
        )
    given_scheme, _, credentials = header.strip().partition(b" ")
    valid = hmac.compare_digest(credentials.strip(), key)
    if not valid or given_scheme.lower() not in _SCHEMES:
        raise ApiError(
            401,
            f"The API key is invalid: send 'Authorization: {scheme} <key>' (or '{other} "
            "<key>') with the key the server was started with.",
            code=KEY_INVALID,
            kind="unauthorized",
            headers=challenge,
        )


# -- scoring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranked:
    """A scored request: results best first, and the tokens it cost. Under a latency
    budget, the documents it left unscored follow the scored ones in their order
    with score 0, and :attr:`scored` says how many were scored."""

    results: list[RerankResult]
    tokens: int
    scored: int | None = None


class Service:
    """The model behind every dialect: its name and limits, the token budget, the
    batcher, errors; ``app.state.service``, given to handlers by :data:`ServiceDep`.

    Backends' ``count_tokens`` run in up to four threads of the service's own
    (``memos-rerank-tokenize``), which :meth:`close` stops.
    """

    def __init__(
        self,
        reranker: Reranker,
        batcher: MicroBatcher,
        *,
        model_name: str,
        max_documents: int,
        max_request_tokens: int | None,
        max_body_bytes: int,
        on_budget: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.reranker = reranker
        self._on_budget = on_budget
        self.batcher = batcher
        self.model_name = model_name
        self.max_documents = max_documents
        self.max_request_tokens = max_request_tokens
        self.max_body_bytes = max_body_bytes
        self.tokenizer_workers = min(4, os.cpu_count() or 1)
        self.started_at = int(time.time())
        self._tokenizer = ThreadPoolExecutor(
            max_workers=self.tokenizer_workers, thread_name_prefix="memos-rerank-tokenize"
        )
        count = getattr(reranker, "count_tokens", None)
        self._count: Callable[[str, Sequence[str]], int] | None = count if callable(count) else None
        cap = getattr(reranker, "max_query_length", None)
        self._query_cap = cap if isinstance(cap, int) and not isinstance(cap, bool) else None

    def close(self) -> None:
        """Stop the tokenizer threads; a count in progress finishes, queued ones are dropped."""
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    def check_documents(self, count: int, *, field: str = "documents") -> None:
        if count > self.max_documents:
            raise too_many_documents(count, self.max_documents, field=field)

    def check_text(self, characters: int) -> None:
        """Refuse texts to rank longer in all than the body limit (in characters),
        before they are built."""
        if characters > self.max_body_bytes:
            raise ApiError(
                413,
                f"The texts to rank would hold {characters} characters; this server ranks "
                f"at most {self.max_body_bytes} per request. Split the documents over "
                "several requests.",
                kind="too_large",
            )

    def estimate_tokens(self, query: str, documents: Sequence[str]) -> int:
        """The clients' estimate (:func:`~memos_rerank_integrations._types.estimate_tokens`)
        of every document scored with the query, the query capped like the backend caps it."""
        query_tokens = estimate_tokens(query)
        if self._query_cap is not None:
            query_tokens = min(query_tokens, self._query_cap)
        return sum(query_tokens + estimate_tokens(document) for document in documents)

    async def count_tokens(self, calls: Sequence[tuple[str, Sequence[str]]]) -> int:
        """Tokens the calls would score: the backend's ``count_tokens`` in a worker
        thread when it has one (tokenization only), else :meth:`estimate_tokens`."""
        count = self._count
        if count is None:
            return sum(self.estimate_tokens(query, documents) for query, documents in calls)
        loop = asyncio.get_running_loop()

        def total() -> int:
            return sum(int(count(query, documents)) for query, documents in calls)

        try:
            return await loop.run_in_executor(self._tokenizer, total)
        except InvalidInputError as exc:
            raise ApiError(400, exc.message) from None
        except Exception as exc:
            raise _model_error(exc) from None

    def check_budget(self, tokens: int, documents: int) -> None:
        budget = self.max_request_tokens
        if budget is None or tokens <= budget:
            return
        parts = math.ceil(tokens / budget)
        per_part = max(1, documents * budget // tokens)
        raise ApiError(
            413,
            f"This request would score {tokens} tokens; this server scores at most {budget} "
            f"per request. Split it into at least {parts} requests (about {per_part} "
            "documents each), or shorten the query: every document is scored together "
            "with the whole query.",
            kind="token_budget",
        )

    async def rank(
        self,
        request: Request,
        query: str,
        documents: Sequence[str],
        top_n: int | None,
        budget_ms: float | None = None,
    ) -> Ranked:
        """Check the limits, then score one call (withdrawn if the client leaves);
        within a latency budget (``budget_ms``, else the ``X-Rerank-Budget-Ms``
        header), counted from here."""
        budget = _budget(request, budget_ms)
        self.check_documents(len(documents))
        tokens = await self.count_tokens([(query, documents)])
        self.check_budget(tokens, len(documents))
        futures = [self._submit(query, documents, top_n, budget, tokens)]
        (results,) = await self._wait(request, futures)
        if budget is None:
            return Ranked(results, tokens)
        ranked = _with_unscored(results, len(documents), top_n)
        request.state.rerank_budget = (budget.milliseconds, len(results), len(documents))
        if self._on_budget is not None:
            self._on_budget(len(results), len(documents), budget.elapsed_ms() / 1000.0)
        return Ranked(ranked, tokens, scored=len(results))

    async def rank_pairs(
        self, request: Request, calls: Sequence[tuple[str, Sequence[str]]]
    ) -> Ranked:
        """Several calls of one request (vLLM's pairwise ``/score``), fused by the
        batcher; results come back in call order, each call's best first."""
        self.check_documents(sum(len(documents) for _, documents in calls))
        tokens = await self.count_tokens(calls)
        self.check_budget(tokens, sum(len(documents) for _, documents in calls))
        share = -(-tokens // max(len(calls), 1))  # each pair's part of the count, for batching
        futures = [self._submit(query, documents, None, tokens=share) for query, documents in calls]
        outputs = await self._wait(request, futures)
        return Ranked([result for output in outputs for result in output], tokens)

    def model_limit(self, name: str) -> int | None:
        """The backend's ``name`` attribute (``max_length``...) if it is an int."""
        value = getattr(self.reranker, name, None)
        return value if isinstance(value, int) else None

    def _submit(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None,
        budget: Budget | None = None,
        tokens: int | None = None,
    ) -> Future[list[RerankResult]]:
        try:
            return self.batcher.submit(query, documents, top_n, budget=budget, tokens=tokens)
        except RerankError as exc:  # shutting down
            raise ApiError(503, exc.message, code=INTERNAL, kind="unavailable") from None

    async def _wait(
        self, request: Request, futures: list[Future[list[RerankResult]]]
    ) -> list[list[RerankResult]]:
        waiters = [asyncio.wrap_future(future) for future in futures]
        gathered = asyncio.gather(*waiters)
        watcher = asyncio.ensure_future(_disconnected(request))
        pending: set[asyncio.Future[Any]] = {gathered, watcher}
        try:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Cancelled (a shutdown past its bound): withdraw what has not started.
            for future in futures:
                future.cancel()
            gathered.cancel()
            raise
        finally:
            watcher.cancel()
        if not gathered.done():
            # The client went away first: withdraw what has not started. A call the
            # model is computing finishes, and its answer is dropped.
            for future in futures:
                future.cancel()
            gathered.cancel()
            for waiter in waiters:
                waiter.add_done_callback(_consume)
            raise ClientGone
        try:
            return gathered.result()
        except InvalidInputError as exc:
            # The backend's own limits (e.g. a query longer than it accepts).
            raise ApiError(400, exc.message) from None
        except Exception as exc:
            raise _model_error(exc) from None


BUDGET_HEADER = "x-rerank-budget-ms"


def _budget(request: Request, budget_ms: float | None) -> Budget | None:
    """The request's latency budget, started now: the body's ``budget_ms``, else the
    ``X-Rerank-Budget-Ms`` header (a 400 when it is not a number of milliseconds)."""
    if budget_ms is None:
        header = request.headers.get(BUDGET_HEADER)
        if header is None:
            return None
        try:
            budget_ms = check_budget_ms(float(header[:32]) if len(header) <= 32 else None)
        except (ValueError, InvalidInputError):
            budget_ms = None
        if budget_ms is None:
            raise ApiError(
                400,
                f"X-Rerank-Budget-Ms must be a number of milliseconds, more than 0 and at "
                f"most {MAX_BUDGET_MS:.0f}.",
            )
    return Budget(budget_ms)


def _with_unscored(
    results: list[RerankResult], count: int, top_n: int | None
) -> list[RerankResult]:
    """The scored results, then the documents left unscored in their order, with
    score 0 and the lowest stage, cut to ``top_n``."""
    scored = {result.index for result in results}
    unscored = [
        RerankResult(index, 0.0, Stage.IRRELEVANT) for index in range(count) if index not in scored
    ]
    ranked = [*results, *unscored]
    return ranked if top_n is None else ranked[:top_n]


def budget_headers(request: Request) -> dict[str, str]:
    """The latency-budget headers of a response (none without a budget)."""
    outcome = getattr(request.state, "rerank_budget", None)
    if outcome is None:
        return {}
    budget_ms, scored, documents = outcome
    return {
        "X-Rerank-Budget-Ms": f"{budget_ms:g}",
        "X-Rerank-Scored": str(scored),
        "X-Rerank-Partial": "true" if scored < documents else "false",
    }


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(_service)]
"""A handler parameter that receives the app's :class:`Service`."""


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _consume(future: asyncio.Future[Any]) -> None:
    # A withdrawn call's outcome is nobody's business: do not log it as unretrieved.
    if not future.cancelled():
        future.exception()


def _model_error(exc: Exception) -> ApiError:
    if isinstance(exc, MalformedResponseError):
        return ApiError(
            500,
            f"The model gave an invalid answer: {exc.message}",
            code=INTERNAL,
            kind="malformed_answer",
        )
    if isinstance(exc, RerankError):
        logger.warning("Reranking failed: %s", exc)
        return ApiError(503, f"The model failed: {exc.message}", code=INTERNAL, kind="model_error")
    logger.error("Unexpected error while reranking", exc_info=exc)
    return ApiError(500, "Internal error while reranking.", code=INTERNAL, kind="internal")
