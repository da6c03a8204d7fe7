from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import memos_rerank_integrations as mri
from memos_rerank_integrations import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidInputError,
    MalformedResponseError,
    ModelLoadError,
    RateLimitError,
    Reranker,
    RerankError,
    RerankResult,
    RerankTimeoutError,
    Stage,
    StageThresholds,
)
from memos_rerank_integrations._engine.batching import budget_batches
from memos_rerank_integrations._types import check_inputs, check_top_n, rank_scores

from .support.backends import SUBPROCESS_ENV, OverlapReranker, SyncOnlyReranker

PUBLIC_API = [
    "DEFAULT_THRESHOLDS",
    "AuthenticationError",
    "BackendUnavailableError",
    "CohereReranker",
    "Comparison",
    "CrossEncoderReranker",
    "EmbeddingReranker",
    "FallbackReranker",
    "HTTPReranker",
    "InvalidInputError",
    "LLMListwiseReranker",
    "LLMReranker",
    "MalformedResponseError",
    "MemOSReranker",
    "ModelLoadError",
    "QwenReranker",
    "RateLimitError",
    "RerankError",
    "RerankResult",
    "RerankTimeoutError",
    "Reranker",
    "Stage",
    "StageThresholds",
    "ZeroEntropyReranker",
    "__version__",
    "from_config",
    "acompare",
    "compare",
]


def test_public_api_is_pinned() -> None:
    assert sorted(mri.__all__) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(mri, name) is not None, name
    with pytest.raises(AttributeError):
        mri.NotAThing  # noqa: B018


def test_top_level_import_pulls_in_no_heavy_dependency() -> None:
    code = (
        "import sys, memos_rerank_integrations as m; "
        "from memos_rerank_integrations import MemOSReranker, HTTPReranker, FallbackReranker; "
        "heavy = [n for n in ('torch', 'transformers', 'langchain_core', 'llama_index', 'cohere') "
        "if n in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=SUBPROCESS_ENV
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("memos_rerank_integrations.langchain", "langchain_core", "langchain"),
        ("memos_rerank_integrations.llama_index", "llama_index", "llama-index"),
    ],
)
def test_missing_extra_names_the_extra(module: str, blocked: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=SUBPROCESS_ENV
    ).stdout
    assert f"memos-rerank-integrations[{extra}]" in out


def test_stage_has_five_ordered_members() -> None:
    assert [s.label for s in Stage] == [
        "irrelevant",
        "weak",
        "partial",
        "relevant",
        "highly_relevant",
    ]
    assert Stage.IRRELEVANT < Stage.WEAK < Stage.PARTIAL < Stage.RELEVANT < Stage.HIGHLY_RELEVANT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("relevant", Stage.RELEVANT),
        ("Highly Relevant", Stage.HIGHLY_RELEVANT),
        ("highly-relevant", Stage.HIGHLY_RELEVANT),
        ("WEAK", Stage.WEAK),
        (2, Stage.PARTIAL),
        ("0", Stage.IRRELEVANT),
        (Stage.WEAK, Stage.WEAK),
    ],
)
def test_stage_parse(value: object, expected: Stage) -> None:
    assert Stage.parse(value) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["very relevant", 5, -1, True, 1.5, None])
def test_stage_parse_rejects_unknown(value: object) -> None:
    with pytest.raises(InvalidInputError, match="highly_relevant"):
        Stage.parse(value)  # type: ignore[arg-type]


def test_default_thresholds_split_scores_into_stages() -> None:
    t = StageThresholds()
    assert t.cuts == (0.2, 0.4, 0.6, 0.8)
    cases = {
        0.0: Stage.IRRELEVANT,
        0.1999: Stage.IRRELEVANT,
        0.2: Stage.WEAK,
        0.39: Stage.WEAK,
        0.4: Stage.PARTIAL,
        0.6: Stage.RELEVANT,
        0.7999: Stage.RELEVANT,
        0.8: Stage.HIGHLY_RELEVANT,
        1.0: Stage.HIGHLY_RELEVANT,
        -3.0: Stage.IRRELEVANT,
        7.5: Stage.HIGHLY_RELEVANT,
    }
    for score, stage in cases.items():
        assert t.stage(score) is stage, score
    assert t.min_score("relevant") == 0.6
    assert t.min_score(Stage.IRRELEVANT) == -math.inf
    with pytest.raises(InvalidInputError):
        t.stage(float("nan"))


@pytest.mark.parametrize(
    "cuts",
    [(0.4, 0.2, 0.6, 0.8), (0.2, 0.2, 0.6, 0.8), (-0.1, 0.4, 0.6, 0.8), (0.2, 0.4, 0.6, 1.2)],
)
def test_invalid_thresholds_raise(cuts: tuple[float, ...]) -> None:
    with pytest.raises(InvalidInputError, match="cut points"):
        StageThresholds(*cuts)


