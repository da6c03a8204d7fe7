"""LLMListwiseReranker against real LangChain chat models and a real LlamaIndex LLM whose
answers are computed from the prompt (a hidden relevance per document), a Mem0 LLM
over a loopback OpenAI-compatible server, and hostile answers of every shape."""

from __future__ import annotations

import itertools
import math
import pickle
import re
import time
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from langchain_core.documents import Document
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage

from memos_rerank_integrations import (
    DEFAULT_THRESHOLDS,
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    LLMListwiseReranker,
    MalformedResponseError,
    RateLimitError,
    Reranker,
    RerankTimeoutError,
    StageThresholds,
    from_config,
)
from memos_rerank_integrations._llm.listwise import parse_permutation, window_spans
from memos_rerank_integrations.langchain import RerankCompressor

from ..support.loopback import LoopbackServer, Recorded, Reply
from .test_llm import SECRET, StatusError, both_frameworks, both_modes, raising, scripted

QUERY = "What are the user's hobbies?"
_PASSAGE = re.compile(r"^\[(\d+)\] doc (\d+)$", re.MULTILINE)


def relevance(doc: int) -> int:
    """A hidden relevance, distinct for every doc below 1009 and unrelated to its index."""
    return (doc * 7919) % 1009


def docs(count: int) -> list[str]:
    return [f"doc {i}" for i in range(count)]


def shown(prompt: str) -> list[int]:
    """The docs a prompt shows, in the order of their identifiers [1], [2], ..."""
    passages = _PASSAGE.findall(prompt)
    assert [int(number) for number, _ in passages] == list(range(1, len(passages) + 1))
    return [int(doc) for _, doc in passages]


def sorting(prompt: str) -> str:
    """The answer of a model that knows the hidden relevance: every passage, best first."""
    window = shown(prompt)
    ranked = sorted(range(len(window)), key=lambda p: -relevance(window[p]))
    return " > ".join(f"[{p + 1}]" for p in ranked)


def best_first(documents: list[int]) -> list[int]:
    return sorted(documents, key=lambda doc: -relevance(doc))


async def call(reranker: LLMListwiseReranker, mode: str, *args: Any, **kwargs: Any) -> Any:
    if mode == "async":
        return await reranker.arerank(*args, **kwargs)
    return reranker.rerank(*args, **kwargs)


def order_of(results: list[Any]) -> list[int]:
    return [r.index for r in results]


# ---------------------------------------------------------------- windows


@both_frameworks
@both_modes
async def test_fifty_documents_take_four_windows_back_to_front(framework: str, mode: str) -> None:
    llm = scripted(framework, sorting)
    results = await call(LLMListwiseReranker(llm, window=20, step=10), mode, QUERY, docs(50))
    prompts = llm.record.prompts
    assert len(prompts) == 4
    windows = [shown(prompt) for prompt in prompts]
    # The last 20 first, in input order; each next window holds the 10 documents before
    # it and the best 10 of the window before, carried forward.
    assert windows[0] == list(range(30, 50))
    assert windows[1] == list(range(20, 30)) + best_first(windows[0])[:10]
    assert windows[2] == list(range(10, 20)) + best_first(windows[1])[:10]
    assert windows[3] == list(range(0, 10)) + best_first(windows[2])[:10]
    order = order_of(results)
    assert sorted(order) == list(range(50))
    # The best window - step documents of the whole list reach the front, in order.
    assert order[:10] == best_first(list(range(50)))[:10]
    assert order[:20] == best_first(windows[3])


@pytest.mark.parametrize(
    ("count", "window", "step", "calls"),
    [
        (0, 20, 10, 0),
        (1, 20, 10, 0),  # nothing to order
        (2, 20, 10, 1),
        (20, 20, 10, 1),  # n <= window: one call
        (21, 20, 10, 2),  # window + 1: [1:21], [0:11]
        (50, 20, 10, 4),
        (100, 20, 10, 9),  # RankGPT's top 100
        (50, 20, 20, 3),  # step == window: disjoint blocks [30:50], [10:30], [0:10]
        (45, 20, 10, 4),  # the front window is short: [0:15]
        (7, 2, 1, 6),
    ],
)
def test_number_of_llm_calls(count: int, window: int, step: int, calls: int) -> None:
    llm = scripted("langchain", sorting)
    results = LLMListwiseReranker(llm, window=window, step=step).rerank(QUERY, docs(count))
    assert len(llm.record.prompts) == calls
    assert sorted(order_of(results)) == list(range(count))
    seen = {doc for prompt in llm.record.prompts for doc in shown(prompt)}
    assert seen == (set(range(count)) if count > 1 else set())


