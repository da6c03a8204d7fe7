"""One wall-clock deadline per remote call, kept however the call's time is spent.

A :class:`Deadline` is made when a call starts and shared by all its requests and
their retries. Three things keep it:

- every attempt runs inside :meth:`Deadline.attempt`, which records, in a context
  variable, the moment that attempt must end; async attempts also run under
  ``asyncio.wait_for``, which cancels connect, headers and body alike;
- the sockets of the HTTP clients this package makes go through
  :class:`DeadlineNetworkBackend`, which cuts every connect, read and write at that
  moment (httpx's own timeout is per read, so a server that trickles one byte at a
  time would otherwise never trip it), and stops within :data:`POLL_SECONDS` once
  the call is cancelled;
- the synchronous path runs a call's requests in worker threads
  (:func:`run_in_threads`) and waits for them only until the deadline, so the caller
  gets its answer in time even where the sockets are not ours (a client passed in,
  an httpx whose pools :func:`guard_sockets` cannot reach, a DNS lookup); stragglers
  are told to stop and are not waited for.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import httpcore
import httpx

__all__ = [
    "POLL_SECONDS",
    "Deadline",
    "DeadlineNetworkBackend",
    "guard_sockets",
    "run_in_threads",
]

T = TypeVar("T")

# How often a blocked read looks whether its call was cancelled (a sibling request
# failed): the longest a straggler keeps its connection after that.
POLL_SECONDS = 0.1


class Deadline:
    """The moment a call must be over, plus a flag that tells its requests to stop."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._cancelled = threading.Event()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Tell the call's requests still running to stop (the call is decided)."""
        self._cancelled.set()

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking early when the call is cancelled; ``True`` if it was."""
        return self._cancelled.wait(seconds)

    @contextlib.contextmanager
    def attempt(self, timeout: float) -> Iterator[None]:
        """Within this block, sockets of our clients stop ``timeout`` seconds from now
        (never after the call's deadline) or when the call is cancelled."""
        token = _ATTEMPT.set(_Attempt(min(self.at, time.monotonic() + timeout), self))
        try:
            yield
        finally:
            _ATTEMPT.reset(token)


@dataclass(frozen=True)
class _Attempt:
    ends: float
    call: Deadline


_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "memos_rerank_attempt", default=None
)


def _time_left(error: type[httpcore.TimeoutException]) -> float | None:
    """Seconds the current attempt has left (``None``: not inside one); raises
    ``error`` when none are left or the call was cancelled."""
    attempt = _ATTEMPT.get()
    if attempt is None:
        return None
    left = attempt.ends - time.monotonic()
    if attempt.call.cancelled:
        raise error("the call was cancelled")
    if left <= 0:
        raise error("the call's deadline passed")
    return left


def _clamp(timeout: float | None, error: type[httpcore.TimeoutException]) -> float | None:
    left = _time_left(error)
    if left is None:
        return timeout
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if _ATTEMPT.get() is None:
            return self._stream.read(max_bytes, timeout)
        # Short slices, so that a cancelled call is noticed while the server is silent;
        # a slice that times out is simply tried again (nothing was consumed).
        ends = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _time_left(httpcore.ReadTimeout)
            assert left is not None
            wait = min(left, POLL_SECONDS)
            if ends is not None:
                per_read = ends - time.monotonic()
                if per_read <= 0:
                    raise httpcore.ReadTimeout("timed out")
                wait = min(wait, per_read)
            try:
                return self._stream.read(max_bytes, wait)
            except httpcore.ReadTimeout:
                continue

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Not sliced: a write cut short may have sent part of the buffer.
        self._stream.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._stream.start_tls(
            ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(stream)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class DeadlineNetworkBackend(httpcore.NetworkBackend):
    """An httpcore network backend whose connects, reads and writes end when the
    current attempt must (see :meth:`Deadline.attempt`); outside an attempt it is the
    backend it wraps."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            host,
            port,
            timeout=_clamp(timeout, httpcore.ConnectTimeout),
            local_address=local_address,
            socket_options=socket_options,
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_unix_socket(
            path, timeout=_clamp(timeout, httpcore.ConnectTimeout), socket_options=socket_options
        )
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def guard_sockets(client: httpx.Client) -> bool:
    """Route the sockets of every transport of ``client`` (its own and its proxy
    mounts) through :class:`DeadlineNetworkBackend`; ``True`` if all could be.

    httpx builds its connection pools without a way to pass a network backend, so
    this sets the pools' backend after the fact, keeping everything else httpx read
    from the environment (proxies, certificates). Where an httpx version lays its
    transports out differently nothing is changed, and the deadline still holds for
    the caller through :func:`run_in_threads`.
    """
    transports = [getattr(client, "_transport", None)]
    transports += list(getattr(client, "_mounts", {}).values())
    guarded = True
    for transport in transports:
        if transport is None:
            continue
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, DeadlineNetworkBackend):
            continue
        if not isinstance(backend, httpcore.NetworkBackend):
            guarded = False
            continue
        pool._network_backend = DeadlineNetworkBackend(backend)  # type: ignore[union-attr]
    return guarded


def run_in_threads(
    tasks: Sequence[Callable[[], T]],
    *,
    deadline: Deadline,
    workers: int,
    expired: Callable[[], BaseException],
) -> list[T]:
    """Run ``tasks`` on at most ``workers`` threads; their results in order.

    The caller waits until all are done, one fails (its error is raised) or the
    deadline passes (``expired()`` is raised), never longer: the tasks still running
    are cancelled through ``deadline`` and left to end on their own. The workers are
    daemon threads, not an executor's, whose threads the interpreter joins at exit:
    a straggler stuck on a socket that is not ours must not hold the process up.
    """
    futures: list[Future[T]] = [Future() for _ in tasks]
    jobs = collections.deque(
        zip(futures, tasks, [contextvars.copy_context() for _ in tasks], strict=True)
    )
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                future, task, context = jobs.popleft()
            if deadline.cancelled:
                future.cancel()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = context.run(task)
            except BaseException as error:  # handed to the caller through the future
                future.set_exception(error)
            else:
                future.set_result(result)

    for _ in range(min(workers, len(tasks))):
        threading.Thread(target=work, name="memos-rerank-request", daemon=True).start()
    try:
        pending: set[Future[T]] = set(futures)
        while pending:
            left = deadline.remaining()
            if left <= 0:
                raise expired()
            done, pending = wait(pending, timeout=left, return_when=FIRST_EXCEPTION)
            for future in futures:  # input order, so the error raised is stable
                if future in done and future.exception() is not None:
                    future.result()
        return [future.result() for future in futures]
    finally:
        deadline.cancel()
        for future in futures:
            future.cancel()  # those not started yet; running ones stop through deadline
