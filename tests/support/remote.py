"""The remote backends as the contract tests see them.

Each :class:`RemoteBackend` says, for one backend, what the contract tests need to
know and nothing else: how to build it against a loopback URL, the request it sends
(path, ``Authorization`` header, body), how its service encodes a ranking and an
error, where its key and base URL come from in the environment, and the defaults
that shape its requests. ``HTTPReranker`` appears twice, once per wire format
(``cohere``, as vLLM and infinity speak it, and ``tei``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memos_rerank_integrations import (
    CohereReranker,
    HTTPReranker,
    MemOSReranker,
    ZeroEntropyReranker,
)

from .loopback import Recorded, Reply, score_of

KEY = "sk-contract-SECRET-7f3a9c"

# Every environment variable a remote backend reads: cleared by the contract tests so
# that the machine's own settings never leak in.
ENVIRONMENT = (
    "MEMOS_API_KEY",
    "MEMOS_BASE_URL",
    "CO_API_KEY",
    "COHERE_API_KEY",
    "CO_API_URL",
    "ZERO_ENTROPY_API_KEY",
    "ZEROENTROPY_API_KEY",
    "ZEROENTROPY_BASE_URL",
)


@dataclass(frozen=True)
class RemoteBackend:
    name: str  # the test id
    backend: str  # RerankError.backend
    factory: Callable[..., Any]  # (base_url, api_key or None, **options) -> the reranker
    path: str  # where the request goes, under the base URL
    auth_scheme: str  # "Authorization: <scheme> <key>"
    error: Callable[[str], Any]  # the service's error body carrying a message
    fields: Mapping[str, Any] = field(default_factory=dict)  # sent besides query and documents
    key_env: tuple[str, ...] = ()  # where a missing key is looked up, first set wins; () = optional
    base_url_env: str | None = None
    documents_per_request: int = 64  # the default split
    tei: bool = False  # {query, texts, raw_scores, truncate} -> [{"index", "score"}]
    # Through the vendor's SDK (``http_client`` / ``async_http_client`` not taken, the
    # base URL handed to the SDK unchecked).
    sdk: bool = False
    # Malformed answers the SDK's response model turns into valid ones.
    sdk_coerces: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.name

    def make(self, base_url: str, *, api_key: str | None = KEY, **options: Any) -> Any:
        """The backend against ``base_url``; ``api_key=None`` leaves the key to the
        environment."""
        return self.factory(base_url, api_key, **options)

    @property
    def sends_top_n(self) -> bool:
        """Whether ``top_n`` goes to the service (TEI has none: the cut happens here)."""
        return not self.tei

    @property
    def documents_field(self) -> str:
        return "texts" if self.tei else "documents"

    def authorization(self, key: str = KEY) -> str:
        return f"{self.auth_scheme} {key}"

    def body(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        """The JSON body of the request for one call of ``documents``."""
        if self.tei:
            return {"query": query, "texts": list(documents), "raw_scores": False, "truncate": True}
        body = {**self.fields, "query": query, "documents": list(documents)}
        if top_n is not None:
            body["top_n"] = top_n
        return body

    def documents(self, request: Recorded) -> list[str]:
        """The documents a recorded request carried."""
        return list(request.body[self.documents_field])

    def results(self, items: Iterable[Mapping[str, Any]]) -> Any:
        """An answer in the service's shape from items with ``index`` and ``score``
        keys (either may be left out, any value goes)."""
        score_key = "score" if self.tei else "relevance_score"
        renamed = [{score_key if k == "score" else k: v for k, v in item.items()} for item in items]
        return renamed if self.tei else {"id": "contract", "results": renamed}

    def scored(self, pairs: Iterable[tuple[Any, Any]]) -> Any:
        return self.results({"index": i, "score": s} for i, s in pairs)

    def wrong_shape(self, n: int) -> Any:
        """A complete ranking in the other wire format (a bare list for the services that
        answer an object, an object for TEI, which answers a bare list)."""
        items = [{"index": i, "relevance_score": 0.5} for i in range(n)]
        return {"results": items} if self.tei else items

    def answer(self, documents: Sequence[str], top_n: int | None = None) -> Any:
        """The service's answer for ``documents``, scored by :func:`score_of`, best first,
        cut at ``top_n`` where the service takes one."""
        ranked = sorted(range(len(documents)), key=lambda i: -score_of(documents[i]))
        if top_n is not None and self.sends_top_n:
            ranked = ranked[:top_n]
        return self.scored((i, score_of(documents[i])) for i in ranked)

    def serve(self, request: Recorded) -> Reply:
        """A responder: the service answering whatever it was sent."""
        return Reply(200, self.answer(self.documents(request), request.body.get("top_n")))

    def serve_neutral(self, request: Recorded) -> Reply:
        """A responder scoring every document 0.5 (documents need not be ``doc <n>``)."""
        return Reply(200, self.scored((i, 0.5) for i in range(len(self.documents(request)))))


def _memos(base_url: str, api_key: str | None, **options: Any) -> MemOSReranker:
    return MemOSReranker(base_url=base_url, **_key(api_key), **options)


def _cohere(base_url: str, api_key: str | None, **options: Any) -> CohereReranker:
    return CohereReranker(base_url=base_url, **_key(api_key), **options)


def _zeroentropy(base_url: str, api_key: str | None, **options: Any) -> ZeroEntropyReranker:
    return ZeroEntropyReranker(base_url=base_url, **_key(api_key), **options)


def _http(base_url: str, api_key: str | None, **options: Any) -> HTTPReranker:
    return HTTPReranker(base_url, **_key(api_key), **options)


def _tei(base_url: str, api_key: str | None, **options: Any) -> HTTPReranker:
    return HTTPReranker(base_url, api_format="tei", **_key(api_key), **options)


def _key(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"api_key": api_key}


MEMOS = RemoteBackend(
    name="memos",
    backend="memos",
    factory=_memos,
    path="/rerank",
    auth_scheme="Token",
    error=lambda message: {"message": message},
    fields={"model": "memos-reranker-0.6b"},
    key_env=("MEMOS_API_KEY",),
    base_url_env="MEMOS_BASE_URL",
)
COHERE = RemoteBackend(
    name="cohere",
    backend="cohere",
    factory=_cohere,
    path="/v2/rerank",
    auth_scheme="Bearer",
    error=lambda message: {"message": message},
    fields={"model": "rerank-v3.5"},
    key_env=("CO_API_KEY", "COHERE_API_KEY"),
    base_url_env="CO_API_URL",
    documents_per_request=100,  # one Cohere search unit
    sdk=True,
    # The SDK's response model reads an index "0" as 0 (see test_cohere.py).
    sdk_coerces=frozenset({"numeric string index"}),
)
ZEROENTROPY = RemoteBackend(
    name="zeroentropy",
    backend="zeroentropy",
    factory=_zeroentropy,
    path="/v1/models/rerank",
    auth_scheme="Bearer",
    error=lambda message: {"detail": message},
    fields={"model": "zerank-1"},
    # Mem0's name first, then the official SDK's.
    key_env=("ZERO_ENTROPY_API_KEY", "ZEROENTROPY_API_KEY"),
    base_url_env="ZEROENTROPY_BASE_URL",
)
HTTP = RemoteBackend(
    name="http",
    backend="http",
    factory=_http,
    path="/rerank",
    auth_scheme="Bearer",
    # vLLM's error body.
    error=lambda message: {"object": "error", "message": message, "code": 400},
)
HTTP_TEI = RemoteBackend(
    name="http-tei",
    backend="http",
    factory=_tei,
    path="/rerank",
    auth_scheme="Bearer",
    # text-embeddings-inference's error body.
    error=lambda message: {"error": message, "error_type": "Validation"},
    tei=True,
)

BACKENDS: list[RemoteBackend] = [MEMOS, COHERE, ZEROENTROPY, HTTP, HTTP_TEI]
