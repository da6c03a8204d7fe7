"""Mem0 integration: any backend of this package as a Mem0 reranker.

>>> from memos_rerank_integrations.mem0 import register
>>> register()  # adds the provider "memos" to Mem0's RerankerFactory
>>> memory = Memory.from_config({
...     ...,
...     "reranker": {"provider": "memos", "config": {
...         "backend": "qwen", "model": "Qwen/Qwen3-Reranker-0.6B", "top_n": 5}},
... })
>>> memory.search("...", filters={"user_id": "u1"}, top_k=20, rerank=True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ._calls import check_budget_ms
from ._config import check_config, from_config, provider_options, thresholds_from
from ._configurable import mask_secrets, unknown_options
from ._exceptions import InvalidInputError
from ._extras import missing_extra
from ._llm.mem0_llm import Mem0LLM
from ._pipeline import Outcome, RerankSettings, arun, check_query, run
from ._types import Reranker, Stage, StageThresholds, check_top_n

try:
    from mem0.configs.rerankers.base import BaseRerankerConfig
    from mem0.reranker.base import BaseReranker
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise missing_extra("mem0", "mem0ai", feature="memos_rerank_integrations.mem0") from exc

__all__ = ["Mem0LLM", "Mem0Reranker", "Mem0RerankerConfig", "register"]

RERANK_SCORE_KEY = "rerank_score"
RERANK_STAGE_KEY = "rerank_stage"
SCORE_KEY = "score"
VECTOR_SCORE_KEY = "vector_score"


class Mem0RerankerConfig(BaseRerankerConfig):  # type: ignore[misc]
    """The ``config`` of Mem0's ``{"provider": "memos", "config": {...}}`` reranker block.

    ``backend`` is one of this package's provider names (as for
    :func:`~memos_rerank_integrations.from_config`; default ``"qwen"``), and every key
    that is not an option of this class goes to that backend, e.g. ``model``,
    ``device``, ``base_url`` or, for ``"fallback"``, ``rerankers``. ``api_key`` (Mem0's
    own field) goes to the backend too and is held as a ``SecretStr``.

    ``top_n`` keeps at most that many memories (Mem0's ``top_k`` field is the same
    option under Mem0's name); a search's own ``top_k`` cuts further. ``min_score`` and
    ``min_stage`` drop memories before the cut; ``thresholds`` maps scores onto
    ``rerank_stage``. ``text_key`` is the field of Mem0's result dicts that is scored.

    ``score`` says what each result's ``score`` field holds: ``"vector"`` (the default)
    keeps Mem0's own search score there, as Mem0's own reranker providers do, with the
    rerank score beside it in ``rerank_score``; ``"rerank"`` puts the rerank score in
    ``score`` (for code that reads ``score`` and expects it to follow the order) and
    moves Mem0's search score to ``vector_score``. A search's ``threshold`` (Mem0's,
    0.1 by default) drops hits by Mem0's score before this reranker sees them.

    ``budget_ms`` bounds each search's rerank: memories are scored in Mem0's order until
    it runs out; the scored ones come back reranked, the rest after them in Mem0's order
    without ``rerank_score``, every one flagged ``rerank_partial`` / ``rerank_scored``.
    """

    # Inputs may hold keys: validation errors must not echo them.
    model_config = ConfigDict(extra="allow", hide_input_in_errors=True)

    api_key: SecretStr | None = Field(default=None, description="The backend's API key.")
    backend: str = Field(default="qwen", description="This package's backend name.")
    top_n: int | None = Field(default=None, description="Keep at most this many memories.")
    min_score: float | None = Field(default=None, description="Drop memories below this.")
    min_stage: Stage | None = Field(default=None, description="Drop memories below this stage.")
    thresholds: StageThresholds = Field(
        default_factory=StageThresholds, description="Cut points that map scores onto stages."
    )
    text_key: str = Field(default="memory", description="The field of each memory to score.")
    budget_ms: float | None = Field(
        default=None,
        description="A latency budget per search, in milliseconds: memories are scored in "
        "Mem0's order until it runs out; the rest follow unscored (rerank_scored=False).",
    )
    score: Literal["vector", "rerank"] = Field(
        default="vector",
        description="What each result's `score` holds: Mem0's search score ('vector') or "
        "the rerank score ('rerank', Mem0's score then under `vector_score`).",
    )

    @field_validator("top_n", "top_k", mode="before")
    @classmethod
    def _check_count(cls, value: Any) -> int | None:
        return check_top_n(value)

    @field_validator("min_score", mode="before")
    @classmethod
    def _check_min_score(cls, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"min_score must be a number or None, got {value!r}.")
        if not math.isfinite(value):
            raise InvalidInputError(f"min_score must be finite, got {value!r}.")
        return float(value)

    @field_validator("min_stage", mode="before")
    @classmethod
    def _parse_min_stage(cls, value: Any) -> Stage | None:
        return None if value is None else Stage.parse(value)

    @field_validator("thresholds", mode="before")
    @classmethod
    def _parse_thresholds(cls, value: Any) -> StageThresholds:
        return thresholds_from(value)

    @field_validator("budget_ms", mode="before")
    @classmethod
    def _check_budget_ms(cls, value: Any) -> float | None:
        return check_budget_ms(value)

    @field_validator("text_key")
    @classmethod
    def _check_text_key(cls, value: str) -> str:
        if not value:
            raise InvalidInputError("text_key must be a non-empty str.")
        return value

    @model_validator(mode="after")
    def _check_backend(self) -> Mem0RerankerConfig:
        if self.top_n is not None and self.top_k is not None and self.top_n != self.top_k:
            raise InvalidInputError(
                f"top_n={self.top_n} and top_k={self.top_k} disagree; they are one option "
                "(top_k is Mem0's name for it): give one."
            )
        unknown = self.unknown_options(self.model_extra or {}, self.backend)
        if unknown is not None:
            raise InvalidInputError(unknown)
        check_config({"provider": self.backend, "config": self.backend_options()})
        return self

    def __repr_args__(self) -> Any:
        # Backend options may nest keys (an LLM config's api_key): never show them.
        for name, value in super().__repr_args__():
            yield name, mask_secrets(value) if name in (self.model_extra or {}) else value

    @classmethod
    def unknown_options(cls, options: Mapping[str, Any], backend: object) -> str | None:
        """Why ``options`` hold names that neither this block nor ``backend`` take
        (naming the closest valid one), or ``None`` when all are known."""
        backend_keys = provider_options(backend) if isinstance(backend, str) else None
        if backend_keys is None:
            return None  # an unknown backend is reported by check_config
        own = set(cls.model_fields)
        unknown = sorted(set(options) - own - backend_keys, key=str)
        if not unknown:
            return None
        return unknown_options(
            unknown,
            (own - {"provider", "model", "api_key"}) | backend_keys,
            owner=f"Mem0RerankerConfig with backend {backend!r} (its options and the backend's)",
        )

    @property
    def limit(self) -> int | None:
        """The most memories a call returns (``top_n``, or Mem0's ``top_k``)."""
        return self.top_n if self.top_n is not None else self.top_k

    def backend_options(self) -> dict[str, Any]:
        """The options this block gives its backend (the key revealed)."""
        options: dict[str, Any] = dict(self.model_extra or {})
        if self.model is not None:
            options["model"] = self.model
        if self.provider is not None:
            options["provider"] = self.provider
        if self.api_key is not None:
            options["api_key"] = self.api_key.get_secret_value()
        return options


class Mem0Reranker(BaseReranker):  # type: ignore[misc]
    """A Mem0 reranker over any backend of this package.

    Built by Mem0's ``RerankerFactory`` from a :class:`Mem0RerankerConfig` (see
    :func:`register`), or directly: ``Mem0Reranker({"backend": "memos"})`` or
    ``Mem0Reranker(reranker=QwenReranker(), top_n=5)`` for a backend you built.

    :meth:`rerank` returns deep copies of Mem0's result dicts, best first, with
    ``rerank_score`` (a float) and ``rerank_stage`` (e.g. ``"relevant"``) added; Mem0's
    ``score`` and every other field are kept, and the input is never changed. With
    ``score="rerank"`` the rerank score is in ``score`` too, and Mem0's score moves to
    ``vector_score``.
    When the backend fails it raises (a :class:`~memos_rerank_integrations.RerankError`),
    and Mem0 logs it and returns its vector-search results unchanged: there are never
    made-up scores.
    """

    def __init__(
        self,
        config: Mem0RerankerConfig | Mapping[str, Any] | BaseModel | None = None,
        *,
        reranker: Reranker | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            unknown = Mem0RerankerConfig.unknown_options(options, options.get("backend", "qwen"))
            if unknown is not None:
                raise InvalidInputError(unknown)
            config = Mem0RerankerConfig(**options)
        elif options:
            raise InvalidInputError("Pass options in config or as keywords, not both.")
        elif isinstance(config, Mapping):
            unknown = Mem0RerankerConfig.unknown_options(config, config.get("backend", "qwen"))
            if unknown is not None:
                raise InvalidInputError(unknown)
            config = Mem0RerankerConfig(**config)
        elif not isinstance(config, Mem0RerankerConfig):
            if not isinstance(config, BaseModel):
                raise InvalidInputError(
                    "config must be a Mem0RerankerConfig or a mapping, "
                    f"got {type(config).__name__}."
                )
            config = Mem0RerankerConfig(**config.model_dump(exclude_unset=True))
        if reranker is None:
            reranker = from_config({"provider": config.backend, "config": config.backend_options()})
        elif "backend" in config.model_fields_set or config.backend_options():
            raise InvalidInputError(
                "Give either reranker=... or a backend with its options, not both."
            )
        self.config = config
        self.reranker = reranker
        self._settings = RerankSettings(
            reranker=reranker,
            top_n=config.limit,
            min_score=config.min_score,
            min_stage=config.min_stage,
            thresholds=config.thresholds,
            budget_ms=config.budget_ms,
            fallback=False,
        )

    def __repr__(self) -> str:
        return f"Mem0Reranker(reranker={self.reranker!r}, top_n={self.config.limit!r})"

    def rerank(
        self, query: str, documents: list[dict[str, Any]], top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """Rerank Mem0's search results for ``query``; at most ``top_k`` (a search's
        own ``top_k``) and the configured ``top_n`` come back."""
        settings, texts = self._prepare(query, documents, top_k)
        if not texts:
            return []
        return self._build(documents, run(settings, query, texts), self.config.score)

    async def arerank(
        self, query: str, documents: list[dict[str, Any]], top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """The async twin of :meth:`rerank` (Mem0's ``AsyncMemory`` runs :meth:`rerank`
        in a worker thread)."""
        settings, texts = self._prepare(query, documents, top_k)
        if not texts:
            return []
        return self._build(documents, await arun(settings, query, texts), self.config.score)

    def _prepare(
        self, query: object, documents: object, top_k: object
    ) -> tuple[RerankSettings, list[str]]:
        check_query(query)
        if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
            raise InvalidInputError(
                f"documents must be a list of Mem0 result dicts, got {type(documents).__name__}."
            )
        key = self.config.text_key
        texts = []
        for position, document in enumerate(documents):
            text = document.get(key) if isinstance(document, Mapping) else None
            if not isinstance(text, str):
                raise InvalidInputError(
                    f"documents[{position}] has no str {key!r} field to score "
                    f"(got {type(document).__name__}); set text_key to the field to score."
                )
            texts.append(text)
        limit = check_top_n(top_k)
        settings = self._settings
        if limit is not None and (settings.top_n is None or limit < settings.top_n):
            settings = settings.model_copy(update={"top_n": limit})
        return settings, texts

    @staticmethod
    def _build(
        documents: Sequence[Mapping[str, Any]], outcome: Outcome, score: str
    ) -> list[dict[str, Any]]:
        assert outcome.results is not None  # fallback is off: a failure raised
        ranked = []
        for index, result, flags in outcome.placed():
            item = copy.deepcopy(dict(documents[index]))
            if result is not None:
                item[RERANK_SCORE_KEY] = result.score
                item[RERANK_STAGE_KEY] = result.stage.label
            if score == "rerank":
                item[VECTOR_SCORE_KEY] = item.get(SCORE_KEY)
                if result is not None:
                    item[SCORE_KEY] = result.score
            item.update(flags)
            ranked.append(item)
        return ranked


def register(name: str = "memos") -> None:
    """Add :class:`Mem0Reranker` to Mem0's ``RerankerFactory`` as provider ``name``.

    Call it once per process before ``Memory.from_config``; calling it again is
    harmless. A name Mem0 already uses for another reranker is refused.
    """
    from mem0.utils.factory import RerankerFactory

    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"name must be a non-empty str, got {name!r}.")
    entry = (f"{__name__}.{Mem0Reranker.__qualname__}", Mem0RerankerConfig)
    current = RerankerFactory.provider_to_class.get(name)
    if current is not None and tuple(current) != entry:
        raise InvalidInputError(
            f"Mem0 already has a reranker provider {name!r} ({current[0]}); register this "
            "one under another name."
        )
    RerankerFactory.provider_to_class[name] = entry
