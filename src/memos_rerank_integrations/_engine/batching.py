"""Length-sorted, token-budget batching shared by the local backends and engines."""

from __future__ import annotations

from collections.abc import Sequence

from .._exceptions import InvalidInputError

__all__ = ["budget_batches", "limit_padding"]


def budget_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group indices into batches sorted by length (longest first) so that each
    batch's padded size, rows x longest row, stays within ``max_tokens``.

    A single row longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be positive, got {max_tokens}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def limit_padding(
    batch: Sequence[int], lengths: Sequence[int], *, max_padding: float, min_tokens: int = 0
) -> list[list[int]]:
    """Split a longest-first batch (as :func:`budget_batches` makes them) into runs
    whose padding stays at most ``max_padding`` of their padded size.

    Runs smaller than ``min_tokens`` padded tokens are never split further: below
    that, a bigger matrix multiply is worth more than the padding it saves.
    """
    runs: list[list[int]] = []
    current: list[int] = []
    real = longest = 0
    for index in batch:
        widest = max(longest, lengths[index])
        padded = (len(current) + 1) * widest
        padding = padded - real - lengths[index]
        if current and padded > min_tokens and padding > max_padding * padded:
            runs.append(current)
            current, real, widest = [], 0, lengths[index]
        current.append(index)
        real += lengths[index]
        longest = widest
    if current:
        runs.append(current)
    return runs
