"""The Mem0 plug-in, inside a real ``mem0.Memory`` / ``AsyncMemory`` run offline: local
Qdrant, the MiniLM embedder, ``infer=False`` adds (no LLM call), no telemetry, and a
guard that fails the test on any non-loopback resolve or connect."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from mem0 import AsyncMemory, Memory
from mem0.utils.factory import RerankerFactory

from memos_rerank_integrations import (
    InvalidInputError,
    QwenReranker,
    RerankError,
    Stage,
    StageThresholds,
)
from memos_rerank_integrations.mem0 import Mem0Reranker, Mem0RerankerConfig, register

from ..support import qwen_fixtures as _qwen_fixtures
from ..support.backends import SUBPROCESS_ENV, OverlapReranker
from ..support.loopback import LoopbackServer, Reply
from ..support.offline import NetworkGuard, memory_config, network_guard

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir

USER = {"user_id": "alice"}
QUERY = "What does the user like to drink?"
MEMORIES = [
    "User likes playing badminton.",
    "User prefers Jiangxiang-flavored baijiu, like Moutai.",
    "User drinks green tea every morning.",
    "User is a backend developer in Hangzhou.",
    "User is going on a business trip to Beijing next Wednesday.",
]


@pytest.fixture(scope="module")
def guard() -> Iterator[NetworkGuard]:
    with network_guard() as active:
        yield active
    assert active.attempts == [], f"non-loopback network use: {active.attempts}"


@pytest.fixture(autouse=True)
def offline(guard: NetworkGuard) -> Iterator[None]:
    before = len(guard.attempts)
    yield
    assert guard.attempts[before:] == [], f"non-loopback network use: {guard.attempts[before:]}"


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    register()


def qwen_block(model: Path, **extra: Any) -> dict[str, Any]:
    return {"provider": "memos", "config": {"backend": "qwen", "model": str(model), **extra}}


def dead_block(server: LoopbackServer) -> dict[str, Any]:
    return {
        "provider": "memos",
        "config": {"backend": "http", "base_url": server.url, "max_retries": 0, "top_n": 3},
    }


@pytest.fixture(scope="module")
def dead_server() -> Iterator[LoopbackServer]:
    from ..support.loopback import loopback

    with loopback(lambda request: Reply(503, {"message": "down for maintenance"})) as srv:
        yield srv


@pytest.fixture(scope="module")
def memory(
    tmp_path_factory: pytest.TempPathFactory, tiny_qwen_dir: Path, guard: NetworkGuard
) -> Iterator[Memory]:
    config = memory_config(tmp_path_factory.mktemp("mem0"), qwen_block(tiny_qwen_dir, top_n=3))
    built = Memory.from_config(config)
    for text in MEMORIES:
        built.add(text, user_id=USER["user_id"], infer=False)
    yield built
    release(built)


def release(memory: Memory | AsyncMemory) -> None:
    """Close Mem0's SQLite history and the local Qdrant (else Qdrant's __del__ runs at
    interpreter exit and complains)."""
    memory.close()
    memory.vector_store.client.close()


def same_ranking(results: list[dict[str, Any]], expected: list[tuple[str, float]]) -> None:
    assert [r["id"] for r in results] == [memory_id for memory_id, _ in expected]
    assert [r["rerank_score"] for r in results] == pytest.approx([s for _, s in expected])


def same_hits(results: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """The same memories, fields and order; vector scores equal up to float noise
    (two embeddings of one query differ in the last bits)."""
    assert [{**r, "score": None} for r in results] == [{**e, "score": None} for e in expected]
    assert [r["score"] for r in results] == pytest.approx([e["score"] for e in expected])


def vector_hits(memory: Memory, top_k: int = 5) -> list[dict[str, Any]]:
    return memory.search(QUERY, filters=USER, top_k=top_k, threshold=0.0)["results"]


def expected_ranking(model: Path, hits: list[dict[str, Any]]) -> list[tuple[str, float]]:
    results = QwenReranker(model).rerank(QUERY, [hit["memory"] for hit in hits])
    return [(hits[r.index]["id"], r.score) for r in results]


def test_memory_from_config_builds_the_registered_provider(memory: Memory) -> None:
    assert isinstance(memory.reranker, Mem0Reranker)
    assert isinstance(memory.reranker.reranker, QwenReranker)
    assert memory.reranker.config.limit == 3


def test_search_with_rerank_reorders_and_scores_the_vector_hits(
    memory: Memory, tiny_qwen_dir: Path
) -> None:
    hits = vector_hits(memory)
    assert len(hits) == 5 and all("rerank_score" not in hit for hit in hits)

    reranked = memory.search(QUERY, filters=USER, top_k=5, threshold=0.0, rerank=True)["results"]

    same_ranking(reranked, expected_ranking(tiny_qwen_dir, hits)[:3])  # top_n=3 of 5 hits
    vector = {hit["id"]: hit for hit in hits}
    for result in reranked:
        assert type(result["rerank_score"]) is float
        assert result["rerank_stage"] == StageThresholds().stage(result["rerank_score"]).label
        # Everything Mem0 returned is kept, the vector score included.
        same_hits(
            [{k: v for k, v in result.items() if not k.startswith("rerank_")}],
            [vector[result["id"]]],
        )


def test_a_search_top_k_below_top_n_cuts_further(memory: Memory, tiny_qwen_dir: Path) -> None:
    reranked = memory.search(QUERY, filters=USER, top_k=2, threshold=0.0, rerank=True)["results"]
    expected = expected_ranking(tiny_qwen_dir, vector_hits(memory, top_k=2))
    assert [r["id"] for r in reranked] == [memory_id for memory_id, _ in expected]


def test_search_without_rerank_is_vector_only(memory: Memory) -> None:
    plain = memory.search(QUERY, filters=USER, top_k=5, threshold=0.0, rerank=False)["results"]
    same_hits(plain, vector_hits(memory))
    assert all("rerank_score" not in hit and "rerank_stage" not in hit for hit in plain)


def test_score_rerank_puts_the_rerank_score_in_score(memory: Memory, tiny_qwen_dir: Path) -> None:
    """Issue 27: Mem0's docs read ``score``; with ``"score": "rerank"`` in the block it
    is the rerank score, and Mem0's own score is kept under ``vector_score``."""
    hits = vector_hits(memory)
    vector = {hit["id"]: hit["score"] for hit in hits}
    default = memory.reranker
    block = {"backend": "qwen", "model": str(tiny_qwen_dir), "top_n": 3, "score": "rerank"}
    memory.reranker = RerankerFactory.create("memos", block)  # as Memory.from_config does
    try:
        reranked = memory.search(QUERY, filters=USER, top_k=5, threshold=0.0, rerank=True)
    finally:
        memory.reranker = default
    results = reranked["results"]
    same_ranking(results, expected_ranking(tiny_qwen_dir, hits)[:3])
    assert [r["score"] for r in results] == [r["rerank_score"] for r in results]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert [r["vector_score"] for r in results] == pytest.approx([vector[r["id"]] for r in results])
    # The default keeps Mem0's score in score, as Mem0's own providers do.
    plain = memory.search(QUERY, filters=USER, top_k=5, threshold=0.0, rerank=True)["results"]
    assert all("vector_score" not in r for r in plain)
    assert [r["score"] for r in plain] == pytest.approx([vector[r["id"]] for r in plain])


