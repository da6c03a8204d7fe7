"""Small deterministic backends for adapter tests (no model, no network)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memos_rerank_integrations._calls import Budget
from memos_rerank_integrations._types import RerankResult, rank_scores

SRC = Path(__file__).resolve().parents[2] / "src"
# Child Python processes import this checkout's code, installed or not.
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
}

# The MemOS documentation's reranking examples: [{"query": ..., "documents": [...]}, ...].
MEMOS_EXAMPLES: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "examples.json").read_text()
)["examples"]


def overlap_score(query: str, document: str) -> float:
    """Fraction of the query's words that occur in the document."""
    words = set(re.findall(r"\w+", query.lower()))
    found = set(re.findall(r"\w+", document.lower()))
    return len(words & found) / len(words) if words else 0.0


class OverlapReranker:
    """Scores by word overlap; records every call and which entry point was used."""

    model = "overlap-test"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[str]]] = []

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        self.calls.append(("rerank", query, list(documents)))
        return rank_scores([overlap_score(query, d) for d in documents], top_n=top_n)

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        self.calls.append(("arerank", query, list(documents)))
        return rank_scores([overlap_score(query, d) for d in documents], top_n=top_n)


class ScriptedReranker:
    """Returns given scores in document order, or raises a given error."""

    def __init__(self, scores: Sequence[float] | None = None, error: Exception | None = None):
        self.scores = scores
        self.error = error
        self.calls = 0

    def _answer(self, documents: Sequence[str]) -> list[RerankResult]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        assert self.scores is not None
        return rank_scores(list(self.scores)[: len(documents)])

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return self._answer(documents)

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return self._answer(documents)


class RawReranker:
    """Returns whatever it is given, unchecked (for malformed-result tests)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> Any:
        return self.raw


class SyncOnlyReranker:
    """Duck-typed: only ``rerank``, no ``arerank``."""

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return rank_scores([overlap_score(query, d) for d in documents], top_n=top_n)


class FirstK:
    """Scores the first ``k`` documents (``base`` + position / 10, so later ones rank
    first) when asked within a budget, recording each budget; every document
    (position / 10) otherwise."""

    model = "first-k"

    def __init__(self, k: int, *, base: float = 0.0) -> None:
        self.k = k
        self.base = base
        self.budgets: list[Budget] = []

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return rank_scores([i / 10 for i in range(len(documents))], top_n=top_n)

    def rerank_within(
        self, query: str, documents: Sequence[str], *, budget: Budget
    ) -> list[RerankResult]:
        self.budgets.append(budget)
        return rank_scores([self.base + i / 10 for i in range(min(self.k, len(documents)))])
