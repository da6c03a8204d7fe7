"""The reranking examples from the MemOS documentation, shipped with the package so
that ``memos-rerank demo`` works from an installed copy.

``EXAMPLES`` mirrors ``examples.json`` (kept equal by a test); the demo reads one
user's memories from the second example and asks each query against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["BUSINESS_TRIP_QUERY", "EXAMPLES", "MEM0_PLAYBOOKS", "Example"]


@dataclass(frozen=True)
class Example:
    """One query and the memories it is asked against."""

    query: str
    documents: tuple[str, ...]


EXAMPLES: Final[tuple[Example, ...]] = (
    Example(
        "Any liquor recommendations for me?",
        (
            "User prefers Jiangxiang-flavored baijiu, like Moutai.",
            "I don't drink alcohol.",
        ),
    ),
    Example(
        "What are the user's hobbies?",
        (
            "User likes playing badminton.",
            "User is a backend developer in Hangzhou.",
            "User prefers concise replies.",
            "User prefers Jiangxiang-flavored baijiu.",
            "User is going on a business trip to Beijing next Wednesday.",
        ),
    ),
)

# The third topic the guide uses: the business-trip memory of the second example.
BUSINESS_TRIP_QUERY: Final = "When is the user's next business trip?"

MEM0_PLAYBOOKS: Final[tuple[str, ...]] = (
    "customer having login issues with mobile app",
    "science fiction books with space exploration themes",
    "What restaurants did I enjoy last month that had good vegetarian options?",
    "What are my food preferences?",
    "What movies do I like?",
    "important work tasks",
)
