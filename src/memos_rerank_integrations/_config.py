"""Backends from a config, and back: :func:`from_config`, ``to_config()`` and pickling.

A config is ``{"provider": NAME, "config": {OPTION: VALUE, ...}}``, the shape of a
Mem0 reranker block. NAME is one of this package's backends (``qwen``,
``cross_encoder``, ``embedding``, ``memos``, ``cohere``, ``http``, ``zero_entropy``,
``llm``, ``fallback``), whose options are its constructor's keyword arguments, or one
of Mem0's reranker providers (``cohere``, ``sentence_transformer``, ``huggingface``,
``llm_reranker``, ``zero_entropy``) with Mem0's config keys, mapped onto the backend
that does the same job (see :data:`MEM0_PROVIDERS`).

Every backend inherits :class:`Configurable`, which remembers the arguments its
constructor was called with. ``to_config()`` turns the explicit ones into a config
(plain JSON data); pickling stores them too and calls the constructor again on
unpickling, so HTTP clients, loaded models and locks are made afresh, lazily, in the
process that unpickles. A config never holds an API key (the rebuilt backend reads it
from the environment, or takes ``from_config(config, api_key=...)``); a pickle carries
an explicit ``api_key`` as a ``SecretStr``. Unknown providers, keys and options are
:class:`InvalidInputError` naming the closest valid name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._configurable import (
    BACKEND_CALL_OPTIONS,
    PACKAGE,
    PROVIDERS,
    did_you_mean,
    unknown_options,
)
from ._exceptions import InvalidInputError
from ._types import StageThresholds

if TYPE_CHECKING:
    from ._types import Reranker

__all__ = [
    "MEM0_PROVIDERS",
    "backend_class",
    "check_config",
    "from_config",
    "provider_options",
    "settings_from_dict",
    "settings_to_dict",
    "thresholds_from",
]

# --------------------------------------------------------------------------- Mem0


@dataclass(frozen=True)
class _Mem0Provider:
    """One of Mem0's reranker providers: the backend it maps to, the Mem0 keys it
    accepts on top of that backend's own options, and the translation."""

    target: str
    keys: frozenset[str]
    translate: Callable[[dict[str, Any]], dict[str, Any]]


def _drop(options: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key not in names}


def _translate_cohere(options: dict[str, Any]) -> dict[str, Any]:
    options = _none_dropped(options)
    chunks = options.get("max_chunks_per_doc")
    if chunks is not None:
        raise InvalidInputError(
            f"max_chunks_per_doc={chunks!r} is an option of Cohere's v1 API; CohereReranker "
            "uses the v2 API, which cuts each document at max_tokens_per_doc instead. Set "
            "max_tokens_per_doc (or drop max_chunks_per_doc)."
        )
    return _drop(options, "top_k", "provider", "return_documents", "max_chunks_per_doc")


def _translate_zero_entropy(options: dict[str, Any]) -> dict[str, Any]:
    return _drop(_none_dropped(options), "top_k", "provider")


def _batch_tokens(options: dict[str, Any], default_max_length: int) -> dict[str, Any]:
    """Mem0's ``batch_size`` (pairs per forward pass) as this package's token budget."""
    batch_size = options.get("batch_size")
    out = _drop(options, "batch_size", "show_progress_bar", "api_key", "top_k", "provider")
    if batch_size is None:
        return out
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if "max_batch_tokens" in options:
        raise InvalidInputError(
            "Give batch_size (Mem0's pairs per batch) or max_batch_tokens (this package's "
            "tokens per batch), not both."
        )
    max_length = options.get("max_length", default_max_length)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InvalidInputError(f"max_length must be a positive int, got {max_length!r}.")
    out["max_batch_tokens"] = batch_size * max_length
    return out


# Mem0's local providers run the checkpoint in float32 (sentence-transformers' and
# transformers' default); so do their blocks here, so the scores are theirs even where
# CrossEncoderReranker's own default would pick bfloat16.
_MEM0_DTYPE = "float32"


