"""Test-wide settings (nothing in the suite may reach the Hugging Face Hub; Mem0 runs
without telemetry) and the loopback ``server`` fixture of the remote-backend tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .support import offline  # noqa: F401 - Mem0's settings, read when mem0 is first imported
from .support.loopback import LoopbackServer, loopback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    """A scripted HTTP server on 127.0.0.1, stopped after the test."""
    with loopback() as srv:
        yield srv
