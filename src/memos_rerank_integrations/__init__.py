"""Relevance reranking for LangChain, LlamaIndex and agent-memory pipelines.

The core types are imported eagerly; backends (and ``from_config``) are imported
on first access so that ``import memos_rerank_integrations`` never imports torch,
langchain, llama_index or cohere.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._configurable import REGISTRY
from ._exceptions import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    ModelLoadError,
    RateLimitError,
    RerankError,
    RerankTimeoutError,
)
from ._types import DEFAULT_THRESHOLDS, Reranker, RerankResult, Stage, StageThresholds

if TYPE_CHECKING:
    from ._compare import Comparison, acompare, compare
    from ._config import from_config
    from ._fallback import FallbackReranker
    from ._llm.listwise import LLMListwiseReranker
    from ._llm.pointwise import LLMReranker
    from ._local.cross_encoder import CrossEncoderReranker
    from ._local.embedding import EmbeddingReranker
    from ._local.qwen import QwenReranker
    from ._remote.cohere import CohereReranker
    from ._remote.http_reranker import HTTPReranker
    from ._remote.memos import MemOSReranker
    from ._remote.zeroentropy import ZeroEntropyReranker

__version__ = "0.1.0"

# Public name -> private module that defines it, imported on first access: every
# backend of the registry, and the config and compare helpers.
_LAZY = {
    **{provider.attribute: provider.module for provider in REGISTRY},
    "from_config": "._config",
    "compare": "._compare",
    "acompare": "._compare",
    "Comparison": "._compare",
}

__all__ = [
    "DEFAULT_THRESHOLDS",
    "AuthenticationError",
    "BackendUnavailableError",
    "CohereReranker",
    "Comparison",
    "CrossEncoderReranker",
    "EmbeddingReranker",
    "FallbackReranker",
    "HTTPReranker",
    "InvalidInputError",
    "LLMListwiseReranker",
    "LLMReranker",
    "MalformedResponseError",
    "MemOSReranker",
    "ModelLoadError",
    "QwenReranker",
    "RateLimitError",
    "RerankError",
    "RerankResult",
    "RerankTimeoutError",
    "Reranker",
    "Stage",
    "StageThresholds",
    "ZeroEntropyReranker",
    "__version__",
    "acompare",
    "compare",
    "from_config",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
