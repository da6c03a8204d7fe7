"""Pointwise reranking with a chat model the user already has (LangChain or LlamaIndex).

Each (query, document) pair asks the model for a grade 0-4 on the package's five
relevance stages; score = grade / 4, so grade ``g`` lands on ``Stage(g)`` with the
default :class:`StageThresholds` (a score from 0.0 to 1.0 written with a decimal
point, as Mem0's LLM reranker asks for, is read as it is). One prompt builder, one
parser and one retry loop (a generator that yields prompts and receives answers) serve
the sync and async paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import httpx

from .. import _exceptions as errors
from .._configurable import Configurable
from .._remote.json_bounds import json_shape_problem
from .._types import (
    DEFAULT_THRESHOLDS,
    RerankResult,
    StageThresholds,
    check_call,
    check_text,
    rank_scores,
)

__all__ = ["DEFAULT_LLM_INSTRUCTION", "LLMReranker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_LLM_INSTRUCTION = (
    "Judge how useful the document (for example a stored memory about the user) is "
    "for answering the query."
)

_SYSTEM_TEMPLATE = """You grade how relevant a document is to a query.
{instruction}

Use exactly one of these five grades:
0 = irrelevant: the document has nothing to do with the query.
1 = weak: the document shares a topic or keywords with the query but does not help answer it.
2 = partial: the document holds some of the information the query needs, or related facts \
that help only in part.
3 = relevant: the document answers the query, or most of it.
4 = highly relevant: the document answers the query directly and completely; it is exactly \
what was asked for.

