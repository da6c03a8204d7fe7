"""LLMReranker against real LangChain chat models and a real LlamaIndex LLM with
scripted answers (chosen from the prompt, so concurrency cannot reorder them)."""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    GenericFakeChatModel,
    ParrotFakeChatModel,
)
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from llama_index.core.llms import (
    CompletionResponse,
    CompletionResponseGen,
    CustomLLM,
    LLMMetadata,
)
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from pydantic import PrivateAttr

from memos_rerank_integrations import (
    DEFAULT_THRESHOLDS,
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    LLMReranker,
    MalformedResponseError,
    RateLimitError,
    Reranker,
    RerankTimeoutError,
    Stage,
)
from memos_rerank_integrations._llm.pointwise import parse_grade, parse_score
from memos_rerank_integrations.langchain import RerankCompressor
from memos_rerank_integrations.llama_index import RerankPostprocessor

from ..support.linear import assert_linear, repeated
from ..support.loopback import LoopbackServer, Recorded, Reply

QUERY = "What are the user's hobbies?"
# Grades a careful grader might give the MemOS example memories.
GRADES = {
    "User likes playing badminton.": "4",
    "User is a backend developer in Hangzhou.": "1",
    "User prefers concise replies.": "0",
    "User prefers Jiangxiang-flavored baijiu.": "2",
    "User is going on a business trip to Beijing next Wednesday.": "3",
}
DOCS = list(GRADES)
_DOCUMENT = re.compile(r"<document>\n(.*?)\n</document>", re.DOTALL)
REMINDER = "could not be read"


def document_of(prompt: str) -> str:
    match = _DOCUMENT.search(prompt)
    assert match is not None, prompt
    return match.group(1)


def by_document(answers: dict[str, str]) -> Callable[[str], str]:
    return lambda prompt: answers[document_of(prompt)]


class _Recorder:
    """Counts calls and the largest number of calls in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompts: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def enter(self, prompt: str) -> None:
        with self.lock:
            self.prompts.append(prompt)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


class ScriptedChatModel(BaseChatModel):
    """A LangChain chat model whose answer is a function of the prompt."""

    answer: Callable[[str], str]
    delay: float = 0.0
    _record: _Recorder = PrivateAttr(default_factory=_Recorder)

    @property
    def _llm_type(self) -> str:
        return "scripted-chat-model"

    @property
    def record(self) -> _Recorder:
        return self._record

    def _reply(self, messages: list[BaseMessage]) -> ChatResult:
        text = self.answer("\n\n".join(str(message.content) for message in messages))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._record.enter("\n\n".join(str(message.content) for message in messages))
        try:
            time.sleep(self.delay)
            return self._reply(messages)
        finally:
            self._record.leave()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._record.enter("\n\n".join(str(message.content) for message in messages))
        try:
            await asyncio.sleep(self.delay)
            return self._reply(messages)
        finally:
            self._record.leave()


class ScriptedLlamaLLM(CustomLLM):
    """A LlamaIndex LLM whose completion is a function of the prompt, with a real
    async path (CustomLLM's default acomplete would block the event loop)."""

    answer: Callable[[str], str]
    delay: float = 0.0
    _record: _Recorder = PrivateAttr(default_factory=_Recorder)

    @property
    def record(self) -> _Recorder:
        return self._record

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="scripted")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._record.enter(prompt)
        try:
            time.sleep(self.delay)
            return CompletionResponse(text=self.answer(prompt))
        finally:
            self._record.leave()

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        self._record.enter(prompt)
        try:
            await asyncio.sleep(self.delay)
            return CompletionResponse(text=self.answer(prompt))
        finally:
            self._record.leave()

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        text = self.answer(prompt)
        yield CompletionResponse(text=text, delta=text)


FRAMEWORKS = {"langchain": ScriptedChatModel, "llama_index": ScriptedLlamaLLM}


def scripted(framework: str, answer: Callable[[str], str], delay: float = 0.0) -> Any:
    return FRAMEWORKS[framework](answer=answer, delay=delay)


