"""The base of every backend, :class:`Configurable`: the arguments its constructor was
called with, ``to_config()``, pickling and copies, with secrets kept out; and the
provider registry, which names each backend once (names and module paths only:
nothing here imports a backend)."""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from ._types import StageThresholds, estimate_tokens

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "PACKAGE",
    "PROVIDERS",
    "REGISTRY",
    "Configurable",
    "Provider",
    "mask_secrets",
    "provider_named",
    "strip_secrets",
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


# Constructor arguments that are never written into a config or a pickle.
_SECRETS = frozenset({"api_key"})
# Backends whose key can only be passed as an argument (no environment variable): a
# pickle, which never holds the key, could not give it back, so pickling one that has
# a key is refused.
_KEY_ONLY_AS_ARGUMENT = frozenset({"HTTPReranker"})
# Constructor arguments that hold the caller's own objects (clients with their
# transports, proxies and auth): a config cannot describe them, and a pickle of them
# could carry credentials, so to_config() and pickling refuse them.
_USER_OBJECTS = frozenset({"http_client", "async_http_client", "client", "async_client"})


# --------------------------------------------------------------------------- to_config


_SECRET_SUFFIXES = ("api_key", "_secret", "_password", "_token", "access_key", "secret_key")
_SECRET_NAMES = frozenset({"token", "secret", "password", "credentials", "api_key"})


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


def strip_secrets(value: Any) -> Any:
    """A copy of nested config data without key-, token-, secret- or password-named entries."""
    if isinstance(value, Mapping):
        return {
            key: strip_secrets(item)
            for key, item in value.items()
            if not (isinstance(key, str) and _is_secret(key))
        }
    if isinstance(value, (list, tuple)):
        return [strip_secrets(item) for item in value]
    return value


def mask_secrets(value: Any) -> Any:
    """Nested config data with key-, token-, secret- or password-named values masked."""
    if isinstance(value, Mapping):
        return {
            key: "**********"
            if isinstance(key, str) and _is_secret(key) and item is not None
            else mask_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [mask_secrets(item) for item in value]
    return value


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


class Configurable:
    """What makes a backend configurable and picklable: the arguments its constructor
    was called with, recorded before ``__init__`` runs.

    * :meth:`to_config` returns ``{"provider", "config"}`` with the options that were
      passed explicitly (defaults stay defaults), as plain JSON data; never the key.
    * Pickling stores the same options (Python objects allowed, e.g. a
      ``StageThresholds``) and calls the constructor again when unpickled, so clients,
      models and locks are rebuilt lazily there. The key is never pickled: the rebuilt
      backend reads it from the environment, as a backend built without ``api_key``
      does (unpickling raises :class:`AuthenticationError` if it is not set there).
    * Your own HTTP/SDK clients and LLM objects cannot go into a config or a pickle:
      both raise ``TypeError`` naming the option (rebuild with ``from_config(config,
      http_client=...)``). ``copy.copy`` / ``copy.deepcopy`` build a new backend from
      the same arguments, key included, sharing those objects.
    """

    _config_call: tuple[tuple[Any, ...], dict[str, Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
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
                if value is not None and type(self).__name__ in _KEY_ONLY_AS_ARGUMENT:
                    raise TypeError(
                        f"Cannot pickle {owner} with an api_key: pickles never hold keys, and "
                        f"{owner} reads none from the environment. Rebuild it in the worker "
                        "with from_config(backend.to_config(), api_key=...)."
                    )
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