Reply with the grade digit only (0, 1, 2, 3 or 4) and nothing else."""

_USER_TEMPLATE = """<query>
{query}
</query>
<document>
{document}
</document>
Grade:"""

_RETRY_REMINDER = (
    "Your previous answer could not be read as a grade. "
    "Reply with exactly one digit: 0, 1, 2, 3 or 4."
)

_TRUNCATION_MARK = " [...]"


@dataclass(frozen=True)
class _Prompt:
    system: str
    user: str

    def as_text(self) -> str:
        return f"{self.system}\n\n{self.user}"

    def as_messages(self) -> list[tuple[str, str]]:
        # LangChain turns (role, text) pairs into messages, so no import is needed here.
        return [("system", self.system), ("human", self.user)]

    def with_reminder(self) -> _Prompt:
        return _Prompt(self.system, f"{self.user}\n\n{_RETRY_REMINDER}")


@dataclass(frozen=True)
class _Answer:
    text: str
    logprobs: Any = None


# ---------------------------------------------------------------- parsing

# Every pattern here runs in linear time: none starts with an unbounded run that
# could begin at each character of a long run (a leading ``\s*`` retried at every
# space of a 40,000-space answer was quadratic: about a minute), and none nests
# quantifiers over the same characters.
_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)
_FENCE = re.compile(r"```[\w-]*")
# "0-4", "0 to 4" and Mem0's "0.0 to 1.0": the scale named, not a grade.
_SCALE = re.compile(r"\b0(?:\.0)?\s*(?:-|–|—|to)\s*(?:4|1\.0)\b(?!\.\d)", re.IGNORECASE)
# "/4" or "out of 4" after a grade. A match starts at no whitespace preceded by
# whitespace, so a run of spaces is scanned once, from its first one.
_OUT_OF_FOUR = re.compile(r"(?<!\s)\s*(?:/|\bout\s+of\b)\s*4\b(?!\.\d)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?!\w|\.\d)")
_WORD_DASH = re.compile(r"(?<=[A-Za-z])[-_](?=[A-Za-z])")
# Longest phrases first: at one position the first alternative that matches wins, so
# "highly relevant" and "not relevant" never also count as "relevant".
_STAGE_WORDS = re.compile(
    r"\b(highly relevant|not at all relevant|not relevant|irrelevant"
    r"|partial(?:ly)?(?: relevant)?|weak(?:ly)?(?: relevant)?|relevant)\b",
    re.IGNORECASE,
)
_GRADE_KEYS = ("grade", "score", "relevance", "rating", "stage", "label")
# A JSON answer holding more than this (or nested deeper than MAX_RESPONSE_DEPTH) is
# read as text instead: a grade needs a few items, not a parser building millions.
_MAX_ANSWER_ITEMS = 1000


@dataclass(frozen=True)
class _Reading:
    """What an answer says: its ``score`` in [0, 1], and the ``grade`` 0-4 it came from
    (``None`` for a score given on Mem0's 0.0-1.0 scale)."""

    score: float
    grade: int | None = None

    @classmethod
    def of_grade(cls, grade: int) -> _Reading:
        return cls(grade / 4, grade)


def _stage_word_grade(word: str) -> int:
    word = word.lower()
    if word.startswith("highly"):
        return 4
    if word.startswith(("not", "irrelevant")):
        return 0
    if word.startswith("partial"):
        return 2
    if word.startswith("weak"):
        return 1
    return 3


def _strip_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks, in one pass (a lazy regex
    would rescan the rest of the answer for every unclosed opening tag)."""
    parts, position = [], 0
    while True:
        opened = _THINK_OPEN.search(text, position)
        closed = None if opened is None else _THINK_CLOSE.search(text, opened.end())
        if opened is None or closed is None:
            break
        parts += [text[position : opened.start()], " "]
        position = closed.end()
    parts.append(text[position:])
    return "".join(parts)


def _number_reading(value: float, *, decimal: bool) -> _Reading | None:
    """A number as a grade 0-4 or, written with a decimal point and from 0.0 to 1.0
    (``0.8``, ``1.0``), as a score on Mem0's scale."""
    if not math.isfinite(value):
        return None
    if decimal and 0 <= value <= 1:
        return _Reading(value + 0.0)  # + 0.0: -0.0 reads as 0.0
    if value != int(value) or not 0 <= value <= 4:
        return None
    return _Reading.of_grade(int(value))


def _json_reading(text: str) -> tuple[bool, _Reading | None]:
    """(found JSON, reading). A JSON answer is read by its grade field only, so numbers
    in an explanation field cannot conflict with it."""
    candidates = [text]
    # From the first "{" to the last "}" (what a greedy regex would match, in linear time).
    first, last = text.find("{"), text.rfind("}")
    if first != -1 and last > first and (first, last) != (0, len(text) - 1):
        candidates.append(text[first : last + 1])
    for candidate in candidates:
        if json_shape_problem(candidate, max_items=_MAX_ANSWER_ITEMS) is not None:
            continue
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):  # not JSON, a 4,300-digit int
            continue
        if isinstance(value, dict):
            keys = {str(key).lower(): key for key in value}
            field = next((keys[name] for name in _GRADE_KEYS if name in keys), None)
            return True, None if field is None else _value_reading(value[field])
        return True, _value_reading(value)
    return False, None


def _value_reading(value: object) -> _Reading | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # No float(): 10**400 would overflow.
        return _Reading.of_grade(value) if 0 <= value <= 4 else None
    if isinstance(value, float):
        return _number_reading(value, decimal=True)
    if isinstance(value, str):
        return _text_reading(value)
    return None


def _text_reading(text: str) -> _Reading | None:
    text = _OUT_OF_FOUR.sub("", _SCALE.sub(" ", text))
    text = _WORD_DASH.sub(" ", text)
    readings = [_number_reading(float(n), decimal="." in n) for n in _NUMBER.findall(text)]
    readings += [_Reading.of_grade(_stage_word_grade(w)) for w in _STAGE_WORDS.findall(text)]
    # Strict: one score, stated once or repeated consistently; conflicting or
    # out-of-range numbers make the answer unreadable rather than guessed.
    distinct = set(readings)
    scores = {None if reading is None else reading.score for reading in distinct}
    if len(scores) != 1:
        return None
    score = scores.pop()
    if score is None:
        return None
    # A grade and the same score on Mem0's scale ("3 (0.75)") give the score alone.
    return distinct.pop() if len(distinct) == 1 else _Reading(score)