async def call(reranker: LLMReranker, mode: str, *args: Any, **kwargs: Any) -> Any:
    if mode == "async":
        return await reranker.arerank(*args, **kwargs)
    return reranker.rerank(*args, **kwargs)


both_frameworks = pytest.mark.parametrize("framework", list(FRAMEWORKS))
both_modes = pytest.mark.parametrize("mode", ["sync", "async"])


# ---------------------------------------------------------------- ranking


@both_frameworks
@both_modes
async def test_ranks_by_scripted_grades(framework: str, mode: str) -> None:
    llm = scripted(framework, by_document(GRADES))
    results = await call(LLMReranker(llm), mode, QUERY, DOCS)

    assert [DOCS[r.index] for r in results] == [
        "User likes playing badminton.",
        "User is going on a business trip to Beijing next Wednesday.",
        "User prefers Jiangxiang-flavored baijiu.",
        "User is a backend developer in Hangzhou.",
        "User prefers concise replies.",
    ]
    assert [r.score for r in results] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert all(type(r.score) is float for r in results)
    assert [r.stage for r in results] == [
        Stage.HIGHLY_RELEVANT,
        Stage.RELEVANT,
        Stage.PARTIAL,
        Stage.WEAK,
        Stage.IRRELEVANT,
    ]
    assert len(llm.record.prompts) == len(DOCS)


def test_every_grade_lands_on_its_stage_with_default_thresholds() -> None:
    for grade in range(5):
        assert DEFAULT_THRESHOLDS.stage(grade / 4) is Stage(grade)
        llm = FakeListChatModel(responses=[str(grade)])
        [result] = LLMReranker(llm).rerank("q", ["d"])
        assert (result.score, result.stage) == (grade / 4, Stage(grade))


@both_modes
async def test_top_n_and_ties_keep_input_order(mode: str) -> None:
    answers = {"a": "2", "b": "4", "c": "2", "d": "4", "e": "0"}
    llm = scripted("langchain", by_document(answers))
    results = await call(LLMReranker(llm), mode, "q", list(answers), top_n=3)
    assert [r.index for r in results] == [1, 3, 0]


@both_frameworks
@both_modes
async def test_empty_documents_never_call_the_llm(framework: str, mode: str) -> None:
    def fail(prompt: str) -> str:
        raise AssertionError("the LLM must not be called")

    llm = scripted(framework, fail)
    assert await call(LLMReranker(llm), mode, "q", []) == []
    assert llm.record.prompts == []


def test_duplicate_documents_each_get_a_result() -> None:
    llm = scripted("langchain", by_document({"same": "3", "other": "1"}))
    results = LLMReranker(llm).rerank("q", ["same", "other", "same"])
    assert sorted(r.index for r in results) == [0, 1, 2]
    assert [r.index for r in results] == [0, 2, 1]


# ---------------------------------------------------------------- prompt


@both_frameworks
def test_prompt_has_query_document_instruction_and_stages(framework: str) -> None:
    llm = scripted(framework, lambda prompt: "2")
    LLMReranker(llm, instruction="Prefer memories about leisure.").rerank(QUERY, [DOCS[0]])
    [prompt] = llm.record.prompts
    assert QUERY in prompt
    assert f"<document>\n{DOCS[0]}\n</document>" in prompt
    assert "Prefer memories about leisure." in prompt
    for line in (
        "0 = irrelevant",
        "1 = weak",
        "2 = partial",
        "3 = relevant",
        "4 = highly relevant",
    ):
        assert line in prompt
    assert LLMReranker(llm).build_prompt(QUERY, DOCS[0]).count("= ") == 5


def test_langchain_gets_the_instructions_as_a_system_message() -> None:
    # The parrot answers with the last message it got: the user part alone.
    with pytest.raises(MalformedResponseError) as caught:
        LLMReranker(ParrotFakeChatModel(), max_retries=0).rerank("which grade?", ["a doc"])
    assert "got '<query>\\nwhich grade?\\n</query>\\n<document>\\na doc" in str(caught.value)
    assert "You grade" not in str(caught.value)


