"""Rerankers built on a sequence-classification head (cross-encoders)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._engine.bert import packed_bert
from .._exceptions import InvalidInputError, ModelLoadError
from .._types import DEFAULT_THRESHOLDS, StageThresholds
from .encoder import EncodedCalls, LoadedEncoder, LocalEncoderReranker, load_encoder, run_batches
from .tokenize import head_text

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

    ``query_template`` and ``document_template`` wrap each side of the pair
    before tokenization (each holds its placeholder, ``{query}`` or
    ``{document}``, once). Models converted from a prompted reranker need them,
    e.g. Qwen3-Reranker "-seq-cls" checkpoints (see the docs' vLLM page). Text after
    ``{document}`` is never cut: a long document loses the tail of its own text
    only.

    Scores: with ``normalize=True`` (the default) a probability in [0, 1] — the
    sigmoid of the logit for a one-logit head, the softmax probability of label 1
    (= ``sigmoid(logit_1 - logit_0)``) for a two-logit head. With
    ``normalize=False`` the raw logit (``logit_1 - logit_0`` for two logits).

    A checkpoint it would score at random is a :class:`ModelLoadError` when it loads:
    one lacking weights (e.g. an original Qwen3-Reranker, a causal LM with no
    classification head: the error says to use ``QwenReranker``) or holding them in
    another shape than its config says, a head of more than two labels, or two
    labels named so that label 0 is the relevant one.

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
        query_template: str = "{query}",
        document_template: str = "{document}",
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
        self.query_template = _check_template("query_template", query_template, "{query}")
        self.document_template = _check_template(
            "document_template", document_template, "{document}"
        )

    def _load(self, device: torch.device, dtype: torch.dtype) -> LoadedEncoder:
        from transformers import AutoModelForSequenceClassification

        loaded = load_encoder(
            self.model,
            AutoModelForSequenceClassification,
            device,
            dtype,
            reranker="CrossEncoderReranker",
        )
        _check_labels(self.model, loaded.model.config)
        # The engine owns the layers' weights (held once, prepacked for oneDNN on CPU).
        engine = packed_bert(loaded.model, own_weights=True)
        if engine is not None:
            loaded.packed = engine.logits
        return loaded

    def count_tokens(self, query: str, documents: Sequence[str]) -> int:
        """The tokens of every (query, document) pair as the model reads them: the
        sum over documents of the pair's length after templates, truncation to
        ``max_length`` and the tokenizer's special tokens."""
        return super().count_tokens(query, documents)

    def _encode(self, loaded: LoadedEncoder, calls: list[tuple[str, list[str]]]) -> EncodedCalls:
        max_length = self._max_length(loaded)
        head, tail = self.document_template.split("{document}")
        tokenizer = loaded.tokenizer
        encodings: dict[str, list[list[int]]] = {}
        counts = []
        for query, documents in calls:
            # Only the first max_length tokens of any text can reach the model.
            query_text = self.query_template.replace("{query}", query)
            query_text = head_text(tokenizer, query_text, max_length + 1)
            pairs = _encode_pairs(
                tokenizer,
                query_text,
                [head_text(tokenizer, head + document, max_length + 1) for document in documents],
                tail,
                max_length,
            )
            for name, rows in pairs.items():
                encodings.setdefault(name, []).extend(rows)
            counts.append(len(documents))
        tokens = []
        start = 0
        for count in counts:
            tokens.append(sum(len(ids) for ids in encodings["input_ids"][start : start + count]))
            start += count
        return EncodedCalls(encodings, counts, tokens)

    def _score(self, loaded: LoadedEncoder, encoded: EncodedCalls) -> list[list[float]]:
        import torch

        logits = run_batches(
            loaded, encoded.encodings, max_batch_tokens=self.max_batch_tokens, forward=_logits
        )
        raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        flat: list[float] = (torch.sigmoid(raw) if self.normalize else raw).tolist()
        scores = []
        start = 0
        for count in encoded.plan:
            scores.append(flat[start : start + count])
            start += count
        return scores