def _read(answer: str) -> _Reading | None:
    text = _FENCE.sub(" ", _strip_thinking(answer)).strip()
    if not text:
        return None
    found, reading = _json_reading(text)
    return reading if found else _text_reading(text)


def parse_score(answer: str) -> float | None:
    """The score in [0, 1] a model's answer gives, or ``None`` when it cannot be read:
    a grade 0-4 divided by 4 (see :func:`parse_grade`) or, for a number written with
    a decimal point from 0.0 to 1.0 (``"0.8"``, ``{"score": 0.8}``), that number, as
    Mem0's LLM reranker asks its model for a score. Whole numbers are grades, so
    ``"1"`` is 0.25 and ``"1.0"`` is 1.0; ``"0.8, maybe 0.9"`` conflicts and is
    unreadable (Mem0 would take the first number)."""
    reading = _read(answer)
    return None if reading is None else reading.score


def parse_grade(answer: str) -> int | None:
    """The grade 0-4 in a model's answer, or ``None`` when it cannot be read (or is a
    score on Mem0's 0.0-1.0 scale, see :func:`parse_score`).

    Accepts extra words, markdown, code fences, ``"3/4"``, stage names and JSON such as
    ``{"grade": 2}``; rejects refusals, conflicting grades and numbers outside 0-4.
    """
    reading = _read(answer)
    return None if reading is None else reading.grade


