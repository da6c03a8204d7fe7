"""CrossEncoderReranker against a plain transformers implementation, on tiny BERTs
built offline."""

from __future__ import annotations

import asyncio
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from memos_rerank_integrations import (
    CrossEncoderReranker,
    InvalidInputError,
    ModelLoadError,
    StageThresholds,
    from_config,
)
from memos_rerank_integrations._local import runtime as engine
from memos_rerank_integrations.testing import build_tiny_cross_encoder, build_tiny_qwen_reranker

from ..support.checkpoints import with_config, without_weights

QUERY = "What are the user's hobbies?"
DOCUMENTS = [
    "User likes playing badminton.",
    "User is a backend developer in Hangzhou.",
    "User prefers concise replies.",
    "",
    "用户喜欢酱香型白酒，比如茅台。 Ünïcödé text too.",
    " ".join(["User is going on a business trip to Beijing next Wednesday."] * 20),
    "I don't drink alcohol.",
]


@pytest.fixture(scope="module")
def one_label(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("one-label"))


@pytest.fixture(scope="module")
def two_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("two-labels"), num_labels=2, seed=1)


@pytest.fixture(scope="module")
def no_pad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("no-pad"), pad_token=False, seed=2)


def reference_logits(
    path: Path,
    query: str,
    documents: list[str],
    *,
    max_length: int,
    truncation: str = "only_second",
) -> torch.Tensor:
    """One pair at a time, no padding: the plain transformers recipe.

    Pairs go in as one-element lists, as sentence-transformers' CrossEncoder passes
    them: a bare ``tokenizer(query, "")`` drops an empty document's [SEP] (an empty
    string reads as "no pair"), while lists keep the pair format for every document.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for document in documents:
            inputs = tokenizer(
                [query],
                [document],
                truncation=truncation,
                max_length=max_length,
                return_tensors="pt",
            )
            rows.append(model(**inputs).logits[0])
    return torch.stack(rows)


def scores_by_index(results: list) -> list[float]:
    ordered = sorted(results, key=lambda result: result.index)
    assert [result.index for result in ordered] == list(range(len(results)))
    return [result.score for result in ordered]


@pytest.mark.parametrize("max_batch_tokens", [1, 64, 100_000])
@pytest.mark.parametrize("max_length", [24, 128])
def test_scores_equal_the_plain_recipe(
    one_label: Path, max_length: int, max_batch_tokens: int
) -> None:
    reranker = CrossEncoderReranker(
        one_label, dtype="float32", max_length=max_length, max_batch_tokens=max_batch_tokens
    )
    expected = torch.sigmoid(reference_logits(one_label, QUERY, DOCUMENTS, max_length=max_length))
    got = scores_by_index(reranker.rerank(QUERY, DOCUMENTS))
    assert got == pytest.approx(expected[:, 0].tolist(), abs=1e-5)
    # The long document really was cut, so the comparison covers truncation.
    tokenizer = AutoTokenizer.from_pretrained(one_label)
    assert len(tokenizer(QUERY, DOCUMENTS[5])["input_ids"]) > max_length


def test_single_document(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype=torch.float32)
    [result] = reranker.rerank(QUERY, [DOCUMENTS[0]])
    expected = torch.sigmoid(reference_logits(one_label, QUERY, DOCUMENTS[:1], max_length=128))
    assert result.index == 0
    assert result.score == pytest.approx(expected.item(), abs=1e-5)


def test_truncation_keeps_the_query(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=16)
    long_document = DOCUMENTS[5]
    # A query that differs only in a late word changes the score: it was not cut.
    first = reranker.rerank("what are the hobbies of the user", [long_document])[0].score
    second = reranker.rerank("what are the hobbies of the developer", [long_document])[0].score
    assert first != pytest.approx(second, abs=1e-6)
    # A document that differs only after the cut scores the same.
    same = reranker.rerank(QUERY, [long_document, long_document + " badminton badminton"])
    assert same[0].score == pytest.approx(same[1].score, abs=1e-6)


def test_query_longer_than_max_length_cuts_both(one_label: Path) -> None:
    query = " ".join(["what are the user's hobbies"] * 10)
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=16)
    expected = torch.sigmoid(
        reference_logits(one_label, query, DOCUMENTS, max_length=16, truncation="longest_first")
    )
    assert scores_by_index(reranker.rerank(query, DOCUMENTS)) == pytest.approx(
        expected[:, 0].tolist(), abs=1e-5
    )


def test_max_length_is_capped_at_the_tokenizers_limit(one_label: Path) -> None:
    # The tiny model has 128 positions; a larger max_length must not overflow them.
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=10_000)
    expected = torch.sigmoid(reference_logits(one_label, QUERY, DOCUMENTS, max_length=128))
    assert scores_by_index(reranker.rerank(QUERY, DOCUMENTS)) == pytest.approx(
        expected[:, 0].tolist(), abs=1e-5
    )


def test_normalize_false_returns_raw_logits(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32", normalize=False)
    expected = reference_logits(one_label, QUERY, DOCUMENTS, max_length=128)[:, 0]
    got = scores_by_index(reranker.rerank(QUERY, DOCUMENTS))
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert any(score < 0 for score in got) and any(score > 1 for score in got)


def test_two_label_head(two_labels: Path) -> None:
    logits = reference_logits(two_labels, QUERY, DOCUMENTS, max_length=128)
    probabilities = torch.softmax(logits, dim=-1)[:, 1]
    normalized = CrossEncoderReranker(two_labels, dtype="float32").rerank(QUERY, DOCUMENTS)
    assert scores_by_index(normalized) == pytest.approx(probabilities.tolist(), abs=1e-5)
    raw = CrossEncoderReranker(two_labels, dtype="float32", normalize=False).rerank(
        QUERY, DOCUMENTS
    )
    # A raw score is a difference of two logits of size ~5: float32 rounding in a padded
    # batch (seen with transformers 5.24) moves it by up to ~1e-5 while P(relevant) stays
    # within 1e-5, so the raw tolerance scales with the logits' size.
    tolerance = 1e-5 * max(1.0, float(logits.abs().max()))
    assert scores_by_index(raw) == pytest.approx(
        (logits[:, 1] - logits[:, 0]).tolist(), abs=tolerance
    )


def test_more_than_two_labels_is_a_load_error(tmp_path: Path) -> None:
    path = build_tiny_cross_encoder(tmp_path, num_labels=3)
    with pytest.raises(ModelLoadError, match="3-label head"):
        CrossEncoderReranker(path, dtype="float32").rerank(QUERY, DOCUMENTS)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3-Reranker-shaped checkpoint: a Qwen3ForCausalLM, no classification head."""
    return build_tiny_qwen_reranker(tmp_path_factory.mktemp("causal-lm"))