def test_thresholds_from_cuts() -> None:
    assert StageThresholds.from_cuts([0.1, 0.3, 0.5, 0.7]).stage(0.35) is Stage.PARTIAL
    with pytest.raises(InvalidInputError, match="four"):
        StageThresholds.from_cuts([0.1, 0.3])
    with pytest.raises(InvalidInputError, match="finite"):
        StageThresholds(float("nan"), 0.4, 0.6, 0.8)


def test_rank_scores_sorts_best_first_keeps_ties_and_plain_floats() -> None:
    results = rank_scores(np.array([0.3, 0.9, 0.3, 0.1], dtype=np.float32).tolist())
    assert [r.index for r in results] == [1, 0, 2, 3]
    assert all(type(r.score) is float for r in results)
    results = rank_scores([np.float32(0.5), np.float32(0.7)])  # type: ignore[list-item]
    assert all(type(r.score) is float for r in results)
    assert [r.stage for r in results] == [Stage.RELEVANT, Stage.PARTIAL]
    assert [r.index for r in rank_scores([0.1, 0.2, 0.3], top_n=2)] == [2, 1]
    with pytest.raises(MalformedResponseError):
        rank_scores([0.1, float("nan")])


def test_input_checks() -> None:
    assert check_inputs("q", ("a", "b")) == ["a", "b"]
    with pytest.raises(InvalidInputError, match="query must be a str"):
        check_inputs(None, ["a"])
    with pytest.raises(InvalidInputError, match="sequence of str"):
        check_inputs("q", "abc")
    with pytest.raises(InvalidInputError, match=r"documents\[1\]"):
        check_inputs("q", ["a", 3])
    with pytest.raises(InvalidInputError, match=r"documents\[1\] must be a str, got bytes"):
        check_inputs("q", ["a", b"b"])
    assert check_top_n(None) is None and check_top_n(3) == 3
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(InvalidInputError, match="top_n"):
            check_top_n(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, where",
    [("\ud800", 0), ("abc\udfff", 3), ("记忆\udc80x", 2), ("x" * 10_000 + "\ud83d", 10_000)],
)
def test_lone_surrogates_are_invalid_input_naming_the_document(text: str, where: int) -> None:
    message = rf"documents\[2\] contains a lone surrogate \(U\+D[89A-F]\w\w at character {where}\)"
    with pytest.raises(InvalidInputError, match=message):
        check_inputs("q", ["fine", "also fine 记忆 😀", text])
    with pytest.raises(InvalidInputError, match=f"The query contains .* at character {where}"):
        check_inputs(text, ["fine"])
    # Other non-ASCII text is fine (an emoji is one code point in a str, not a pair).
    assert check_inputs("😀 记忆 café", ["\U0001f600"]) == ["😀"]
    with pytest.raises(InvalidInputError, match="U\\+D83D at character 0"):
        check_inputs("q", ["\ud83d\ude00"])  # a UTF-16 pair spelled out is two lone halves


def test_error_tree() -> None:
    for cls in (
        InvalidInputError,
        AuthenticationError,
        RateLimitError,
        RerankTimeoutError,
        BackendUnavailableError,
        MalformedResponseError,
        ModelLoadError,
    ):
        assert issubclass(cls, RerankError)
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(RerankTimeoutError, TimeoutError)
    assert issubclass(ModelLoadError, BackendUnavailableError)
    err = RateLimitError("slow down", retry_after=2.0, status_code=429, code=40309, backend="memos")
    assert err.retry_after == 2.0
    assert str(err) == "slow down (backend=memos, status=429, code=40309)"
    assert str(RerankError("plain")) == "plain"


def test_reranker_protocol_accepts_duck_types() -> None:
    assert isinstance(OverlapReranker(), Reranker)
    assert not isinstance(SyncOnlyReranker(), Reranker)
    result = RerankResult(index=0, score=0.5, stage=Stage.PARTIAL)
    with pytest.raises(AttributeError):
        result.score = 1.0  # type: ignore[misc]


def test_budget_batches_sorts_by_length_and_respects_budget() -> None:
    lengths = [5, 50, 7, 48, 3, 100]
    batches = budget_batches(lengths, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 100
    assert batches[0] == [5]
    assert budget_batches(lengths, max_tokens=10_000, max_batch_size=2) == [[5, 1], [3, 2], [0, 4]]
    with pytest.raises(InvalidInputError):
        budget_batches(lengths, max_tokens=0)