def test_a_block_of_one_document_is_not_sent() -> None:
    # step == window with 41 documents: blocks [21:41], [1:21] and [0:1]; the last holds
    # document 0 alone, which keeps its place in front of its neighbours' block.
    llm = scripted("langchain", sorting)
    results = LLMListwiseReranker(llm, window=20, step=20).rerank(QUERY, docs(41))
    assert [shown(prompt) for prompt in llm.record.prompts] == [
        list(range(21, 41)),
        list(range(1, 21)),
    ]
    assert order_of(results) == [
        0,
        *best_first(list(range(1, 21))),
        *best_first(list(range(21, 41))),
    ]


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(0, 400),
    window=st.integers(2, 60),
    step_fraction=st.floats(0, 1),
)
def test_window_spans_cover_the_list_back_to_front(
    count: int, window: int, step_fraction: float
) -> None:
    step = max(1, min(window, round(step_fraction * window)))
    spans = window_spans(count, window, step)
    if count <= 1:
        assert spans == []
        return
    formula = 1 if count <= window else 1 + math.ceil((count - window) / step)
    single = count > window and count - (formula - 1) * step == 1
    assert len(spans) == formula - single
    assert spans[0] == (max(0, count - window), count)
    assert spans[-1][0] == (1 if single else 0)
    for start, end in spans:
        assert 0 <= start < end <= count and 2 <= end - start <= window
    for (start, end), (next_start, next_end) in itertools.pairwise(spans):
        assert next_end == end - step and next_start == max(0, start - step)
    covered = set().union(*(range(start, end) for start, end in spans))
    assert covered == set(range(count)) - ({0} if single else set())


def test_a_hand_computed_order() -> None:
    # Relevance rises with the index. Window [2:5] sorts docs 2, 3, 4 -> 4, 3, 2: the
    # order is 0 1 4 3 2. Window [0:3] sorts 0, 1, 4 -> 4, 1, 0: the order is 4 1 0 3 2.
    def by_index(prompt: str) -> str:
        window = shown(prompt)
        return " > ".join(
            f"[{p + 1}]" for p in sorted(range(len(window)), key=lambda p: -window[p])
        )

    llm = scripted("langchain", by_index)
    results = LLMListwiseReranker(llm, window=3, step=2).rerank(QUERY, docs(5))
    assert [shown(prompt) for prompt in llm.record.prompts] == [[2, 3, 4], [0, 1, 4]]
    assert order_of(results) == [4, 1, 0, 3, 2]


@both_modes
async def test_a_list_within_one_window_is_sorted_exactly(mode: str) -> None:
    llm = scripted("llama_index", sorting)
    results = await call(LLMListwiseReranker(llm), mode, QUERY, docs(20))
    assert order_of(results) == best_first(list(range(20)))
    assert len(llm.record.prompts) == 1


# ---------------------------------------------------------------- scores


def test_scores_come_from_the_rank() -> None:
    llm = scripted("langchain", sorting)
    reranker = LLMListwiseReranker(llm, window=4, step=2)
    results = reranker.rerank(QUERY, docs(10))
    assert [r.score for r in results] == [(10 - rank) / 10 for rank in range(10)]
    assert all(a.score > b.score for a, b in itertools.pairwise(results))
    assert all(type(r.score) is float for r in results)
    assert [r.stage for r in results] == [DEFAULT_THRESHOLDS.stage(r.score) for r in results]
    top = LLMListwiseReranker(scripted("langchain", sorting), window=4, step=2).rerank(
        QUERY, docs(10), top_n=3
    )
    assert top == results[:3]
    custom = StageThresholds(0.1, 0.2, 0.3, 0.95)
    staged = LLMListwiseReranker(scripted("langchain", sorting), thresholds=custom)
    assert [r.stage for r in staged.rerank(QUERY, docs(5))] == [
        custom.stage(s) for s in (1.0, 0.8, 0.6, 0.4, 0.2)
    ]