def test_long_documents_are_truncated() -> None:
    llm = scripted("langchain", lambda prompt: "3")
    document = "A" * 60 + "B" * 500
    LLMReranker(llm, max_document_chars=60).rerank("q", [document, "short"])
    documents = sorted((document_of(p) for p in llm.record.prompts), key=len)
    assert documents == ["short", "A" * 60 + " [...]"]

    untouched = scripted("langchain", lambda prompt: "3")
    LLMReranker(untouched, max_document_chars=None).rerank("q", [document])
    assert document_of(untouched.record.prompts[0]) == document


# ---------------------------------------------------------------- messy answers

READABLE = [
    ("3", 3),
    ("  2\n", 2),
    ("I would rate this a 3 because it answers the question.", 3),
    ("The answer is 1.", 1),
    ("Highly relevant", 4),
    ("HIGHLY_RELEVANT", 4),
    ("Relevant", 3),
    ("Partially relevant", 2),
    ("weak", 1),
    ("Irrelevant.", 0),
    ("Not relevant at all", 0),
    ("**3**", 3),
    ("Grade: 3/4", 3),
    ("Grade: **4**/4", 4),
    ("Grade (0-4): 1", 1),
    ("2 out of 4", 2),
    ("```\n4\n```", 4),
    ('```json\n{"grade": 2}\n```', 2),
    ('{"grade": 2}', 2),
    ('{"Grade": 1, "reason": "mentions 3 of the 4 facts"}', 1),
    ('{"grade": "relevant"}', 3),
    ("3 (relevant)", 3),
    ("4 - highly relevant", 4),
    ("<think>Maybe 2, maybe 4.</think>\n3", 3),
    ("3\n\nGrade: 3", 3),
]

UNREADABLE = [
    "",
    "I'm sorry, but I can't help with that.",
    "As an AI language model I cannot judge relevance.",
    "asdf qwerty",
    "2 or 3",
    "3 - highly relevant",
    "Grade: 2. Actually, 4.",
    "5",
    "-1",
    "Grade: 7/10",
    "2.5",
    '{"grade": 5}',
    '{"answer": 3}',
    '{"grade": true}',
    "NaN",
    # Grades above 4 written as text, not as a JSON number.
    "Grade: 5",
    '{"grade": "5"}',
    "I would give it a 5.",
    "6 - highly relevant",
    # Mem0's scale: one score, or none.
    "0.8, maybe 0.9",
    "Score: 1.5",
    '{"score": 1.2}',
]

# Mem0's LLM reranker asks for a score from 0.0 to 1.0; such a score, written with a
# decimal point, is read as the score itself.
MEM0_SCALE = [
    ("0.8", 0.8),
    ("Score: 0.35", 0.35),
    ("1.0", 1.0),
    ("0.0", 0.0),
    ('{"score": 0.6}', 0.6),
    ("On a scale from 0.0 to 1.0, this is 0.9.", 0.9),
    ("3 (0.75)", 0.75),  # a grade and the same score agree
]


@pytest.mark.parametrize(("answer", "grade"), READABLE)
def test_messy_but_readable_answers(answer: str, grade: int) -> None:
    llm = FakeListChatModel(responses=[answer])
    [result] = LLMReranker(llm, max_retries=0).rerank("q", ["d"])
    assert result.score == grade / 4
    assert result.stage is Stage(grade)


@pytest.mark.parametrize(("answer", "score"), MEM0_SCALE)
def test_scores_on_mem0s_scale_are_read_as_they_are(answer: str, score: float) -> None:
    llm = FakeListChatModel(responses=[answer])
    [result] = LLMReranker(llm, max_retries=0).rerank("q", ["d"])
    assert result.score == score
    assert result.stage is DEFAULT_THRESHOLDS.stage(score)


def test_whole_numbers_stay_grades() -> None:
    llm = FakeListChatModel(responses=["1", "Grade: 1", "2.0", "Grade: 2.0"])
    results = LLMReranker(llm, max_retries=0, max_concurrency=1).rerank("q", list("abcd"))
    assert [(r.index, r.score) for r in results] == [(2, 0.5), (3, 0.5), (0, 0.25), (1, 0.25)]