class Recording(OverlapReranker):
    """Records the documents each call was given."""


def test_mem0s_threshold_drops_hits_before_the_reranker_sees_them(memory: Memory) -> None:
    """What docs/mem0.md says: a search's ``threshold`` (0.1 by default) drops hits by
    Mem0's vector score before the reranker is called."""
    hits = vector_hits(memory)
    cut = sorted(hit["score"] for hit in hits)[2]  # the median score: three hits reach it
    backend = Recording()
    default = memory.reranker
    memory.reranker = Mem0Reranker(reranker=backend)
    try:
        memory.search(QUERY, filters=USER, top_k=5, threshold=cut, rerank=True)
    finally:
        memory.reranker = default
    ((_, _, seen),) = backend.calls
    assert sorted(seen) == sorted(hit["memory"] for hit in hits if hit["score"] >= cut)
    assert 0 < len(seen) < len(hits)


async def test_async_memory_reranks_the_same_way(
    tmp_path: Path, tiny_qwen_dir: Path, memory: Memory
) -> None:
    amemory = AsyncMemory.from_config(memory_config(tmp_path, qwen_block(tiny_qwen_dir, top_n=3)))
    try:
        for text in MEMORIES:
            await amemory.add(text, user_id=USER["user_id"], infer=False)
        hits = (await amemory.search(QUERY, filters=USER, top_k=5, threshold=0.0))["results"]
        assert all("rerank_score" not in hit for hit in hits)
        reranked = (await amemory.search(QUERY, filters=USER, top_k=5, threshold=0.0, rerank=True))[
            "results"
        ]
    finally:
        release(amemory)
    same_ranking(reranked, expected_ranking(tiny_qwen_dir, hits)[:3])
    assert all(r["rerank_stage"] in {s.label for s in Stage} for r in reranked)


