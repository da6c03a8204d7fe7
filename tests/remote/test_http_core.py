"""The shared remote core: limits, splitting, merge, retries, error mapping, validation."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import threading
import time
import zlib
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    ModelLoadError,
    RateLimitError,
    RerankError,
    RerankTimeoutError,
)
from memos_rerank_integrations._remote.base import (
    InputLimits,
    RemoteReranker,
    RetryPolicy,
    plan_requests,
    read_scored_results,
    resolve_api_key,
    validate_ranking,
)
from memos_rerank_integrations._remote.http import (
    error_for_status,
    error_for_transport,
    join_url,
    retry_after_seconds,
)
from memos_rerank_integrations._types import estimate_tokens, rank_scores

from ..support.linear import assert_linear, repeated


def test_estimate_tokens_counts_ascii_by_four_and_other_characters_by_one() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd" * 10) == 10
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("记忆重排") == 4
    assert estimate_tokens("ab记忆") == 3


@pytest.mark.parametrize("text", ["x" * 1000, "记" * 300 + "y" * 300, "short"])
def test_truncation_keeps_the_longest_prefix_within_the_limit(text: str) -> None:
    limits = InputLimits(on_too_long="truncate")
    limit = 50
    if estimate_tokens(text) <= limit:
        assert limits.fit("t", text, limit) == text
        return
    with pytest.warns(UserWarning, match="over the limit of 50"):
        cut = limits.fit("t", text, limit)
    assert text.startswith(cut)
    assert estimate_tokens(cut) <= limit < estimate_tokens(text[: len(cut) + 1])


def test_truncation_uses_a_custom_counter() -> None:
    limits = InputLimits(count_tokens=lambda s: len(s.split()), on_too_long="truncate")
    with pytest.warns(UserWarning):
        assert limits.fit("t", "one two three four", 2) == "one two "


def test_raise_mode_names_the_limit_and_the_fix() -> None:
    with pytest.raises(InvalidInputError, match="on_too_long='truncate'"):
        InputLimits(on_too_long="raise").fit("The query", "x" * 100, 5)


def test_plan_requests_respects_both_caps_and_order() -> None:
    tokens = [10, 10, 10, 10, 10]
    assert plan_requests(tokens, query_tokens=0, max_documents=2, max_tokens=None) == [
        [0, 1],
        [2, 3],
        [4],
    ]
    assert plan_requests(tokens, query_tokens=5, max_documents=10, max_tokens=30) == [
        [0, 1],
        [2, 3],
        [4],
    ]
    # A document over the budget on its own still gets sent, alone.
    assert plan_requests([5, 100, 5], query_tokens=0, max_documents=10, max_tokens=20) == [
        [0],
        [1],
        [2],
    ]
    assert plan_requests([], query_tokens=0, max_documents=3, max_tokens=None) == []


def test_validate_ranking_accepts_a_complete_answer() -> None:
    assert validate_ranking([(1, 0.9), (0, 1)], n_documents=2, top_n_sent=None, backend="t") == {
        1: 0.9,
        0: 1.0,
    }
    assert validate_ranking([(1, 0.9)], n_documents=3, top_n_sent=1, backend="t") == {1: 0.9}


@pytest.mark.parametrize(
    "pairs, top_n, match",
    [
        ([(0, 0.1), (2, 0.2)], None, "index 2, outside"),
        ([(0, 0.1), (0, 0.2)], None, "twice"),
        ([(0, 0.1)], None, "ranks 1 documents, expected 2"),
        ([(0, 0.1), (1, "0.2")], None, "type str"),
        ([(0, 0.1), (1, None)], None, "type NoneType"),
        ([(0, 0.1), (1, float("inf"))], None, "non-finite"),
        ([(0, 0.1), (True, 0.2)], None, "type bool"),
        ([(0, 0.1), (1.0, 0.2)], None, "type float"),
        ([(0, 0.1), (1, 0.2)], 1, "expected 1"),
    ],
)
def test_validate_ranking_rejects(pairs: Any, top_n: int | None, match: str) -> None:
    with pytest.raises(MalformedResponseError, match=match):
        validate_ranking(pairs, n_documents=2, top_n_sent=top_n, backend="t")


def test_read_scored_results_shapes() -> None:
    assert read_scored_results(
        {"results": [{"index": 0, "relevance_score": 0.5, "document": {"text": "a"}}]},
        backend="t",
    ) == [(0, 0.5)]
    assert read_scored_results(
        [{"index": 1, "score": 2.0}], backend="t", score_key="score", bare_list=True
    ) == [(1, 2.0)]
    with pytest.raises(MalformedResponseError):
        read_scored_results({"results": []}, backend="t", bare_list=True)
    bad_payloads = ({"results": None}, {"results": [1]}, "text", {"results": [{"index": 0}]}, [])
    for bad in bad_payloads:
        with pytest.raises(MalformedResponseError):
            read_scored_results(bad, backend="t")


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "0.25"}) == 0.25
    assert retry_after_seconds({"Retry-After-Ms": "150"}) == 0.15
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({"Retry-After": "-1"}) is None
    assert retry_after_seconds({}) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (retry_after_seconds({"Retry-After": date}) or 0) <= 31


@pytest.mark.parametrize(
    "status, error_class",
    [
        (400, InvalidInputError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, InvalidInputError),
        (408, RerankTimeoutError),
        (422, InvalidInputError),
        (429, RateLimitError),
        (500, BackendUnavailableError),
        (502, BackendUnavailableError),
        (503, BackendUnavailableError),
        (504, BackendUnavailableError),
        (302, MalformedResponseError),
    ],
)
def test_error_for_status(status: int, error_class: type[RerankError]) -> None:
    error = error_for_status(status, backend="svc", payload={"message": "why"})
    assert type(error) is error_class
    assert error.status_code == status and error.backend == "svc"
    assert "why" in str(error)


def test_error_for_transport() -> None:
    request = httpx.Request("POST", "http://127.0.0.1/rerank")
    assert isinstance(
        error_for_transport(httpx.ReadTimeout("t", request=request), backend="s", timeout=1),
        RerankTimeoutError,
    )
    assert isinstance(
        error_for_transport(httpx.ConnectError("c", request=request), backend="s", timeout=1),
        BackendUnavailableError,
    )
    assert isinstance(
        error_for_transport(httpx.UnsupportedProtocol("u"), backend="s", timeout=1),
        InvalidInputError,
    )


@pytest.mark.parametrize(
    "error, retried",
    [
        (BackendUnavailableError("x"), True),
        (RerankTimeoutError("x"), True),
        (RateLimitError("x"), True),
        (AuthenticationError("x"), False),
        (InvalidInputError("x"), False),
        (MalformedResponseError("x"), False),
        (ModelLoadError("x"), False),
    ],
)
def test_retry_policy_retries_only_transient_errors(error: RerankError, retried: bool) -> None:
    policy = RetryPolicy(max_retries=3, backoff_base=0.1, backoff_max=1.0)
    assert (policy.delay(0, error, remaining=100) is not None) is retried
    assert policy.delay(3, BackendUnavailableError("x"), remaining=100) is None


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(max_retries=10, backoff_base=0.1, backoff_max=1.0)
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        waits = [policy.delay(attempt, BackendUnavailableError("x"), 100) for _ in range(50)]
        assert all(w is not None and ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered


def test_retry_after_is_honoured_up_to_backoff_max_and_the_budget() -> None:
    policy = RetryPolicy(max_retries=3, backoff_base=0.1, backoff_max=5.0)
    assert policy.delay(0, RateLimitError("x", retry_after=4.0), remaining=100) == 4.0
    assert policy.delay(0, RateLimitError("x", retry_after=6.0), remaining=100) is None
    assert policy.delay(0, RateLimitError("x", retry_after=4.0), remaining=3) is None
    assert policy.total_budget == 4 * 10.0 + 3 * 5.0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_retry_policy_run_attempts_and_gives_up(mode: str) -> None:
    policy = RetryPolicy(timeout=1.0, max_retries=2, backoff_base=0.001, backoff_max=0.01)
    timeouts: list[float] = []

    def attempt(timeout: float) -> str:
        timeouts.append(timeout)
        if len(timeouts) < 3:
            raise BackendUnavailableError("down")
        return "ok"

    async def aattempt(timeout: float) -> str:
        return attempt(timeout)

    def call() -> str:
        if mode == "sync":
            return policy.run(attempt, what="test")
        return asyncio.run(policy.arun(aattempt, what="test"))

    assert call() == "ok"
    assert len(timeouts) == 3 and all(0 < t <= 1.0 for t in timeouts)
    timeouts.clear()
    policy = RetryPolicy(timeout=1.0, max_retries=1, backoff_base=0.001, backoff_max=0.01)
    with pytest.raises(BackendUnavailableError):
        call()
    assert len(timeouts) == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"timeout": float("nan")}, {"max_retries": 1.5}, {"backoff_base": -1}],
)
def test_retry_policy_rejects_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        RetryPolicy(**kwargs)


def test_resolve_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("A_KEY", raising=False)
    monkeypatch.setenv("B_KEY", " from-b ")
    key = resolve_api_key(None, ["A_KEY", "B_KEY"], owner="X", backend="x")
    assert key is not None and key.get_secret_value() == "from-b"
    assert "from-b" not in repr(key)
    monkeypatch.setenv("A_KEY", "from-a")
    key = resolve_api_key(None, ["A_KEY", "B_KEY"], owner="X", backend="x")
    assert key is not None and key.get_secret_value() == "from-a"
    key = resolve_api_key("given", ["A_KEY"], owner="X", backend="x")
    assert key is not None and key.get_secret_value() == "given"
    monkeypatch.delenv("A_KEY")
    monkeypatch.delenv("B_KEY")
    assert resolve_api_key(None, ["A_KEY"], owner="X", backend="x", required=False) is None
    with pytest.raises(AuthenticationError, match=r"pass api_key=\.\.\. or set A_KEY or B_KEY"):
        resolve_api_key("  ", ["A_KEY", "B_KEY"], owner="X", backend="x")
    # A key no HTTP header can carry is the caller's input error, told at construction.
    with pytest.raises(InvalidInputError, match="line break"):
        resolve_api_key("a\nb", ["A_KEY"], owner="X", backend="x")


def test_join_url_keeps_the_base_path() -> None:
    assert join_url("http://h:1/api/v1/", "/rerank") == "http://h:1/api/v1/rerank"
    assert join_url("http://h:1", "v1/models/rerank") == "http://h:1/v1/models/rerank"


class InProcessService(RemoteReranker):
    """A remote backend whose 'service' is a Cohere-like function in this process:
    exercises the shared split / merge / top_n logic without a network."""

    backend_name = "in-process"

    def __init__(self, scores: dict[str, float], **options: Any) -> None:
        super().__init__(timeout=1.0, max_retries=0, **options)
        self.scores = scores
        self.calls: list[tuple[int, int | None]] = []

    def _answer(self, documents: list[str], top_n: int | None) -> list[tuple[object, object]]:
        self.calls.append((len(documents), top_n))
        ranked = sorted(range(len(documents)), key=lambda i: -self.scores[documents[i]])
        return [(i, self.scores[documents[i]]) for i in ranked[:top_n]]

    def _score_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        return self._answer(documents, top_n)

    async def _ascore_chunk(
        self, query: str, documents: list[str], top_n: int | None, timeout: float
    ) -> list[tuple[object, object]]:
        await asyncio.sleep(0)
        return self._answer(documents, top_n)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.5, 0.9, 1.0, 3.5]), max_size=40),
    per_request=st.integers(1, 7),
    top_n=st.one_of(st.none(), st.integers(1, 45)),
    use_async=st.booleans(),
)
def test_split_and_merge_equal_one_big_request(
    scores: list[float], per_request: int, top_n: int | None, use_async: bool
) -> None:
    docs = [f"doc {i}" for i in range(len(scores))]
    service = InProcessService(
        dict(zip(docs, scores, strict=True)), max_documents_per_request=per_request
    )
    if use_async:
        results = asyncio.run(service.arerank("q", docs, top_n=top_n))
    else:
        results = service.rerank("q", docs, top_n=top_n)
    assert results == rank_scores(scores, top_n=top_n)
    assert all(size <= per_request for size, _ in service.calls)
    assert all(sent is None or sent < size for size, sent in service.calls)


class TiesReversed(InProcessService):
    """Lists tied documents in the reverse of their input order, as a server may."""

    def _answer(self, documents: list[str], top_n: int | None) -> list[tuple[object, object]]:
        self.calls.append((len(documents), top_n))
        ranked = sorted(range(len(documents)), key=lambda i: (-self.scores[documents[i]], -i))
        return [(i, self.scores[documents[i]]) for i in ranked[:top_n]]


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.0, 0.5, 0.5, 1.0]), min_size=2, max_size=30),
    per_request=st.integers(1, 7),
    top_n=st.one_of(st.none(), st.integers(1, 35)),
    use_async=st.booleans(),
)
def test_ties_keep_input_order_whatever_order_the_server_lists_them(
    scores: list[float], per_request: int, top_n: int | None, use_async: bool
) -> None:
    docs = [f"doc {i}" for i in range(len(scores))]
    service = TiesReversed(
        dict(zip(docs, scores, strict=True)), max_documents_per_request=per_request
    )
    if use_async:
        results = asyncio.run(service.arerank("q", docs, top_n=top_n))
    else:
        results = service.rerank("q", docs, top_n=top_n)
    indices = [r.index for r in results]
    if top_n is None:
        assert indices == sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    else:
        # Which of the documents tied at a cut the service keeps is its choice; what
        # comes back is best first, ties in input order.
        assert len(indices) == min(top_n, len(scores))
        assert indices == sorted(indices, key=lambda i: (-scores[i], i))


# ---------------------------------------------------------------- numbers from duck-typed backends


def test_validate_ranking_takes_numpy_scalars_and_returns_plain_numbers() -> None:
    import numpy as np

    pairs = [(np.int64(1), np.float32(0.5)), (np.uint8(0), np.float16(0.25)), (np.int32(2), 3)]
    scores = validate_ranking(pairs, n_documents=3, top_n_sent=None, backend="t")
    assert scores == {1: 0.5, 0: 0.25, 2: 3.0}
    assert all(type(i) is int and type(s) is float for i, s in scores.items())
    assert list(scores) == [1, 0, 2]  # the answer's order is kept


@pytest.mark.parametrize(
    "index, score, match",
    [
        ("bool_", 0.5, "index of type bool"),
        (0, "bool_", "score of type bool"),
        (0, "nan32", "non-finite"),
        (0, "inf64", "non-finite"),
        (0, "huge", "non-finite"),
        (0, "-huge", "non-finite"),
        ("huge", 0.5, r"index 10+\.\.\., outside"),
        ("float64", 0.5, "index of type float64"),
        (0, b"0.5", "score of type bytes"),
        (0, 1j, "score of type complex"),
    ],
)
def test_validate_ranking_still_rejects(index: Any, score: Any, match: str) -> None:
    import numpy as np

    named = {
        "bool_": np.bool_(True),
        "nan32": np.float32("nan"),
        "inf64": np.float64("inf"),
        "float64": np.float64(0.0),
        "huge": 10**400,
        "-huge": -(10**400),
    }
    index, score = named.get(index, index), named.get(score, score)
    with pytest.raises(MalformedResponseError, match=match) as caught:
        validate_ranking([(index, score)], n_documents=1, top_n_sent=None, backend="t")
    assert len(str(caught.value)) < 200


# ---------------------------------------------------------------- decoding under the cap


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


@pytest.mark.parametrize(
    "encoding, encode",
    [
        (None, lambda b: b),
        ("identity", lambda b: b),
        ("gzip", _gzip),
        ("x-gzip", _gzip),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
        ("deflate, gzip", lambda b: _gzip(zlib.compress(b))),
        ("GZIP", _gzip),
    ],
)
def test_body_decoder_reads_what_it_asks_for(encoding: str | None, encode: Any) -> None:
    from memos_rerank_integrations._remote.http import _BodyDecoder

    data = b'{"results": []}' * 1000
    encoded = encode(data)
    decoder = _BodyDecoder(encoding, limit=len(data), backend="t")
    # Fed in awkward pieces, as a socket delivers them (a lone first byte included).
    pieces = [encoded[:1]] + [encoded[i : i + 7] for i in range(1, len(encoded), 7)]
    out = b"".join(decoder.decode(piece) for piece in pieces)
    assert out + decoder.flush() == data


def test_body_decoder_stops_a_bomb_at_the_cap_without_inflating_it() -> None:
    import tracemalloc

    from memos_rerank_integrations._remote.http import _BodyDecoder

    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    bomb = b"".join([packer.compress(block) for _ in range(128)] + [packer.flush()])  # 128 MiB
    decoder = _BodyDecoder("gzip", limit=1 << 20, backend="t")
    tracemalloc.start()
    try:
        with pytest.raises(MalformedResponseError, match=f"larger than {1 << 20} bytes"):
            decoder.decode(bomb)  # one piece: zlib is never asked for more than the cap + 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # about the 1 MiB cap, not the 128 MiB inflated


@pytest.mark.parametrize(
    "encoding, data, match",
    [
        ("br", b"\x00", "Content-Encoding 'br'"),
        ("gzip, zstd", b"\x00", "Content-Encoding 'zstd'"),
        ("gzip", b"not gzip at all", "could not be decompressed"),
        ("deflate", b"\xff\xfe\xfd", "could not be decompressed"),
    ],
)
def test_body_decoder_rejects_what_it_cannot_read(encoding: str, data: bytes, match: str) -> None:
    from memos_rerank_integrations._remote.http import _BodyDecoder

    with pytest.raises(MalformedResponseError, match=match):
        decoder = _BodyDecoder(encoding, limit=1000, backend="t")
        decoder.decode(data)
        decoder.flush()


# ---------------------------------------------------------------- answers bounded in objects

_TRICKY = st.lists(
    st.sampled_from(
        ['"', "\\", "\\\\", '\\"', "[", "]", "{", "}", ",", ":", " ", "é", "\U0001f600"]
    ),
    max_size=6,
).map("".join)
_KEYS = _TRICKY | st.text(max_size=4)
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TRICKY
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=40,
)


def _json_items(value: Any) -> int:
    """Items as the bound counts them: each array and object, and each comma in one."""
    if isinstance(value, (list, dict)):
        inner = value.values() if isinstance(value, dict) else value
        return 1 + max(len(value) - 1, 0) + sum(_json_items(v) for v in inner)
    return 0


def _json_depth(value: Any) -> int:
    if isinstance(value, (list, dict)):
        inner = value.values() if isinstance(value, dict) else value
        return 1 + max((_json_depth(v) for v in inner), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(
    value=_VALUES,
    indent=st.sampled_from([None, 0, 2]),
    ensure_ascii=st.booleans(),
    as_bytes=st.booleans(),
)
def test_the_shape_check_counts_what_the_parser_would_build(
    value: Any, indent: int | None, ensure_ascii: bool, as_bytes: bool
) -> None:
    from memos_rerank_integrations._remote.json_bounds import json_shape_problem

    text = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)
    content: str | bytes = text.encode() if as_bytes else text
    items, depth = _json_items(value), _json_depth(value)
    assert json_shape_problem(content, max_items=items, max_depth=depth) is None
    if items:
        over = json_shape_problem(content, max_items=items - 1, max_depth=depth)
        assert over == f"holds more than {items - 1:,} JSON items"
    if depth:
        deeper = json_shape_problem(content, max_items=items, max_depth=depth - 1)
        assert deeper == f"is nested deeper than {depth - 1} levels"


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"]" + b"{}," * 10, "is not valid JSON"),  # a bracket closing nothing
        (b'"a" "b" "c" "d" "e" "f"', "is not valid JSON"),  # more strings than 1 item holds
        (b'"\\\\"' + b",[]" * 5, "holds more than 1 JSON items"),  # an escaped backslash ends...
        (b'"\\"' + b",[]" * 5, None),  # ...an escaped quote does not
        (b'"\\\\\\"' + b",[]" * 5, None),
        (b'"unterminated' + b",[]" * 5, None),
    ],
)
def test_the_shape_check_refuses_what_no_valid_json_holds(content: bytes, problem: Any) -> None:
    from memos_rerank_integrations._remote.json_bounds import json_shape_problem

    assert json_shape_problem(content, max_items=1) == problem


_BODY_PIECES = st.sampled_from(
    [b" ", b"\n", b"0", b"9", b"-", b".", b"e", b'"', b"\\", b'\\"', b"\\u", b"[", b"]", b"{"]
)
_MORE_PIECES = st.sampled_from([b"}", b",", b":", b"a", b"true", b"\xff", "\U0001f600".encode()])


@settings(max_examples=30, deadline=None)
@given(unit=st.lists(_BODY_PIECES | _MORE_PIECES, min_size=1, max_size=6).map(b"".join))
@example(unit=b'"\\"')  # escaped quotes: a string that never ends, retried from each quote
@example(unit=b" ")
@example(unit=b"[")
def test_reading_an_answer_takes_linear_time(unit: bytes) -> None:
    from memos_rerank_integrations import MemOSReranker
    from memos_rerank_integrations._remote.json_bounds import json_shape_problem

    reranker = MemOSReranker(api_key="k", base_url="http://127.0.0.1:9")

    def parse(body: bytes) -> None:
        with contextlib.suppress(RerankError):
            reranker._parse(200, {}, body, n_documents=3)

    assert_linear(
        lambda body: json_shape_problem(body, max_items=10**9), lambda n: repeated(unit, n), 2_000
    )
    assert_linear(parse, lambda n: b'{"results": [' + repeated(unit, n), 2_000)


# ---------------------------------------------------------------- one deadline per call


def test_an_attempt_never_starts_without_time_left() -> None:
    from memos_rerank_integrations._remote.deadline import Deadline

    policy = RetryPolicy(timeout=1.0, max_retries=3, backoff_base=0.001, backoff_max=0.01)
    calls: list[float] = []
    deadline = Deadline(0.0)
    with pytest.raises(RerankTimeoutError, match="No time was left"):
        policy.run(calls.append, what="test request", deadline=deadline, backend="t")
    with pytest.raises(RerankTimeoutError, match="No time was left"):
        asyncio.run(policy.arun(_async(calls.append), what="test request", deadline=deadline))
    assert calls == []


def _async(function: Any) -> Any:
    async def wrapped(*args: Any) -> Any:
        return function(*args)

    return wrapped


def test_each_attempt_gets_the_smaller_of_timeout_and_what_is_left() -> None:
    from memos_rerank_integrations._remote.deadline import Deadline

    policy = RetryPolicy(timeout=5.0, max_retries=0)
    seen: list[float] = []
    policy.run(seen.append, what="test", deadline=Deadline(0.5))
    assert 0 < seen[0] <= 0.5


def test_async_attempts_are_cut_at_their_timeout_then_retried() -> None:
    policy = RetryPolicy(timeout=0.2, max_retries=1, backoff_base=0.001, backoff_max=0.01)
    calls: list[float] = []

    async def hangs(timeout: float) -> str:
        calls.append(timeout)
        await asyncio.sleep(60)
        return "never"

    started = time.monotonic()
    with pytest.raises(RerankTimeoutError, match=r"within 0\.2 s"):
        asyncio.run(policy.arun(hangs, what="test request", backend="t"))
    assert len(calls) == 2 and time.monotonic() - started < policy.total_budget + 1.0


def test_a_cancelled_call_stops_sleeping_before_its_retry() -> None:
    from memos_rerank_integrations._remote.deadline import Deadline

    policy = RetryPolicy(timeout=1.0, max_retries=1, backoff_base=4.0, backoff_max=5.0)
    deadline = Deadline(policy.total_budget)
    attempts = 0

    def fails(timeout: float) -> None:
        nonlocal attempts
        attempts += 1
        threading.Timer(0.2, deadline.cancel).start()
        raise BackendUnavailableError("down")

    started = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        policy.run(fails, what="test", deadline=deadline)
    assert attempts == 1 and time.monotonic() - started < 1.5  # not the 2-4 s backoff


def test_run_in_threads_returns_in_order_and_fails_fast() -> None:
    from memos_rerank_integrations._remote.deadline import Deadline, run_in_threads

    def task(value: int, pause: float) -> Any:
        def run() -> int:
            time.sleep(pause)
            if value < 0:
                raise AuthenticationError("no")
            return value

        return run

    deadline = Deadline(10.0)
    assert run_in_threads(
        [task(1, 0.1), task(2, 0.0), task(3, 0.05)],
        deadline=deadline,
        workers=2,
        expired=lambda: RerankTimeoutError("late"),
    ) == [1, 2, 3]
    assert deadline.cancelled  # whatever is left of a decided call is told to stop

    started = time.monotonic()
    with pytest.raises(AuthenticationError):
        run_in_threads(
            [task(1, 3.0), task(-1, 0.1), task(3, 3.0)],
            deadline=Deadline(10.0),
            workers=3,
            expired=lambda: RerankTimeoutError("late"),
        )
    assert time.monotonic() - started < 1.5  # not waiting for the 3 s siblings

    started = time.monotonic()
    with pytest.raises(RerankTimeoutError, match="late"):
        run_in_threads(
            [task(1, 3.0)],
            deadline=Deadline(0.3),
            workers=1,
            expired=lambda: RerankTimeoutError("late"),
        )
    assert time.monotonic() - started < 1.3


def test_own_clients_guard_every_transport_proxies_included(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memos_rerank_integrations._remote.deadline import DeadlineNetworkBackend, guard_sockets
    from memos_rerank_integrations._remote.http import HTTPClients

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    client = HTTPClients(1.0, None, None).sync()
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    assert len(transports) >= 2  # the proxy from the environment is still used
    for transport in transports:
        assert isinstance(transport._pool._network_backend, DeadlineNetworkBackend)  # type: ignore[attr-defined]
    assert guard_sockets(client)  # idempotent
    client.close()
