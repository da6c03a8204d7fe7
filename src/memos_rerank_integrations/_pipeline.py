"""What both framework adapters share: their options, per-call overrides, result
validation, thresholds before the ``top_n`` cut, the fallback to the original order,
skipping, and the facts each call reports (a DEBUG log record, trace fields).

The adapters differ only in how they read text from, and write scores onto,
their framework's objects, and in how they show a call to their framework's tracing.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._calls import Ask, Budget, Steps, arun_steps, check_budget_ms, run_steps
from ._configurable import unknown_options
from ._exceptions import InvalidInputError, RerankError
from ._types import (
    RerankResult,
    Stage,
    StageThresholds,
    check_top_n,
    checked_results,
)

__all__ = [
    "CallOptions",
    "Outcome",
    "RerankSettings",
    "arun",
    "call_options",
    "copy_metadata",
    "run",
]

logger = logging.getLogger("memos_rerank_integrations")

SCORE_KEY = "relevance_score"
STAGE_KEY = "rerank_stage"
FALLBACK_KEY = "rerank_fallback"
SKIPPED_KEY = "rerank_skipped"
# Written on every document of a call with a latency budget: whether the budget ran
# out before every document was scored, and whether this one was.
PARTIAL_KEY = "rerank_partial"
SCORED_KEY = "rerank_scored"

# Per-call override keys: LangChain's ``config["configurable"]``, LlamaIndex's
# ``RerankQueryBundle`` attributes.
RERANK_OPTION = "rerank"
TOP_N_OPTION = "rerank_top_n"
BUDGET_OPTION = "rerank_budget_ms"


class RerankSettings(BaseModel):
    """Options shared by the LangChain compressor and the LlamaIndex postprocessor.

    An option the adapter does not have (Mem0's ``top_k`` for ``top_n``, a misspelling)
    is an :class:`InvalidInputError` naming the closest valid one, never ignored, and
    so is assigning one; ``model_validate`` refuses it too (a pydantic
    ``ValidationError`` with that message)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, validate_assignment=True)

    def __init__(self, /, **data: Any) -> None:
        valid = field_names(type(self))
        unknown = [name for name in data if name not in valid]
        if unknown:
            raise InvalidInputError(unknown_options(unknown, valid, owner=type(self).__name__))
        super().__init__(**data)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and not hasattr(type(self), name):
            valid = field_names(type(self))
            if name not in valid:
                raise InvalidInputError(unknown_options([name], valid, owner=type(self).__name__))
        super().__setattr__(name, value)

    reranker: Any = Field(
        description="Any object with rerank(query, documents, top_n=None) and, ideally, "
        "async arerank(...) returning results sorted by score."
    )
    top_n: int | None = Field(default=None, description="Keep at most this many; None keeps all.")
    min_score: float | None = Field(default=None, description="Drop results scoring below this.")
    min_stage: Stage | None = Field(default=None, description="Drop results below this stage.")
    thresholds: StageThresholds | None = Field(
        default=None,
        description="Cut points that map scores onto stages. None (the default) uses the "
        "backend's own (its `thresholds` attribute, e.g. EmbeddingReranker's fitted ones), "
        "else the stages its results carry, else the package defaults.",
    )
    fallback: bool = Field(
        default=True,
        description="On a backend error, return the input in its original order, flagged.",
    )
    enabled: bool = Field(
        default=True,
        strict=True,
        description="False skips reranking: the input comes back in its order, cut to "
        "top_n, flagged rerank_skipped, and the backend is not called.",
    )
    skip_if: Callable[[str], bool] | None = Field(
        default=None,
        description="Called with the query; a true answer skips reranking for that call "
        "(e.g. lambda q: len(q.split()) <= 3).",
    )
    budget_ms: float | None = Field(
        default=None,
        description="A latency budget for each call, in milliseconds: the documents are "
        "scored in their given order until it runs out; the scored ones come back "
        "reranked, the rest after them in their order, every one flagged "
        "rerank_partial / rerank_scored. None: no budget.",
    )

    @field_validator("reranker")
    @classmethod
    def _check_reranker(cls, value: Any) -> Any:
        if not callable(getattr(value, "rerank", None)):
            raise ValueError(
                f"reranker must have a rerank(query, documents, top_n=None) method; "
                f"got {type(value).__name__}. Use e.g. QwenReranker(), MemOSReranker() "
                "or any object with that method."
            )
        return value

    @field_validator("top_n", mode="before")
    @classmethod
    def _check_top_n(cls, value: Any) -> int | None:
        # Strict like the backends: True is not 1 and "3" is not 3.
        return check_top_n(value)

    @field_validator("min_score")
    @classmethod
    def _check_min_score(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"min_score must be a finite number or None, got {value}.")
        return value

    @field_validator("min_stage", mode="before")
    @classmethod
    def _parse_min_stage(cls, value: Any) -> Stage | None:
        return None if value is None else Stage.parse(value)

    @field_validator("budget_ms", mode="before")
    @classmethod
    def _check_budget_ms(cls, value: Any) -> float | None:
        return check_budget_ms(value)

    def _model_name(self) -> str:
        name = getattr(self.reranker, "model", None)
        return name if isinstance(name, str) else type(self.reranker).__name__

    def _stage_thresholds(self) -> StageThresholds | None:
        """The cut points results are staged with: the adapter's, else the backend's;
        None when neither has any (then the stages the results carry are kept)."""
        if self.thresholds is not None:
            return self.thresholds
        own = getattr(self.reranker, "thresholds", None)
        return own if isinstance(own, StageThresholds) else None