@pytest.mark.parametrize("answer", UNREADABLE)
def test_unreadable_answers_are_errors_not_default_scores(answer: str) -> None:
    llm = FakeListChatModel(responses=[answer])
    with pytest.raises(MalformedResponseError, match="no readable grade"):
        LLMReranker(llm, max_retries=0).rerank("q", ["d"])


def test_content_blocks_are_read_and_reasoning_skipped() -> None:
    message = AIMessage(
        content=[
            {"type": "reasoning", "reasoning": "It could be a 4."},
            {"type": "text", "text": "Grade: "},
            {"type": "text", "text": "2"},
        ]
    )
    llm = GenericFakeChatModel(messages=iter([message]))
    [result] = LLMReranker(llm).rerank("q", ["d"])
    assert result.score == 0.5


def test_string_llms_and_minimal_duck_typed_models_work() -> None:
    [result] = LLMReranker(FakeListLLM(responses=["4"])).rerank("q", ["d"])
    assert result.score == 1.0

    class Minimal:
        def invoke(self, messages: list[tuple[str, str]]) -> str:
            roles = [role for role, _ in messages]
            assert roles == ["system", "human"]
            return "relevant" if "badminton" in messages[1][1] else "irrelevant"

    results = LLMReranker(Minimal(), max_concurrency=2).rerank(QUERY, DOCS[:3])
    assert [(r.index, r.score) for r in results] == [(0, 0.75), (1, 0.0), (2, 0.0)]


# ---------------------------------------------------------------- reading time


def test_a_40000_space_answer_is_read_in_linear_time() -> None:
    # A pattern that began with a run of whitespace was retried from each space:
    # about a minute of CPU for this answer.
    started = time.thread_time()
    assert parse_grade("3" + " " * 40_000 + ".") == 3
    assert parse_grade("Grade:" + " " * 40_000 + "2 /" + " " * 40_000 + "4") == 2
    assert time.thread_time() - started < 2.0


def test_a_json_answer_of_a_million_objects_is_not_built() -> None:
    import tracemalloc

    answer = "[" + "{}," * 1_000_000 + "{}]"  # parsed: a million dicts, some 60 MB
    tracemalloc.start()
    try:
        assert parse_score(answer) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(answer), f"{peak / len(answer):.1f} times the answer's size"


_ANSWER_PIECES = st.sampled_from(
    [" ", "\t", "\n", "0", "1", "3", "4", "9", ".", "-", "/", "out of", "to", "{", "}", "[", "]"]
)
_MORE_ANSWER_PIECES = st.sampled_from(
    ['"', "\\", ":", "<think>", "</think>", "```", "relevant", "highly", "not", "a", "_", "é"]
)


@settings(max_examples=40, deadline=None)
@given(unit=st.lists(_ANSWER_PIECES | _MORE_ANSWER_PIECES, min_size=1, max_size=6).map("".join))
@example(unit=" ")
@example(unit="0 ")
@example(unit="<think>")
@example(unit="{")
def test_reading_an_answer_takes_linear_time(unit: str) -> None:
    assert_linear(parse_score, lambda n: "3" + repeated(unit, n) + ".", 2_000)


# ---------------------------------------------------------------- retries


@both_frameworks
@both_modes
async def test_unreadable_answer_is_asked_again_then_succeeds(framework: str, mode: str) -> None:
    def answer(prompt: str) -> str:
        if document_of(prompt) == "fine":
            return "4"
        return "2" if REMINDER in prompt else "Hmm, hard to say."

    llm = scripted(framework, answer)
    results = await call(LLMReranker(llm, max_retries=1), mode, "q", ["fine", "tricky"])
    assert [(r.index, r.score) for r in results] == [(0, 1.0), (1, 0.5)]
    # Only the unreadable one is asked again, with a reminder.
    asked = [(document_of(p), REMINDER in p) for p in llm.record.prompts]
    assert sorted(asked) == [("fine", False), ("tricky", False), ("tricky", True)]


