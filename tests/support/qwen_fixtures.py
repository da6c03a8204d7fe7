"""Fixtures for the QwenReranker tests: a tiny Qwen3-Reranker built offline once per
session, and a plain implementation of the model card's transformers recipe."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from memos_rerank_integrations._qwen_prompt import DEFAULT_INSTRUCTION, PROMPT_PREFIX, PROMPT_SUFFIX
from memos_rerank_integrations.testing import build_tiny_qwen_reranker


class ModelCardRecipe:
    """The Qwen3-Reranker model card's transformers code, kept as plain as the card."""

    def __init__(self, path: Path, *, dtype: torch.dtype = torch.float32, max_length: int = 8192):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.max_length = max_length
        self.prefix_tokens = self.tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")

    def sequences(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[list[int]]:
        """The token ids the card's code below feeds the model (unpadded)."""
        if instruction is None:
            instruction = DEFAULT_INSTRUCTION
        pairs = [
            f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}" for doc in documents
        ]
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        return [self.prefix_tokens + list(ele) + self.suffix_tokens for ele in inputs["input_ids"]]

    def __call__(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        if instruction is None:
            instruction = DEFAULT_INSTRUCTION
        pairs = [
            f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}" for doc in documents
        ]
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        # The card also passes max_length here, which padding=True ignores (with a warning).
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt")
        with torch.no_grad():
            batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores: list[float] = batch_scores[:, 1].exp().tolist()
        return scores


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_reranker(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_qwen_nopad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights and vocabulary, but a tokenizer without a padding token."""
    return build_tiny_qwen_reranker(tmp_path_factory.mktemp("tiny-qwen-nopad"), pad_token=None)


@pytest.fixture(scope="session")
def qwen_recipe(tiny_qwen_dir: Path) -> ModelCardRecipe:
    return ModelCardRecipe(tiny_qwen_dir)


def by_index(results: Sequence[Any]) -> list[float]:
    """Scores in input order, from results sorted best first."""
    scores = [0.0] * len(results)
    for result in results:
        scores[result.index] = result.score
    return scores