def field_names(cls: type[BaseModel]) -> set[str]:
    """The names a pydantic model's constructor takes: its fields and their aliases."""
    names = set(cls.model_fields)
    for info in cls.model_fields.values():
        if info.alias is not None:
            names.add(info.alias)
        if isinstance(info.validation_alias, str):
            names.add(info.validation_alias)
    return names


@dataclass(frozen=True)
class CallOptions:
    """Per-call overrides: ``rerank`` (True forces, False skips; None follows
    ``enabled`` and ``skip_if``), ``top_n`` and ``budget_ms`` (None keeps the
    adapter's)."""

    rerank: bool | None = None
    top_n: int | None = None
    budget_ms: float | None = None


def call_options(values: Any, *, source: str) -> CallOptions:
    """Read the ``rerank``, ``rerank_top_n`` and ``rerank_budget_ms`` overrides from a
    mapping (or an object's attributes); ``source`` names where they came from in error
    messages.

    In a mapping shared with other components (LangChain's ``configurable``), a key
    that starts with ``rerank_`` but is none of these is a misspelling: an
    :class:`InvalidInputError` naming the closest valid one, never ignored."""
    if isinstance(values, Mapping):
        ours = (RERANK_OPTION, TOP_N_OPTION, BUDGET_OPTION)
        misspelled = [
            key
            for key in values
            if isinstance(key, str) and key.startswith("rerank_") and key not in ours
        ]
        if misspelled:
            raise InvalidInputError(unknown_options(misspelled, ours, owner=source))
        rerank, top_n = values.get(RERANK_OPTION), values.get(TOP_N_OPTION)
        budget = values.get(BUDGET_OPTION)
    else:
        rerank, top_n = getattr(values, RERANK_OPTION, None), getattr(values, TOP_N_OPTION, None)
        budget = getattr(values, BUDGET_OPTION, None)
    if rerank is not None and not isinstance(rerank, bool):
        raise InvalidInputError(
            f"{source} {RERANK_OPTION!r} must be True or False, got {rerank!r}."
        )
    if top_n is not None:
        try:
            check_top_n(top_n)
        except InvalidInputError:
            raise InvalidInputError(
                f"{source} {TOP_N_OPTION!r} must be a positive int, got {top_n!r}."
            ) from None
    budget_ms = check_budget_ms(budget, name=f"{source} {BUDGET_OPTION!r}")
    return CallOptions(rerank=rerank, top_n=top_n, budget_ms=budget_ms)


