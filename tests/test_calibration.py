from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memos_rerank_integrations import InvalidInputError, Stage, StageThresholds
from memos_rerank_integrations.calibration import fit_thresholds, stage_error


def test_evenly_spread_grades_give_the_midpoints() -> None:
    fitted = fit_thresholds([0.1, 0.3, 0.5, 0.7, 0.9], [0, 1, 2, 3, 4])
    assert fitted.cuts == pytest.approx((0.2, 0.4, 0.6, 0.8))


def test_reproduces_separable_grades_from_crowded_scores() -> None:
    # Cosine-like scores crowd into [0.45, 0.75]: the defaults call all of it
    # partial or relevant, the fitted cuts recover every grade.
    scores = [0.46, 0.48, 0.52, 0.55, 0.58, 0.61, 0.66, 0.69, 0.72, 0.74]
    grades = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    fitted = fit_thresholds(scores, grades)
    assert [fitted.stage(s) for s in scores] == grades
    assert stage_error(fitted, scores, grades) == 0.0
    assert stage_error(StageThresholds(), scores, grades) >= 0.9
    assert fitted.weak == pytest.approx((0.48 + 0.52) / 2)
    assert fitted.highly_relevant == pytest.approx((0.69 + 0.72) / 2)


def test_accepts_stages_and_names() -> None:
    scores = [0.1, 0.9, 0.5]
    by_name = fit_thresholds(scores, ["irrelevant", "highly relevant", "PARTIAL"])
    by_stage = fit_thresholds(scores, [Stage.IRRELEVANT, Stage.HIGHLY_RELEVANT, Stage.PARTIAL])
    assert by_name == by_stage
    assert [by_name.stage(s) for s in scores] == [0, 4, 2]


def test_unseen_stages_get_distinct_cuts_in_the_gaps() -> None:
    fitted = fit_thresholds([0.2, 0.3, 0.8], [0, 0, 4])
    assert [fitted.stage(s) for s in (0.2, 0.3, 0.8)] == [0, 0, 4]
    low, *_, high = fitted.cuts
    assert low > 0.3 and high <= 0.8  # all four cuts between the two groups
    assert fitted.cuts == pytest.approx((0.4, 0.5, 0.6, 0.7))


def test_only_low_grades_put_the_upper_cuts_above_every_score() -> None:
    fitted = fit_thresholds([0.1, 0.2, 0.6], [0, 1, 1])
    assert [fitted.stage(s) for s in (0.1, 0.2, 0.6)] == [0, 1, 1]
    assert fitted.partial > 0.6 and fitted.highly_relevant < 1.0


def test_ties_share_a_stage_and_the_majority_wins() -> None:
    fitted = fit_thresholds([0.5, 0.5, 0.5, 0.9], [3, 3, 1, 4])
    assert fitted.stage(0.5) == Stage.RELEVANT
    assert stage_error(fitted, [0.5, 0.5, 0.5, 0.9], [3, 3, 1, 4]) == pytest.approx(2 / 4)


def test_extreme_scores_stay_representable() -> None:
    # 1.0 reaches every cut point in [0, 1], and only one cut can sit at 0.0.
    fitted = fit_thresholds([0.0, 1.0], [4, 0])
    assert fitted.stage(1.0) == Stage.HIGHLY_RELEVANT
    assert fitted.stage(0.0) <= Stage.WEAK
    fitted = fit_thresholds([0.0, 0.0, 1.0], [0, 1, 4])
    assert fitted.stage(0.0) in (Stage.IRRELEVANT, Stage.WEAK)
    assert fitted.stage(1.0) == Stage.HIGHLY_RELEVANT


@pytest.mark.parametrize(
    ("scores", "stages", "message"),
    [
        ([], [], "at least one"),
        ([0.1, 0.2], [0], "2 scores but 1 stages"),
        ([1.5], [0], "normalised"),
        ([-0.1], [0], "normalised"),
        ([math.nan], [0], "normalised"),
        (["0.5"], [0], "must be a number"),
        ([True], [0], "must be a number"),
        ([0.5], ["very relevant"], "Not a relevance stage"),
        ([0.5], [7], "Not a relevance stage"),
    ],
)
def test_bad_input_is_a_clear_error(
    scores: list[object], stages: list[object], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        fit_thresholds(scores, stages)  # type: ignore[arg-type]


def test_strings_are_not_sequences_of_scores() -> None:
    with pytest.raises(InvalidInputError, match="not strings"):
        fit_thresholds("0.5", [0])  # type: ignore[arg-type]


labelled = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
        st.integers(min_value=0, max_value=4),
    ),
    min_size=1,
    max_size=40,
)
cut_points = st.lists(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=4, max_size=4, unique=True
).map(sorted)


@settings(max_examples=300, deadline=None)
@given(labelled, cut_points)
def test_no_cut_points_fit_better(pairs: list[tuple[float, int]], cuts: list[float]) -> None:
    scores = [score for score, _ in pairs]
    grades = [grade for _, grade in pairs]
    fitted = fit_thresholds(scores, grades)
    assert isinstance(fitted, StageThresholds)  # valid: in [0, 1], strictly increasing
    rival = StageThresholds.from_cuts(cuts)
    assert stage_error(fitted, scores, grades) <= stage_error(rival, scores, grades) + 1e-12
    assert stage_error(fitted, scores, grades) <= stage_error(StageThresholds(), scores, grades)