def test_retry_with_a_list_fake_model() -> None:
    llm = FakeListChatModel(responses=["I cannot judge this.", "**3**"])
    [result] = LLMReranker(llm, max_retries=1).rerank("q", ["d"])
    assert result.score == 0.75


@both_frameworks
@both_modes
async def test_retries_exhausted_raise_malformed(framework: str, mode: str) -> None:
    llm = scripted(framework, by_document({"good": "3", "bad": "no idea"}))
    with pytest.raises(MalformedResponseError) as caught:
        await call(LLMReranker(llm, max_retries=2), mode, "q", ["good", "bad"])
    assert "document(s) [1]" in str(caught.value)
    assert "'no idea'" in str(caught.value)
    assert [document_of(p) for p in llm.record.prompts].count("bad") == 3
    assert [document_of(p) for p in llm.record.prompts].count("good") == 1


def test_no_retries_means_one_call() -> None:
    llm = scripted("langchain", lambda prompt: "???")
    with pytest.raises(MalformedResponseError):
        LLMReranker(llm, max_retries=0).rerank("q", ["d"])
    assert len(llm.record.prompts) == 1


# ---------------------------------------------------------------- concurrency


@both_frameworks
@both_modes
async def test_concurrency_is_bounded_and_used(framework: str, mode: str) -> None:
    documents = [f"memory {i}" for i in range(12)]
    llm = scripted(framework, lambda prompt: str(int(document_of(prompt).split()[1]) % 5), 0.03)
    results = await call(LLMReranker(llm, max_concurrency=3), mode, "q", documents)
    assert len(results) == 12
    assert {r.index for r in results} == set(range(12))
    assert 2 <= llm.record.max_in_flight <= 3


@both_modes
async def test_max_concurrency_one_is_sequential(mode: str) -> None:
    llm = scripted("langchain", lambda prompt: "1", 0.01)
    await call(LLMReranker(llm, max_concurrency=1), mode, "q", ["a", "b", "c"])
    assert llm.record.max_in_flight == 1


# ---------------------------------------------------------------- errors


class StatusError(Exception):
    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


SECRET = "sk-live-abcdef123456"


def raising(exc: Exception) -> Callable[[str], str]:
    def answer(prompt: str) -> str:
        raise exc

    return answer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(f"timed out with key {SECRET}"), RerankTimeoutError),
        (httpx.ReadTimeout(f"read timeout {SECRET}"), RerankTimeoutError),
        (StatusError(f"rate limited for {SECRET}", 429), RateLimitError),
        (StatusError(f"Incorrect API key provided: {SECRET}", 401), AuthenticationError),
        (StatusError(f"server error {SECRET}", 503), BackendUnavailableError),
        (RuntimeError(f"connection refused, key={SECRET}"), BackendUnavailableError),
    ],
)
@both_frameworks
@both_modes
async def test_llm_errors_map_to_the_error_tree_without_secrets(
    exc: Exception, expected: type[Exception], framework: str, mode: str
) -> None:
    llm = scripted(framework, raising(exc))
    with pytest.raises(expected) as caught:
        await call(LLMReranker(llm), mode, "q", ["a", "b", "c"])
    assert caught.value.__cause__ is exc
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    assert type(exc).__name__ in str(caught.value)


def test_timeout_wrapped_by_a_client_error_is_still_a_timeout() -> None:
    class APITimeoutError(Exception):
        pass

    def answer(prompt: str) -> str:
        try:
            raise httpx.ConnectTimeout("connect timeout")
        except httpx.ConnectTimeout as inner:
            raise APITimeoutError("Request timed out.") from inner

    with pytest.raises(RerankTimeoutError):
        LLMReranker(scripted("langchain", answer)).rerank("q", ["a"])


@both_modes
async def test_one_failing_document_fails_the_whole_call(mode: str) -> None:
    def answer(prompt: str) -> str:
        if document_of(prompt) == "boom":
            raise RuntimeError("provider exploded")
        return "3"

    llm = scripted("langchain", answer)
    with pytest.raises(BackendUnavailableError):
        await call(LLMReranker(llm), mode, "q", ["a", "boom", "c"])