@dataclass(frozen=True)
class Outcome:
    """One adapter call: ``results`` (kept, best first) after reranking, or, when the
    input passes through (``fell_back`` after a backend error, or ``skipped``), the
    ``passthrough`` indices (original order, cut to ``top_n``).

    With a latency budget (``budget_ms``), ``unscored`` are the documents the budget
    left unscored, in their original order, after the ``results`` (the ``top_n`` cut
    counts both); ``partial`` says whether there are any, ``scored`` how many
    documents were scored."""

    results: list[RerankResult] | None
    passthrough: list[int] = field(default_factory=list)
    fell_back: bool = False
    skipped: bool = False
    backend: str = ""
    documents: int = 0
    top_n: int | None = None
    duration_ms: float = 0.0
    error: str | None = None
    unscored: list[int] = field(default_factory=list)
    budget_ms: float | None = None
    scored: int = 0

    @property
    def partial(self) -> bool:
        return (
            self.budget_ms is not None and self.results is not None and self.scored < self.documents
        )

    @property
    def kept(self) -> int:
        if self.results is None:
            return len(self.passthrough)
        return len(self.results) + len(self.unscored)

    def placed(self) -> list[tuple[int, RerankResult | None, dict[str, bool]]]:
        """The answer, in order: each document's index, its result (``None`` when it
        comes back unscored) and the flags it carries (``rerank_skipped`` /
        ``rerank_fallback`` on a passed-through input; ``rerank_partial`` and
        ``rerank_scored`` with a latency budget)."""
        if self.results is None:
            flag = SKIPPED_KEY if self.skipped else FALLBACK_KEY
            return [(index, None, {flag: True}) for index in self.passthrough]
        if self.budget_ms is None:
            return [(r.index, r, {}) for r in self.results]
        partial = self.partial
        return [
            *((r.index, r, {PARTIAL_KEY: partial, SCORED_KEY: True}) for r in self.results),
            *((index, None, {PARTIAL_KEY: partial, SCORED_KEY: False}) for index in self.unscored),
        ]

    def facts(self) -> dict[str, Any]:
        """The call's facts under ``rerank_*`` keys: the DEBUG record's ``extra``, the
        LlamaIndex event tags."""
        return {
            "rerank_backend": self.backend,
            "rerank_documents": self.documents,
            "rerank_top_n": self.top_n,
            "rerank_kept": self.kept,
            "rerank_duration_ms": self.duration_ms,
            "rerank_fallback": self.fell_back,
            "rerank_skipped": self.skipped,
            "rerank_error": self.error,
            "rerank_budget_ms": self.budget_ms,
            "rerank_partial": self.partial,
            "rerank_scored": self.scored if self.results is not None else 0,
        }


def check_query(query: object) -> str:
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}.")
    return query


