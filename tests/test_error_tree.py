"""One ``except RerankError`` covers every backend: hostile input and hostile answers
end as the documented error class, never as OverflowError, RecursionError,
UnicodeEncodeError or a tokenizer's TypeError."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memos_rerank_integrations import (
    AuthenticationError,
    CohereReranker,
    CrossEncoderReranker,
    EmbeddingReranker,
    FallbackReranker,
    HTTPReranker,
    InvalidInputError,
    LLMReranker,
    MalformedResponseError,
    MemOSReranker,
    QwenReranker,
    RerankError,
    ZeroEntropyReranker,
)
from memos_rerank_integrations.testing import build_tiny_cross_encoder, build_tiny_qwen_reranker

from .support.loopback import (
    MODES,
    LoopbackServer,
    Reply,
    cohere_results,
    exception_texts,
    invoke,
    loopback,
)

KEY = "sk-tree-SECRET-2718"
DOCS = ["doc 1", "doc 2", "doc 3"]
LONE = "\ud800"

REMOTE: dict[str, Callable[..., Any]] = {
    "http": lambda server, **kw: HTTPReranker(server.url, api_key=KEY, max_retries=0, **kw),
    "memos": lambda server, **kw: MemOSReranker(
        api_key=KEY, base_url=server.url, max_retries=0, **kw
    ),
    "zeroentropy": lambda server, **kw: ZeroEntropyReranker(
        api_key=KEY, base_url=server.url, max_retries=0, **kw
    ),
    "cohere": lambda server, **kw: CohereReranker(
        api_key=KEY, base_url=server.url, max_retries=0, **kw
    ),
}


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MEMOS_API_KEY",
        "CO_API_KEY",
        "COHERE_API_KEY",
        "ZERO_ENTROPY_API_KEY",
        "ZEROENTROPY_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- input that cannot be encoded


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(REMOTE))
def test_a_lone_surrogate_is_invalid_input_before_any_request(
    server: LoopbackServer, name: str, mode: str
) -> None:
    reranker = REMOTE[name](server)
    with pytest.raises(InvalidInputError, match=r"documents\[1\] contains a lone surrogate"):
        invoke(reranker, mode, "q", ["fine", f"bad {LONE} text", "fine"])
    with pytest.raises(InvalidInputError, match="The query contains a lone surrogate"):
        invoke(reranker, mode, f"q{LONE}", DOCS)
    assert server.requests == []


@pytest.fixture(scope="module")
def local_backends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    encoder = build_tiny_cross_encoder(tmp_path_factory.mktemp("tree-encoder"))
    qwen = build_tiny_qwen_reranker(tmp_path_factory.mktemp("tree-qwen"))
    return {
        "qwen": QwenReranker(qwen, device="cpu"),
        "cross-encoder": CrossEncoderReranker(encoder, device="cpu"),
        "embedding": EmbeddingReranker(str(encoder), device="cpu"),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["qwen", "cross-encoder", "embedding"])
def test_local_backends_say_which_document_cannot_be_encoded(
    local_backends: dict[str, Any], name: str, mode: str
) -> None:
    reranker = local_backends[name]
    assert len(invoke(reranker, mode, "q", ["ok", "fine"])) == 2  # the model works
    with pytest.raises(InvalidInputError, match=r"documents\[1\] contains a lone surrogate"):
        invoke(reranker, mode, "q", ["ok", f"x{LONE}"])
    with pytest.raises(InvalidInputError, match="The query contains a lone surrogate"):
        invoke(reranker, mode, f"{LONE}", ["ok"])


@pytest.mark.parametrize("mode", MODES)
def test_llm_and_fallback_chains_say_it_too(mode: str) -> None:
    from langchain_core.language_models import FakeListChatModel

    llm = LLMReranker(FakeListChatModel(responses=["3"] * 10), max_concurrency=1)
    chain = FallbackReranker([llm])
    for reranker in (llm, chain):
        with pytest.raises(InvalidInputError, match=r"documents\[0\] contains a lone surrogate"):
            invoke(reranker, mode, "q", [f"{LONE}"])
    with pytest.raises(InvalidInputError, match="instruction contains a lone surrogate"):
        LLMReranker(FakeListChatModel(responses=[]), instruction=LONE)


def test_text_options_with_a_lone_surrogate_are_rejected_at_construction(
    server: LoopbackServer,
) -> None:
    for make in REMOTE.values():
        with pytest.raises(InvalidInputError, match="model contains a lone surrogate"):
            make(server, model=f"m{LONE}")
    with pytest.raises(InvalidInputError, match="instruction contains a lone surrogate"):
        HTTPReranker(server.url, template="qwen3", instruction=LONE)


# ---------------------------------------------------------------- answers that cannot be read


def _results(index: str, score: str) -> str:
    items = [f'{{"index": {i}, "relevance_score": 0.5}}' for i in (0, 1)]
    items.append(f'{{"index": {index}, "relevance_score": {score}}}')
    return '{"results": [' + ", ".join(items) + "]}"


HOSTILE_ANSWERS: dict[str, str | bytes] = {
    "400-digit integer score": _results("2", "9" * 400),
    "5000-digit integer score": _results("2", "9" * 5000),
    "score 1e999": _results("2", "1e999"),
    "score -1e400": _results("2", "-1e400"),
    "400-digit index": _results("9" * 400, "0.5"),
    "float index": _results("2.0", "0.5"),
    "string score": _results("2", '"0.5"'),
    "nested 100,000 deep": '{"results": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "items that are not objects": '{"results": ["a", 1, null]}',
    "results not a list": '{"results": {"index": 0}}',
    "not UTF-8": b'{"results": "\xe9\xff"}',
}
# The SDK parses answers into pydantic models, which turn 2.0 into 2 and "0.5" into 0.5.
SDK_COERCES = {"float index", "string score"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("answer", list(HOSTILE_ANSWERS))
@pytest.mark.parametrize("name", list(REMOTE))
def test_an_unreadable_answer_is_malformed(
    server: LoopbackServer, name: str, answer: str, mode: str
) -> None:
    if name == "cohere" and answer in SDK_COERCES:
        pytest.skip("the Cohere SDK's model coerces this one into a valid answer")
    server.script(Reply(200, HOSTILE_ANSWERS[answer]))
    with pytest.raises(MalformedResponseError) as caught:
        invoke(REMOTE[name](server), mode, "q", DOCS)
    assert caught.value.backend == name
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize("name", list(REMOTE))
def test_huge_but_finite_scores_are_scores(server: LoopbackServer, name: str) -> None:
    server.script(Reply(200, _results("2", "1e308")))
    results = REMOTE[name](server).rerank("q", DOCS)
    assert results[0].index == 2 and results[0].score == 1e308
    assert all(type(r.score) is float and type(r.index) is int for r in results)


@pytest.mark.parametrize("name", list(REMOTE))
def test_a_server_message_with_lone_surrogates_is_printable(
    server: LoopbackServer, name: str
) -> None:
    server.script(Reply(500, '{"message": "broken \\ud800 here"}'))
    with pytest.raises(RerankError) as caught:
        REMOTE[name](server).rerank("q", DOCS)
    for text in exception_texts(caught.value):
        text.encode("utf-8")  # would raise UnicodeEncodeError when printed or logged


@pytest.mark.parametrize(
    "code, error",
    [
        ("1e999", MalformedResponseError),
        ("-1e999", MalformedResponseError),
        ("NaN", MalformedResponseError),
        ("true", MalformedResponseError),
        ("40132.5", MalformedResponseError),
        ('"1e3"', MalformedResponseError),
        ('"+-5"', MalformedResponseError),
        ("9" * 400, MalformedResponseError),
        ("[40132]", MalformedResponseError),
        ("40132.0", AuthenticationError),
        ('" 40132 "', AuthenticationError),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_memos_business_codes_that_are_not_integers(
    server: LoopbackServer, code: str, error: type[RerankError], mode: str
) -> None:
    server.script(Reply(200, f'{{"code": {code}, "message": "x"}}'))
    with pytest.raises(error):
        invoke(REMOTE["memos"](server), mode, "q", DOCS)


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key, problem",
    [
        ("sk-abc\ndef", "line break"),
        ("sk-abc\tdef", "control character"),
        ("sk-abc\x00def", "control character"),
        ("sk-abc\x7fdef", "control character"),
        ("sk-abc…", "non-ASCII"),
        ("“sk-abcdef”", "non-ASCII"),
        ("sk-abc\u00a0def", "non-ASCII"),
    ],
)
@pytest.mark.parametrize("name", list(REMOTE))
def test_a_key_no_header_can_carry_is_rejected_at_construction(
    server: LoopbackServer, name: str, key: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidInputError, match=problem) as caught:
        if name == "http":
            HTTPReranker(server.url, api_key=key)
        elif name == "memos":
            MemOSReranker(api_key=key, base_url=server.url)
        elif name == "zeroentropy" and "\x00" not in key:  # an environment has no NUL
            monkeypatch.setenv("ZERO_ENTROPY_API_KEY", key)  # from the environment too
            ZeroEntropyReranker(base_url=server.url)
        elif name == "zeroentropy":
            ZeroEntropyReranker(api_key=key, base_url=server.url)
        else:
            CohereReranker(api_key=key, base_url=server.url)
    for text in exception_texts(caught.value):
        assert key.strip() not in text and "abc" not in text
    assert server.requests == []


@pytest.mark.parametrize("name", list(REMOTE))
def test_keys_are_stripped_of_surrounding_whitespace(server: LoopbackServer, name: str) -> None:
    server.script(Reply(200, cohere_results(DOCS)))
    reranker: Any
    if name == "http":
        reranker = HTTPReranker(server.url, api_key=f"  {KEY}\n")
    elif name == "memos":
        reranker = MemOSReranker(api_key=f"\t{KEY} ", base_url=server.url)
    elif name == "zeroentropy":
        reranker = ZeroEntropyReranker(api_key=f"{KEY}\r\n", base_url=server.url)
    else:
        reranker = CohereReranker(api_key=f" {KEY} ", base_url=server.url)
    reranker.rerank("q", DOCS)
    assert server.requests[0].headers["Authorization"].split(" ", 1)[1] == KEY


# ---------------------------------------------------------------- LLM answers


UNREADABLE_ANSWERS = [
    '{"grade": 1e400}',
    '{"grade": ' + "9" * 400 + "}",
    '{"grade": ' + "9" * 5000 + "}",
    '{"grade": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "[" * 100_000,
    "1e400",
    "9" * 5000,
]
ANSWER_IDS = [
    "1e400",
    "400 digits",
    "5000 digits",
    "deep grade",
    "deep answer",
    "text 1e400",
    "long",
]


@pytest.mark.parametrize("answer", UNREADABLE_ANSWERS, ids=ANSWER_IDS)
def test_the_grade_parser_itself_never_raises(answer: str) -> None:
    from memos_rerank_integrations._llm.pointwise import parse_grade

    assert parse_grade(answer) is None


@pytest.mark.parametrize("answer", UNREADABLE_ANSWERS, ids=ANSWER_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_llm_answers_that_cannot_be_read_are_malformed(answer: str, mode: str) -> None:
    from langchain_core.language_models import FakeListChatModel

    llm = LLMReranker(FakeListChatModel(responses=[answer] * 4), max_retries=1, max_concurrency=1)
    with pytest.raises(MalformedResponseError):
        invoke(llm, mode, "q", ["only document"])


@pytest.mark.parametrize("logprob", [1000, 10**400, -(10**400), float("inf"), "x", True])
def test_llm_logprobs_out_of_range_keep_the_plain_grade(logprob: Any) -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    content = [
        {"token": "3", "logprob": logprob, "top_logprobs": [{"token": "3", "logprob": logprob}]}
    ]
    message = AIMessage(content="3", response_metadata={"logprobs": {"content": content}})
    llm = LLMReranker(GenericFakeChatModel(messages=iter([message])), max_concurrency=1)
    (result,) = llm.rerank("q", ["only document"])
    assert result.score == 0.75


def test_llm_answers_full_of_unclosed_tags_are_read_in_linear_time() -> None:
    from memos_rerank_integrations._llm.pointwise import parse_grade

    # A lazy regex rescans the rest of the answer for each unclosed tag: ~40 s here.
    started = time.monotonic()
    assert parse_grade("<think>" * 30_000 + " 3") == 3
    assert parse_grade("{" * 300_000 + " grade 2") == 2
    assert time.monotonic() - started < 5.0
    assert parse_grade('<THINKING>4</thinking> {"grade": 2}') == 2
    assert parse_grade("<think>1</think> <think>0</think> 3") == 3


# ---------------------------------------------------------------- anything at all

_EDGES = st.sampled_from([10**400, -(10**400), 2**63, 1e308, -0.0, math.inf, "\ud800", "0.5"])
_JSON = st.recursive(
    _EDGES
    | st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec=None, exclude_categories=[])),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["results", "index", "relevance_score", "code"]), children
        )
    ),
    max_leaves=12,
)
_RESULT = st.fixed_dictionaries(
    {
        "index": st.integers(0, 2) | _JSON,
        "relevance_score": _EDGES | st.floats(0, 1) | _JSON,
    }
)
_BODIES = (
    st.binary(max_size=64)
    | _JSON.map(lambda value: json.dumps(value))
    | st.lists(_RESULT, max_size=4).map(lambda items: json.dumps({"results": items}))
    | st.lists(_RESULT, max_size=4).map(
        lambda items: json.dumps({"code": 0, "data": {"results": items}})
    )
)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[LoopbackServer]:
    with loopback() as server:
        yield server


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=st.sampled_from([200, 200, 200, 400, 429, 500]), body=_BODIES)
@example(200, json.dumps({"results": [{"index": 0, "relevance_score": 10**400}]}))
@example(200, json.dumps({"code": 1e999}).replace("Infinity", "1e999"))
@example(500, '{"message": "\\ud800"}')
@pytest.mark.parametrize("name", ["memos", "cohere"])
def test_whatever_a_server_answers_only_rerank_errors_come_out(
    shared_server: LoopbackServer, name: str, status: int, body: Any
) -> None:
    shared_server.script(Reply(status, body))
    reranker = REMOTE[name](shared_server)
    try:
        results = reranker.rerank("q", DOCS)
    except RerankError:
        return
    assert all(type(r.index) is int and type(r.score) is float for r in results)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(_JSON, _JSON), max_size=4), top_n=st.none() | st.integers(1, 4))
def test_validate_ranking_raises_only_malformed_response_errors(pairs: Any, top_n: Any) -> None:
    from memos_rerank_integrations._types import validate_ranking

    try:
        scores = validate_ranking(pairs, n_documents=3, top_n_sent=top_n, backend="t")
    except MalformedResponseError as error:
        assert len(str(error)) < 300
        return
    assert all(type(i) is int and type(s) is float for i, s in scores.items())


@settings(max_examples=200, deadline=None)
@given(query=st.text(alphabet=st.characters(codec=None)), docs=st.lists(st.text(), max_size=3))
def test_check_inputs_raises_only_invalid_input_errors(query: str, docs: list[str]) -> None:
    from memos_rerank_integrations._types import check_inputs

    try:
        checked = check_inputs(query, docs)
    except InvalidInputError:
        return
    (query + "".join(checked)).encode("utf-8")  # what passes can be sent
