"""The base of every backend, :class:`Configurable`: the arguments its constructor was
called with (unknown option names refused), ``to_config()`` with secrets kept out,
pickling with an explicit key carried as a ``SecretStr``, and copies; the helpers that
strip, mask, wrap and find secrets in nested config data (key-, token-, secret- and
password-named entries, and credentials in URLs such as a proxy's
``http://user:password@host``); and the provider registry, which names each backend
once (names and module paths only: nothing here imports a backend)."""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from ._exceptions import InvalidInputError
from ._types import StageThresholds, estimate_tokens

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "BACKEND_CALL_OPTIONS",
    "PACKAGE",
    "PROVIDERS",
    "REGISTRY",
    "Configurable",
    "Provider",
    "did_you_mean",
    "hide_secrets",
    "mask_secrets",
    "provider_named",
    "reveal_secrets",
    "secret_texts",
    "strip_secrets",
    "unknown_options",
]

PACKAGE = __name__.rpartition(".")[0]


@dataclass(frozen=True)
class Provider:
    """One backend of this package: its config name, where its class lives (a
    private module, relative to the package, and the class name), other spellings
    the command line accepts, and whether it runs a model in this process."""

    name: str
    module: str
    attribute: str
    aliases: tuple[str, ...] = ()
    local: bool = False


# The one place each backend is named: from_config, to_config, the lazy exports,
# compare and the command line read it.
REGISTRY: tuple[Provider, ...] = (
    Provider("qwen", "._local.qwen", "QwenReranker", local=True),
    Provider(
        "cross_encoder",
        "._local.cross_encoder",
        "CrossEncoderReranker",
        aliases=("cross-encoder",),
        local=True,
    ),
    Provider("embedding", "._local.embedding", "EmbeddingReranker", local=True),
    Provider("memos", "._remote.memos", "MemOSReranker"),
    Provider("cohere", "._remote.cohere", "CohereReranker"),
    Provider("http", "._remote.http_reranker", "HTTPReranker"),
    Provider(
        "zero_entropy",
        "._remote.zeroentropy",
        "ZeroEntropyReranker",
        aliases=("zeroentropy", "zero-entropy"),
    ),
    Provider("llm", "._llm.pointwise", "LLMReranker"),
    Provider("llm_listwise", "._llm.listwise", "LLMListwiseReranker"),
    Provider("fallback", "._fallback", "FallbackReranker"),
)
PROVIDERS: Mapping[str, Provider] = {provider.name: provider for provider in REGISTRY}
_SPELLINGS: Mapping[str, Provider] = {
    spelling: provider for provider in REGISTRY for spelling in (provider.name, *provider.aliases)
}


def provider_named(spelling: str) -> Provider | None:
    """The provider a name or one of its aliases (``cross-encoder``) spells, if any."""
    return _SPELLINGS.get(spelling)


# Constructor arguments that are never written into a config; a pickle carries them
# as a SecretStr.
_SECRETS = frozenset({"api_key"})
# Constructor arguments that hold the caller's own objects (clients with their
# transports, proxies and auth): a config cannot describe them, and a pickle of them
# could carry credentials, so to_config() and pickling refuse them.
_USER_OBJECTS = frozenset({"http_client", "async_http_client", "client", "async_client"})


# --------------------------------------------------------------------------- to_config


_SECRET_SUFFIXES = ("api_key", "_secret", "_password", "_token", "access_key", "secret_key")
_SECRET_NAMES = frozenset({"token", "secret", "password", "credentials", "api_key"})


_MASK = "**********"
# The user information of a URL (``scheme://user:password@``, or a token as the user):
# a proxy's or a server's credentials.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


def _secret_entry(key: object, item: object) -> bool:
    """Whether a mapping entry holds a secret: a secret name, or a URL with credentials."""
    return (isinstance(key, str) and _is_secret(key) and item is not None) or _has_credentials(item)


def _has_credentials(value: object) -> bool:
    return isinstance(value, str) and _URL_CREDENTIALS.search(value) is not None


