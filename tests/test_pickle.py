"""Pickled backends keep working in another process: an explicit key travels inside
the pickle as a ``SecretStr`` (a pickle is a trusted-process format), a key read from
the environment is read again there, and configs, reprs and errors hold no secret.
Proved in a real ``multiprocessing`` spawn child and on the workers of a real
``dask.distributed`` local cluster talking to a loopback server, and with local models
reloaded in a child."""

from __future__ import annotations

import base64
import copy
import json
import multiprocessing
import os
import pickle
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cloudpickle
import httpx
import pytest

from memos_rerank_integrations import (
    AuthenticationError,
    CohereReranker,
    CrossEncoderReranker,
    FallbackReranker,
    HTTPReranker,
    LLMReranker,
    MemOSReranker,
    QwenReranker,
    StageThresholds,
    ZeroEntropyReranker,
    from_config,
)
from memos_rerank_integrations.testing import build_tiny_cross_encoder

from .support import qwen_fixtures as _qwen_fixtures
from .support.backends import OverlapReranker
from .support.loopback import (
    LoopbackServer,
    Recorded,
    Reply,
    cohere_results,
    expected_order,
    loopback,
)
from .support.pickle_child import rerank_in_child

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir

KEYS = {
    "MEMOS_API_KEY": "memos-SECRET-k3y-0001",
    "CO_API_KEY": "cohere-SECRET-k3y-0002",
    "ZERO_ENTROPY_API_KEY": "zerank-SECRET-k3y-0003",
    "OPENAI_API_KEY": "openai-SECRET-k3y-0004",
    "HTTP_KEY": "http-SECRET-k3y-0005",  # HTTPReranker reads no environment variable
}
DOCS = ["doc 4", "doc 9", "doc 1", "doc 6"]
TEXTS = ["User drinks green tea.", "User likes badminton.", "User prefers baijiu."]


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*KEYS, "COHERE_API_KEY", "ZEROENTROPY_API_KEY", "MEMOS_BASE_URL", "CO_API_URL"):
        monkeypatch.delenv(name, raising=False)


def header(request: Recorded, name: str) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), None)