@pytest.fixture(scope="module")
def dead_memory(
    tmp_path_factory: pytest.TempPathFactory, dead_server: LoopbackServer, guard: NetworkGuard
) -> Iterator[Memory]:
    config = memory_config(tmp_path_factory.mktemp("dead"), dead_block(dead_server))
    built = Memory.from_config(config)
    for text in MEMORIES:
        built.add(text, user_id=USER["user_id"], infer=False)
    yield built
    release(built)


def test_a_dead_backend_leaves_mem0_with_its_vector_results(
    dead_memory: Memory, dead_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    plain = vector_hits(dead_memory)
    calls = len(dead_server.requests)
    with caplog.at_level(logging.WARNING):
        result = dead_memory.search(QUERY, filters=USER, top_k=5, threshold=0.0, rerank=True)
    assert len(dead_server.requests) == calls + 1  # the backend was asked, and failed
    same_hits(result["results"], plain)  # Mem0's own fallback: vector order, all 5, unchanged
    assert all("rerank_score" not in hit for hit in result["results"])  # no 0.0 scores
    assert "Reranking failed" in caplog.text and "503" in caplog.text


async def test_a_dead_backend_under_async_memory(
    tmp_path: Path, dead_server: LoopbackServer
) -> None:
    amemory = AsyncMemory.from_config(memory_config(tmp_path, dead_block(dead_server)))
    try:
        for text in MEMORIES[:3]:
            await amemory.add(text, user_id=USER["user_id"], infer=False)
        plain = (await amemory.search(QUERY, filters=USER, top_k=3, threshold=0.0))["results"]
        calls = len(dead_server.requests)
        reranked = await amemory.search(QUERY, filters=USER, top_k=3, threshold=0.0, rerank=True)
    finally:
        release(amemory)
    assert len(dead_server.requests) == calls + 1
    same_hits(reranked["results"], plain)
    assert all("rerank_score" not in hit for hit in plain)


def test_the_plugin_raises_on_a_backend_failure(dead_server: LoopbackServer) -> None:
    reranker = Mem0Reranker(dead_block(dead_server)["config"])
    hits = [{"id": str(i), "memory": text, "score": 0.5} for i, text in enumerate(MEMORIES)]
    with pytest.raises(RerankError) as raised:
        reranker.rerank(QUERY, hits, 5)
    assert raised.value.status_code == 503


# ---------------------------------------------------------------- the plug-in alone


def mem0_hits() -> list[dict[str, Any]]:
    return [
        {"id": f"m{i}", "memory": text, "score": 1.0 - i / 10, "metadata": {"tags": ["t"]}}
        for i, text in enumerate(MEMORIES)
    ]


def test_outputs_are_deep_copies_and_inputs_stay_untouched() -> None:
    hits = mem0_hits()
    before = copy.deepcopy(hits)
    out = Mem0Reranker(reranker=OverlapReranker()).rerank("User drinks baijiu?", hits)
    assert hits == before
    assert out[0]["id"] == "m1" and out[0]["score"] == hits[1]["score"]
    out[0]["metadata"]["tags"].append("changed")
    assert hits == before


def test_score_option_alone() -> None:
    hits = mem0_hits()
    out = Mem0Reranker(reranker=OverlapReranker(), score="rerank").rerank(
        "User drinks baijiu?", hits
    )
    assert [r["score"] for r in out] == [r["rerank_score"] for r in out]
    assert out[0]["id"] == "m1" and out[0]["vector_score"] == hits[1]["score"]
    assert "vector_score" not in hits[1] and hits[1]["score"] == 0.9  # inputs untouched
    with pytest.raises(pydantic.ValidationError, match="score"):
        Mem0RerankerConfig(backend="embedding", score="both")


def test_top_n_top_k_and_thresholds() -> None:
    hits = mem0_hits()
    backend = OverlapReranker()
    # top_n and a call's top_k: the smaller wins.
    query = "user drinks baijiu daily"
    assert len(Mem0Reranker(reranker=backend, top_n=3).rerank(query, hits)) == 3
    assert len(Mem0Reranker(reranker=backend, top_n=3).rerank(query, hits, 2)) == 2
    assert len(Mem0Reranker(reranker=backend, top_k=2).rerank(query, hits, 4)) == 2
    # m1 (user, baijiu) and m2 (user, drinks) score 0.5, the rest 0.25.
    kept = Mem0Reranker(reranker=backend, min_score=0.5).rerank(query, hits)
    assert [(r["id"], r["rerank_score"]) for r in kept] == [("m1", 0.5), ("m2", 0.5)]
    strict = Mem0Reranker(reranker=backend, min_stage="partial", thresholds=[0.1, 0.5, 0.7, 0.9])
    assert [r["rerank_stage"] for r in strict.rerank(query, hits)] == ["partial", "partial"]
    assert {r["rerank_stage"] for r in Mem0Reranker(reranker=backend).rerank(query, hits)} == {
        "partial",
        "weak",
    }
    assert Mem0Reranker(reranker=backend).rerank(query, []) == []


def test_text_key_picks_the_field_and_a_missing_one_is_an_error() -> None:
    hits = [{"id": "a", "text": "User drinks tea."}, {"id": "b", "text": "User runs."}]
    out = Mem0Reranker(reranker=OverlapReranker(), text_key="text").rerank("tea", hits)
    assert [r["id"] for r in out] == ["a", "b"]
    with pytest.raises(InvalidInputError, match="'memory'"):
        Mem0Reranker(reranker=OverlapReranker()).rerank("tea", hits)


async def test_arerank_matches_rerank() -> None:
    plugin = Mem0Reranker(reranker=OverlapReranker(), top_n=2)
    assert await plugin.arerank("User drinks baijiu?", mem0_hits()) == plugin.rerank(
        "User drinks baijiu?", mem0_hits()
    )


def test_config_validation_lists_the_valid_options() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"Valid options: .*max_batch_tokens"):
        Mem0RerankerConfig(backend="qwen", max_batch_size=4)
    with pytest.raises(pydantic.ValidationError, match=r"Valid providers: .*cross_encoder"):
        Mem0RerankerConfig(backend="qwen3")
    with pytest.raises(pydantic.ValidationError, match="disagree"):
        Mem0RerankerConfig(backend="qwen", top_n=3, top_k=5)
    with pytest.raises(pydantic.ValidationError, match="top_n"):
        Mem0RerankerConfig(backend="qwen", top_n=0)
    with pytest.raises(pydantic.ValidationError):
        Mem0RerankerConfig(backend="qwen", min_stage="very")