def strip_secrets(value: Any) -> Any:
    """A copy of nested config data without key-, token-, secret- or password-named
    entries, and without strings holding a URL with credentials (a proxy's
    ``http://user:password@host``)."""
    if isinstance(value, Mapping):
        return {
            key: strip_secrets(item) for key, item in value.items() if not _secret_entry(key, item)
        }
    if isinstance(value, (list, tuple)):
        return [strip_secrets(item) for item in value if not _has_credentials(item)]
    return value


def mask_secrets(value: Any) -> Any:
    """Nested config data with key-, token-, secret- or password-named values masked,
    and the credentials of URLs (``http://**********@host``)."""
    if isinstance(value, Mapping):
        return {
            key: _MASK
            if isinstance(key, str) and _is_secret(key) and item is not None
            else mask_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(rf"\g<scheme>{_MASK}@", value)
    return value


def hide_secrets(value: Any) -> Any:
    """A copy of nested config data whose secret texts (the str values
    :func:`strip_secrets` drops) are wrapped in ``SecretStr``: kept, e.g. for a pickle,
    but never shown by a repr. Other values keep their type."""
    if isinstance(value, Mapping):
        return {
            key: SecretStr(item)
            if isinstance(item, str) and _secret_entry(key, item)
            else hide_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [SecretStr(item) if _has_credentials(item) else hide_secrets(item) for item in value]
    return value


def reveal_secrets(value: Any) -> Any:
    """The inverse of :func:`hide_secrets`: every ``SecretStr`` as its plain text."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {key: reveal_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [reveal_secrets(item) for item in value]
    return value


def secret_texts(value: Any) -> list[str]:
    """Every secret text in nested config data (secret-named values, URL credentials
    and their password part), longest first: what to scrub from an error message."""
    found: set[str] = set()

    def visit(key: object, item: object) -> None:
        if isinstance(item, SecretStr):
            item = item.get_secret_value()
        if isinstance(key, str) and _is_secret(key) and isinstance(item, (str, int, float)):
            found.add(str(item))
        if isinstance(item, str):
            for match in _URL_CREDENTIALS.finditer(item):
                userinfo = match["userinfo"]
                found.add(userinfo)
                found.update(part for part in userinfo.split(":", 1)[1:] if part)
        elif isinstance(item, Mapping):
            for inner_key, inner in item.items():
                visit(inner_key, inner)
        elif isinstance(item, (list, tuple)):
            for inner in item:
                visit(None, inner)

    visit(None, value)
    return sorted((text for text in found if text), key=len, reverse=True)


def _shown_name(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


# Options people pass to a backend that belong to each call.
BACKEND_CALL_OPTIONS: Mapping[str, str] = {
    name: f"{name} is not a backend option: pass top_n to each call "
    "(rerank(query, documents, top_n=...)) or to an adapter."
    for name in ("top_n", "top_k")
}


def did_you_mean(
    unknown: Iterable[object], valid: Iterable[str], notes: Mapping[str, str] | None = None
) -> str:
    """For each unknown name, the closest valid one (``difflib``: "Did you mean 'top_n'
    for 'top_k'?") or, with none close, its entry in ``notes``; "" when nothing helps."""
    valid_names = sorted(set(valid))
    hints = []
    for name in sorted(str(item) for item in unknown):
        close = difflib.get_close_matches(name, valid_names, n=1)
        if close:
            hints.append(f"Did you mean {close[0]!r} for {_shown_name(name)}?")
        elif notes and name in notes:
            hints.append(notes[name])
    return " ".join(hints)


def unknown_options(
    unknown: Iterable[object],
    valid: Iterable[str],
    *,
    owner: str,
    notes: Mapping[str, str] | None = None,
) -> str:
    """The message for options ``owner`` does not take: the unknown names, the closest
    valid name for each (:func:`did_you_mean`), then every valid name."""
    names = sorted(str(name) for name in unknown)
    valid_names = sorted(set(valid))
    shown = ", ".join(_shown_name(name) for name in names)
    hint = did_you_mean(names, valid_names, notes)
    message = f"Unknown option(s) [{shown}] for {owner}." + (f" {hint}" if hint else "")
    return message + f" Valid options: {', '.join(valid_names)}."


def _provider_of(cls: type[Any]) -> str:
    for provider in REGISTRY:
        if cls.__module__ == PACKAGE + provider.module and cls.__qualname__ == provider.attribute:
            return provider.name
    raise TypeError(
        f"{cls.__qualname__} is not one of this package's backends, so it has no config "
        f"(to_config covers {', '.join(sorted(PROVIDERS))}). It still pickles."
    )


def _plain(owner: str, key: str, value: Any) -> Any:
    """``value`` as JSON data for a config, or a TypeError saying why it cannot be."""
    if key == "llm":
        to_config = getattr(value, "to_config", None)
        if callable(to_config):
            return to_config()
        raise TypeError(
            f"{owner} wraps your own LLM object ({type(value).__name__}), which a config "
            "cannot describe. Build it with from_config({'provider': 'llm', 'config': "
            "{'llm': {'provider': 'openai', 'config': {...}}}}) to get one with a config, or "
            "pass llm=... to from_config when rebuilding."
        )
    if key == "rerankers":
        configs = []
        for position, backend in enumerate(value):
            to_config = getattr(backend, "to_config", None)
            if not callable(to_config):
                raise TypeError(
                    f"{owner}: rerankers[{position}] ({type(backend).__name__}) has no to_config()."
                )
            configs.append(to_config())
        return configs
    if key == "count_tokens":
        if value is estimate_tokens:
            return _OMIT
        raise TypeError(
            f"{owner}: count_tokens={value!r} is a function, which a config cannot hold; "
            "pass count_tokens=... to from_config when rebuilding."
        )
    if isinstance(value, StageThresholds):
        return list(value.cuts)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == "torch" and type(value).__name__ in ("dtype", "device"):
        return str(value).removeprefix("torch.")
    return _json_data(owner, key, value)


_OMIT = object()


def _json_data(owner: str, key: str, value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{owner}: {key}={value!r} is not a finite number.")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_data(owner, key, item) for item in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _json_data(owner, key, item) for k, item in value.items()}
    raise TypeError(
        f"{owner}: option {key}={type(value).__name__} is not plain data, so it cannot go "
        "into a config."
    )


def _rebuild(cls: type[Any], options: dict[str, Any]) -> Any:
    return cls(**options)


def _keyword_names(cls: type[Any]) -> frozenset[str] | None:
    """The keyword options ``cls``'s constructor takes (its named parameters, and what
    its ``**options`` take when the class names them with ``keyword_options()``);
    ``None`` when a bare ``**kwargs`` takes anything."""
    if cls in _KEYWORDS:
        return _KEYWORDS[cls]
    names: set[str] = set()
    open_ended = False
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            keyword_options = getattr(cls, "keyword_options", None)
            if callable(keyword_options):
                names |= keyword_options()
            else:
                open_ended = True
        elif parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            names.add(parameter.name)
    result = None if open_ended else frozenset(names)
    _KEYWORDS[cls] = result
    return result


_KEYWORDS: dict[type[Any], frozenset[str] | None] = {}


class Configurable:
    """What makes a backend configurable and picklable: the arguments its constructor
    was called with, recorded before ``__init__`` runs.

    * An option name the constructor does not take is an :class:`InvalidInputError`
      naming the closest valid one (``top_k`` -> ``top_n``), raised before anything
      is built.
    * :meth:`to_config` returns ``{"provider", "config"}`` with the options that were
      passed explicitly (defaults stay defaults), as plain JSON data; never the key.
    * Pickling stores the same options (Python objects allowed, e.g. a
      ``StageThresholds``) and calls the constructor again when unpickled, so clients,
      models and locks are rebuilt lazily there. An explicit ``api_key`` travels
      inside the pickle as a pydantic ``SecretStr`` (a pickle is a format for trusted
      processes: treat it like the key); a key the backend read from the environment
      is not pickled, and the rebuilt backend reads it from the environment of the
      process that unpickles it.
    * Your own HTTP/SDK clients and LLM objects cannot go into a config or a pickle:
      both raise ``TypeError`` naming the option (rebuild with ``from_config(config,
      http_client=...)``). ``copy.copy`` / ``copy.deepcopy`` build a new backend from
      the same arguments, key included, sharing those objects.
    """

    _config_call: tuple[tuple[Any, ...], dict[str, Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        valid = _keyword_names(cls)
        if valid is not None:
            unknown = [name for name in kwargs if name not in valid]
            if unknown:
                raise InvalidInputError(
                    unknown_options(unknown, valid, owner=cls.__name__, notes=BACKEND_CALL_OPTIONS)
                )
        instance = super().__new__(cls)
        recorded = dict(kwargs)
        for name in _SECRETS & set(recorded):
            if isinstance(recorded[name], str):
                recorded[name] = SecretStr(recorded[name])
        instance._config_call = (args, recorded)
        return instance

    def _config_options(self) -> dict[str, Any]:
        """The constructor's explicit arguments by name (``**options`` flattened)."""
        args, kwargs = self._config_call
        signature = inspect.signature(type(self).__init__)
        bound = signature.bind(self, *args, **kwargs)
        parameters = list(signature.parameters.values())
        options: dict[str, Any] = {}
        for parameter in parameters[1:]:
            if parameter.name not in bound.arguments:
                continue
            value = bound.arguments[parameter.name]
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                options.update(value)
            elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(
                        f"{type(self).__name__} was given extra positional arguments, which "
                        "cannot be rebuilt by name."
                    )
            else:
                options[parameter.name] = value
        return options

    def to_config(self) -> dict[str, Any]:
        """``{"provider": NAME, "config": {...}}``: what :func:`from_config` rebuilds
        into an equal backend. API keys are never included."""
        owner = type(self).__name__
        provider = _provider_of(type(self))
        config: dict[str, Any] = {}
        for key, value in self._config_options().items():
            if key in _SECRETS:
                continue
            if key in _USER_OBJECTS:
                if value is None:
                    continue
                raise TypeError(
                    f"{owner} was built with your own {key}, which a config cannot describe; "
                    f"pass {key}=... to from_config when rebuilding."
                )
            plain = _plain(owner, key, value)
            if plain is not _OMIT:
                config[key] = plain
        return {"provider": provider, "config": config}

    def __reduce__(self) -> tuple[Any, ...]:
        owner = type(self).__name__
        options = {}
        for key, value in self._config_options().items():
            if key in _SECRETS:
                if value is not None:  # recorded as a SecretStr by __new__
                    options[key] = value
                continue
            if key in _USER_OBJECTS and value is not None:
                raise TypeError(
                    f"Cannot pickle {owner} built with your own {key}: a client's transport, "
                    "auth and pools do not travel between processes. Pickle a backend built "
                    f"without {key}, or rebuild it in the worker."
                )
            if key == "llm" and not callable(getattr(value, "to_config", None)):
                raise TypeError(
                    f"Cannot pickle {owner} around your own LLM object "
                    f"({type(value).__name__}): it may hold API keys and clients. Build it "
                    "from a config (llm={'provider': ..., 'config': {...}}) or rebuild it in "
                    "the worker."
                )
            options[key] = value
        return (_rebuild, (type(self), options))

    def __copy__(self) -> Self:
        args, kwargs = self._config_call
        copied: Self = type(self)(*args, **kwargs)
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        try:
            options = self._config_options()
        except TypeError:
            return self.__copy__()
        if isinstance(options.get("rerankers"), (list, tuple)):
            options["rerankers"] = [copy.deepcopy(item, memo) for item in options["rerankers"]]
        copied: Self = type(self)(**options)
        return copied
