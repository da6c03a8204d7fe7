"""Choosing stage cut points from labelled examples.

The default :class:`~memos_rerank_integrations.StageThresholds` ``(0.2, 0.4, 0.6, 0.8)``
suit a calibrated probability such as Qwen3-Reranker's P(yes). Other backends spread
their scores differently (cosine similarities of an embedding model crowd into the
middle of [0, 1]), so their stages are only meaningful with cut points fitted to
them. Score a few dozen (query, memory) pairs you have graded by hand, then::

    from memos_rerank_integrations.calibration import fit_thresholds

    thresholds = fit_thresholds(scores, grades)  # grades: Stage, 0-4 or stage names
    compressor = RerankCompressor(reranker=backend, thresholds=thresholds, min_stage="relevant")
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

from ._exceptions import InvalidInputError
from ._types import Stage, StageThresholds

__all__ = ["fit_thresholds", "stage_error"]

_STAGES = len(Stage)


def fit_thresholds(
    scores: Sequence[float],
    stages: Sequence[Stage | int | str],
    *,
    balanced: bool = False,
) -> StageThresholds:
    """Fit the four cut points that best reproduce hand-graded stages.

    ``scores`` are a backend's scores in [0, 1] and ``stages`` the grade you gave
    each scored pair (a :class:`Stage`, its value 0-4 or its name). The result
    minimises the total ordinal error ``sum(|fitted stage - given stage|)`` over
    all pairs (an exact dynamic programme over the sorted scores, so it is the
    best any four cut points can do). Each cut lies halfway between the highest
    score below it and the lowest score at or above it; stages no example was
    fitted to get cuts spread evenly through the same gap, or between the
    extreme scores and 0 or 1.

    With ``balanced=True`` each pair counts ``1 / (number of pairs graded like it)``,
    so every graded stage weighs the same in total. Use it when one grade dominates
    the labelled set, as *irrelevant* usually does (most memories have nothing to do
    with a given query): unweighted, the many irrelevant pairs can squeeze the
    middle stages into a sliver.

    Raises :class:`~memos_rerank_integrations.InvalidInputError` when the inputs
    are empty, of different lengths, or hold a score outside [0, 1] or a value
    that is not a stage.
    """
    pairs = _checked(scores, stages)
    groups = _groups(pairs, balanced=balanced)
    assigned = _best_assignment(groups)
    return StageThresholds.from_cuts(_cuts(groups, assigned))


def stage_error(
    thresholds: StageThresholds,
    scores: Sequence[float],
    stages: Sequence[Stage | int | str],
    *,
    balanced: bool = False,
) -> float:
    """The mean ``|stage given by thresholds - given stage|`` over labelled pairs
    (0.0 means every pair lands in its graded stage). With ``balanced=True``, the
    mean of that error over each graded stage's pairs, averaged over the stages
    present, so a rare stage counts as much as a common one."""
    pairs = _checked(scores, stages)
    errors: dict[Stage, list[int]] = {}
    for score, stage in pairs:
        errors.setdefault(stage, []).append(abs(thresholds.stage(score) - stage))
    if balanced:
        return sum(sum(e) / len(e) for e in errors.values()) / len(errors)
    return sum(sum(e) for e in errors.values()) / len(pairs)


def _checked(
    scores: Sequence[float], stages: Sequence[Stage | int | str]
) -> list[tuple[float, Stage]]:
    if isinstance(scores, (str, bytes)) or isinstance(stages, (str, bytes)):
        raise InvalidInputError("scores and stages must be sequences, not strings.")
    scores, stages = list(scores), list(stages)
    if len(scores) != len(stages):
        raise InvalidInputError(
            f"Got {len(scores)} scores but {len(stages)} stages; give one stage per score."
        )
    if not scores:
        raise InvalidInputError("Need at least one labelled score to fit thresholds.")
    pairs = []
    for position, (score, stage) in enumerate(zip(scores, stages, strict=True)):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise InvalidInputError(
                f"scores[{position}] must be a number, got {type(score).__name__}."
            )
        if not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise InvalidInputError(
                f"scores[{position}] is {score!r}; stage cut points live on [0, 1], so fit "
                "them on normalised scores (e.g. CrossEncoderReranker with normalize=True)."
            )
        pairs.append((float(score), Stage.parse(stage)))
    return pairs


def _groups(pairs: list[tuple[float, Stage]], *, balanced: bool) -> list[tuple[float, list[float]]]:
    """Pairs grouped by equal score, ascending: (score, weight of each stage).

    Equal scores always share a stage, so they are decided together."""
    totals = Counter(stage for _, stage in pairs)
    groups: list[tuple[float, list[float]]] = []
    for score, members in itertools.groupby(sorted(pairs), key=lambda pair: pair[0]):
        weights = [0.0] * _STAGES
        for _, stage in members:
            weights[stage] += 1.0 / totals[stage] if balanced else 1.0
        groups.append((score, weights))
    return groups


def _room(low: float | None, high: float) -> int:
    """How many distinct cut points fit in ``(low, high]`` (``[0, high]`` when ``low``
    is None), counted up to four: near-equal floats leave no room between them."""
    count, x = 0, high
    while count < _STAGES - 1 and (x >= 0.0 if low is None else x > low):
        count += 1
        x = math.nextafter(x, -math.inf)
    return count


def _best_assignment(groups: list[tuple[float, list[float]]]) -> list[int]:
    """A non-decreasing stage per group with the least total ordinal error, such
    that the stages skipped between neighbours have room for their cut points."""
    inf = math.inf
    # cost[g][s]: least error of groups[: g + 1] with group g in stage s.
    cost = [[inf] * _STAGES for _ in groups]
    back = [[0] * _STAGES for _ in groups]
    for g, (score, counts) in enumerate(groups):
        for s in range(_STAGES):
            own = sum(count * abs(s - label) for label, count in enumerate(counts))
            if g == 0:
                if s <= _room(None, score):
                    cost[g][s] = own
                continue
            room = _room(groups[g - 1][0], score)
            options = [p for p in range(s + 1) if s - p <= room]
            previous = min(options, key=lambda p: cost[g - 1][p])
            cost[g][s] = cost[g - 1][previous] + own
            back[g][s] = previous
    top_room = _room(groups[-1][0], 1.0)
    finals = [s for s in range(_STAGES) if _STAGES - 1 - s <= top_room]
    stage = min(finals, key=lambda s: cost[-1][s])
    assigned = [0] * len(groups)
    for g in range(len(groups) - 1, -1, -1):
        assigned[g] = stage
        stage = back[g][stage]
    return assigned


def _cuts(groups: list[tuple[float, list[float]]], assigned: list[int]) -> list[float]:
    """Place cut ``k`` (1-4) in the gap between the groups below stage ``k`` and
    those at or above it; cuts sharing a gap are spread evenly through it."""
    scores = [score for score, _ in groups]
    gaps: dict[tuple[float | None, float], list[int]] = {}
    for k in range(1, _STAGES):
        below = [score for score, s in zip(scores, assigned, strict=True) if s < k]
        above = [score for score, s in zip(scores, assigned, strict=True) if s >= k]
        gap = (max(below) if below else None, min(above) if above else 1.0)
        gaps.setdefault(gap, []).append(k)
    cuts = [0.0] * (_STAGES - 1)
    for (low, high), ks in gaps.items():
        for k, cut in zip(ks, _spread(low, high, len(ks)), strict=True):
            cuts[k - 1] = cut
    return cuts


def _spread(low: float | None, high: float, count: int) -> list[float]:
    """``count`` increasing points evenly through ``(low, high]`` (``[0, high]`` when
    ``low`` is None), nudged apart where floats are too close to split evenly."""
    start = 0.0 if low is None else low
    points = [start + (high - start) * j / (count + 1) for j in range(1, count + 1)]
    floor = low
    for i, point in enumerate(points):
        if floor is not None and point <= floor:
            points[i] = math.nextafter(floor, math.inf)
        floor = points[i]
    ceiling = high
    for i in range(count - 1, -1, -1):
        if points[i] > ceiling:
            points[i] = ceiling
        ceiling = math.nextafter(points[i], -math.inf)
    return points