# ---------------------------------------------------------------- options


def test_bad_llm_and_bad_options_are_clear_errors() -> None:
    with pytest.raises(InvalidInputError, match="LangChain chat model"):
        LLMReranker(object())
    llm = FakeListChatModel(responses=["1"])
    with pytest.raises(InvalidInputError, match="max_concurrency"):
        LLMReranker(llm, max_concurrency=0)
    with pytest.raises(InvalidInputError, match="max_retries"):
        LLMReranker(llm, max_retries=-1)
    with pytest.raises(InvalidInputError, match="max_document_chars"):
        LLMReranker(llm, max_document_chars=0)
    with pytest.raises(InvalidInputError, match="instruction"):
        LLMReranker(llm, instruction=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="thresholds"):
        LLMReranker(llm, thresholds=(0.1, 0.2, 0.3, 0.4))  # type: ignore[arg-type]


def test_bad_inputs_fail_before_calling_the_llm() -> None:
    llm = scripted("langchain", lambda prompt: "1")
    reranker = LLMReranker(llm)
    with pytest.raises(InvalidInputError):
        reranker.rerank(None, ["a"])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        reranker.rerank("q", "not a list")
    with pytest.raises(InvalidInputError):
        reranker.rerank("q", ["a"], top_n=0)
    assert llm.record.prompts == []


def test_is_a_reranker_and_repr_hides_the_model() -> None:
    llm = FakeListChatModel(responses=["1"])
    reranker = LLMReranker(llm, max_concurrency=4)
    assert isinstance(reranker, Reranker)
    assert reranker.llm is llm
    assert repr(reranker) == (
        "LLMReranker(llm=FakeListChatModel, max_concurrency=4, max_retries=1, "
        "max_document_chars=4000)"
    )


# ---------------------------------------------------------------- log-probabilities


def logprob_message(text: str, probabilities: dict[str, float]) -> AIMessage:
    top = [{"token": token, "logprob": math.log(p)} for token, p in probabilities.items()]
    metadata = {
        "logprobs": {
            "content": [{"token": text, "logprob": top[0]["logprob"], "top_logprobs": top}]
        }
    }
    return AIMessage(content=text, response_metadata=metadata)


def test_logprobs_refine_the_score_to_the_expected_grade() -> None:
    # Non-digit alternatives carry no grade and are left out of the expectation.
    message = logprob_message("3", {"3": 0.6, " 4": 0.2, "2": 0.1, "Grade": 0.1})
    llm = GenericFakeChatModel(messages=iter([message, message]))
    [refined] = LLMReranker(llm).rerank("q", ["d"])
    expected = (3 * 0.6 + 4 * 0.2 + 2 * 0.1) / 0.9
    assert refined.score == pytest.approx(expected / 4)
    assert refined.stage is Stage.RELEVANT
    [plain] = LLMReranker(llm, use_logprobs=False).rerank("q", ["d"])
    assert plain.score == 0.75


def test_logprobs_leave_a_score_on_mem0s_scale_alone() -> None:
    top = [{"token": "0", "logprob": math.log(0.7)}, {"token": "1", "logprob": math.log(0.3)}]
    content = [{**top[0], "top_logprobs": top}, {"token": ".8", "logprob": 0.0}]
    message = AIMessage(content="0.8", response_metadata={"logprobs": {"content": content}})
    [result] = LLMReranker(GenericFakeChatModel(messages=iter([message]))).rerank("q", ["d"])
    assert result.score == 0.8


def test_logprobs_without_the_grade_token_keep_the_plain_grade() -> None:
    message = logprob_message("Grade", {"Grade": 0.9, "Score": 0.1})
    message = AIMessage(content="Grade: 1", response_metadata=message.response_metadata)
    [result] = LLMReranker(GenericFakeChatModel(messages=iter([message]))).rerank("q", ["d"])
    assert result.score == 0.25


# ---------------------------------------------------------------- adapter