# Label names that say which of two logits is the relevant one.
_RELEVANT_NAMES = frozenset({"relevant", "positive", "pos", "yes", "true", "match", "entailment"})
_IRRELEVANT_NAMES = frozenset(
    {"irrelevant", "not relevant", "not_relevant", "negative", "neg", "no", "false", "no match"}
)


def _check_labels(model: str, config: Any) -> None:
    """A relevance head has one logit, or two with label 1 the relevant one: a head of
    another width, or two labels whose names say label 0 is the relevant one, is a
    :class:`ModelLoadError` (the scores would be meaningless or inverted)."""
    labels = config.num_labels
    if labels not in (1, 2):
        raise ModelLoadError(
            f"Model {model!r} has a {labels}-label head; CrossEncoderReranker needs "
            "a relevance model with one logit (or two: not relevant / relevant)."
        )
    if labels == 2:
        names = getattr(config, "id2label", None) or {}
        first = str(names.get(0, "")).strip().lower()
        second = str(names.get(1, "")).strip().lower()
        if first in _RELEVANT_NAMES or second in _IRRELEVANT_NAMES:
            raise ModelLoadError(
                f"Model {model!r} names its labels 0={names.get(0)!r}, 1={names.get(1)!r}: "
                "CrossEncoderReranker scores label 1 as the relevant one, so its scores "
                "would be inverted. Use a checkpoint whose label 1 means relevant."
            )


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits: torch.Tensor = model(**batch).logits
    return logits


def _check_template(name: str, template: object, placeholder: str) -> str:
    if not isinstance(template, str) or template.count(placeholder) != 1:
        raise InvalidInputError(
            f"{name} must be a str holding {placeholder} exactly once, got {template!r}."
        )
    return template


def _encode_pairs(
    tokenizer: Any, query: str, documents: list[str], tail: str, max_length: int
) -> dict[str, list[list[int]]]:
    """Token ids of each (query, document + tail) pair, at most ``max_length`` long.

    A pair that fits is the tokenizer's own encoding of the two texts. A longer
    one loses the end of the document; the query and ``tail`` stay whole.
    """
    if not tail:
        return _truncated_pairs(tokenizer, query, documents, max_length)
    whole = _as_lists(tokenizer([query] * len(documents), [d + tail for d in documents]))
    too_long = [i for i, ids in enumerate(whole["input_ids"]) if len(ids) > max_length]
    if not too_long:
        return whole
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    cut = _truncated_pairs(
        tokenizer,
        query,
        [documents[i] for i in too_long],
        max_length - len(tail_ids),
        special_tokens_mask=True,
    )
    specials = cut.pop("special_tokens_mask")
    for row, i in enumerate(too_long):
        # The tail goes after the document's last token, before the closing specials.
        end = len(specials[row])
        while end > 0 and specials[row][end - 1]:
            end -= 1
        for name in whole:
            ids = cut[name][row]
            if name == "input_ids":
                insert = tail_ids
            else:
                insert = [ids[end - 1] if end > 0 else 0] * len(tail_ids)
            whole[name][i] = ids[:end] + insert + ids[end:]
    return whole


def _truncated_pairs(
    tokenizer: Any,
    query: str,
    documents: list[str],
    max_length: int,
    *,
    special_tokens_mask: bool = False,
) -> dict[str, list[list[int]]]:
    # "only_second" keeps the query whole; it cannot when the query alone fills
    # max_length, and then both sides are cut (the tokenizer would raise otherwise).
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    if max_length < specials + 2:
        raise InvalidInputError(
            f"max_length leaves only {max_length} tokens for the query and document; "
            "raise max_length or shorten document_template."
        )
    query_tokens = len(tokenizer(query, add_special_tokens=False)["input_ids"])
    room = max_length - specials - query_tokens
    encoded = tokenizer(
        [query] * len(documents),
        documents,
        truncation="only_second" if room >= 1 else "longest_first",
        max_length=max_length,
        return_special_tokens_mask=special_tokens_mask,
    )
    return _as_lists(encoded)


def _as_lists(encoded: Any) -> dict[str, list[list[int]]]:
    return {name: [list(row) for row in rows] for name, rows in encoded.items()}