def service(request: Recorded) -> Reply:
    """Rerank (MemOS, Cohere v2, Zero Entropy paths) or chat completions (grade n % 5)."""
    if request.path.endswith("/chat/completions"):
        match = re.search(r"<document>\s*doc (\d+)", request.body["messages"][-1]["content"])
        grade = int(match.group(1)) % 5 if match else 0
        message = {"role": "assistant", "content": str(grade)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return Reply(
            200, {"id": "c", "object": "chat.completion", "created": 0, "choices": [choice]}
        )
    return Reply(200, cohere_results(request.body["documents"], request.body.get("top_n")))


@pytest.fixture
def live() -> Iterator[LoopbackServer]:
    with loopback(service) as srv:
        yield srv


def keyed_backends(url: str) -> dict[str, Any]:
    """One backend per kind that holds a key, each given its key explicitly."""
    llm = {
        "provider": "openai",
        "config": {
            "model": "gpt-test",
            "api_key": KEYS["OPENAI_API_KEY"],
            "openai_base_url": url + "/v1",
        },
    }
    return {
        "memos": MemOSReranker(api_key=KEYS["MEMOS_API_KEY"], base_url=url, max_retries=0),
        "cohere": CohereReranker(api_key=KEYS["CO_API_KEY"], base_url=url, max_retries=0),
        "zero_entropy": ZeroEntropyReranker(
            api_key=KEYS["ZERO_ENTROPY_API_KEY"], base_url=url, max_retries=0
        ),
        "llm": from_config({"provider": "llm", "config": {"llm": llm, "max_concurrency": 2}}),
        "http": HTTPReranker(url, path="http/rerank", api_key=KEYS["HTTP_KEY"], max_retries=0),
        "fallback": FallbackReranker(
            [
                MemOSReranker(api_key=KEYS["MEMOS_API_KEY"], base_url="http://127.0.0.1:9"),
                CohereReranker(api_key=KEYS["CO_API_KEY"], base_url=url),
            ]
        ),
    }


def dumps_everywhere(backend: Any) -> list[bytes]:
    return [pickle.dumps(backend, protocol) for protocol in range(pickle.HIGHEST_PROTOCOL + 1)] + [
        cloudpickle.dumps(backend)  # what Ray and Dask use
    ]


def test_keys_from_the_environment_never_appear_in_pickles(
    live: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    llm = {
        "provider": "openai",
        "config": {"model": "gpt-test", "openai_base_url": live.url + "/v1"},
    }
    backends = {
        "memos": MemOSReranker(base_url=live.url, max_retries=0),
        "cohere": CohereReranker(base_url=live.url, max_retries=0),
        "zero_entropy": ZeroEntropyReranker(base_url=live.url, max_retries=0),
        "llm": from_config({"provider": "llm", "config": {"llm": llm, "max_concurrency": 2}}),
    }
    for name, backend in backends.items():
        backend.rerank("q", DOCS)  # used first: clients made, nothing cached may leak
        for data in dumps_everywhere(backend):
            for key in KEYS.values():
                for encoded in (key.encode(), key.encode("utf-16-le"), key[::-1].encode()):
                    assert encoded not in data, (name, key)
            # No client, pool or lock travels: they are rebuilt in the process that loads it.
            assert b"httpx" not in data and b"_thread" not in data


def test_explicit_keys_travel_and_work_in_a_spawned_process(
    live: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backends = keyed_backends(live.url)  # built with explicit keys, none in the environment
    for backend in backends.values():
        for data in dumps_everywhere(backend):
            assert b"httpx" not in data and b"_thread" not in data
    worker_keys = {name: f"worker-{key}" for name, key in KEYS.items()}
    for name, value in worker_keys.items():  # the workers' environment holds other keys
        monkeypatch.setenv(name, value)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        futures = {
            (name, mode): pool.submit(rerank_in_child, backends[name], "q", DOCS, mode)
            for name in backends
            for mode in ("sync", "async")
        }
        answers = {key: future.result(timeout=120) for key, future in futures.items()}
    grades = sorted(range(len(DOCS)), key=lambda i: (-(int(DOCS[i].split()[-1]) % 5), i))
    for (name, _), (pid, ranking) in answers.items():
        assert pid != os.getpid()
        order = [index for index, _, _ in ranking]
        assert order == (grades if name == "llm" else expected_order(DOCS)), name
    # Each request carried the key the backend was built with, not the workers' own.
    auth = {(r.path, header(r, "Authorization")) for r in live.requests}
    assert auth == {
        ("/rerank", f"Token {KEYS['MEMOS_API_KEY']}"),
        ("/v2/rerank", f"Bearer {KEYS['CO_API_KEY']}"),
        ("/v1/models/rerank", f"Bearer {KEYS['ZERO_ENTROPY_API_KEY']}"),
        ("/v1/chat/completions", f"Bearer {KEYS['OPENAI_API_KEY']}"),
        ("/http/rerank", f"Bearer {KEYS['HTTP_KEY']}"),
    }


def test_an_explicit_key_survives_unpickling_without_an_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 27: MemOSReranker(api_key=...) pickled, then failed with AuthenticationError;
    # HTTPReranker(api_key=...) refused to pickle.
    for backend, header_value in [
        (MemOSReranker(api_key=KEYS["MEMOS_API_KEY"]), f"Token {KEYS['MEMOS_API_KEY']}"),
        (
            HTTPReranker("http://127.0.0.1:9", api_key=KEYS["HTTP_KEY"]),
            f"Bearer {KEYS['HTTP_KEY']}",
        ),
    ]:
        for data in dumps_everywhere(backend):
            restored = pickle.loads(data)
            assert restored._auth_headers() == {"Authorization": header_value}
            assert restored.to_config() == backend.to_config()
            for shown in (repr(restored), str(restored), json.dumps(restored.to_config())):
                assert KEYS["MEMOS_API_KEY"] not in shown and KEYS["HTTP_KEY"] not in shown
    # A key the backend read from the environment is read again where it is unpickled.
    monkeypatch.setenv("MEMOS_API_KEY", KEYS["MEMOS_API_KEY"])
    data = pickle.dumps(MemOSReranker())
    assert KEYS["MEMOS_API_KEY"].encode() not in data
    monkeypatch.setenv("MEMOS_API_KEY", "another-key")
    assert pickle.loads(data)._api_key.get_secret_value() == "another-key"
    monkeypatch.delenv("MEMOS_API_KEY")
    with pytest.raises(AuthenticationError, match="MEMOS_API_KEY"):
        pickle.loads(data)


def test_local_models_reload_in_a_spawned_process(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    backends = [
        QwenReranker(
            tiny_qwen_dir, dtype="float32", thresholds=StageThresholds(0.1, 0.2, 0.3, 0.4)
        ),
        CrossEncoderReranker(build_tiny_cross_encoder(tmp_path / "ce"), max_length=64),
    ]
    here = [[(r.index, r.score, r.stage.label) for r in b.rerank("tea?", TEXTS)] for b in backends]
    for backend in backends:
        data = pickle.dumps(backend)  # loaded: the weights stay behind
        assert len(data) < 2_000 and b"torch" not in data
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        there = [
            pool.submit(rerank_in_child, b, "tea?", TEXTS).result(timeout=180) for b in backends
        ]
    for (pid, ranking), expected in zip(there, here, strict=True):
        assert pid != os.getpid()
        assert [i for i, _, _ in ranking] == [i for i, _, _ in expected]
        assert [s for _, s, _ in ranking] == pytest.approx([s for _, s, _ in expected], abs=1e-5)
        assert [label for _, _, label in ranking] == [label for _, _, label in expected]


def test_options_survive_a_round_trip() -> None:
    backend = MemOSReranker(
        "memos-reranker-4b",
        api_key=KEYS["MEMOS_API_KEY"],
        timeout=2.5,
        max_documents_per_request=7,
        on_too_long="raise",
        count_tokens=len,  # a module-level function pickles by reference
        thresholds=StageThresholds(0.05, 0.1, 0.5, 0.9),
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MEMOS_API_KEY", "k")
        for data in dumps_everywhere(backend):
            restored = pickle.loads(data)
            assert (restored.model, restored.url) == (backend.model, backend.url)
            assert (restored.retry, restored.limits) == (backend.retry, backend.limits)
            assert restored.thresholds == backend.thresholds


def test_copies_keep_the_key_and_share_your_clients() -> None:
    client = httpx.Client()
    try:
        backend = HTTPReranker("http://127.0.0.1:9", api_key="k-copy", http_client=client)
        for duplicate in (copy.copy(backend), copy.deepcopy(backend)):
            assert duplicate is not backend
            assert duplicate._auth_headers() == {"Authorization": "Bearer k-copy"}
            assert duplicate._clients.sync() is client
        chain = FallbackReranker([backend])
        deep = copy.deepcopy(chain)
        assert deep.rerankers[0] is not backend  # a deep copy copies the chain's backends
        assert deep.rerankers[0]._clients.sync() is client
        assert copy.copy(chain).rerankers[0] is backend
    finally:
        client.close()


def test_what_cannot_be_pickled_says_why() -> None:
    from langchain_core.language_models import FakeListChatModel

    client = httpx.Client()
    try:
        cases = [
            (HTTPReranker("http://127.0.0.1:9", http_client=client), "your own http_client"),
            (CohereReranker(client=object(), async_client=object()), "your own client"),
            (LLMReranker(FakeListChatModel(responses=["1"])), "your own LLM object"),
            (FallbackReranker([HTTPReranker("http://127.0.0.1:9", http_client=client)]), "http"),
        ]
        for backend, message in cases:
            with pytest.raises(TypeError, match=message):
                pickle.dumps(backend)
    finally:
        client.close()
    # HTTPReranker pickles with or without a key; a duck-typed backend by its own rules.
    assert pickle.loads(pickle.dumps(HTTPReranker("http://127.0.0.1:9"))).url.endswith("/rerank")
    chain = pickle.loads(pickle.dumps(FallbackReranker([OverlapReranker()])))
    assert [r.index for r in chain.rerank("tea", ["tea", "coffee"])] == [0, 1]


# -- a proxy password in a Mem0 LLM config ----------------------------------------------

PROXY_PASSWORD = "pr0xy-SECRET-pa55"


def test_a_proxy_password_stays_out_of_configs_and_reprs_but_travels_in_the_pickle(
    live: LoopbackServer,
) -> None:
    from memos_rerank_integrations.mem0 import Mem0RerankerConfig

    # The loopback server is also the proxy (its target's host is never resolved).
    proxy = f"http://alice:{PROXY_PASSWORD}@{live.url.removeprefix('http://')}"
    llm = {
        "provider": "openai",
        "config": {
            "model": "gpt-test",
            "api_key": KEYS["OPENAI_API_KEY"],
            "openai_base_url": live.url + "/v1",
            "http_client_proxies": {"http://": proxy},
        },
    }
    backend = from_config({"provider": "llm", "config": {"llm": llm, "max_retries": 0}})
    block = Mem0RerankerConfig(backend="llm", llm=llm)
    for shown in (
        json.dumps(backend.to_config()),
        repr(backend),
        repr(backend.llm),
        repr(block),
        str(block),
    ):
        assert PROXY_PASSWORD not in shown and KEYS["OPENAI_API_KEY"] not in shown, shown
    # The entry that held credentials is dropped: an LLM rebuilt from the config uses
    # the environment's proxies, as it reads the environment's key.
    assert backend.to_config()["config"]["llm"]["config"]["http_client_proxies"] == {}
    assert f"http://{'*' * 10}@127.0.0.1" in repr(block)
    grades = sorted(range(len(DOCS)), key=lambda i: (-(int(DOCS[i].split()[-1]) % 5), i))
    for data in dumps_everywhere(backend):
        restored = pickle.loads(data)
        assert [r.index for r in restored.rerank("q", DOCS)] == grades
        assert PROXY_PASSWORD not in json.dumps(restored.to_config())
        # Mem0 built the unpickled LLM's proxy client from the same credentials.
        proxy_client = restored.llm._llm.config.http_client
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        assert proxy_client.post("http://llm.invalid/v1/chat/completions", json=chat).is_success
    credentials = base64.b64encode(f"alice:{PROXY_PASSWORD}".encode()).decode()
    proxied = [r for r in live.requests if r.path.startswith("http://llm.invalid/")]
    assert len(proxied) == len(dumps_everywhere(backend))
    assert {header(r, "Proxy-Authorization") for r in proxied} == {f"Basic {credentials}"}
    direct = {header(r, "Authorization") for r in live.requests if r not in proxied}
    assert direct == {f"Bearer {KEYS['OPENAI_API_KEY']}"}  # the explicit key travelled too


# -- a real distributed engine ----------------------------------------------------------


def test_a_backend_and_a_compressor_rerank_on_dask_workers(live: LoopbackServer) -> None:
    """Issue 27: what the pickling promised, on the worker processes of a real
    ``dask.distributed`` cluster (cloudpickle, separate processes, no key in their
    environment): the backend and a LangChain compressor around it rerank there."""
    distributed = pytest.importorskip("distributed")
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    backend = MemOSReranker(api_key=KEYS["MEMOS_API_KEY"], base_url=live.url, max_retries=0)
    http = HTTPReranker(live.url, path="http/rerank", api_key=KEYS["HTTP_KEY"], max_retries=0)
    compressor = RerankCompressor(reranker=http, top_n=2)
    documents = [Document(page_content=text, id=str(i)) for i, text in enumerate(DOCS)]
    with (
        distributed.LocalCluster(
            processes=True, n_workers=1, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        (worker_pid,) = client.run(os.getpid).values()
        ranked = client.submit(backend.rerank, "q", DOCS, pure=False).result(timeout=60)
        kept = client.submit(compressor.compress_documents, documents, "q", pure=False).result(
            timeout=60
        )
    assert worker_pid != os.getpid()
    assert [r.index for r in ranked] == expected_order(DOCS)
    assert [d.id for d in kept] == [str(i) for i in expected_order(DOCS)[:2]]
    assert all(isinstance(d.metadata["relevance_score"], float) for d in kept)
    auth = {(r.path, header(r, "Authorization")) for r in live.requests}
    assert auth == {
        ("/rerank", f"Token {KEYS['MEMOS_API_KEY']}"),
        ("/http/rerank", f"Bearer {KEYS['HTTP_KEY']}"),
    }