def test_the_key_is_a_secret_in_the_config_and_reaches_the_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MEMOS_API_KEY", raising=False)
    config = Mem0RerankerConfig(backend="memos", api_key="sk-plugin-secret-7")
    assert "sk-plugin-secret-7" not in repr(config) and "sk-plugin-secret-7" not in str(config)
    plugin = Mem0Reranker(config)
    assert plugin.reranker._api_key.get_secret_value() == "sk-plugin-secret-7"
    assert "sk-plugin-secret-7" not in repr(plugin)
    # A key nested in a backend option is masked too, and errors never echo the input.
    llm = {"provider": "openai", "config": {"api_key": "sk-nested-secret-8", "model": "m"}}
    nested = Mem0RerankerConfig(backend="llm", llm=llm)
    assert "sk-nested-secret-8" not in repr(nested) and "sk-nested-secret-8" not in str(nested)
    with pytest.raises(pydantic.ValidationError) as raised:
        Mem0RerankerConfig(backend="llm", llm=llm, api_key="sk-plugin-secret-7", typo=1)
    message = str(raised.value)
    assert "typo" in message
    for key in ("sk-plugin-secret-7", "sk-nested-secret-8"):  # not even a truncated part
        assert not any(key[i : i + 6] in message for i in range(len(key) - 5)), message


def test_register_is_idempotent_and_refuses_mem0s_own_names() -> None:
    register()
    assert RerankerFactory.provider_to_class["memos"][1] is Mem0RerankerConfig
    with pytest.raises(InvalidInputError, match="already has"):
        register("cohere")
    with pytest.raises(ValueError, match="Unsupported reranker provider"):
        RerankerFactory.create("memos-not-registered", {})


def test_missing_extra_names_it() -> None:
    code = (
        "import sys; sys.modules['mem0'] = None\n"
        "try:\n    import memos_rerank_integrations.mem0\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=SUBPROCESS_ENV
    ).stdout
    assert "memos-rerank-integrations[mem0]" in out and "mem0ai" in out


def test_the_network_guard_refuses_and_records(guard: NetworkGuard) -> None:
    import socket

    before = len(guard.attempts)
    with pytest.raises(OSError, match="network guard"):
        socket.create_connection(("203.0.113.7", 443), timeout=1)
    with pytest.raises(OSError, match="network guard"):
        socket.getaddrinfo("api.openai.com", 443)
    assert len(guard.attempts) == before + 2
    del guard.attempts[before:]  # expected here; the autouse check must not fail on them
