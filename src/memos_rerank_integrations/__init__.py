"""Relevance reranking for LangChain, LlamaIndex and agent-memory pipelines.

The core types are imported eagerly; backends (and ``from_config``) are imported
on first access so that ``import memos_rerank_integrations`` never imports torch,
langchain, llama_index or cohere.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    from ._cohere import CohereReranker
    from ._compare import Comparison, acompare, compare
    from ._config import from_config
    from ._cross_encoder import CrossEncoderReranker
    from ._embedding import EmbeddingReranker
    from ._fallback import FallbackReranker
    from ._http_reranker import HTTPReranker
    from ._llm import LLMReranker
    from ._memos import MemOSReranker
    from ._qwen import QwenReranker
    from ._zeroentropy import ZeroEntropyReranker

__version__ = "0.1.0"

# Backend name -> private module that defines it, imported on first access.
_LAZY = {
    "QwenReranker": "._qwen",
    "CrossEncoderReranker": "._cross_encoder",
    "EmbeddingReranker": "._embedding",
    "MemOSReranker": "._memos",
    "CohereReranker": "._cohere",
    "HTTPReranker": "._http_reranker",
    "ZeroEntropyReranker": "._zeroentropy",
    "FallbackReranker": "._fallback",
    "LLMReranker": "._llm",
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
