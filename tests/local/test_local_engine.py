"""What every local backend shares: bounded tokenization of long texts (exact against
tokenizing the whole text) and model loading that is safe from any number of threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from memos_rerank_integrations import (
    CrossEncoderReranker,
    EmbeddingReranker,
    QwenReranker,
)
from memos_rerank_integrations._local import runtime as engine
from memos_rerank_integrations._local import tokenize
from memos_rerank_integrations._local.embedding import default_embedding_model
from memos_rerank_integrations._local.tokenizer_file import open_tokenizer_file
from memos_rerank_integrations.testing import build_tiny_cross_encoder, build_tiny_qwen_reranker

from ..support import qwen_fixtures as _qwen_fixtures

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tokenizers(tiny_qwen_dir: Path, tiny_bert_dir: Path) -> dict[str, Any]:
    """Byte-level BPE with NFC (Qwen; through transformers and read straight from its
    file), WordPiece with NFD accent stripping (BERT): the two families the local
    backends meet."""
    return {
        "qwen-bpe": AutoTokenizer.from_pretrained(tiny_qwen_dir),
        "qwen-bpe-file": open_tokenizer_file(str(tiny_qwen_dir)),
        "minilm-wordpiece": AutoTokenizer.from_pretrained(default_embedding_model()),
        "tiny-wordpiece": AutoTokenizer.from_pretrained(tiny_bert_dir),
    }


PIECES = [
    *"ab Yz1:?!.'\n\t茅台🙂-",
    "e\u0301",
    "\u0301",
    "\u0323\u0302",
    "\u0f73",
    "\u1100\u1161",
    "\u1161",
    "\u11a8",
    "<|im_end|>",
    "[SEP]",
    "<think>",
    "  ",
    "'ll",
    "2024",
    "aaaaaaaa",
    "\u00c5",
    "\u212b",
    "ﬁ",
]
texts = st.lists(st.sampled_from(PIECES), max_size=80).map("".join)


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut after a few characters, at every power of two: boundaries land everywhere."""
    monkeypatch.setattr(tokenize, "_HEAD_MIN_CHARS", 2)
    monkeypatch.setattr(tokenize, "_CHARS_PER_TOKEN", 0)
    monkeypatch.setattr(tokenize, "_CUT_SEARCH", 3)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=texts, need=st.integers(1, 40))
def test_encode_head_is_a_prefix_of_the_full_tokenization(
    tokenizers: dict[str, Any], tiny_chunks: None, text: str, need: int
) -> None:
    for name, tokenizer in tokenizers.items():
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        (head,) = tokenize.encode_head(tokenizer, [text], need)
        assert head == full[: len(head)], name
        assert len(head) >= min(need, len(full)), name
        cut = tokenize.head_text(tokenizer, text, need)
        assert text.startswith(cut)
        assert tokenizer(cut, add_special_tokens=False)["input_ids"][:need] == full[:need], name


CRAFTED = [
    # a cut inside an added token would tokenize its pieces as text
    *("x" * k + "<|im_end|>" + " tail words" * 3 for k in range(12)),
    *("x" * k + "[SEP]" + " tail words" * 3 for k in range(8)),
    # normalization across the cut: marks composing with an earlier letter
    *("ab " * k + "d\u0316\u0307 e\u0301 \u1100\u1161 ok" for k in range(6)),
    # whitespace runs and newlines decided by the next character
    *(" " * k + "a" + " " * 7 + "b\n\n\n c" for k in range(6)),
    # one very long word
    "a" * 300 + " b",
    "1234567890" * 20,
]


@pytest.mark.parametrize("text", CRAFTED)
def test_encode_head_is_exact_for_every_need_on_crafted_texts(
    tokenizers: dict[str, Any], tiny_chunks: None, text: str
) -> None:
    for name, tokenizer in tokenizers.items():
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        for need in range(1, len(full) + 2):
            (head,) = tokenize.encode_head(tokenizer, [text], need)
            assert head == full[: len(head)], (name, need)
            assert len(head) >= min(need, len(full)), (name, need)