@both_modes
async def test_no_or_one_document_never_calls_the_llm(mode: str) -> None:
    llm = scripted("langchain", sorting)
    reranker = LLMListwiseReranker(llm)
    assert await call(reranker, mode, QUERY, []) == []
    [only] = await call(reranker, mode, QUERY, ["doc 0"])
    assert (only.index, only.score) == (0, 1.0)
    assert llm.record.prompts == []


def test_duplicate_documents_each_keep_a_place() -> None:
    llm = FakeListChatModel(responses=["[3] > [1] > [2]"])
    results = LLMListwiseReranker(llm).rerank(QUERY, ["same", "same", "other"])
    assert order_of(results) == [2, 0, 1]


# ---------------------------------------------------------------- prompts and options


def test_prompt_numbers_the_passages_and_asks_for_an_order() -> None:
    reranker = LLMListwiseReranker(FakeListChatModel(responses=["[1]"]), instruction="Be picky.")
    prompt = reranker.build_prompt(QUERY, ["first memory", "second memory"])
    assert "Be picky." in prompt and QUERY in prompt
    assert "[1] first memory\n[2] second memory" in prompt
    assert "[2] > [1] > [3]" in prompt and "2 passages" in prompt


def test_long_documents_are_truncated() -> None:
    llm = scripted("langchain", lambda prompt: "[2] > [1]")
    long = "x" * 50
    LLMListwiseReranker(llm, max_document_chars=10).rerank(QUERY, [long, "short"])
    LLMListwiseReranker(llm, max_document_chars=None).rerank(QUERY, [long, "short"])
    truncated, whole = llm.record.prompts
    assert "[1] " + "x" * 10 + " [...]\n[2] short" in truncated and "x" * 11 not in truncated
    assert "[1] " + long + "\n" in whole


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 1, "step": 1}, "window must be an int >= 2"),
        ({"window": 0}, "window"),
        ({"window": True}, "window"),
        ({"window": 2.0}, "window"),
        ({"step": 0}, "step"),
        ({"step": 21}, "step must be at most window"),
        ({"window": 5, "step": 6}, "step must be at most window"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": False}, "max_retries"),
        ({"max_document_chars": 0}, "max_document_chars"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"instruction": " "}, "instruction"),
        ({"instruction": "\ud800"}, "surrogate"),
        ({"thresholds": [0.1, 0.2, 0.3, 0.4]}, "thresholds"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        LLMListwiseReranker(FakeListChatModel(responses=["[1]"]), **options)


def test_bad_llm_and_bad_inputs_fail_before_calling_the_llm() -> None:
    with pytest.raises(InvalidInputError, match="LangChain chat model"):
        LLMListwiseReranker(object())
    llm = scripted("langchain", sorting)
    reranker = LLMListwiseReranker(llm)
    for query, documents in [(1, ["a"]), ("q", "ab"), ("q", ["a", 2]), ("q", ["a", "\ud800"])]:
        with pytest.raises(InvalidInputError):
            reranker.rerank(query, documents)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="top_n"):
        reranker.rerank("q", ["a", "b"], top_n=0)
    assert llm.record.prompts == []


def test_is_a_reranker_and_repr_hides_the_model() -> None:
    reranker = LLMListwiseReranker(FakeListChatModel(responses=["[1]"]), window=8, step=4)
    assert isinstance(reranker, Reranker)
    assert repr(reranker) == (
        "LLMListwiseReranker(llm=FakeListChatModel, window=8, step=4, max_retries=1, timeout=None)"
    )


def test_string_llms_and_content_blocks_are_read() -> None:
    text_llm = FakeListLLM(responses=["[2] > [1]"])  # a LangChain LLM: invoke returns a str
    assert order_of(LLMListwiseReranker(text_llm).rerank(QUERY, ["a", "b"])) == [1, 0]
    blocks = AIMessage(
        content=[
            {"type": "reasoning", "reasoning": "[1] > [2] looks wrong"},
            {"type": "text", "text": "<think>maybe [1]</think>[2] > [1]"},
        ]
    )

    class BlockModel:
        def invoke(self, messages: object) -> AIMessage:
            return blocks

    assert order_of(LLMListwiseReranker(BlockModel()).rerank(QUERY, ["a", "b"])) == [1, 0]


# ---------------------------------------------------------------- malformed answers