def test_a_causal_lm_checkpoint_is_refused_naming_qwen_reranker(causal_lm: Path) -> None:
    """transformers would give the missing head random weights: every process would
    rank differently. The error says so and names the class that scores this model."""
    engine.clear_model_cache()
    reranker = CrossEncoderReranker(causal_lm, dtype="float32")
    with pytest.raises(ModelLoadError) as info:
        reranker.rerank(QUERY, DOCUMENTS)
    message = str(info.value)
    assert "Qwen3ForCausalLM" in message and "score.weight" in message
    assert "at random" in message and "QwenReranker" in message
    assert not engine._cache


def test_mem0s_huggingface_block_refuses_a_causal_lm_checkpoint(causal_lm: Path) -> None:
    backend = from_config({"provider": "huggingface", "config": {"model": str(causal_lm)}})
    assert isinstance(backend, CrossEncoderReranker)
    with pytest.raises(ModelLoadError, match="QwenReranker"):
        backend.rerank(QUERY, DOCUMENTS)


def test_mem0s_huggingface_block_cuts_pairs_at_its_max_length(one_label: Path) -> None:
    """The block's max_length reaches the reranker: its scores are Mem0's own
    HuggingFaceReranker's at that max_length (a short query, so that Mem0's
    longest-first truncation also cuts only the document), not the default's."""
    from mem0.utils.factory import RerankerFactory

    query = "hobbies?"
    documents = [DOCUMENTS[0], DOCUMENTS[5], DOCUMENTS[1] + " " + DOCUMENTS[5]]
    block: dict[str, object] = {"model": str(one_label), "device": "cpu", "max_length": 24}
    memories = [{"id": str(i), "memory": text} for i, text in enumerate(documents)]
    theirs = RerankerFactory.create("huggingface", dict(block)).rerank(query, memories)
    ours = from_config({"provider": "huggingface", "config": block})
    assert isinstance(ours, CrossEncoderReranker) and ours.max_length == 24
    results = ours.rerank(query, documents)
    assert [r.index for r in results] == [int(m["id"]) for m in theirs]
    assert [r.score for r in results] == pytest.approx(
        [m["rerank_score"] for m in theirs], abs=1e-5
    )
    # The long documents were cut: the default max_length scores them otherwise.
    unset = {key: value for key, value in block.items() if key != "max_length"}
    default = from_config({"provider": "huggingface", "config": unset})
    uncut = scores_by_index(default.rerank(query, documents))
    assert uncut[0] == pytest.approx(scores_by_index(results)[0], abs=1e-6)
    assert uncut[1] != pytest.approx(scores_by_index(results)[1], abs=1e-4)
    # batch_size pairs of the block's max_length tokens per forward pass.
    batched = from_config({"provider": "huggingface", "config": {**block, "batch_size": 3}})
    assert batched.max_batch_tokens == 3 * 24  # type: ignore[attr-defined]