def _translate_sentence_transformer(options: dict[str, Any]) -> dict[str, Any]:
    options = {"model": "cross-encoder/ms-marco-MiniLM-L-6-v2", **_none_dropped(options)}
    return {"dtype": _MEM0_DTYPE, **_batch_tokens(options, 512)}


def _translate_huggingface(options: dict[str, Any]) -> dict[str, Any]:
    options = {"model": "BAAI/bge-reranker-base", **_none_dropped(options)}
    return {"dtype": _MEM0_DTYPE, **_batch_tokens(options, 512)}


def _none_dropped(options: dict[str, Any]) -> dict[str, Any]:
    """Mem0 writes its unset common options as None, meaning "the default"."""
    common = ("model", "api_key", "device", "provider", "top_k")
    return {k: v for k, v in options.items() if not (k in common and v is None)}


def _translate_llm_reranker(options: dict[str, Any]) -> dict[str, Any]:
    prompt = options.get("scoring_prompt")
    if prompt is not None:
        raise InvalidInputError(
            "scoring_prompt replaces Mem0's whole system prompt (and is deprecated there); "
            "LLMReranker's prompt asks for a grade 0-4 on the five stages. Pass your task as "
            "instruction=... instead."
        )
    # Mem0's LLMReranker builds its LLM exactly like this.
    provider = options.get("provider") or "openai"
    nested = options.get("llm")
    if nested is not None and not isinstance(nested, Mapping):
        raise InvalidInputError(
            "llm must be a mapping {'provider': ..., 'config': {...}}, "
            f"got {type(nested).__name__}."
        )
    llm_config: dict[str, Any] = {}
    if nested is not None:
        provider = nested.get("provider", provider)
        llm_config = dict(nested.get("config") or {})
    llm_config.setdefault("model", options.get("model") or "gpt-5-mini")
    llm_config.setdefault("temperature", options.get("temperature", 0.0))
    llm_config.setdefault("max_tokens", options.get("max_tokens", 100))
    if options.get("api_key"):
        llm_config.setdefault("api_key", options["api_key"])
    out = _drop(
        options,
        "model",
        "api_key",
        "provider",
        "top_k",
        "temperature",
        "max_tokens",
        "scoring_prompt",
        "llm",
    )
    out["llm"] = {"provider": provider, "config": llm_config}
    return out


# Mem0's reranker providers and their config keys (mem0ai 2.2: mem0/configs/rerankers/).
MEM0_PROVIDERS: Mapping[str, _Mem0Provider] = {
    "cohere": _Mem0Provider(
        "cohere",
        frozenset(
            {"model", "api_key", "top_k", "provider", "return_documents", "max_chunks_per_doc"}
        ),
        _translate_cohere,
    ),
    "zero_entropy": _Mem0Provider(
        "zero_entropy",
        frozenset({"model", "api_key", "top_k", "provider"}),
        _translate_zero_entropy,
    ),
    "sentence_transformer": _Mem0Provider(
        "cross_encoder",
        frozenset(
            {"model", "api_key", "top_k", "provider", "device", "batch_size", "show_progress_bar"}
        ),
        _translate_sentence_transformer,
    ),
    "huggingface": _Mem0Provider(
        "cross_encoder",
        frozenset(
            {
                "model",
                "api_key",
                "top_k",
                "provider",
                "device",
                "batch_size",
                "max_length",
                "normalize",
            }
        ),
        _translate_huggingface,
    ),
    "llm_reranker": _Mem0Provider(
        "llm",
        frozenset(
            {
                "model",
                "api_key",
                "top_k",
                "provider",
                "temperature",
                "max_tokens",
                "scoring_prompt",
                "llm",
            }
        ),
        _translate_llm_reranker,
    ),
}


# --------------------------------------------------------------------------- options


def backend_class(name: str) -> type[Any]:
    """The class of this package's provider ``name`` (imported on first use)."""
    provider = PROVIDERS[name]
    cls: type[Any] = getattr(importlib.import_module(provider.module, PACKAGE), provider.attribute)
    return cls