# (answer, the order of 5 passages it gives (0-based), or None: it names no passage)
MALFORMED = [
    ("[2] > [1] > [3] > [5] > [4]", [1, 0, 2, 4, 3]),
    ("[2] > [2] > [1] > [2]", [1, 0, 2, 3, 4]),  # repeats
    ("[7] > [3] > [6]", [2, 0, 1, 3, 4]),  # out of range
    ("[0] > [4]", [3, 0, 1, 2, 4]),  # zero
    ("[-1] > [5] > [-3]", [4, 0, 1, 2, 3]),  # negative
    ("-1 > -2 > -5", None),  # only negative numbers
    ("I cannot rank these passages.", None),  # non-numeric
    ("", None),  # empty
    ("   \n\t", None),
    ("[] > [ ] > [x]", None),
    ("Sure! Ranking: [3] > [1] > [2] > [5] > [4]. Passage 9 is spam.", [2, 0, 1, 4, 3]),
    ("5 > 4 > 3 > 2 > 1", [4, 3, 2, 1, 0]),  # no brackets: bare numbers
    ("[1, 5, 2]", [0, 4, 1, 2, 3]),  # a JSON list
    ("Answer: 1. [4]  2. [2]", [3, 1, 0, 2, 4]),  # list numbering ignored when [n] exist
    ("[99999999999999999999999999999] > [2]", [1, 0, 2, 3, 4]),  # huge
    ("[" + "9" * 5000 + "] > [3]", [2, 0, 1, 3, 4]),  # beyond int()'s 4,300 digits
    ("[" + "0" * 5000 + "4] > [3]", [3, 2, 0, 1, 4]),  # leading zeros
    (" > ".join(f"[{i % 9}]" for i in range(5000, 0, -1)), [4, 3, 2, 1, 0]),  # thousands
    ("[٣] > [１] > [５]", [2, 0, 4, 1, 3]),  # Arabic-Indic and full-width digits
    ("[²] > [½]", None),  # digit-like characters that are not decimal digits
    ("[3.5] > [2]", [1, 0, 2, 3, 4]),
    ("[[4]] > [1", [3, 0, 1, 2, 4]),
    ("<think>[5] > [4] > [3]</think>\n[1] > [2]", [0, 1, 2, 3, 4]),  # reasoning skipped
    ("<think>unfinished [4] > [5]", [3, 4, 0, 1, 2]),  # no closing tag: all of it is read
    ('{"ranking": [3, 1]}', [2, 0, 1, 3, 4]),
    ("[1]" * 1000 + "[2]", [0, 1, 2, 3, 4]),
    ("\x00[5]\ufeff>\u200b[4]", [4, 3, 0, 1, 2]),
]


@pytest.mark.parametrize(("answer", "expected"), MALFORMED)
def test_malformed_answers_give_a_complete_order_or_an_error(
    answer: str, expected: list[int] | None
) -> None:
    assert parse_permutation(answer, 5) == expected
    llm = scripted("langchain", lambda prompt: answer)
    reranker = LLMListwiseReranker(llm, max_retries=0)
    if expected is None:
        with pytest.raises(MalformedResponseError, match="named no passage"):
            reranker.rerank(QUERY, docs(5))
    else:
        assert order_of(reranker.rerank(QUERY, docs(5))) == expected


