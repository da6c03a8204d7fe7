"""Listwise reranking with a chat model: the model orders whole windows of documents.

RankGPT's sliding window: the documents are shown ``window`` at a time as ``[1] text``,
``[2] text``, ...; the model answers with an order such as ``[2] > [1] > [3]``, and that
window of the running ranking is rearranged accordingly. Windows start at the end of
the list and move ``step`` documents towards the front each time, so a strong document
found late is carried forward by every later window (the ``window - step`` documents
that overlap). One generator (it yields prompts and receives answers) serves the sync
and async paths; the LLM clients, prompt and answer types and the error mapping are
those of :class:`~memos_rerank_integrations.LLMReranker`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import re
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from .. import _exceptions as errors
from .._configurable import Configurable
from .._remote.deadline import Deadline, run_in_threads
from .._types import (
    DEFAULT_THRESHOLDS,
    RerankResult,
    StageThresholds,
    check_call,
    nonempty_text,
    optional_positive_int,
    positive_int,
    rank_scores,
)
from .pointwise import _TRUNCATION_MARK, _Answer, _client_for, _map_llm_error, _Prompt

__all__ = [
    "DEFAULT_LISTWISE_INSTRUCTION",
    "LLMListwiseReranker",
    "parse_permutation",
    "window_spans",
]

logger = logging.getLogger(__name__)

DEFAULT_LISTWISE_INSTRUCTION = (
    "Rank the passages (for example stored memories about the user) by how useful each "
    "is for answering the query."
)

_SYSTEM_TEMPLATE = """You are RankGPT, an assistant that ranks passages by their relevance \
to a query.
{instruction}"""

_USER_TEMPLATE = """I will give you {count} passages, each marked with an identifier from \
[1] to [{count}].
<query>
{query}
</query>

{passages}

Rank the {count} passages above by their relevance to the query, most relevant first. \
Answer with the identifiers only, each passage once, in the form [2] > [1] > [3]. \
Do not explain."""

_RETRY_REMINDER = (
    "Your previous answer named no passage identifier. Reply with the ranking only, "
    "for example [2] > [1] > [3]."
)

# A bracketed identifier "[12]" (white space allowed inside), or else a bare run of
# digits not preceded by "-" or another digit. Both alternatives are sequences of
# disjoint character classes, so a match attempt never backtracks more than the run it
# looks at: one finditer over an answer is linear in its length.
_IDENTIFIER = re.compile(r"\[\s*(\d+)\s*\]|(?<![-\d])(\d+)")
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)


def window_spans(count: int, window: int, step: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` slices of a ranking of ``count`` documents that are sent to
    the model, in the order they are sent: RankGPT's sliding window, from the end of
    the list to the front.

    The first span is the last ``window`` documents; each next one ends ``step``
    documents earlier, and the last starts at 0. A span of fewer than two documents
    is not sent (there is nothing to order). So ``count <= window`` takes one call
    (none for 0 or 1 document) and a longer list ``1 + ceil((count - window) / step)``,
    one less where that last span holds a single document (``step == window`` only):
    50 documents with ``window=20, step=10`` are ``[30:50], [20:40], [10:30], [0:20]``.
    """
    spans = []
    end = count
    while True:
        start = max(0, end - window)
        if end - start >= 2:
            spans.append((start, end))
        if start == 0:
            return spans
        end -= step


def _after_thinking(text: str) -> str:
    """``text`` after its last ``</think>`` (or ``</thinking>``) tag, if it has one."""
    last = collections.deque(_THINK_CLOSE.finditer(text), maxlen=1)
    return text[last[0].end() :] if last else text


def _identifier(digits: str, count: int) -> int | None:
    """The 0-based position a 1-based identifier names, or ``None`` outside 1..count.
    Leading zeros are dropped; a longer number is out of range without being converted
    (``int`` of a 5,000-digit string would raise, and is slow)."""
    digits = digits.lstrip("0")
    if not digits or len(digits) > len(str(count)):
        return None
    value = int(digits)  # also reads other scripts' decimal digits, e.g. "٣" or "３"
    return value - 1 if value <= count else None


def parse_permutation(answer: str, count: int) -> list[int] | None:
    """The order of ``count`` passages that a model's answer gives, as 0-based
    positions: always a permutation of ``range(count)``, or ``None`` when the answer
    names no passage at all.

    Identifiers are read in one pass over the text after the last ``</think>`` tag:
    bracketed ones (``[3]``) when the answer has any, else bare numbers (``3 > 1``;
    one preceded by ``-`` names nothing). Identifiers are 1-based; ``0``, numbers above
    ``count`` and repeats are dropped; passages the answer does not name follow the
    named ones in their current order. No position is ever invented, lost or given
    twice, and reading stops once every passage is named.
    """
    bracketed: dict[int, None] = {}
    bare: dict[int, None] = {}
    for match in _IDENTIFIER.finditer(_after_thinking(answer)):
        inside, alone = match.groups()
        if inside is not None:
            position = _identifier(inside, count)
            if position is not None:
                bracketed[position] = None
                if len(bracketed) == count:
                    break
        elif not bracketed and len(bare) < count:
            position = _identifier(alone, count)
            if position is not None:
                bare[position] = None
    named = bracketed or bare
    if not named:
        return None
    return [*named, *(position for position in range(count) if position not in named)]


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not (math.isfinite(timeout) and timeout > 0)
    ):
        raise errors.InvalidInputError(
            f"timeout must be a positive number of seconds or None, got {timeout!r}."
        )
    return float(timeout)