def _signature_options(cls: type[Any]) -> tuple[frozenset[str], frozenset[str]]:
    """(every keyword option, the required ones) of a backend's constructor."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    names: set[str] = set()
    required: set[str] = set()
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            # Remote backends name what their **options take (keyword_options).
            keyword_options = getattr(cls, "keyword_options", None)
            if callable(keyword_options):
                names |= keyword_options()
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(parameter.name)
            if parameter.default is inspect.Parameter.empty:
                required.add(parameter.name)
    return frozenset(names), frozenset(required)


def _all_names() -> list[str]:
    return sorted(set(PROVIDERS) | set(MEM0_PROVIDERS))


def _split(config: object) -> tuple[str, dict[str, Any]]:
    if hasattr(config, "model_dump") and not isinstance(config, Mapping):
        config = config.model_dump()
    if not isinstance(config, Mapping):
        raise InvalidInputError(
            "A backend config is a mapping {'provider': NAME, 'config': {...}}, "
            f"got {type(config).__name__}."
        )
    extra = sorted(set(config) - {"provider", "config"}, key=str)
    if extra:
        raise InvalidInputError(
            f"Unknown top-level key(s) {extra} in a backend config; it holds only 'provider' "
            f"and 'config'. {did_you_mean(extra, ('provider', 'config'))}".rstrip()
        )
    name = config.get("provider")
    if not isinstance(name, str) or (name not in PROVIDERS and name not in MEM0_PROVIDERS):
        hint = did_you_mean([name], _all_names()) if isinstance(name, str) else ""
        raise InvalidInputError(
            f"Unknown reranker provider {name!r}. {hint + ' ' if hint else ''}Valid providers: "
            f"{', '.join(_all_names())}."
        )
    options = config.get("config")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidInputError(
            f"The 'config' of provider {name!r} must be a mapping of options, "
            f"got {type(options).__name__}."
        )
    for key in options:
        if not isinstance(key, str):
            raise InvalidInputError(f"Option names must be str, got {key!r}.")
    return name, dict(options)


def provider_options(name: str) -> frozenset[str] | None:
    """The option names provider ``name`` accepts (a Mem0 provider's keys included), or
    ``None`` for a name that is no provider."""
    dialect = MEM0_PROVIDERS.get(name)
    if name in PROVIDERS:
        target = name
    elif dialect is not None:
        target = dialect.target
    else:
        return None
    valid, _ = _signature_options(backend_class(target))
    return valid | (dialect.keys if dialect is not None else frozenset())


def _resolve(name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(this package's provider, its constructor options), keys checked."""
    dialect = MEM0_PROVIDERS.get(name)
    target = name if name in PROVIDERS else dialect.target if dialect else name
    cls = backend_class(target)
    valid, required = _signature_options(cls)
    accepted = valid | (dialect.keys if dialect is not None else frozenset())
    unknown = sorted(set(options) - accepted)
    if unknown:
        what = f"{name!r} (Mem0's keys and {cls.__name__}'s)" if dialect else repr(name)
        raise InvalidInputError(
            unknown_options(
                unknown, accepted, owner=f"reranker provider {what}", notes=BACKEND_CALL_OPTIONS
            )
        )
    if dialect is not None:
        options = dialect.translate(options)
    missing = sorted(required - set(options))
    if missing:
        raise InvalidInputError(
            f"Reranker provider {name!r} needs option(s) {missing} ({cls.__name__})."
        )
    return target, options


def check_config(config: Mapping[str, Any], *, _depth: int = 0) -> None:
    """Check a config's provider name and option names without building anything."""
    name, options = _split(config)
    target, resolved = _resolve(name, options)
    for item in _nested_configs(target, resolved, _depth):
        check_config(item, _depth=_depth + 1)


# A fallback chain of fallback chains is fine; a config nested deeper is a mistake (or
# an attack on the recursion limit).
_MAX_NESTING = 8


def _nested_configs(target: str, options: Mapping[str, Any], depth: int) -> list[Any]:
    rerankers = options.get("rerankers") if target == "fallback" else None
    if not isinstance(rerankers, Sequence) or isinstance(rerankers, (str, bytes)):
        return []
    nested = [item for item in rerankers if isinstance(item, Mapping)]
    if nested and depth >= _MAX_NESTING:
        raise InvalidInputError(
            f"Fallback configs are nested more than {_MAX_NESTING} levels deep."
        )
    return nested


def thresholds_from(value: object) -> StageThresholds:
    """A :class:`StageThresholds` from itself, four cut points or a mapping of its fields."""
    if isinstance(value, StageThresholds):
        return value
    if isinstance(value, Mapping):
        fields = {"weak", "partial", "relevant", "highly_relevant"}
        unknown = sorted(set(value) - fields, key=str)
        if unknown:
            raise InvalidInputError(
                f"Unknown threshold name(s) {unknown}; use {', '.join(sorted(fields))}. "
                f"{did_you_mean(unknown, fields)}".rstrip()
            )
        return StageThresholds(**value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return StageThresholds.from_cuts(list(value))
    raise InvalidInputError(
        "thresholds must be a StageThresholds, four increasing cut points or a mapping "
        f"of weak/partial/relevant/highly_relevant, got {type(value).__name__}."
    )


def _build_llm(value: object) -> object:
    if not isinstance(value, Mapping):
        return value  # the caller's own chat model
    keys = ("provider", "config", "timeout")
    unknown = sorted(set(value) - set(keys), key=str)
    provider = value.get("provider")
    if unknown or not isinstance(provider, str):
        raise InvalidInputError(
            "An LLM in a config is a mapping {'provider': <a Mem0 LLM provider, e.g. "
            "'openai'>, 'config': {...}, 'timeout': seconds (optional)}"
            + (
                f"; unknown key(s) {unknown}. {did_you_mean(unknown, keys)}".rstrip()
                if unknown
                else "."
            )
        )
    try:
        from ._llm.mem0_llm import Mem0LLM
    except ImportError as exc:
        from ._extras import missing_extra

        raise missing_extra(
            "mem0", "mem0ai", feature="An LLM given as {'provider', 'config'}"
        ) from exc
    if "timeout" in value:
        return Mem0LLM(provider, value.get("config"), timeout=value["timeout"])
    return Mem0LLM(provider, value.get("config"))


def from_config(config: Mapping[str, Any], **options: Any) -> Reranker:
    """Build a backend from ``{"provider": NAME, "config": {...}}``.

    ``options`` are added to (and override) the config's options: pass what a config
    cannot hold, e.g. ``api_key=...``, ``http_client=...`` or ``llm=ChatOpenAI(...)``.
    Unknown providers and options raise :class:`InvalidInputError` listing the valid
    ones; a backend's own checks run as when it is constructed directly.
    """
    return _build(config, options, 0)


def _build(config: Mapping[str, Any], options: dict[str, Any], depth: int) -> Reranker:
    name, config_options = _split(config)
    target, kwargs = _resolve(name, {**config_options, **options})
    if "thresholds" in kwargs:
        kwargs["thresholds"] = thresholds_from(kwargs["thresholds"])
    if target in ("llm", "llm_listwise") and "llm" in kwargs:
        kwargs["llm"] = _build_llm(kwargs["llm"])
    if _nested_configs(target, kwargs, depth):
        kwargs["rerankers"] = [
            _build(item, {}, depth + 1) if isinstance(item, Mapping) else item
            for item in kwargs["rerankers"]
        ]
    backend: Reranker = backend_class(target)(**kwargs)
    return backend


# --------------------------------------------------------------------------- adapters


def settings_to_dict(data: dict[str, Any]) -> dict[str, Any]:
    """An adapter's dumped fields as JSON data: the backend as its ``to_config()``
    (kept as the object when it has none), stages by name, enums by value."""
    from enum import Enum

    from ._types import Stage

    out = dict(data)
    to_config = getattr(out.get("reranker"), "to_config", None)
    if callable(to_config):
        out["reranker"] = to_config()
    for key, value in out.items():
        if isinstance(value, Stage):
            out[key] = value.label
        elif isinstance(value, Enum):
            out[key] = value.value
    return out


def settings_from_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`settings_to_dict`: a backend config becomes the backend."""
    out = dict(data)
    if isinstance(out.get("reranker"), Mapping):
        out["reranker"] = from_config(out["reranker"])
    return out