def test_encode_head_reads_only_what_it_needs(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["qwen-bpe"]
    sentence = "User is going on a business trip to Beijing next Wednesday. "
    for text in (sentence * 200_000, "茅台" * 3_000_000, "a" * 5_000_000):  # 12, 6, 5 MB
        (head,) = tokenize.encode_head(tokenizer, [text], 100)
        assert len(head) >= 100
        probe = text[:20_000]
        assert head == tokenizer(probe, add_special_tokens=False)["input_ids"][: len(head)]
        assert len(tokenize.head_text(tokenizer, text, 100)) < 50_000


def test_safe_cuts_respect_normalization_and_special_tokens() -> None:
    specials = ("<|im_end|>",)
    # Never before a combining mark, a Hangul vowel or inside a special token.
    for text, position in (
        ("xe\u0301\u0301\u0301y", 3),
        ("x\u1100\u1161y", 2),
        ("ab<|im_end|>cd", 6),
    ):
        cut, safe = tokenize._safe_cut(text, position, specials)
        assert safe
        assert cut <= position
        assert tokenize._stable(text[cut])
        start = text.find(specials[0])
        assert not (start != -1 and start < cut < start + len(specials[0]))


# -- loading from many threads ----------------------------------------------------------------


def _first_calls_at_once(make: list[Callable[[], Any]]) -> list[str]:
    """Build fresh rerankers and make their first (loading) calls from threads at once."""
    engine.clear_model_cache()
    rerankers = [factory() for factory in make]
    barrier = threading.Barrier(len(rerankers))
    errors: list[str] = []

    def first_call(reranker: Any) -> None:
        barrier.wait()
        try:
            results = reranker.rerank("What are the user's hobbies?", ["badminton", "tea"])
            assert len(results) == 2
        except Exception as exc:  # recorded, the test fails below
            errors.append(f"{type(reranker).__name__}: {type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=first_call, args=(r,)) for r in rerankers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return errors


def test_first_calls_of_different_models_from_threads_at_once(
    tiny_qwen_dir: Path, tiny_bert_dir: Path
) -> None:
    for _ in range(3):
        errors = _first_calls_at_once(
            [
                lambda: QwenReranker(tiny_qwen_dir, dtype="float32"),
                lambda: CrossEncoderReranker(tiny_bert_dir, dtype="bfloat16"),
                lambda: EmbeddingReranker(dtype="float32"),
                lambda: QwenReranker(tiny_qwen_dir, dtype="bfloat16"),
            ]
        )
        assert errors == []


def test_forward_passes_wait_while_a_model_loads(tiny_bert_dir: Path) -> None:
    """A load sets torch's process-wide default dtype (transformers' from_pretrained):
    no forward pass may run meanwhile. Tokenizing does not wait."""
    reranker = CrossEncoderReranker(tiny_bert_dir, dtype="float32")
    expected = [r.score for r in reranker.rerank("q", ["a memory", "another"])]
    started, release = threading.Event(), threading.Event()

    def slow_loader() -> object:
        started.set()
        release.wait(60)
        return object()

    loading = threading.Thread(
        target=engine.load_shared,
        args=(("slow-test-model", id(started)), slow_loader),
        kwargs={"model": "slow"},
    )
    loading.start()
    try:
        assert started.wait(60)
        with ThreadPoolExecutor(max_workers=1) as pool:
            scoring = pool.submit(reranker.rerank, "q", ["a memory", "another"])
            assert reranker.count_tokens("q", ["a memory"]) > 0  # tokenizing runs meanwhile
            time.sleep(0.5)
            assert not scoring.done()
            release.set()
            assert [r.score for r in scoring.result(timeout=60)] == pytest.approx(expected)
    finally:
        release.set()
        loading.join(timeout=60)


def test_a_loader_that_fails_releases_the_gate(tmp_path: Path, tiny_bert_dir: Path) -> None:
    engine.clear_model_cache()
    broken = build_tiny_qwen_reranker(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(Exception, match="Could not load"):
        QwenReranker(broken, dtype="float32").rerank("q", ["d"])
    # Scoring and loading still work afterwards.
    reranker = CrossEncoderReranker(tiny_bert_dir, dtype=torch.float32)
    assert len(reranker.rerank("q", ["a", "b"])) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_fused_steps_equal_the_separate_ops(dtype: str) -> None:
    """``Linear.silu`` / ``times`` / ``plus`` (prepacked: the step runs as a oneDNN
    post-op inside the matmul) compute what the separate torch ops do, both ways."""
    from memos_rerank_integrations._engine.linear import Linear, can_prepack

    torch.manual_seed(0)
    kind = getattr(torch, dtype)
    module = torch.nn.Linear(64, 48).to(kind)
    x = torch.randn(5, 64).to(kind)
    other = torch.randn(5, 48).to(kind)
    plain = torch.nn.functional.linear(x.float(), module.weight.float(), module.bias.float())
    expected = {
        "silu": torch.nn.functional.silu(plain),
        "times": plain * other.float(),
        "plus": plain + other.float(),
    }
    tolerance = 1e-5 if dtype == "float32" else 0.06
    ways = [False, True] if can_prepack(module.weight) else [False]
    for prepack in ways:
        linear = Linear(module, prepack=prepack)
        got = {
            "silu": linear.silu(x),
            "times": linear.times(x, other.clone()),
            "plus": linear.plus(x, other.clone()),
        }
        for name, value in got.items():
            assert value.dtype == kind
            assert torch.allclose(value.float(), expected[name], atol=tolerance, rtol=0.02), (
                prepack,
                name,
            )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepared_weights_put_heads_in_pairs_and_fold_columns(dtype: str) -> None:
    """The Qwen engine's prepacked copies: ``_prepared(pairs=, columns=)`` gives the
    weight and bias of ``x -> ((x * columns) @ weight.T + bias)[:, rows]`` with ``rows``
    each head's outputs in rotary pairs (i, i + half); a float32-stored weight prepared
    in bf16 is the bf16-cast weight's copy, bit for bit; ``Linear.from_weight``
    prepacks such a weight (stacked ones too)."""
    from memos_rerank_integrations._engine.linear import Linear, can_prepack
    from memos_rerank_integrations._engine.qwen3 import _prepared, _prepared_bias, _Scratch

    torch.manual_seed(0)
    kind = getattr(torch, dtype)
    stored32 = torch.nn.Linear(64, 48)
    module = torch.nn.Linear(64, 48).to(kind)
    with torch.no_grad():
        module.weight.copy_(stored32.weight)
        module.bias.copy_(stored32.bias)
    other = torch.nn.Linear(64, 16, bias=False).to(kind)
    x = torch.randn(5, 64).to(kind)
    head, half = 16, 8  # three heads of 16 outputs
    rows = torch.tensor(
        [h * head + s * half + i for h in range(3) for i in range(half) for s in (0, 1)]
    )
    columns = (torch.rand(64) + 0.5).to(kind)
    scaled = (x.float() * columns.float()).to(kind)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == "float32" else {"atol": 0.05, "rtol": 0.02}
    expected = torch.nn.functional.linear(scaled, module.weight, module.bias)[:, rows]
    stored = module.weight.detach().clone()
    scratch = _Scratch()
    weight = _prepared(module.weight, kind, scratch, pairs=head, columns=columns).clone()
    bias = _prepared_bias(module.bias, kind, pairs=head)
    assert bias is not None
    assert torch.equal(bias, module.bias.detach()[rows])
    folded = _prepared(module.weight, kind, scratch, columns=columns)
    torch.testing.assert_close(folded[rows], weight)
    assert torch.equal(module.weight, stored)  # the stored weight is never written
    cast = _prepared(stored32.weight, kind, scratch, pairs=head, columns=columns)
    assert cast.dtype == kind and torch.equal(cast, weight)
    torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias), expected, **tolerance)
    assert not torch.allclose(expected.float(), module(x).float(), atol=0.1)
    if not can_prepack(module.weight):
        pytest.skip("this torch has no oneDNN prepacked linear")
    linear = Linear.from_weight(weight, bias)
    assert linear.packed
    torch.testing.assert_close(linear(x), expected, **tolerance)
    stacked = Linear.from_weight(
        torch.cat([weight, other.weight]), torch.cat([bias, torch.zeros(16, dtype=kind)])
    )
    torch.testing.assert_close(stacked(x), torch.cat([expected, other(x)], 1), **tolerance)