def test_a_checkpoint_missing_encoder_weights_is_refused(one_label: Path, tmp_path: Path) -> None:
    path = without_weights(one_label, tmp_path / "no-pooler", "bert.pooler.")
    with pytest.raises(ModelLoadError, match=r"no weights for bert\.pooler\.dense\.bias"):
        CrossEncoderReranker(path, dtype="float32").rerank(QUERY, DOCUMENTS)


def test_a_head_of_another_shape_than_the_config_says_is_refused(
    two_labels: Path, tmp_path: Path
) -> None:
    """A config edited to one label over a two-logit checkpoint: transformers would
    re-initialise the head at random (with ignore_mismatched_sizes) or fail with a
    message pointing at its log."""
    path = with_config(
        two_labels, tmp_path / "edited", id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}
    )
    with pytest.raises(ModelLoadError) as info:
        CrossEncoderReranker(path, dtype="float32").rerank(QUERY, DOCUMENTS)
    assert "classifier.weight (checkpoint 2x32, model 1x32)" in str(info.value)


@pytest.mark.parametrize(
    "labels", [{"0": "relevant", "1": "irrelevant"}, {"0": "entailment", "1": "neutral"}]
)
def test_two_labels_whose_names_invert_relevance_are_refused(
    two_labels: Path, tmp_path: Path, labels: dict[str, str]
) -> None:
    path = with_config(two_labels, tmp_path / "inverted", id2label=labels)
    with pytest.raises(ModelLoadError, match="label 1 as the relevant one"):
        CrossEncoderReranker(path, dtype="float32").rerank(QUERY, DOCUMENTS)
    # Names that put relevance on label 1 are fine.
    fine = with_config(two_labels, tmp_path / "fine", id2label={"0": "irrelevant", "1": "relevant"})
    assert len(CrossEncoderReranker(fine, dtype="float32").rerank(QUERY, DOCUMENTS)) == 7