# One call's windows: yields each prompt to ask, is sent its answer, returns the final
# order (document indices, best first).
_Windows = Generator[_Prompt, _Answer, list[int]]


class LLMListwiseReranker(Configurable):
    """Rerank with a chat model that orders whole lists of documents (RankGPT).

    ``llm`` is a LangChain chat model (``invoke`` / ``ainvoke``, e.g. ``ChatOpenAI``), a
    LlamaIndex ``LLM`` (``complete`` / ``acomplete``) or, from a config, a Mem0 LLM.
    The documents are shown ``window`` at a time, numbered ``[1]`` to ``[window]``, and
    the model answers with an order such as ``[2] > [1] > [3]``. Windows slide from the
    end of the list to the front, ``step`` documents at a time (see
    :func:`window_spans`): 50 documents with the defaults take 4 calls, one after the
    other. The best ``window - step`` documents of the whole list reach the front, in
    the model's order; any other document moves forward only while it stays among the
    best ``window - step`` of each window that holds it. ``step == window`` ranks
    disjoint blocks, and no document leaves its block.

    Scores come from the final rank, not from a relevance judgement: the document at
    rank ``r`` (0 first) of ``n`` scores ``(n - r) / n``, from 1.0 down to ``1 / n``,
    strictly decreasing, so the scores, the ranking and ``top_n`` agree. Its stage is
    ``thresholds.stage(score)``: where in the list it landed (with the default
    thresholds the first fifth is "highly relevant" and the last fifth "irrelevant"),
    not a calibrated grade; use :class:`~memos_rerank_integrations.LLMReranker` for
    that.

    Answers are read by :func:`parse_permutation`: repeats, ``0`` and numbers out of
    range are dropped, passages left out keep their current order after the named
    ones, so a readable answer never loses or duplicates a document. An answer that
    names no passage is asked again (with a reminder) up to ``max_retries`` times,
    then the call raises :class:`MalformedResponseError`; the ranking is never
    guessed. Errors of the LLM client become :class:`RerankTimeoutError`,
    :class:`RateLimitError`, :class:`AuthenticationError` or
    :class:`BackendUnavailableError`, with the original exception as ``__cause__``.

    ``timeout`` (seconds) bounds the whole call, all windows and retries together: once
    it has passed, the call raises :class:`RerankTimeoutError` without waiting for the
    model's answer (a sync call waits for it in a worker thread, an async one under
    ``asyncio.wait_for``). ``None`` sets no deadline of its own; the LLM client's
    timeouts still apply. Documents longer than ``max_document_chars`` characters are cut
    to that length (marked ``[...]``) in the prompt; ``None`` disables it.
    """

    def __init__(
        self,
        llm: object,
        *,
        window: int = 20,
        step: int = 10,
        instruction: str | None = None,
        max_retries: int = 1,
        max_document_chars: int | None = 2000,
        timeout: float | None = None,
        thresholds: StageThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        window = positive_int("window", window)
        step = positive_int("step", step)
        if window < 2:
            raise errors.InvalidInputError(f"window must be an int >= 2, got {window!r}.")
        if step > window:
            raise errors.InvalidInputError(
                f"step must be at most window ({window}), got {step!r}: a larger step would "
                "skip documents."
            )
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise errors.InvalidInputError(f"max_retries must be an int >= 0, got {max_retries!r}.")
        if not isinstance(thresholds, StageThresholds):
            raise errors.InvalidInputError(
                f"thresholds must be a StageThresholds, got {type(thresholds).__name__}."
            )
        self.instruction = (
            DEFAULT_LISTWISE_INSTRUCTION
            if instruction is None
            else nonempty_text("instruction", instruction)
        )
        self.max_document_chars = optional_positive_int("max_document_chars", max_document_chars)
        self.timeout = _check_timeout(timeout)
        self._client = _client_for(llm, 1)
        self._llm_name = type(llm).__name__
        self.window = window
        self.step = step
        self.max_retries = max_retries
        self.thresholds = thresholds
        self._system = _SYSTEM_TEMPLATE.format(instruction=self.instruction)

    @property
    def llm(self) -> Any:
        return self._client.llm

    def __repr__(self) -> str:
        return (
            f"LLMListwiseReranker(llm={self._llm_name}, window={self.window}, "
            f"step={self.step}, max_retries={self.max_retries}, timeout={self.timeout})"
        )

    def build_prompt(self, query: str, documents: Sequence[str]) -> str:
        """The full prompt text for one window of documents (system part, blank line,
        user part)."""
        return self._prompt(query, list(documents)).as_text()

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Order ``documents`` by relevance to ``query``, window by window; best first."""
        query, docs, top_n = check_call(query, documents, top_n)
        deadline = self._deadline()
        windows = self._windows(query, docs)
        with contextlib.closing(windows):
            try:
                prompt = next(windows)
                while True:
                    prompt = windows.send(self._call(prompt, deadline))
            except StopIteration as done:
                return self._results(done.value, top_n)

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Async twin of :meth:`rerank` (``ainvoke`` / ``acomplete``); the windows run
        one after the other, as each depends on the one before."""
        query, docs, top_n = check_call(query, documents, top_n)
        deadline = self._deadline()
        windows = self._windows(query, docs)
        with contextlib.closing(windows):
            try:
                prompt = next(windows)
                while True:
                    prompt = windows.send(await self._acall(prompt, deadline))
            except StopIteration as done:
                return self._results(done.value, top_n)

    # ------------------------------------------------------------ the model's calls

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _time_left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._expired()
        return left

    def _expired(self) -> errors.RerankTimeoutError:
        return errors.RerankTimeoutError(
            f"The listwise LLM call did not finish within its timeout of {self.timeout:.3g} s.",
            backend=f"llm:{self._llm_name}",
        )

    @contextlib.contextmanager
    def _llm_errors(self) -> Iterator[None]:
        try:
            yield
        except errors.RerankError:
            raise
        except Exception as exc:
            raise _map_llm_error(exc, self._llm_name) from exc

    def _call(self, prompt: _Prompt, deadline: float | None) -> _Answer:
        with self._llm_errors():
            if deadline is None:
                return self._client.call(prompt)
            [answer] = run_in_threads(
                [functools.partial(self._client.call, prompt)],
                deadline=Deadline(self._time_left(deadline)),
                workers=1,
                expired=self._expired,
            )
            return answer

    async def _acall(self, prompt: _Prompt, deadline: float | None) -> _Answer:
        with self._llm_errors():
            if deadline is None:
                return await self._client.acall(prompt)
            try:
                return await asyncio.wait_for(self._client.acall(prompt), self._time_left(deadline))
            except asyncio.TimeoutError as exc:
                if time.monotonic() < deadline:
                    raise  # the LLM client's own timeout
                raise self._expired() from exc

    # ------------------------------------------------------------ the windows

    def _prompt(self, query: str, documents: list[str]) -> _Prompt:
        limit = self.max_document_chars
        passages = "\n".join(
            f"[{number}] "
            + (text[:limit] + _TRUNCATION_MARK if limit is not None and len(text) > limit else text)
            for number, text in enumerate(documents, start=1)
        )
        user = _USER_TEMPLATE.format(count=len(documents), query=query, passages=passages)
        return _Prompt(self._system, user)

    def _windows(self, query: str, documents: list[str]) -> _Windows:
        """Rank ``documents`` window by window (see :func:`window_spans`); each window's
        answer is asked again up to ``max_retries`` times while it names no passage."""
        order = list(range(len(documents)))
        spans = window_spans(len(documents), self.window, self.step)
        for number, (start, end) in enumerate(spans, start=1):
            shown = order[start:end]
            prompt = self._prompt(query, [documents[i] for i in shown])
            permutation: list[int] | None = None
            answer = _Answer("")
            for attempt in range(self.max_retries + 1):
                reminded = _Prompt(prompt.system, f"{prompt.user}\n\n{_RETRY_REMINDER}")
                answer = yield prompt if attempt == 0 else reminded
                permutation = self._permutation(answer.text, len(shown))
                if permutation is not None:
                    break
                logger.debug(
                    "The LLM's answer for window %d of %d named no passage (attempt %d of %d).",
                    number,
                    len(spans),
                    attempt + 1,
                    self.max_retries + 1,
                )
            if permutation is None:
                raise errors.MalformedResponseError(
                    f"The LLM named no passage of window {number} of {len(spans)} (documents "
                    f"{start}..{end - 1} of the running ranking) after {self.max_retries + 1} "
                    f"attempt(s); it answered {answer.text[:120]!r}. Use a model that follows "
                    "instructions, or raise max_retries.",
                    backend=f"llm:{self._llm_name}",
                )
            order[start:end] = [shown[position] for position in permutation]
        return order

    @staticmethod
    def _permutation(text: str, count: int) -> list[int] | None:
        try:
            return parse_permutation(text, count)
        except Exception:
            # The parser is written not to raise; should an answer still defeat it, the
            # answer is unreadable (asked again, then MalformedResponseError), never an
            # error outside the tree.
            logger.debug("An LLM answer could not be parsed.", exc_info=True)
            return None

    def _results(self, order: list[int], top_n: int | None) -> list[RerankResult]:
        """Rank-derived scores: ``(n - rank) / n`` for the document at ``rank``."""
        count = len(order)
        scores = [0.0] * count
        for rank, index in enumerate(order):
            scores[index] = (count - rank) / count
        return rank_scores(scores, top_n=top_n, thresholds=self.thresholds)