@both_modes
async def test_inside_the_langchain_compressor(mode: str) -> None:
    llm = scripted("langchain", by_document(GRADES))
    compressor = RerankCompressor(reranker=LLMReranker(llm), top_n=2, min_stage="partial")
    documents = [Document(page_content=text, metadata={"n": i}) for i, text in enumerate(DOCS)]
    if mode == "async":
        kept = await compressor.acompress_documents(documents, QUERY)
    else:
        kept = compressor.compress_documents(documents, QUERY)
    assert [d.page_content for d in kept] == [DOCS[0], DOCS[4]]
    assert [d.metadata["relevance_score"] for d in kept] == [1.0, 0.75]
    assert [d.metadata["rerank_stage"] for d in kept] == ["highly_relevant", "relevant"]
    assert [d.metadata["n"] for d in kept] == [0, 4]
    assert "relevance_score" not in documents[0].metadata


def test_compressor_falls_back_on_unreadable_answers() -> None:
    llm = scripted("langchain", lambda prompt: "I refuse.")
    documents = [Document(page_content=text) for text in DOCS[:3]]
    kept = RerankCompressor(reranker=LLMReranker(llm, max_retries=0)).compress_documents(
        documents, QUERY
    )
    assert [d.page_content for d in kept] == DOCS[:3]
    assert all(d.metadata["rerank_fallback"] is True for d in kept)
    strict = RerankCompressor(reranker=LLMReranker(llm, max_retries=0), fallback=False)
    with pytest.raises(MalformedResponseError):
        strict.compress_documents(documents, QUERY)


@both_modes
async def test_inside_the_llama_index_postprocessor(mode: str) -> None:
    llm = scripted("llama_index", by_document(GRADES))
    postprocessor = RerankPostprocessor(reranker=LLMReranker(llm), top_n=3)
    nodes = [NodeWithScore(node=TextNode(text=text), score=0.5) for text in DOCS]
    bundle = QueryBundle(QUERY)
    if mode == "async":
        kept = await postprocessor.apostprocess_nodes(nodes, query_bundle=bundle)
    else:
        kept = postprocessor.postprocess_nodes(nodes, query_bundle=bundle)
    assert [n.node.get_content() for n in kept] == [DOCS[0], DOCS[4], DOCS[3]]
    assert [n.score for n in kept] == [1.0, 0.75, 0.5]
    assert [n.score for n in nodes] == [0.5] * len(DOCS)


def test_importing_the_backend_imports_no_framework() -> None:
    code = (
        "import sys; from memos_rerank_integrations import LLMReranker; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('langchain_core', 'llama_index', 'torch')))"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- Mem0's llm_reranker block


def mem0_style_chat(answers: dict[str, str]) -> Callable[[Recorded], Reply]:
    """An OpenAI-compatible /chat/completions answering each document's score the way
    Mem0's LLM reranker asks its model to: one number from 0.0 to 1.0."""

    def respond(request: Recorded) -> Reply:
        answer = answers[document_of(request.body["messages"][-1]["content"])]
        message = {"role": "assistant", "content": answer}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        body = {"id": "c", "object": "chat.completion", "created": 0, "choices": [choice]}
        return Reply(200, {**body, "model": request.body["model"]})

    return respond


def test_a_mem0_llm_reranker_block_reads_scores_given_the_way_mem0_asks(
    server: LoopbackServer,
) -> None:
    from memos_rerank_integrations import from_config

    answers = {"doc 1": "0.8", "doc 2": "Score: 0.35", "doc 3": "1.0", "doc 4": "0.0"}
    server.script(*[mem0_style_chat(answers)] * len(answers))
    block = {  # as Mem0 documents it for an OpenAI-compatible endpoint
        "provider": "openai",
        "model": "gpt-test",
        "api_key": "sk-test-key",
        "llm": {"provider": "openai", "config": {"openai_base_url": server.url + "/v1"}},
    }
    reranker = from_config({"provider": "llm_reranker", "config": block})
    results = reranker.rerank("q", list(answers))
    assert [(r.index, r.score) for r in results] == [(2, 1.0), (0, 0.8), (1, 0.35), (3, 0.0)]
    assert len(server.requests) == len(answers)