def _expected_grade(grade: int, logprobs: Any) -> float | None:
    """The probability-weighted grade at the position where the model wrote ``grade``,
    from OpenAI-style ``{"content": [{"token", "logprob", "top_logprobs"}]}``."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else logprobs
    if not isinstance(content, list):
        return None
    for entry in content:
        if not isinstance(entry, dict) or str(entry.get("token", "")).strip() != str(grade):
            continue
        mass = [0.0] * 5
        alternatives = entry.get("top_logprobs") or [entry]
        for alternative in alternatives:
            if not isinstance(alternative, dict):
                continue
            token = str(alternative.get("token", "")).strip()
            logprob = _logprob(alternative.get("logprob"))
            if token in {"0", "1", "2", "3", "4"} and logprob is not None:
                mass[int(token)] += math.exp(logprob)
        total = sum(mass)
        if total <= 0 or not math.isfinite(total):
            return None
        return sum(g * p for g, p in enumerate(mass)) / total
    return None


def _logprob(value: object) -> float | None:
    """A log-probability (a finite number <= 0), or ``None`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and value < -10_000:
        return -math.inf  # exp() of it is 0; float() of a 400-digit int would overflow
    if isinstance(value, int) and value > 0:
        return None
    number = float(value)
    return number if math.isfinite(number) and number <= 0 else None


def _answer_text(output: object) -> str:
    """Text of a LangChain message (str or list of content blocks), a LlamaIndex
    ``CompletionResponse`` or a plain string."""
    if isinstance(output, str):
        return output
    content = getattr(output, "content", None)
    if content is None:
        text = getattr(output, "text", None)
        return text if isinstance(text, str) else ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    return ""


def _answer(output: object) -> _Answer:
    metadata = getattr(output, "response_metadata", None)
    logprobs = metadata.get("logprobs") if isinstance(metadata, dict) else None
    return _Answer(_answer_text(output), logprobs)


# ---------------------------------------------------------------- errors


def _chain(exc: BaseException) -> Generator[BaseException, None, None]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


# Distinct classes before Python 3.11; clients such as openai raise their own timeout
# error *from* the httpx one, hence the walk along the cause chain.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, FutureTimeoutError, httpx.TimeoutException)


def _map_llm_error(exc: Exception, llm_name: str) -> errors.RerankError:
    """Translate an exception raised by the LLM client. The message names only the
    exception type and status: provider messages can echo headers or keys."""
    kind = type(exc).__name__
    backend = f"llm:{llm_name}"
    status = next((s for s in map(_status_code, _chain(exc)) if s is not None), None)
    if any(isinstance(e, _TIMEOUTS) for e in _chain(exc)):
        return errors.RerankTimeoutError(f"The LLM call timed out ({kind}).", backend=backend)
    if status == 429:
        return errors.RateLimitError(
            f"The LLM provider is rate limiting ({kind}).", status_code=status, backend=backend
        )
    if status in (401, 403):
        return errors.AuthenticationError(
            f"The LLM provider rejected the credentials ({kind}); check the model's API key.",
            status_code=status,
            backend=backend,
        )
    return errors.BackendUnavailableError(
        f"The LLM call failed ({kind}).", status_code=status, backend=backend
    )


# ---------------------------------------------------------------- clients


async def _bounded_gather(
    function: Callable[[T], Awaitable[R]], items: Sequence[T], limit: int
) -> list[R]:
    semaphore = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with semaphore:
            return await function(item)

    tasks = [asyncio.create_task(one(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        # One failure fails the call: stop the other in-flight requests, don't orphan them.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _Client:
    """Calls one kind of LLM through its sync and async methods (the async one run as
    the sync one in a worker thread where the LLM has none); sync calls of many
    prompts fan out over a thread pool by default."""

    sync_method: ClassVar[str]
    async_method: ClassVar[str]

    def __init__(self, llm: Any, max_concurrency: int) -> None:
        self.llm = llm
        self.max_concurrency = max_concurrency

    def _input(self, prompt: _Prompt) -> Any:
        raise NotImplementedError

    def call(self, prompt: _Prompt) -> _Answer:
        return _answer(getattr(self.llm, self.sync_method)(self._input(prompt)))

    async def acall(self, prompt: _Prompt) -> _Answer:
        method = getattr(self.llm, self.async_method, None)
        if not callable(method):
            return await asyncio.to_thread(self.call, prompt)
        return _answer(await method(self._input(prompt)))

    def call_all(self, prompts: list[_Prompt]) -> list[_Answer]:
        if len(prompts) == 1:
            return [self.call(prompts[0])]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(self.call, prompts))

    async def acall_all(self, prompts: list[_Prompt]) -> list[_Answer]:
        return await _bounded_gather(self.acall, prompts, self.max_concurrency)


class _ChatModelClient(_Client):
    """LangChain chat models and LLMs: ``invoke`` / ``ainvoke`` / ``batch``."""

    sync_method, async_method = "invoke", "ainvoke"

    def _input(self, prompt: _Prompt) -> Any:
        return prompt.as_messages()

    def call_all(self, prompts: list[_Prompt]) -> list[_Answer]:
        batch = getattr(self.llm, "batch", None)
        if len(prompts) == 1 or not callable(batch):
            return super().call_all(prompts)
        outputs = batch(
            [prompt.as_messages() for prompt in prompts],
            config={"max_concurrency": self.max_concurrency},
        )
        return [_answer(output) for output in outputs]


class _CompletionClient(_Client):
    """LlamaIndex LLMs: ``complete`` / ``acomplete`` returning ``CompletionResponse``."""

    sync_method, async_method = "complete", "acomplete"

    def _input(self, prompt: _Prompt) -> Any:
        return prompt.as_text()


def _client_for(llm: object, max_concurrency: int) -> _Client:
    # By capability, not by class: LangChain runnables have invoke, LlamaIndex LLMs complete.
    if callable(getattr(llm, "invoke", None)):
        return _ChatModelClient(llm, max_concurrency)
    if callable(getattr(llm, "complete", None)):
        return _CompletionClient(llm, max_concurrency)
    raise errors.InvalidInputError(
        f"llm must be a LangChain chat model (with invoke/ainvoke) or a LlamaIndex LLM "
        f"(with complete/acomplete); got {type(llm).__name__}."
    )


# ---------------------------------------------------------------- reranker

_Rounds = Generator[list[_Prompt], list[_Answer], list[float]]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise errors.InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


class _Grading:
    """One call's rounds of prompts (see ``LLMReranker._rounds``): :attr:`prompts` to
    ask next (empty once done), then :attr:`results`, ranked."""

    def __init__(
        self, rounds: _Rounds | None, top_n: int | None, thresholds: StageThresholds
    ) -> None:
        self._rounds = rounds
        self._top_n = top_n
        self._thresholds = thresholds
        self.results: list[RerankResult] = []
        self.prompts: list[_Prompt] = [] if rounds is None else next(rounds)

    def answer(self, answers: list[_Answer]) -> None:
        assert self._rounds is not None
        try:
            self.prompts = self._rounds.send(answers)
        except StopIteration as done:
            self.prompts = []
            self.results = rank_scores(done.value, top_n=self._top_n, thresholds=self._thresholds)


class LLMReranker(Configurable):
    """Rerank with a chat model: each document gets a grade 0-4 on the five stages.

    ``llm`` is a LangChain chat model (anything with ``invoke`` / ``ainvoke`` returning
    a message, e.g. ``ChatOpenAI``) or a LlamaIndex ``LLM`` (``complete`` /
    ``acomplete``). Each (query, document) pair is one prompt that describes the
    stages irrelevant (0), weak (1), partial (2), relevant (3) and highly relevant (4);
    the score is grade / 4, so ``Stage(grade)`` is the stage under the default
    ``thresholds``.

    Answers are parsed strictly (a digit, a stage name, ``"3/4"``, markdown or
    ``{"grade": 3}``), in time linear in their length. A number written with a decimal
    point from 0.0 to 1.0 (``"0.8"``, ``{"score": 0.8}``) is taken as the score itself,
    on the scale Mem0's LLM reranker asks its model for (so a Mem0 ``llm_reranker``
    block's model may answer either way); whole numbers are grades, so ``"1"`` scores
    0.25 and ``"1.0"`` scores 1.0. An answer that cannot be read is asked again up to
    ``max_retries`` times, then the whole call raises :class:`MalformedResponseError`:
    there is never a silent default score. Errors of the LLM client become
    :class:`RerankTimeoutError`, :class:`RateLimitError`, :class:`AuthenticationError`
    or :class:`BackendUnavailableError`, with the original exception as ``__cause__``;
    they are not retried here (LLM clients retry on their own).

    Documents longer than ``max_document_chars`` characters are cut to that length
    (marked ``[...]``) so huge inputs don't overflow the context; ``None`` disables it.
    At most ``max_concurrency`` requests run at once per call: ``arerank`` uses an
    ``asyncio.Semaphore``; ``rerank`` uses LangChain's ``batch`` (or a thread pool for
    LlamaIndex). With ``use_logprobs`` and a model that returns token log-probabilities
    (e.g. ``ChatOpenAI(logprobs=True, top_logprobs=5)``), the score is the expected
    grade / 4 instead, which breaks ties between documents with the same grade.
    """

    def __init__(
        self,
        llm: object,
        *,
        instruction: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 1,
        max_document_chars: int | None = 4000,
        use_logprobs: bool = True,
        thresholds: StageThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        if instruction is not None and not isinstance(instruction, str):
            raise errors.InvalidInputError(
                f"instruction must be a str or None, got {type(instruction).__name__}."
            )
        if instruction is not None:
            check_text("instruction", instruction)
        if max_document_chars is not None:
            _check_int("max_document_chars", max_document_chars, 1)
        if not isinstance(thresholds, StageThresholds):
            raise errors.InvalidInputError(
                f"thresholds must be a StageThresholds, got {type(thresholds).__name__}."
            )
        self._client = _client_for(llm, _check_int("max_concurrency", max_concurrency, 1))
        self._llm_name = type(llm).__name__
        self.instruction = DEFAULT_LLM_INSTRUCTION if instruction is None else instruction
        self.max_concurrency = max_concurrency
        self.max_retries = _check_int("max_retries", max_retries, 0)
        self.max_document_chars = max_document_chars
        self.use_logprobs = bool(use_logprobs)
        self.thresholds = thresholds
        self._system = _SYSTEM_TEMPLATE.format(instruction=self.instruction)

    @property
    def llm(self) -> Any:
        return self._client.llm

    def __repr__(self) -> str:
        return (
            f"LLMReranker(llm={self._llm_name}, max_concurrency={self.max_concurrency}, "
            f"max_retries={self.max_retries}, max_document_chars={self.max_document_chars})"
        )

    def build_prompt(self, query: str, document: str) -> str:
        """The full prompt text for one pair (system part, blank line, user part)."""
        return self._prompt(query, document).as_text()

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Grade every document against ``query``; results best first."""
        grading = self._grading(query, documents, top_n)
        while grading.prompts:
            grading.answer(self._ask(self._client.call_all, grading.prompts))
        return grading.results

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Async twin of :meth:`rerank`, at most ``max_concurrency`` requests at once."""
        grading = self._grading(query, documents, top_n)
        while grading.prompts:
            answers = self._ask(self._client.acall_all, grading.prompts)
            grading.answer(await self._awaited(answers))
        return grading.results

    def _grading(self, query: str, documents: Sequence[str], top_n: int | None) -> _Grading:
        query, docs, top_n = check_call(query, documents, top_n)
        rounds = self._rounds(query, docs) if docs else None
        return _Grading(rounds, top_n, self.thresholds)

    def _ask(self, call: Callable[[list[_Prompt]], R], prompts: list[_Prompt]) -> R:
        """``call(prompts)`` with the LLM's errors mapped onto the error tree."""
        with self._llm_errors():
            return call(prompts)

    async def _awaited(self, answers: Awaitable[list[_Answer]]) -> list[_Answer]:
        with self._llm_errors():
            return await answers

    @contextlib.contextmanager
    def _llm_errors(self) -> Iterator[None]:
        try:
            yield
        except errors.RerankError:
            raise
        except Exception as exc:
            raise _map_llm_error(exc, self._llm_name) from exc

    def _prompt(self, query: str, document: str) -> _Prompt:
        limit = self.max_document_chars
        if limit is not None and len(document) > limit:
            document = document[:limit] + _TRUNCATION_MARK
        return _Prompt(self._system, _USER_TEMPLATE.format(query=query, document=document))

    def _score(self, answer: _Answer) -> float | None:
        try:
            return self._read_score(answer)
        except Exception:
            # The parser is written not to raise; should an answer still defeat it, the
            # answer is unreadable (asked again, then MalformedResponseError), never an
            # error outside the tree.
            logger.debug("An LLM answer could not be parsed.", exc_info=True)
            return None

    def _read_score(self, answer: _Answer) -> float | None:
        reading = _read(answer.text)
        if reading is None:
            return None
        if reading.grade is not None and self.use_logprobs and answer.logprobs is not None:
            expected = _expected_grade(reading.grade, answer.logprobs)
            if expected is not None:
                return expected / 4
        return reading.score

    def _rounds(self, query: str, documents: list[str]) -> _Rounds:
        """Ask for every grade, then again for the unreadable ones, up to max_retries."""
        prompts = [self._prompt(query, document) for document in documents]
        scores: list[float | None] = [None] * len(documents)
        pending = list(range(len(documents)))
        unreadable: dict[int, str] = {}
        for attempt in range(self.max_retries + 1):
            asked = [prompts[i] if attempt == 0 else prompts[i].with_reminder() for i in pending]
            answers = yield asked
            if len(answers) != len(pending):
                raise errors.MalformedResponseError(
                    f"The LLM returned {len(answers)} answers for {len(pending)} prompts.",
                    backend=f"llm:{self._llm_name}",
                )
            unreadable = {}
            for index, answer in zip(pending, answers, strict=True):
                scores[index] = self._score(answer)
                if scores[index] is None:
                    unreadable[index] = answer.text
            pending = list(unreadable)
            if not pending:
                return [score for score in scores if score is not None]
            logger.debug(
                "LLM answers for documents %s could not be read as grades (attempt %d of %d).",
                pending,
                attempt + 1,
                self.max_retries + 1,
            )
        first = pending[0]
        raise errors.MalformedResponseError(
            f"The LLM gave no readable grade 0-4 for document(s) {pending} after "
            f"{self.max_retries + 1} attempt(s); e.g. document {first} got "
            f"{unreadable[first][:120]!r}. Use a model that follows instructions, or raise "
            "max_retries.",
            backend=f"llm:{self._llm_name}",
        )
