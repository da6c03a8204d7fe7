"""What is particular to ZeroEntropyReranker, against a real HTTP server on 127.0.0.1:
the ``latency`` option and its base URLs. What every remote backend does is in
test_contract.py."""

from __future__ import annotations

from typing import Any

import pytest

from memos_rerank_integrations import InvalidInputError, ZeroEntropyReranker
from memos_rerank_integrations._remote.zeroentropy import DEFAULT_ZEROENTROPY_BASE_URL

from ..support.loopback import FAST, LoopbackServer, Reply, cohere_shaped

KEY = "ze-SECRET-key-0099"
DOCS = ["doc 11", "doc 12", "doc 13"]


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ZERO_ENTROPY_API_KEY", "ZEROENTROPY_API_KEY", "ZEROENTROPY_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def make(server: LoopbackServer, **kwargs: Any) -> ZeroEntropyReranker:
    return ZeroEntropyReranker(**{"api_key": KEY, "base_url": server.url, **FAST, **kwargs})


def test_latency_is_sent_when_set(server: LoopbackServer) -> None:
    server.script(cohere_shaped, cohere_shaped)
    make(server).rerank("q", DOCS)
    make(server, model="zerank-1-small", latency="fast").rerank("q", DOCS)
    assert "latency" not in server.requests[0].body
    assert server.requests[1].body["latency"] == "fast"
    assert server.requests[1].body["model"] == "zerank-1-small"


def test_bad_latency_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="latency"):
        ZeroEntropyReranker(api_key=KEY, latency=5)  # type: ignore[arg-type]


def test_a_validation_error_list_is_invalid_input(server: LoopbackServer) -> None:
    # Zero Entropy answers 422 with FastAPI's list of validation errors.
    server.script(Reply(422, {"detail": [{"loc": ["body", "query"], "msg": "field required"}]}))
    with pytest.raises(InvalidInputError, match="field required") as caught:
        make(server, max_retries=1).rerank("q", DOCS)
    assert caught.value.status_code == 422 and caught.value.backend == "zeroentropy"
    assert len(server.requests) == 1


def test_base_urls(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        ZeroEntropyReranker(api_key=KEY).url == DEFAULT_ZEROENTROPY_BASE_URL + "/v1/models/rerank"
    )
    # The official SDK's variable already carries /v1.
    monkeypatch.setenv("ZEROENTROPY_BASE_URL", server.url + "/v1")
    server.script(cohere_shaped)
    ZeroEntropyReranker(api_key=KEY).rerank("q", DOCS)
    assert server.requests[0].path == "/v1/models/rerank"