_ANSWER_TEXT = st.lists(
    st.sampled_from([*"0123456789[]>- ,.x\n٣３²", "</think>", "[1]", "[12]", "[-2]"]),
    max_size=60,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(answer=_ANSWER_TEXT, count=st.integers(1, 30))
@example(answer="[1] > [1] > [0] > [31]", count=3)
def test_any_answer_parses_to_a_permutation_or_none(answer: str, count: int) -> None:
    order = parse_permutation(answer, count)
    if order is not None:
        assert sorted(order) == list(range(count))


@settings(max_examples=300, deadline=None)
@given(numbers=st.lists(st.integers(-5, 40), max_size=60), count=st.integers(1, 30))
def test_bracketed_identifiers_are_read_in_order(numbers: list[int], count: int) -> None:
    named = list(dict.fromkeys(n - 1 for n in numbers if 1 <= n <= count))
    expected = named + [p for p in range(count) if p not in named] if named else None
    assert parse_permutation(" > ".join(f"[{n}]" for n in numbers), count) == expected


@settings(max_examples=60, deadline=None)
@given(
    answers=st.lists(_ANSWER_TEXT, min_size=1, max_size=12),
    count=st.integers(0, 40),
    window=st.integers(2, 12),
    max_retries=st.integers(0, 2),
)
def test_any_answers_rank_every_document_once_or_raise(
    answers: list[str], count: int, window: int, max_retries: int
) -> None:
    replies = itertools.cycle(answers)
    llm = scripted("langchain", lambda prompt: next(replies))
    step = max(1, window // 2)
    reranker = LLMListwiseReranker(llm, window=window, step=step, max_retries=max_retries)
    try:
        results = reranker.rerank(QUERY, docs(count))
    except MalformedResponseError:
        return
    assert sorted(order_of(results)) == list(range(count))
    assert len({r.score for r in results}) == count


@pytest.mark.parametrize(
    "answer",
    [
        "[" + "1" * 1_000_000,
        "[" + " " * 1_000_000,
        "[" * 1_000_000,
        ("[ " + " " * 1000) * 1000,
        "-1" * 500_000,
        "</think>" * 100_000,
        " ".join("7" for _ in range(500_000)),
        "[1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 x",
    ],
)
def test_hostile_answers_are_read_in_linear_time(answer: str) -> None:
    started = time.perf_counter()
    order = parse_permutation(answer, 20)
    assert time.perf_counter() - started < 2.0
    assert order is None or sorted(order) == list(range(20))


# ---------------------------------------------------------------- retries


@both_frameworks
@both_modes
async def test_an_answer_naming_no_passage_is_asked_again(framework: str, mode: str) -> None:
    replies = iter(["I'd rather not.", "[2] > [1]"])
    llm = scripted(framework, lambda prompt: next(replies))
    results = await call(LLMListwiseReranker(llm), mode, QUERY, ["a", "b"])
    assert order_of(results) == [1, 0]
    first, second = llm.record.prompts
    assert "named no passage" not in first and "named no passage" in second


@both_modes
async def test_retries_exhausted_raise_malformed(mode: str) -> None:
    llm = scripted("langchain", lambda prompt: "no idea")
    reranker = LLMListwiseReranker(llm, max_retries=2, window=4, step=2)
    with pytest.raises(MalformedResponseError, match=r"window 1 of 3 .*3 attempt") as caught:
        await call(reranker, mode, QUERY, docs(8))
    assert caught.value.backend == "llm:ScriptedChatModel"
    assert len(llm.record.prompts) == 3


# ---------------------------------------------------------------- errors and deadline


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(f"timed out with key {SECRET}"), RerankTimeoutError),
        (StatusError(f"rate limited for {SECRET}", 429), RateLimitError),
        (StatusError(f"Incorrect API key provided: {SECRET}", 401), AuthenticationError),
        (RuntimeError(f"connection refused, key={SECRET}"), BackendUnavailableError),
    ],
)
@both_frameworks
@both_modes
@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_llm_errors_map_to_the_error_tree_without_secrets(
    exc: Exception, expected: type[Exception], framework: str, mode: str, timeout: float | None
) -> None:
    llm = scripted(framework, raising(exc))
    with pytest.raises(expected) as caught:
        await call(LLMListwiseReranker(llm, timeout=timeout), mode, QUERY, ["a", "b", "c"])
    assert caught.value.__cause__ is exc
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)


@both_frameworks
@both_modes
async def test_timeout_ends_a_hanging_call(framework: str, mode: str) -> None:
    llm = scripted(framework, sorting, delay=5.0)
    started = time.monotonic()
    with pytest.raises(RerankTimeoutError, match=r"timeout of 0\.3 s"):
        await call(LLMListwiseReranker(llm, timeout=0.3), mode, QUERY, docs(3))
    assert time.monotonic() - started < 2.5


@both_modes
async def test_timeout_bounds_all_windows_together(mode: str) -> None:
    # Each window answers well within the timeout; the four of them do not.
    slow = scripted("langchain", sorting, delay=0.25)
    with pytest.raises(RerankTimeoutError):
        await call(LLMListwiseReranker(slow, timeout=0.6), mode, QUERY, docs(50))
    assert len(slow.record.prompts) < 4
    patient = scripted("langchain", sorting, delay=0.25)
    results = await call(LLMListwiseReranker(patient, timeout=20), mode, QUERY, docs(50))
    assert len(patient.record.prompts) == 4 and len(results) == 50