def copy_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``metadata``, as LangChain's partner rerankers make; a value that
    cannot be deep-copied (a lock, a client) is shared instead of failing the call."""
    try:
        return copy.deepcopy(dict(metadata))
    except Exception:
        copied = {}
        for key, value in metadata.items():
            try:
                copied[key] = copy.deepcopy(value)
            except Exception:
                copied[key] = value
        return copied


def safe_error(error: BaseException) -> str:
    """How an error is named in logs and traces: a ``RerankError``'s message never holds
    a credential, any other error is named by its type only (its text might)."""
    if isinstance(error, RerankError):
        return f"{type(error).__name__}: {error}"
    return type(error).__name__


def _select(settings: RerankSettings, results: list[RerankResult]) -> list[RerankResult]:
    """Re-stage with the adapter's (or the backend's) cut points, then filter."""
    thresholds = settings._stage_thresholds()
    if thresholds is not None:
        results = [RerankResult(r.index, r.score, thresholds.stage(r.score)) for r in results]
    return [
        result
        for result in results
        if (settings.min_score is None or result.score >= settings.min_score)
        and (settings.min_stage is None or result.stage >= settings.min_stage)
    ]


class _Call:
    """One adapter call in progress: its options, its clock, and how it ends."""

    def __init__(
        self, settings: RerankSettings, query: str, count: int, options: CallOptions, adapter: str
    ) -> None:
        self.settings = settings
        self.count = count
        self.adapter = adapter
        self.backend = settings._model_name()
        self.top_n = settings.top_n if options.top_n is None else options.top_n
        self.budget_ms = settings.budget_ms if options.budget_ms is None else options.budget_ms
        self.started = time.perf_counter()
        if options.rerank is not None:
            self.skip = not options.rerank
        else:
            skip_if = settings.skip_if
            self.skip = not settings.enabled or (
                count > 0 and skip_if is not None and bool(skip_if(query))
            )

    def _head(self) -> list[int]:
        keep = self.count if self.top_n is None else min(self.count, self.top_n)
        return list(range(keep))

    def _end(self, **fields: Any) -> Outcome:
        outcome = Outcome(
            backend=self.backend,
            documents=self.count,
            top_n=self.top_n,
            duration_ms=(time.perf_counter() - self.started) * 1000.0,
            **fields,
        )
        _log(self.adapter, outcome)
        return outcome

    def done(self, results: list[RerankResult]) -> Outcome:
        return self._end(results=results, scored=self.count, budget_ms=self.budget_ms)

    def answered(self, raw: object) -> Outcome:
        """The backend's answer checked, staged, filtered (the scored documents, best
        first) and, with the documents a budget left unscored after them in their
        order, cut to ``top_n``."""
        partial = self.budget_ms is not None
        results = checked_results(raw, count=self.count, backend=self.backend, partial=partial)
        scored = {r.index for r in results}
        kept = _select(self.settings, results)
        unscored = [i for i in range(self.count) if i not in scored] if partial else []
        if self.top_n is not None:
            kept = kept[: self.top_n]
            unscored = unscored[: max(self.top_n - len(kept), 0)]
        return self._end(
            results=kept, unscored=unscored, scored=len(scored), budget_ms=self.budget_ms
        )

    def skipped(self) -> Outcome:
        return self._end(results=None, passthrough=self._head(), skipped=True)

    def failed(self, error: Exception) -> Outcome:
        """The fallback outcome, or ``error`` re-raised when fallback is off."""
        described = safe_error(error)
        if not self.settings.fallback:
            self._end(results=[], error=described)
            raise error
        logger.warning(
            "Reranking failed with %s; returning the %d documents in their original order.",
            described,
            self.count,
        )
        return self._end(results=None, passthrough=self._head(), fell_back=True, error=described)


def _log(adapter: str, outcome: Outcome) -> None:
    """The one DEBUG record per call, its values in ``extra`` for structured handlers."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    if outcome.skipped:
        how = "skipped reranking"
    elif outcome.fell_back:
        how = "fell back to the input order"
    elif outcome.error is not None:
        how = f"failed with {outcome.error}"
    else:
        how = "reranked"
    logger.debug(
        "%s %s: %s, %d documents, kept %d, %.1f ms%s",
        adapter,
        how,
        outcome.backend,
        outcome.documents,
        outcome.kept,
        outcome.duration_ms,
        ""
        if outcome.budget_ms is None
        else f", budget {outcome.budget_ms:g} ms, scored {outcome.scored}",
        extra={"rerank_adapter": adapter, **outcome.facts()},
    )


def run(
    settings: RerankSettings,
    query: str,
    texts: list[str],
    options: CallOptions = CallOptions(),
    *,
    adapter: str = "adapter",
) -> Outcome:
    """Rerank ``texts`` synchronously, applying the adapter's options."""
    return run_steps(_steps(settings, query, texts, options, adapter))


async def arun(
    settings: RerankSettings,
    query: str,
    texts: list[str],
    options: CallOptions = CallOptions(),
    *,
    adapter: str = "adapter",
) -> Outcome:
    """The async twin of :func:`run`; a backend without ``arerank`` runs in a thread."""
    return await arun_steps(_steps(settings, query, texts, options, adapter))


def _steps(
    settings: RerankSettings, query: str, texts: list[str], options: CallOptions, adapter: str
) -> Steps[Outcome]:
    call = _Call(settings, query, len(texts), options, adapter)
    if not texts:
        return call.done([])
    if call.skip:
        return call.skipped()
    budget = None if call.budget_ms is None else Budget(call.budget_ms)
    try:
        raw = yield Ask(settings.reranker, query, texts, budget=budget)
        return call.answered(raw)
    except Exception as error:
        return call.failed(error)