def test_balanced_error_weighs_every_graded_stage_equally() -> None:
    thresholds = StageThresholds()
    scores = [0.1, 0.1, 0.1, 0.1, 0.1]  # all irrelevant
    grades = [0, 0, 0, 0, 4]
    assert stage_error(thresholds, scores, grades) == pytest.approx(4 / 5)
    assert stage_error(thresholds, scores, grades, balanced=True) == pytest.approx((0 + 4) / 2)


def test_balanced_fit_keeps_a_rare_stage_apart() -> None:
    # Nine irrelevant pairs score up to 0.5; the one relevant pair scores 0.45.
    scores = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.45]
    grades = [0] * 9 + [3]
    plain = fit_thresholds(scores, grades)
    balanced = fit_thresholds(scores, grades, balanced=True)
    assert plain.stage(0.45) == Stage.IRRELEVANT  # one pair is not worth two mistakes
    assert balanced.stage(0.45) == Stage.RELEVANT
    assert stage_error(balanced, scores, grades, balanced=True) < stage_error(
        plain, scores, grades, balanced=True
    )


@settings(max_examples=300, deadline=None)
@given(labelled, cut_points)
def test_no_cut_points_fit_better_balanced(
    pairs: list[tuple[float, int]], cuts: list[float]
) -> None:
    scores = [score for score, _ in pairs]
    grades = [grade for _, grade in pairs]
    fitted = fit_thresholds(scores, grades, balanced=True)
    rival = StageThresholds.from_cuts(cuts)
    best = stage_error(fitted, scores, grades, balanced=True)
    assert best <= stage_error(rival, scores, grades, balanced=True) + 1e-9


# -- scores one float step apart --------------------------------------------------------
#
# Between two adjacent floats there is no room for a cut point: the fit must see that
# (a cut is the lowest score of its stage, so scores a and nextafter(a) can only be split
# by a cut at nextafter(a) itself), and still give valid, optimal cut points.


def steps_from(start: float, count: int, direction: float) -> list[float]:
    """``start`` and the ``count - 1`` floats next to it towards ``direction``."""
    values = [start]
    for _ in range(count - 1):
        values.append(math.nextafter(values[-1], direction))
    return values


LADDERS = [
    steps_from(0.0, 6, math.inf),  # 0.0 and the smallest subnormals
    steps_from(0.5, 6, math.inf),
    steps_from(0.3, 6, -math.inf),
    steps_from(1.0, 6, -math.inf),  # 1.0 and the floats just below it
]


def candidate_cuts(scores: list[float]) -> list[float]:
    """Every cut point that splits the scores differently: each score (it goes above),
    the float after it (it goes below), and the ends of [0, 1]."""
    cuts = {0.0, 1.0}
    for score in scores:
        cuts.update((score, math.nextafter(score, math.inf)))
    return sorted(cut for cut in cuts if 0.0 <= cut <= 1.0)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(LADDERS).flatmap(
        lambda ladder: st.lists(
            st.tuples(st.sampled_from(ladder), st.integers(min_value=0, max_value=4)),
            min_size=1,
            max_size=7,
        )
    ),
    st.booleans(),
)
def test_scores_one_float_step_apart_get_valid_optimal_cuts(
    pairs: list[tuple[float, int]], balanced: bool
) -> None:
    scores = [score for score, _ in pairs]
    grades = [grade for _, grade in pairs]
    fitted = fit_thresholds(scores, grades, balanced=balanced)
    assert isinstance(fitted, StageThresholds)  # in [0, 1] and strictly increasing
    best = stage_error(fitted, scores, grades, balanced=balanced)
    for cuts in itertools.combinations(candidate_cuts(scores), 4):
        rival = stage_error(StageThresholds.from_cuts(cuts), scores, grades, balanced=balanced)
        assert best <= rival + 1e-12, (cuts, fitted.cuts)


def test_two_scores_one_step_apart_are_split_by_a_cut_at_the_upper_one() -> None:
    low = 0.5
    high = math.nextafter(low, math.inf)
    fitted = fit_thresholds([low, high], [0, 1])
    assert (fitted.stage(low), fitted.stage(high)) == (Stage.IRRELEVANT, Stage.WEAK)
    assert fitted.weak == high
    # Four grades apart, only one cut fits between them: the nearest stages win.
    fitted = fit_thresholds([low, high], [0, 4])
    assert stage_error(fitted, [low, high], [0, 4]) == pytest.approx(3 / 2)
    assert fitted.stage(high) - fitted.stage(low) == 1


def test_the_floats_just_below_one_leave_room_only_for_their_own_cuts() -> None:
    """1.0 reaches every cut, so it is always highly relevant; the three floats below
    it leave room for only three more cuts: each score lands one stage high, in
    distinct stages, rather than two sharing one."""
    below = steps_from(math.nextafter(1.0, -math.inf), 3, -math.inf)[::-1]  # ascending
    scores = [*below, 1.0]
    fitted = fit_thresholds(scores, [0, 1, 2, 3])
    assert [fitted.stage(score) for score in scores] == [1, 2, 3, 4]
    assert fitted.cuts[1:] == (below[1], below[2], 1.0)
    assert stage_error(fitted, scores, [0, 1, 2, 3]) == 1.0


def test_the_smallest_subnormals_are_staged_exactly() -> None:
    scores = steps_from(0.0, 5, math.inf)  # 0.0, 5e-324, 1e-323, ...
    fitted = fit_thresholds(scores, [0, 1, 2, 3, 4])
    assert fitted.cuts == tuple(scores[1:])
    assert [fitted.stage(score) for score in scores] == [0, 1, 2, 3, 4]
