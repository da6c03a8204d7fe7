"""Ctrl-C while a command runs: every SIGINT is recorded, so that code which turns
the KeyboardInterrupt into another error (a C extension interrupted while it is
imported reports an ImportError) cannot hide that the user interrupted."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["seen", "watch"]

_seen: list[int] = []


def seen() -> bool:
    """Whether a SIGINT arrived since the current :func:`watch` began."""
    return bool(_seen)


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Record every SIGINT in the block; each still raises KeyboardInterrupt, as
    Python's own handler does. Where Python's handler is not the one in place (not
    the main thread, an ignored SIGINT), nothing changes and nothing is recorded."""
    del _seen[:]

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        _seen.append(signum)
        raise KeyboardInterrupt

    installed = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if installed:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        # A command may have installed a handler of its own (serve does): left as is.
        if installed and signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        del _seen[:]
