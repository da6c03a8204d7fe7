"""Checking that reading an answer takes time linear in its size.

:func:`assert_linear` times a function on an input and on one ten times longer, by the
CPU time of the calling thread (other processes on a loaded machine do not count), the
best of three runs each. Linear work takes about ten times as long; the check allows
thirty times, plus a constant for timer noise. Quadratic work takes a hundred times
as long, so on inputs where it costs more than a few milliseconds the check fails.
Keep the inputs small (thousands of characters): quadratic work on the longer one
must still end in seconds for the failing check to be seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

FACTOR = 10  # how much longer the second input is
ALLOWED = 30  # how much longer reading it may take
NOISE = 0.05  # seconds of CPU time allowed on top


def cpu_seconds(function: Callable[[T], object], argument: T, runs: int = 3) -> float:
    """The least CPU time (of this thread) of ``runs`` calls ``function(argument)``;
    one call when it takes over a second (the check fails anyway: no need to wait)."""
    best = float("inf")
    for _ in range(runs):
        started = time.thread_time()
        function(argument)
        best = min(best, time.thread_time() - started)
        if best > 1.0:
            break
    return best


def repeated(unit: T, size: int) -> T:
    """``unit`` (a str or bytes) repeated to at least ``size`` characters."""
    return unit * -(-size // len(unit))  # type: ignore[operator, arg-type, no-any-return]


def assert_linear(
    function: Callable[[T], object], make: Callable[[int], T], size: int
) -> tuple[float, float]:
    """Fail unless ``function(make(FACTOR * size))`` costs at most ``ALLOWED`` times
    what ``function(make(size))`` does (plus :data:`NOISE`); returns both costs."""
    small = cpu_seconds(function, make(size))
    large = cpu_seconds(function, make(FACTOR * size))
    assert large <= ALLOWED * small + NOISE, (
        f"{FACTOR} times the input took {large / max(small, 1e-9):.0f} times as long "
        f"({small:.4f} s, then {large:.4f} s)"
    )
    return small, large
