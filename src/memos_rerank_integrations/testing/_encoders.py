"""A tiny BERT cross-encoder with random weights and its own WordPiece tokenizer,
built offline with the ``tokenizers`` library."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_cross_encoder"]

# The words the tokenizer knows whole; any other word is split into pieces.
_CORPUS = [
    "Any liquor recommendations for me?",
    "User prefers Jiangxiang-flavored baijiu, like Moutai.",
    "I don't drink alcohol.",
    "What are the user's hobbies?",
    "User likes playing badminton.",
    "User is a backend developer in Hangzhou.",
    "User prefers concise replies.",
    "User is going on a business trip to Beijing next Wednesday.",
    "customer having login issues with mobile app",
    "science fiction books with space exploration themes",
    "What restaurants did I enjoy last month that had good vegetarian options?",
    "What are my food preferences? What movies do I like? important work tasks",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Reranking orders retrieved passages by their relevance to a query.",
    "A memory system stores facts about the user and recalls them later.",
    "Tea, coffee, wine and beer are drinks; tennis, football and chess are games.",
    "0 1 2 3 4 5 6 7 8 9 ! ? . , ; : ' \" ( ) - _ / @ # % & * + = < >",
]
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SUFFIXES = ["s", "ing", "ed", "er", "ers", "ly", "tion", "ment", "ness"]


def _new_tokenizer(vocab: dict[str, int] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _build_tokenizer() -> Any:
    from tokenizers import processors

    # The library's WordPieceTrainer breaks frequency ties in hash order, which
    # changes between processes; the vocabulary is derived here instead, with the
    # tokenizer's own normalizer and pre-tokenizer, so ids are the same every run.
    splitter = _new_tokenizer({"[UNK]": 0})
    words: set[str] = set()
    for line in _CORPUS:
        text = splitter.normalizer.normalize_str(line)
        words.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(text))
    chars = {char for word in words for char in word}
    pieces = words | chars | {f"##{char}" for char in chars} | {f"##{s}" for s in _SUFFIXES}
    vocab = _SPECIAL + sorted(pieces)
    tokenizer = _new_tokenizer({token: i for i, token in enumerate(vocab)})
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def build_tiny_cross_encoder(
    directory: str | os.PathLike[str],
    *,
    num_labels: int = 1,
    pad_token: bool = True,
    seed: int = 0,
    architecture: str = "bert",
    **config_overrides: Any,
) -> Path:
    """Save a tiny ``BertForSequenceClassification`` (random weights from ``seed``)
    and a WordPiece tokenizer built offline into ``directory``; return its path.

    ``num_labels`` sets the head's width (1 or 2 for rerankers). With
    ``pad_token=False`` neither the tokenizer nor the config defines a pad token,
    like some decoder-based checkpoints. ``architecture="xlm-roberta"`` saves an
    ``XLMRobertaForSequenceClassification`` instead (the architecture of
    ``BAAI/bge-reranker-*``: positions numbered from the pad id + 1, no token
    types, a dense + tanh classification head), with the same tokenizer.
    ``config_overrides`` go to the model's config class. The default
    ``initializer_range`` is large so that random scores spread out.
    """
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    if architecture not in ("bert", "xlm-roberta"):
        raise ValueError(f"architecture must be 'bert' or 'xlm-roberta', got {architecture!r}")

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    backend = _build_tokenizer()
    settings: dict[str, Any] = {
        "vocab_size": backend.get_vocab_size(),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "initializer_range": 0.5,
        "num_labels": num_labels,
        "pad_token_id": 0 if pad_token else None,
    }
    roberta = architecture == "xlm-roberta"
    if roberta:
        # Positions start at pad id + 1, so the table needs that many more rows.
        settings["max_position_embeddings"] += 2
        settings["type_vocab_size"] = 1
        settings["pad_token_id"] = 0
    settings.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = (
            XLMRobertaForSequenceClassification(XLMRobertaConfig(**settings))
            if roberta
            else BertForSequenceClassification(BertConfig(**settings))
        )
    config = model.config
    model.save_pretrained(path)
    names = ["input_ids", "attention_mask"]
    if not roberta:
        names.insert(1, "token_type_ids")
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        model_input_names=names,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        pad_token="[PAD]" if pad_token else None,
        model_max_length=config.max_position_embeddings - (2 if roberta else 0),
    )
    tokenizer.save_pretrained(path)
    return path
