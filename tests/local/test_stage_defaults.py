"""EmbeddingReranker's shipped cut points: re-fitted here from the labelled set's
"fit" queries with the real all-MiniLM-L6-v2 weights, and measured on its
"held_out" queries against the Qwen-style defaults. docs/stages.md states the figures;
this test keeps them true."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from memos_rerank_integrations import DEFAULT_THRESHOLDS, EmbeddingReranker, StageThresholds
from memos_rerank_integrations._local.embedding import MINILM_THRESHOLDS
from memos_rerank_integrations.calibration import fit_thresholds, stage_error

ROOT = Path(__file__).resolve().parents[2]
LABELLED = json.loads((ROOT / "notebooks" / "data" / "labelled_memories.json").read_text())


@pytest.fixture(scope="module")
def scored() -> dict[str, tuple[list[float], list[int]]]:
    """(scores, grades) of every (query, memory) pair, per split."""
    minilm = EmbeddingReranker(dtype="float32")
    memories = LABELLED["memories"]
    calls = [(item["query"], memories, None) for item in LABELLED["queries"]]
    split: dict[str, tuple[list[float], list[int]]] = {"fit": ([], []), "held_out": ([], [])}
    for item, results in zip(LABELLED["queries"], minilm.rerank_many(calls), strict=True):
        by_index = {result.index: result.score for result in results}
        scores, grades = split[item["split"]]
        for index in range(len(memories)):
            scores.append(by_index[index])
            grades.append(item["grades"].get(str(index), 0))
    return split


def test_the_split_alternates_and_covers_every_grade() -> None:
    queries = LABELLED["queries"]
    assert [item["split"] for item in queries] == ["fit", "held_out"] * (len(queries) // 2)
    for name in ("fit", "held_out"):
        grades = {g for item in queries if item["split"] == name for g in item["grades"].values()}
        assert grades == {1, 2, 3, 4}


def test_shipped_cut_points_are_the_fit_on_the_fit_queries(
    scored: dict[str, tuple[list[float], list[int]]],
) -> None:
    fitted = fit_thresholds(*scored["fit"], balanced=True)
    assert EmbeddingReranker().thresholds == MINILM_THRESHOLDS
    # Rounded to three decimals when shipped.
    assert MINILM_THRESHOLDS.cuts == pytest.approx(fitted.cuts, abs=6e-4)


def held_out_errors(scored: dict[str, tuple[list[float], list[int]]]) -> dict[str, float]:
    scores, grades = scored["held_out"]
    return {
        name: stage_error(thresholds, scores, grades, balanced=True)
        for name, thresholds in (("shipped", MINILM_THRESHOLDS), ("qwen", DEFAULT_THRESHOLDS))
    }


def test_shipped_cut_points_beat_the_qwen_defaults_on_held_out_queries(
    scored: dict[str, tuple[list[float], list[int]]],
) -> None:
    errors = held_out_errors(scored)
    assert errors["shipped"] < errors["qwen"]
    # and docs/stages.md states both figures as they are
    page = (ROOT / "docs" / "stages.md").read_text(encoding="utf-8")
    stated = re.search(
        r"balanced stage error of (\d\.\d\d) with these cut points against (\d\.\d\d) with "
        r"the Qwen defaults",
        " ".join(page.split()),  # wherever the lines wrap
    )
    assert stated is not None, "docs/stages.md must state the held-out figures"
    assert float(stated[1]) == pytest.approx(errors["shipped"], abs=0.005)
    assert float(stated[2]) == pytest.approx(errors["qwen"], abs=0.005)


def test_the_defaults_are_the_qwen_scale() -> None:
    assert StageThresholds(0.2, 0.4, 0.6, 0.8) == DEFAULT_THRESHOLDS
