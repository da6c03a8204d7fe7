"""Rerankers built on a sequence-classification head (cross-encoders)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._encoder_base import (
    LoadedEncoder,
    LocalEncoderReranker,
    choose_pad_id,
    length_limit,
    run_batches,
)
from ._exceptions import ModelLoadError
from ._types import DEFAULT_THRESHOLDS, StageThresholds

if TYPE_CHECKING:
    import torch

__all__ = ["CrossEncoderReranker"]


class CrossEncoderReranker(LocalEncoderReranker):
    """Rerank with an ``AutoModelForSequenceClassification`` cross-encoder, such as
    ``BAAI/bge-reranker-v2-m3``, ``cross-encoder/ms-marco-MiniLM-L6-v2`` or a
    Qwen3-Reranker "-seq-cls" conversion.

    Each (query, document) pair is encoded as the tokenizer's text pair. Documents
    longer than ``max_length`` tokens (capped at the tokenizer's own limit) lose
    their tail; the query is kept whole unless it alone is too long, in which case
    both are cut.

    Scores: with ``normalize=True`` (the default) a probability in [0, 1] — the
    sigmoid of the logit for a one-logit head, the softmax probability of label 1
    (= ``sigmoid(logit_1 - logit_0)``) for a two-logit head. With
    ``normalize=False`` the raw logit (``logit_1 - logit_0`` for two logits).

    Weights load on first use and are shared by every reranker in the process with
    the same model, device and dtype. ``device=None`` picks CUDA, then MPS, then
    CPU; ``dtype=None`` picks bfloat16 where the hardware runs it natively, else
    float32 (both chosen at load time). Pairs are tokenized once, sorted by length
    and batched so that a batch holds at most ``max_batch_tokens`` padded tokens.
    Concurrent calls on one model take turns; :meth:`arerank` runs in a worker
    thread, and :meth:`rerank_many` scores several calls in shared batches.
    """

    _kind = "sequence-classification"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int = 512,
        normalize: bool = True,
        max_batch_tokens: int = 8192,
        thresholds: StageThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        super().__init__(
            model,
            device=device,
            dtype=dtype,
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
            normalize=normalize,
            thresholds=thresholds,
        )

    def _load(self, device: torch.device, dtype: torch.dtype) -> LoadedEncoder:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model)
        model = AutoModelForSequenceClassification.from_pretrained(self.model, dtype=dtype)
        labels = model.config.num_labels
        if labels not in (1, 2):
            raise ModelLoadError(
                f"Model {self.model!r} has a {labels}-label head; CrossEncoderReranker needs "
                "a relevance model with one logit (or two: not relevant / relevant)."
            )
        model.to(device).eval()
        pad_id = choose_pad_id(tokenizer, model.config)
        return LoadedEncoder(model, tokenizer, device, pad_id, length_limit(tokenizer))

    def _score(
        self, loaded: LoadedEncoder, calls: list[tuple[str, list[str]]]
    ) -> list[list[float]]:
        import torch

        max_length = self._max_length(loaded)
        encodings: dict[str, list[list[int]]] = {}
        for query, documents in calls:
            pairs = _encode_pairs(loaded.tokenizer, query, documents, max_length)
            for name, rows in pairs.items():
                encodings.setdefault(name, []).extend(rows)
        logits = run_batches(
            loaded, encodings, max_batch_tokens=self.max_batch_tokens, forward=_logits
        )
        raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        flat: list[float] = (torch.sigmoid(raw) if self.normalize else raw).tolist()
        scores = []
        start = 0
        for _, documents in calls:
            scores.append(flat[start : start + len(documents)])
            start += len(documents)
        return scores


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits: torch.Tensor = model(**batch).logits
    return logits


def _encode_pairs(
    tokenizer: Any, query: str, documents: list[str], max_length: int
) -> dict[str, list[list[int]]]:
    # "only_second" keeps the query whole; it cannot when the query alone fills
    # max_length, and then both sides are cut (the tokenizer would raise otherwise).
    query_tokens = len(tokenizer(query, add_special_tokens=False)["input_ids"])
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - query_tokens
    encoded = tokenizer(
        [query] * len(documents),
        documents,
        truncation="only_second" if room >= 1 else "longest_first",
        max_length=max_length,
    )
    return {name: list(rows) for name, rows in encoded.items()}
