"""A tiny Qwen3-Reranker look-alike: real tokenizer files and a real ``Qwen3ForCausalLM``
checkpoint with random weights, built offline in a second."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._local.tokenizer_file import qwen2_pipeline

__all__ = ["build_tiny_qwen_reranker"]

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not "special" in the real vocabulary: they survive decoding.
_ADDED_TOKENS = ["<think>", "</think>"]
_CORPUS = [
    "Judge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".',
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query",
    "<Query>: What are the user's hobbies?\n<Document>: User likes playing badminton.",
    "system\nuser\nassistant\n\n",
    "yes no yes no yes no Yes No yes. no. yes! no!",
    "Any liquor recommendations for me? User prefers Jiangxiang-flavored baijiu, like Moutai.",
    "I don't drink alcohol. User is a backend developer in Hangzhou who prefers concise replies.",
    "User is going on a business trip to Beijing next Wednesday. The meeting is at 10:30.",
    "The quick brown fox jumps over the lazy dog; a memory of 2024-05-01 about travel plans.",
    "Retrieve memories about the user's food preferences, movies, books and work tasks.",
    "用户喜欢喝酱香型白酒，比如茅台。 Café naïve résumé — emoji 🙂 and ümlauts.",
]


def build_tiny_qwen_reranker(
    directory: str | Path,
    *,
    tokenizer_vocab_size: int = 640,
    pad_token: str | None = "<|endoftext|>",
    seed: int = 0,
    training_texts: Sequence[str] = (),
    **config_overrides: Any,
) -> Path:
    """Save a tiny Qwen3-Reranker-shaped model (tokenizer and random weights) to
    ``directory`` and return its path; ``QwenReranker(path)`` loads it offline.

    ``tokenizer_vocab_size`` is the size of the trained BPE vocabulary. The model's
    ``vocab_size`` defaults to the tokenizer's size and may be set larger (the extra
    embedding rows are never produced by the tokenizer): that is how the benchmark
    builds a model with Qwen3-0.6B's 151,669 rows without a 151k-token tokenizer.
    ``config_overrides`` go to :class:`transformers.Qwen3Config` (e.g.
    ``num_hidden_layers=28, hidden_size=1024``). ``pad_token=None`` saves a
    tokenizer without a padding token, like some published Qwen checkpoints.
    ``training_texts`` add to the BPE training corpus (with a larger
    ``tokenizer_vocab_size``, whole words of those texts become single tokens, as
    in the real 151k vocabulary).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    # Qwen2/Qwen3's normalizer, pre-tokenizer and decoder, so BPE merges behave like
    # the real tokenizer's at the boundaries the reranker cares about.
    for part, component in qwen2_pipeline().items():
        setattr(tokenizer, part, component)
    trainer = BpeTrainer(
        vocab_size=tokenizer_vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*_CORPUS * 4, *training_texts], trainer=trainer)
    tokenizer.add_tokens(_ADDED_TOKENS)
    for word in ("yes", "no"):
        if tokenizer.token_to_id(word) is None:  # pragma: no cover - corpus guarantees it
            raise RuntimeError(f"The tiny BPE vocabulary lacks the token {word!r}.")

    fast: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token=pad_token,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=131072,
    )
    fast.save_pretrained(path)

    model_vocab_size = config_overrides.pop("vocab_size", len(fast))
    if model_vocab_size < len(fast):
        raise ValueError(
            f"vocab_size={model_vocab_size} is smaller than the tokenizer ({len(fast)})."
        )
    settings: dict[str, Any] = {
        "vocab_size": model_vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "pad_token_id": fast.pad_token_id,
        "eos_token_id": fast.convert_tokens_to_ids("<|im_end|>"),
    }
    settings.update(config_overrides)
    config = Qwen3Config(**settings)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # Random init gives yes/no logits too close to tell documents apart; a wider
    # spread makes ranking tests meaningful.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.08 if parameter.shape[-1] <= 256 else 0.02)
    model.save_pretrained(path)
    return path