def test_results_sorted_ties_in_input_order_and_top_n(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32")
    documents = ["User likes playing badminton.", "I don't drink alcohol."] * 3
    results = reranker.rerank(QUERY, documents)
    scores = [result.score for result in results]
    assert scores == sorted(scores, reverse=True)
    assert all(type(score) is float for score in scores)
    assert scores[0] != pytest.approx(scores[-1])
    # Identical documents tie exactly and keep their input order.
    best = documents.index(documents[results[0].index])
    assert [result.index for result in results[:3]] == [best, best + 2, best + 4]
    assert [result.stage for result in results] == [
        reranker.thresholds.stage(score) for score in scores
    ]
    assert reranker.rerank(QUERY, documents, top_n=2) == results[:2]
    assert reranker.rerank(QUERY, documents, top_n=100) == results


def test_custom_thresholds_set_the_stages(one_label: Path) -> None:
    thresholds = StageThresholds(0.01, 0.02, 0.03, 0.04)
    reranker = CrossEncoderReranker(one_label, dtype="float32", thresholds=thresholds)
    for result in reranker.rerank(QUERY, DOCUMENTS):
        assert result.stage == thresholds.stage(result.score)


def test_tokenizer_without_pad_token_batches(no_pad: Path) -> None:
    reranker = CrossEncoderReranker(no_pad, dtype="float32", max_length=32)
    expected = torch.sigmoid(reference_logits(no_pad, QUERY, DOCUMENTS, max_length=32))
    results = reranker.rerank(QUERY, DOCUMENTS)
    assert scores_by_index(results) == pytest.approx(expected[:, 0].tolist(), abs=1e-5)


def test_weights_load_lazily_once_and_are_shared(one_label: Path) -> None:
    engine.clear_model_cache()
    first = CrossEncoderReranker(one_label, dtype="float32")
    second = CrossEncoderReranker(str(one_label), device="cpu", dtype="fp32")
    assert not engine._cache, "constructing a reranker must not load weights"
    first.rerank(QUERY, DOCUMENTS)
    second.rerank(QUERY, DOCUMENTS)
    assert len(engine._cache) == 1
    assert first._loaded() is second._loaded()
    CrossEncoderReranker(one_label, dtype="bfloat16").rerank(QUERY, DOCUMENTS)
    assert len(engine._cache) == 2


def test_bfloat16_stays_close_to_float32(one_label: Path) -> None:
    fp32 = scores_by_index(
        CrossEncoderReranker(one_label, dtype="float32").rerank(QUERY, DOCUMENTS)
    )
    bf16 = scores_by_index(
        CrossEncoderReranker(one_label, dtype="bfloat16").rerank(QUERY, DOCUMENTS)
    )
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.05


def test_no_documents_returns_empty_without_loading(tmp_path: Path) -> None:
    reranker = CrossEncoderReranker(tmp_path / "missing", dtype="float32")
    assert reranker.rerank(QUERY, []) == []


def test_wrong_path_is_a_model_load_error_naming_the_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    reranker = CrossEncoderReranker(missing, dtype="float32")
    with pytest.raises(ModelLoadError) as info:
        reranker.rerank(QUERY, DOCUMENTS)
    assert str(missing) in str(info.value)
    assert "local directory" in str(info.value)


@pytest.mark.parametrize(
    ("query", "documents", "top_n", "message"),
    [
        (None, ["a"], None, "query must be a str"),
        (QUERY, "a document", None, "documents must be a sequence"),
        (QUERY, ["a", 3], None, r"documents\[1\] must be a str"),
        (QUERY, ["a"], 0, "top_n must be a positive int"),
        (QUERY, ["a"], True, "top_n must be a positive int"),
    ],
)
def test_bad_input_is_rejected(
    one_label: Path, query: object, documents: object, top_n: object, message: str
) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32")
    with pytest.raises(InvalidInputError, match=message):
        reranker.rerank(query, documents, top_n)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_length": 0}, "max_length must be a positive int"),
        ({"max_batch_tokens": 1.5}, "max_batch_tokens must be a positive int"),
        ({"device": "tpu-9"}, "Unknown device"),
        ({"dtype": "float8"}, "Unknown dtype"),
        ({"thresholds": (0.2, 0.4, 0.6, 0.8)}, "thresholds must be a StageThresholds"),
    ],
)
def test_bad_options_are_rejected(one_label: Path, options: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        CrossEncoderReranker(one_label, **options)


def test_bad_model_argument_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="model must be"):
        CrossEncoderReranker("  ")


def test_rerank_many_equals_per_call_rerank(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=32, max_batch_tokens=96)
    calls = [
        (QUERY, DOCUMENTS, None),
        ("Any liquor recommendations for me?", DOCUMENTS[::-1], 3),
        ("empty call", [], None),
        ("one memory", ["User likes playing badminton."], 1),
    ]
    many = reranker.rerank_many(calls)
    assert len(many) == len(calls)
    for results, (query, documents, top_n) in zip(many, calls, strict=True):
        single = reranker.rerank(query, documents, top_n)
        assert [r.index for r in results] == [r.index for r in single]
        assert [r.score for r in results] == pytest.approx([r.score for r in single], abs=1e-6)
    assert many[2] == []


