"""The Qwen3-Reranker model card's prompt: what the local backend runs and what an
HTTP server (vLLM's score template) is sent."""

from __future__ import annotations

__all__ = ["DEFAULT_INSTRUCTION", "DEFAULT_MODEL", "PROMPT_PREFIX", "PROMPT_SUFFIX", "format_body"]

DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PROMPT_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the "
    'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n"
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_body(instruction: str, query: str, document: str) -> str:
    """The model card's prompt body (the only part that is ever truncated)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
