"""Run in a child process of the pickling tests (kept free of heavy imports)."""

from __future__ import annotations

import asyncio
import os
from typing import Any


def rerank_in_child(
    backend: Any, query: str, documents: list[str], mode: str = "sync"
) -> tuple[int, list[tuple[int, float, str]]]:
    """The child's pid and the backend's ranking, as plain tuples."""
    if mode == "sync":
        results = backend.rerank(query, documents)
    else:
        results = asyncio.run(backend.arerank(query, documents))
    return os.getpid(), [(r.index, r.score, r.stage.label) for r in results]