@pytest.mark.parametrize(
    ("calls", "message"),
    [
        ("not calls", "calls must be a sequence"),
        ([(QUERY, DOCUMENTS)], r"calls\[0\] must be a \(query, documents, top_n\)"),
        ([(QUERY, DOCUMENTS, None), (QUERY, [1], None)], r"documents\[0\] must be a str"),
    ],
)
def test_rerank_many_rejects_bad_calls(one_label: Path, calls: object, message: str) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32")
    with pytest.raises(InvalidInputError, match=message):
        reranker.rerank_many(calls)  # type: ignore[arg-type]


async def test_arerank_equals_rerank_and_runs_concurrently(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32")
    expected = reranker.rerank(QUERY, DOCUMENTS, top_n=4)
    results = await asyncio.gather(*(reranker.arerank(QUERY, DOCUMENTS, top_n=4) for _ in range(8)))
    for result in results:
        assert [r.index for r in result] == [r.index for r in expected]
        assert [r.score for r in result] == pytest.approx([r.score for r in expected], abs=1e-6)
    many = await reranker.arerank_many([(QUERY, DOCUMENTS, 4)])
    assert [r.index for r in many[0]] == [r.index for r in expected]


def test_threads_share_one_model_safely(one_label: Path) -> None:
    engine.clear_model_cache()
    rerankers = [CrossEncoderReranker(one_label, dtype="float32") for _ in range(4)]
    expected = scores_by_index(rerankers[0].rerank(QUERY, DOCUMENTS))
    engine.clear_model_cache()
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda i: rerankers[i % 4].rerank(QUERY, DOCUMENTS), range(16)))
    assert len(engine._cache) == 1
    for outcome in outcomes:
        assert scores_by_index(outcome) == pytest.approx(expected, abs=1e-6)


def test_repr_names_the_model(one_label: Path) -> None:
    text = repr(CrossEncoderReranker(one_label, dtype="float32"))
    assert text.startswith("CrossEncoderReranker(") and str(one_label) in text


def test_scores_are_probabilities(one_label: Path) -> None:
    results = CrossEncoderReranker(one_label, dtype="float32").rerank(QUERY, DOCUMENTS)
    assert all(0.0 <= result.score <= 1.0 and math.isfinite(result.score) for result in results)


QUERY_TEMPLATE = "question: {query}"
DOCUMENT_TEMPLATE = "memory: {document} end of memory."


def test_templates_wrap_query_and_document(one_label: Path) -> None:
    reranker = CrossEncoderReranker(
        one_label,
        dtype="float32",
        query_template=QUERY_TEMPLATE,
        document_template=DOCUMENT_TEMPLATE,
    )
    short = [d for d in DOCUMENTS if len(d) < 100]
    expected = torch.sigmoid(
        reference_logits(
            one_label,
            QUERY_TEMPLATE.format(query=QUERY),
            [DOCUMENT_TEMPLATE.format(document=d) for d in short],
            max_length=128,
        )
    )
    assert scores_by_index(reranker.rerank(QUERY, short)) == pytest.approx(
        expected[:, 0].tolist(), abs=1e-5
    )


