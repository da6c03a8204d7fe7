"""Hostile bodies cost the event loop no more than their size: ``memos-rerank serve``
as a process, a real client sending each body, and a second client polling
``/health`` meanwhile, the loop-lag probe. Bounds are generous (a loaded 2-core
machine); the failures they catch took tens of seconds and gigabytes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memos_rerank_integrations.testing import build_tiny_cross_encoder

from ..support.server import free_port, start_serve, wait_healthy

MIB = 1024 * 1024
# A request may take this long, and /health wait this long behind it (the work each
# body below is allowed is a few hundred milliseconds; unbounded work took 29-85 s).
REQUEST_SECONDS = 10.0
HEALTH_SECONDS = 2.0
# What the server's peak memory may grow by (unbounded work took 1-3 GB).
GROWTH_BYTES = 400 * MIB


class Served:
    """A ``memos-rerank serve`` process and what it reports about itself."""

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.pid = pid

    def peak_memory(self) -> int:
        """The process's peak resident memory (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = build_tiny_cross_encoder(tmp_path_factory.mktemp("event-loop") / "tiny-ce")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_serve(
        [
            *("--model", str(model), "--backend", "cross-encoder", "--dtype", "float32"),
            *("--port", str(port), "--log-level", "warning"),
            # Long requests are counted (off the loop), then refused: no model work.
            *("--max-request-tokens", "50000"),
        ]
    )
    try:
        wait_healthy(process, url)
        yield Served(url, process.pid)
    finally:
        process.terminate()
        process.communicate(timeout=60)


def body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def fill(make: Any, budget: int = 4 * MIB - 4096) -> bytes:
    """The largest body ``make(n)`` under 4 MiB (the server's default limit)."""
    low, high = 1, budget
    while low < high:
        middle = (low + high + 1) // 2
        if len(body(make(middle))) <= budget:
            low = middle
        else:
            high = middle - 1
    return body(make(low))


def rank_fields_amplifier() -> bytes:
    """The 305 kB request of the issue: 1000 documents, one field named 30,000 times."""
    documents = [{"text": "t", "a": "x" * 100}] * 1000
    return body({"query": "q", "documents": documents, "rank_fields": ["a"] * 30_000})


HOSTILE = {
    "rank-fields-named-30000-times": ("/v1/rerank", rank_fields_amplifier, 400),
    "two-million-numbers-as-documents": (
        "/rerank",
        lambda: fill(lambda n: {"query": "q", "documents": [1] * n}),
        400,
    ),
    "a-million-tei-texts": (
        "/rerank",
        lambda: fill(lambda n: {"query": "q", "texts": ["a"] * n}),
        400,
    ),
    "a-million-v2-documents": (
        "/v2/rerank",
        lambda: fill(lambda n: {"query": "q", "documents": ["a"] * n}),
        400,
    ),
    "numbers-as-score-texts": (
        "/score",
        lambda: fill(lambda n: {"text_1": "q", "text_2": [1] * n}),
        400,
    ),
    "half-a-million-score-pairs": (
        "/score",
        lambda: fill(lambda n: {"text_1": ["q"] * n, "text_2": ["a"] * n}),
        400,
    ),
    "one-object-document-with-300000-fields": (
        "/v1/rerank",
        lambda: fill(lambda n: {"query": "q", "documents": [{f"f{i}": "" for i in range(n)}]}),
        400,
    ),
    "documents-x-fields-of-numbers": (
        "/v1/rerank",
        lambda: body({"query": "q", "documents": [{f"f{i}": 1 for i in range(100)}] * 1000}),
        400,
    ),
    "all-fields-ranked-of-1000-documents": (
        "/v1/rerank",
        lambda: body(
            {
                "query": "q",
                "documents": [{f"f{i}": "word " * 6 for i in range(100)}] * 1000,
                "rank_fields": [f"f{i}" for i in range(100)],
            }
        ),
        413,
    ),
    "1000-long-documents": (
        "/rerank",
        lambda: body({"query": "q", "documents": ["word " * 800] * 1000}),
        413,
    ),
    "a-body-for-health": ("/health", lambda: b'{"x": "' + b"a" * (4 * MIB - 16) + b'"}', 405),
    "a-body-for-a-missing-path": ("/nope", lambda: b"[" + b"1," * (2 * MIB - 8) + b"1]", 404),
    "nested-arrays": ("/rerank", lambda: b"[" * (2 * MIB) + b"]" * (2 * MIB - 64), 400),
}


class HealthProbe:
    """Polls ``/health`` from its own thread; the longest answer it waited for."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.longest = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get(f"{self.url}/health").status_code == 200
                self.longest = max(self.longest, time.monotonic() - started)
                self.answers += 1
                time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_body_neither_freezes_the_loop_nor_grows_memory(
    served: Served, name: str
) -> None:
    path, make, status = HOSTILE[name]
    raw = make()
    assert len(raw) <= 4 * MIB
    before = served.peak_memory()
    with HealthProbe(served.url) as probe:
        time.sleep(0.1)
        started = time.monotonic()
        response = httpx.post(
            f"{served.url}{path}",
            content=raw,
            headers={"Content-Type": "application/json"},
            timeout=300,
        )
        elapsed = time.monotonic() - started
        time.sleep(0.1)
    assert elapsed < REQUEST_SECONDS, f"{elapsed:.1f} s"
    assert probe.answers >= 2
    assert probe.longest < HEALTH_SECONDS, f"/health waited {probe.longest:.2f} s"
    assert served.peak_memory() - before < GROWTH_BYTES
    assert response.status_code == status, response.text[:300]