# ---------------------------------------------------------------- config, pickling


def openai_ranking(request: Recorded) -> Reply:
    """An OpenAI-compatible /chat/completions that ranks the passages it is shown."""
    user = request.body["messages"][-1]["content"]
    return Reply(
        200,
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": request.body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": sorting(user)},
                    "finish_reason": "stop",
                }
            ],
        },
    )


def test_from_config_with_a_mem0_llm(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script(*[openai_ranking] * 8)
    llm = {
        "provider": "openai",
        "config": {"model": "gpt-test", "api_key": SECRET, "openai_base_url": server.url + "/v1"},
    }
    config = {"provider": "llm_listwise", "config": {"llm": llm, "window": 20, "step": 10}}
    backend = from_config(config)
    assert isinstance(backend, LLMListwiseReranker)
    order = order_of(backend.rerank(QUERY, docs(50)))
    assert len(server.requests) == 4
    assert order[:10] == best_first(list(range(50)))[:10]
    saved = backend.to_config()
    assert SECRET not in repr(saved)
    assert saved == {
        "provider": "llm_listwise",
        "config": {
            "llm": {
                "provider": "openai",
                "config": {"model": "gpt-test", "openai_base_url": server.url + "/v1"},
            },
            "window": 20,
            "step": 10,
        },
    }
    # The explicit key travels in the pickle (a trusted-process format), so the worker
    # uses it even where its environment has another.
    monkeypatch.setenv("OPENAI_API_KEY", "worker-key")
    copy = pickle.loads(pickle.dumps(backend))
    assert isinstance(copy, LLMListwiseReranker) and (copy.window, copy.step) == (20, 10)
    assert SECRET not in repr(copy)
    assert order_of(copy.rerank(QUERY, docs(50))) == order
    assert len(server.requests) == 8
    headers = {k.lower(): v for k, v in server.requests[-1].headers.items()}
    assert headers["authorization"] == f"Bearer {SECRET}"


def test_an_llm_object_is_passed_as_an_option() -> None:
    backend = from_config(
        {"provider": "llm_listwise", "config": {"window": 3, "step": 1}},
        llm=FakeListChatModel(responses=["[2] > [1]"]),
    )
    assert isinstance(backend, LLMListwiseReranker) and (backend.window, backend.step) == (3, 1)
    assert order_of(backend.rerank(QUERY, ["a", "b"])) == [1, 0]
    with pytest.raises(TypeError, match="your own LLM object"):
        backend.to_config()
    with pytest.raises(InvalidInputError, match="step must be at most window"):
        from_config({"provider": "llm_listwise", "config": {"window": 3, "step": 4}}, llm=backend)


# ---------------------------------------------------------------- LangChain adapter


@both_modes
async def test_inside_the_langchain_compressor(mode: str) -> None:
    llm = scripted("langchain", sorting)
    compressor = RerankCompressor(reranker=LLMListwiseReranker(llm, window=4, step=2), top_n=3)
    documents = [Document(page_content=text, metadata={"n": i}) for i, text in enumerate(docs(9))]
    if mode == "async":
        kept = await compressor.acompress_documents(documents, QUERY)
    else:
        kept = compressor.compress_documents(documents, QUERY)
    # 9 documents, windows of 4 moving by 2: the best 2 reach the front.
    assert [d.metadata["n"] for d in kept][:2] == best_first(list(range(9)))[:2]
    assert [d.metadata["relevance_score"] for d in kept] == [1.0, 8 / 9, 7 / 9]
    assert len(llm.record.prompts) == 4
    assert "relevance_score" not in documents[0].metadata


def test_compressor_falls_back_on_answers_naming_no_passage() -> None:
    llm = scripted("langchain", lambda prompt: "I refuse.")
    documents = [Document(page_content=text) for text in docs(3)]
    reranker = LLMListwiseReranker(llm, max_retries=0)
    kept = RerankCompressor(reranker=reranker).compress_documents(documents, QUERY)
    assert [d.page_content for d in kept] == docs(3)
    assert all(d.metadata["rerank_fallback"] is True for d in kept)
    with pytest.raises(MalformedResponseError):
        RerankCompressor(reranker=reranker, fallback=False).compress_documents(documents, QUERY)