def test_long_document_keeps_the_template_tail(one_label: Path) -> None:
    max_length = 40
    reranker = CrossEncoderReranker(
        one_label,
        dtype="float32",
        max_length=max_length,
        query_template=QUERY_TEMPLATE,
        document_template=DOCUMENT_TEMPLATE,
    )
    tokenizer = AutoTokenizer.from_pretrained(one_label)
    model = AutoModelForSequenceClassification.from_pretrained(one_label, dtype=torch.float32)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # [CLS] query [SEP] head+document (cut) tail [SEP], built by hand.
    query_ids = ids(QUERY_TEMPLATE.format(query=QUERY))
    tail_ids = ids(" end of memory.")
    room = max_length - 3 - len(query_ids) - len(tail_ids)
    document_ids = ids("memory: " + DOCUMENTS[5])[:room] + tail_ids
    input_ids = [tokenizer.cls_token_id, *query_ids, tokenizer.sep_token_id]
    token_types = [0] * len(input_ids) + [1] * (len(document_ids) + 1)
    input_ids += [*document_ids, tokenizer.sep_token_id]
    assert len(input_ids) == max_length
    with torch.no_grad():
        logit = model(
            input_ids=torch.tensor([input_ids]), token_type_ids=torch.tensor([token_types])
        ).logits
    [result] = reranker.rerank(QUERY, [DOCUMENTS[5]])
    assert result.score == pytest.approx(torch.sigmoid(logit).item(), abs=1e-5)
    # Batched with short documents (which keep their plain encoding), still equal.
    results = reranker.rerank(QUERY, [DOCUMENTS[0], DOCUMENTS[5], ""])
    assert scores_by_index(results)[1] == pytest.approx(result.score, abs=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"query_template": "no placeholder"}, "query_template must be a str holding"),
        ({"document_template": "{document} {document}"}, "document_template must be"),
        ({"document_template": None}, "document_template must be"),
    ],
)
def test_bad_templates_are_rejected(one_label: Path, options: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        CrossEncoderReranker(one_label, **options)


def test_max_length_too_small_for_the_template_tail(one_label: Path) -> None:
    reranker = CrossEncoderReranker(
        one_label, dtype="float32", max_length=8, document_template="{document}" + " tail" * 10
    )
    with pytest.raises(InvalidInputError, match="max_length leaves only"):
        reranker.rerank(QUERY, [DOCUMENTS[5]])


@pytest.fixture(scope="module")
def last_token_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3ForSequenceClassification (the "-seq-cls" shape: it scores the last
    non-pad token, found through config.pad_token_id) with no pad token anywhere."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    path = build_tiny_cross_encoder(tmp_path_factory.mktemp("qwen3-seq-cls"), pad_token=False)
    config = Qwen3Config(
        vocab_size=len(AutoTokenizer.from_pretrained(path)),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=None,
        initializer_range=0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Qwen3ForSequenceClassification(config)
    model.save_pretrained(path)
    return path


def test_last_token_pooling_model_without_pad_token(last_token_model: Path) -> None:
    reranker = CrossEncoderReranker(last_token_model, dtype="float32", max_length=32)
    expected = torch.sigmoid(reference_logits(last_token_model, QUERY, DOCUMENTS, max_length=32))
    results = reranker.rerank(QUERY, DOCUMENTS)
    assert scores_by_index(results) == pytest.approx(expected[:, 0].tolist(), abs=1e-5)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    documents=st.lists(st.text(alphabet="abc xyz用户!", max_size=40), max_size=8),
    top_n=st.one_of(st.none(), st.integers(min_value=1, max_value=10)),
)
def test_any_input_gives_a_sorted_ranking_of_every_document(
    one_label: Path, documents: list[str], top_n: int | None
) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=24, max_batch_tokens=64)
    results = reranker.rerank(QUERY, documents, top_n)
    everything = reranker.rerank(QUERY, documents)
    assert sorted(result.index for result in everything) == list(range(len(documents)))
    assert results == everything[: top_n or None]
    for better, worse in itertools.pairwise(everything):
        assert better.score > worse.score or (
            better.score == worse.score and better.index < worse.index
        )


def test_count_tokens_is_the_sum_of_pair_lengths(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=24)
    tokenizer = AutoTokenizer.from_pretrained(one_label)
    expected = sum(
        len(tokenizer([QUERY], [d], truncation="only_second", max_length=24)["input_ids"][0])
        for d in DOCUMENTS
    )
    assert reranker.count_tokens(QUERY, DOCUMENTS) == expected
    assert reranker.count_tokens(QUERY, []) == 0
    with pytest.raises(InvalidInputError):
        reranker.count_tokens(QUERY, [None])  # type: ignore[list-item]


