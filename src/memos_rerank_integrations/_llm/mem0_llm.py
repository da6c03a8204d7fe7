"""A Mem0 LLM (any provider of Mem0's ``LlmFactory``) as the chat model of an LLM reranker."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._configurable import hide_secrets, reveal_secrets, secret_texts, strip_secrets
from .._exceptions import InvalidInputError, MalformedResponseError

__all__ = ["Mem0LLM"]


_ROLES = {"human": "user", "ai": "assistant", "system": "system", "user": "user"}
_DEFAULT_LLM_TIMEOUT = 60.0


class Mem0LLM:
    """A Mem0 LLM (any provider of Mem0's ``LlmFactory``: ``openai``, ``anthropic``,
    ``ollama``, ``litellm``, ...) as the chat model of an
    :class:`~memos_rerank_integrations.LLMReranker`.

    What ``from_config`` builds for an LLM given as ``{"provider", "config"}`` (and
    for Mem0's ``llm_reranker`` blocks). It has a config, so the reranker has one too
    and pickles. :meth:`to_config` holds no secret: ``api_key`` and other key-, token-,
    secret- or password-named fields are dropped, and so is every URL with credentials
    (a proxy's ``http://user:password@host`` in ``http_client_proxies``); an LLM rebuilt
    from it reads its key from the environment (e.g. ``OPENAI_API_KEY``). A pickle keeps
    the whole config, those secrets wrapped in ``SecretStr`` (a pickle is a format for
    trusted processes), so the unpickled LLM talks through the same proxy with the same
    key. Errors from Mem0 while building the LLM have every secret masked. ``timeout``
    (seconds) bounds each request of clients built on
    the OpenAI SDK (Mem0's ``openai``, ``deepseek``, ``xai``, ``vllm``, ``lmstudio``...);
    other providers keep their own client's timeouts.
    """

    def __init__(
        self,
        provider: str = "openai",
        config: Mapping[str, Any] | None = None,
        *,
        timeout: float = _DEFAULT_LLM_TIMEOUT,
    ) -> None:
        from mem0.utils.factory import LlmFactory

        providers = LlmFactory.provider_to_class
        if not isinstance(provider, str) or provider not in providers:
            raise InvalidInputError(
                f"Unknown Mem0 LLM provider {provider!r}. Valid providers: "
                f"{', '.join(sorted(providers))}."
            )
        if config is not None and not isinstance(config, Mapping):
            raise InvalidInputError(
                f"The LLM config must be a mapping, got {type(config).__name__}."
            )
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise InvalidInputError(f"timeout must be a positive number, got {timeout!r}.")
        options = dict(config or {})
        self.provider = provider
        self.timeout = float(timeout)
        self._config: dict[str, Any] = strip_secrets(options)
        # What a pickle carries: the whole config, secrets wrapped so no repr shows them.
        self._pickled: dict[str, Any] = hide_secrets(options)
        secrets = secret_texts(options)
        error: InvalidInputError | None = None
        try:
            self._llm = LlmFactory.create(provider, options)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            for secret in secrets:
                message = message.replace(secret, "**********")
            error = InvalidInputError(
                f"Mem0 could not build its {provider!r} LLM from this config ({message[:300]})."
            )
        if error is not None:
            raise error  # outside the handler: the original may show the key
        client = getattr(self._llm, "client", None)
        with_options = getattr(client, "with_options", None)
        if callable(with_options):
            self._llm.client = with_options(timeout=self.timeout)

    @property
    def model(self) -> str | None:
        model = getattr(getattr(self._llm, "config", None), "model", None)
        return model if isinstance(model, str) else None

    def __repr__(self) -> str:
        return f"Mem0LLM(provider={self.provider!r}, model={self.model!r})"

    def invoke(self, messages: object) -> str:
        """Ask the model: ``messages`` is a str or ``(role, text)`` pairs."""
        if isinstance(messages, str):
            chat = [{"role": "user", "content": messages}]
        else:
            chat = [
                {"role": _ROLES.get(str(role), str(role)), "content": str(text)}
                for role, text in messages  # type: ignore[attr-defined]
            ]
        answer = self._llm.generate_response(messages=chat)
        if not isinstance(answer, str):
            raise MalformedResponseError(
                f"The Mem0 {self.provider!r} LLM answered with {type(answer).__name__}, not text.",
                backend=f"llm:{self.provider}",
            )
        return answer

    def to_config(self) -> dict[str, Any]:
        """``{"provider", "config"}`` (plus ``timeout`` when not the default), without
        keys or URLs with credentials."""
        spec: dict[str, Any] = {"provider": self.provider, "config": dict(self._config)}
        if self.timeout != _DEFAULT_LLM_TIMEOUT:
            spec["timeout"] = self.timeout
        return spec

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_llm, (self.provider, dict(self._pickled), self.timeout))


def _rebuild_llm(provider: str, config: dict[str, Any], timeout: float) -> Mem0LLM:
    return Mem0LLM(provider, reveal_secrets(config), timeout=timeout)