def test_huge_texts_are_read_only_as_far_as_they_fit(
    one_label: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Megabytes of query and document cost what fits in max_length. (The plain
    recipe cannot even be run on them: the tokenizer's truncation of a long pair
    builds every combination of overflowing pieces, tens of GB; the reference below
    scores prefixes that tokenize to the same first tokens.)"""
    huge = "user likes playing badminton and tea " * 100_000  # 3.7 MB
    documents = [huge, "User likes playing badminton.", huge[5:]]
    query = "what are the hobbies of the user " * 50_000  # 1.6 MB: both sides cut
    short = [document[:5000] for document in documents]
    plain = reference_logits(one_label, QUERY, short, max_length=32)
    # An even room (33 - 3 special tokens) splits the same way whichever side is longer.
    long_query = reference_logits(
        one_label, query[:5000], short, max_length=33, truncation="longest_first"
    )
    seen: list[int] = []
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=32)
    tokenizer_type = type(reranker._loaded().tokenizer)
    original = tokenizer_type.__call__

    def measuring(this: object, text: object, *args: object, **kwargs: object) -> object:
        for part in (text, args[0] if args else kwargs.get("text_pair")):
            if part is not None:
                texts = [part] if isinstance(part, str) else list(part)  # type: ignore[call-overload]
                seen.append(sum(len(t) for t in texts))
        return original(this, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tokenizer_type, "__call__", measuring)
    got = scores_by_index(reranker.rerank(QUERY, documents))
    assert got == pytest.approx(torch.sigmoid(plain[:, 0]).tolist(), abs=1e-5)
    assert max(seen) < 20_000  # never the megabytes
    wide = CrossEncoderReranker(one_label, dtype="float32", max_length=33)
    got_long = scores_by_index(wide.rerank(query, documents))
    assert got_long == pytest.approx(torch.sigmoid(long_query[:, 0]).tolist(), abs=1e-5)
    assert max(seen) < 20_000


def test_tokenizing_does_not_wait_for_a_running_forward_pass(one_label: Path) -> None:
    reranker = CrossEncoderReranker(one_label, dtype="float32")
    loaded = reranker._loaded()
    with loaded.lock, ThreadPoolExecutor(max_workers=1) as pool:  # as if a pass were running
        assert pool.submit(reranker.count_tokens, QUERY, DOCUMENTS).result(timeout=30) > 0


@pytest.fixture(scope="module")
def xlm_roberta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(
        tmp_path_factory.mktemp("xlm-roberta"), architecture="xlm-roberta", seed=4
    )


# Rows of many lengths, so one pass packs rows of different lengths and attention
# groups need their key masks (and split where padding would be large).
MANY_LENGTHS = [*DOCUMENTS, *(" ".join(["badminton"] * n) for n in (1, 2, 5, 9, 17, 33, 60))]


def _encoder_forwards(reranker: CrossEncoderReranker) -> list[int]:
    """Counts the transformers encoder's own forward calls (the padded path)."""
    model = reranker._loaded().model
    calls: list[int] = []
    model.base_model.encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _with_random_norms(path: Path, directory: Path) -> Path:
    """A copy of a tiny model whose LayerNorms have random weights and biases (freshly
    built ones are all 1 and 0, so a swapped or skipped LayerNorm would go unseen)."""
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(11)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(path).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("architecture", ["one_label", "two_labels", "xlm_roberta"])
@pytest.mark.parametrize("max_batch_tokens", [1, 150, 100_000])
def test_the_packed_engine_scores_like_the_transformers_forward(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    architecture: str,
    max_batch_tokens: int,
) -> None:
    """BERT and XLM-RoBERTa heads run unpadded, with only the first token computed in
    the last layer, their linears prepacked for oneDNN on CPU (and, where not
    prepacked, on the model's own weights); the scores stay the one-pair-at-a-time
    transformers forward's."""
    from memos_rerank_integrations._engine import bert as _bert_engine

    path = _with_random_norms(request.getfixturevalue(architecture), tmp_path / "norms")
    logits = reference_logits(path, QUERY, MANY_LENGTHS, max_length=64)
    expected = (logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).tolist()
    options = {"dtype": "float32", "max_length": 64, "max_batch_tokens": max_batch_tokens}
    engine.clear_model_cache()
    reranker = CrossEncoderReranker(path, **options, normalize=False)
    reranker.rerank(QUERY, ["warm up"])
    assert reranker._loaded().packed is not None
    forwards = _encoder_forwards(reranker)
    got = scores_by_index(reranker.rerank(QUERY, MANY_LENGTHS))
    assert forwards == [], "the padded transformers forward ran"
    assert got == pytest.approx(expected, abs=1e-4)
    # Unprepacked (other devices): the model keeps its weights; equal to the padded
    # forward on the same batches, to float rounding.
    monkeypatch.setattr(_bert_engine, "can_prepack", lambda weight: False)
    engine.clear_model_cache()
    plain = CrossEncoderReranker(path, **options, normalize=False)
    assert scores_by_index(plain.rerank(QUERY, MANY_LENGTHS)) == pytest.approx(expected, abs=1e-4)
    forwards = _encoder_forwards(plain)
    plain._loaded().packed = None
    padded = scores_by_index(plain.rerank(QUERY, MANY_LENGTHS))
    assert got == pytest.approx(padded, abs=1e-4)
    assert len(forwards) > 0
    engine.clear_model_cache()


def test_on_cpu_the_packed_engine_holds_the_weights_once_prepacked(one_label: Path) -> None:
    """On CPU the layers' linears run prepacked and the model's plain copy of them is
    released: the model's own forward then refuses to run rather than compute with
    empty weights."""
    from memos_rerank_integrations._engine.linear import can_prepack

    engine.clear_model_cache()
    reranker = CrossEncoderReranker(one_label, dtype="float32", max_length=64)
    reranker.rerank(QUERY, ["warm up"])
    model = reranker._loaded().model
    layer = model.base_model.encoder.layer[0]
    if not can_prepack(model.classifier.weight):
        pytest.skip("this torch has no oneDNN prepacked linear")
    for each in model.base_model.encoder.layer:
        for module in (each.attention.self.query, each.intermediate.dense, each.output.dense):
            assert module.weight.numel() == 0
    assert layer.attention.output.LayerNorm.weight.numel() > 0
    with pytest.raises(RuntimeError, match="prepacked"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    engine.clear_model_cache()


def test_models_the_packed_engine_does_not_cover_keep_the_transformers_forward(
    last_token_model: Path,
) -> None:
    engine.clear_model_cache()
    reranker = CrossEncoderReranker(last_token_model, dtype="float32", max_length=32)
    reranker.rerank(QUERY, ["warm up"])
    assert reranker._loaded().packed is None


@pytest.fixture(scope="module")
def electra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ElectraForSequenceClassification (the shape of ms-marco-electra cross-encoders),
    with two labels: an architecture the packed engine does not cover."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    path = build_tiny_cross_encoder(tmp_path_factory.mktemp("electra"), num_labels=2, seed=4)
    config = ElectraConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(path)),
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        pad_token_id=0,
        initializer_range=0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        ElectraForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("architecture", ["last_token_model", "electra"])
def test_rerank_many_on_a_model_the_engine_does_not_cover_equals_the_recipe(
    request: pytest.FixtureRequest, architecture: str
) -> None:
    """transformers' padded forward over calls mixed in batches of a small budget: each
    call's ranking is the one-pair-at-a-time recipe's (top_n, duplicates, an empty
    call and a lone document included)."""
    path = request.getfixturevalue(architecture)
    engine.clear_model_cache()
    reranker = CrossEncoderReranker(path, dtype="float32", max_length=40, max_batch_tokens=90)
    calls: list[tuple[str, list[str], int | None]] = [
        (QUERY, MANY_LENGTHS, None),
        ("Any liquor recommendations for me?", [DOCUMENTS[3], DOCUMENTS[0], DOCUMENTS[3]], None),
        ("empty call", [], None),
        ("one memory", [DOCUMENTS[6]], None),
        ("badminton", MANY_LENGTHS[::-1], 4),
    ]
    together = reranker.rerank_many(calls)
    assert reranker._loaded().packed is None
    for (query, documents, top_n), got in zip(calls, together, strict=True):
        if not documents:
            assert got == []
            continue
        logits = reference_logits(path, query, documents, max_length=40)
        raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        expected = torch.sigmoid(raw).tolist()
        order = sorted(range(len(documents)), key=lambda i: (-expected[i], i))[:top_n]
        assert [r.index for r in got] == order
        assert [r.score for r in got] == pytest.approx([expected[i] for i in order], abs=1e-5)
    # The duplicate documents tie exactly, in input order.
    first, second = (r for r in together[1] if r.index != 1)
    assert (first.index, second.index, first.score) == (0, 2, second.score)
    engine.clear_model_cache()
