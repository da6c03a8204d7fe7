"""from_config builds every backend (this package's names and Mem0's, with Mem0's keys);
to_config() gives back a config that rebuilds an equal backend, never with a key."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

from memos_rerank_integrations import (
    CohereReranker,
    CrossEncoderReranker,
    EmbeddingReranker,
    FallbackReranker,
    HTTPReranker,
    InvalidInputError,
    LLMReranker,
    MemOSReranker,
    QwenReranker,
    Stage,
    StageThresholds,
    ZeroEntropyReranker,
    from_config,
)
from memos_rerank_integrations._config import check_config
from memos_rerank_integrations.testing import build_tiny_cross_encoder

from .support import qwen_fixtures as _qwen_fixtures
from .support.backends import SUBPROCESS_ENV, OverlapReranker
from .support.loopback import (
    FAST,
    LoopbackServer,
    Recorded,
    Reply,
    cohere_shaped,
    expected_order,
    loopback,
    tei_shaped,
)

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir

KEY = "sk-config-SECRET-5150"
DOCS = ["doc 3", "doc 7", "doc 11", "doc 2", "doc 5"]
QUERY = "What does the user drink?"
TEXTS = [
    "User prefers Jiangxiang-flavored baijiu.",
    "User likes playing badminton.",
    "User drinks green tea every morning.",
]
KEY_ENV = (
    "MEMOS_API_KEY",
    "MEMOS_BASE_URL",
    "CO_API_KEY",
    "COHERE_API_KEY",
    "CO_API_URL",
    "ZERO_ENTROPY_API_KEY",
    "ZEROENTROPY_API_KEY",
    "ZEROENTROPY_BASE_URL",
    "OPENAI_API_KEY",
)


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tiny_ce_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("config-ce"))


def header(request: Recorded, name: str) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), None)


def ranking(results: list[Any]) -> list[tuple[int, float, Stage]]:
    return [(r.index, r.score, r.stage) for r in results]


def grade_of(document: str) -> int:
    return int(document.split()[-1]) % 5


def chat_completion(request: Recorded) -> Reply:
    """An OpenAI-compatible /chat/completions: grade n % 5 for a document 'doc n'."""
    user = request.body["messages"][-1]["content"]
    match = re.search(r"<document>\s*doc (\d+)", user)
    grade = int(match.group(1)) % 5 if match else 0
    return Reply(
        200,
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": request.body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": str(grade)},
                    "finish_reason": "stop",
                }
            ],
        },
    )


def by_grade(docs: list[str]) -> list[int]:
    return sorted(range(len(docs)), key=lambda i: (-grade_of(docs[i]), i))


# ---------------------------------------------------------------- this package's names


def test_local_backends_match_their_constructors(tiny_qwen_dir: Path, tiny_ce_dir: Path) -> None:
    pairs = [
        (
            {"provider": "qwen", "config": {"model": str(tiny_qwen_dir), "dtype": "float32"}},
            QwenReranker(tiny_qwen_dir, dtype="float32"),
        ),
        (
            {"provider": "cross_encoder", "config": {"model": str(tiny_ce_dir), "max_length": 64}},
            CrossEncoderReranker(tiny_ce_dir, max_length=64),
        ),
        ({"provider": "embedding"}, EmbeddingReranker()),
    ]
    for config, direct in pairs:
        built = from_config(config)
        assert type(built) is type(direct)
        assert ranking(built.rerank(QUERY, TEXTS)) == ranking(direct.rerank(QUERY, TEXTS))


@pytest.mark.parametrize(
    ("provider", "path", "auth"),
    [
        ("memos", "/rerank", f"Token {KEY}"),
        ("cohere", "/v2/rerank", f"Bearer {KEY}"),
        ("zero_entropy", "/v1/models/rerank", f"Bearer {KEY}"),
        ("http", "/rerank", f"Bearer {KEY}"),
    ],
)
def test_remote_backends_from_config(
    server: LoopbackServer, provider: str, path: str, auth: str
) -> None:
    server.script(cohere_shaped)
    config = {"base_url": server.url, "api_key": KEY, "max_retries": 0, "timeout": 5.0}
    backend = from_config({"provider": provider, "config": config})
    results = backend.rerank("q", DOCS, top_n=3)
    assert [r.index for r in results] == expected_order(DOCS)[:3]
    (request,) = server.requests
    assert (request.path, header(request, "Authorization")) == (path, auth)


def test_remote_options_reach_the_backend(server: LoopbackServer) -> None:
    server.script(tei_shaped, tei_shaped)
    backend = from_config(
        {
            "provider": "http",
            "config": {
                "base_url": server.url,
                "api_format": "tei",
                "raw_scores": True,
                "max_documents_per_request": 3,
                "thresholds": [0.1, 0.2, 0.3, 0.4],
                **FAST,
            },
        }
    )
    assert isinstance(backend, HTTPReranker)
    results = backend.rerank("q", DOCS)
    assert [r.index for r in results] == expected_order(DOCS)
    assert sorted(len(r.body["texts"]) for r in server.requests) == [2, 3]  # split at 3
    assert server.requests[0].body["raw_scores"] is True
    assert results[0].stage is StageThresholds(0.1, 0.2, 0.3, 0.4).stage(results[0].score)


def test_an_llm_from_a_mem0_llm_config(server: LoopbackServer) -> None:
    server.script(*[chat_completion] * len(DOCS))
    llm = {
        "provider": "openai",
        "config": {"model": "gpt-test", "api_key": KEY, "openai_base_url": server.url + "/v1"},
    }
    backend = from_config({"provider": "llm", "config": {"llm": llm, "max_concurrency": 2}})
    assert isinstance(backend, LLMReranker)
    results = backend.rerank("q", DOCS)
    assert [r.index for r in results] == by_grade(DOCS)
    assert [r.score for r in results] == [grade_of(DOCS[i]) / 4 for i in by_grade(DOCS)]
    assert {(r.path, header(r, "Authorization")) for r in server.requests} == {
        ("/v1/chat/completions", f"Bearer {KEY}")
    }
    config = backend.to_config()
    assert KEY not in json.dumps(config)
    assert config == {
        "provider": "llm",
        "config": {
            "llm": {
                "provider": "openai",
                "config": {"model": "gpt-test", "openai_base_url": server.url + "/v1"},
            },
            "max_concurrency": 2,
        },
    }


def test_an_llm_object_is_passed_as_an_option() -> None:
    from langchain_core.language_models import FakeListChatModel

    backend = from_config({"provider": "llm"}, llm=FakeListChatModel(responses=["4", "0"]))
    assert isinstance(backend, LLMReranker)
    assert [r.index for r in backend.rerank("q", ["a", "b"])] == [0, 1]
    with pytest.raises(TypeError, match="your own LLM object"):
        backend.to_config()


def test_fallback_from_a_list_of_configs() -> None:
    with loopback(cohere_shaped) as live:
        dead = {"provider": "http", "config": {"base_url": "http://127.0.0.1:9", "max_retries": 0}}
        backend = from_config(
            {
                "provider": "fallback",
                "config": {
                    "rerankers": [dead, {"provider": "http", "config": {"base_url": live.url}}]
                },
            }
        )
        assert isinstance(backend, FallbackReranker)
        answer = backend.rerank_detailed("q", DOCS)
        assert answer.position == 1 and [r.index for r in answer.results] == expected_order(DOCS)
        assert [type(b) for b in backend.rerankers] == [HTTPReranker, HTTPReranker]
        assert from_config(backend.to_config()).to_config() == backend.to_config()


def test_options_given_as_arguments_override_the_config(server: LoopbackServer) -> None:
    server.script(cohere_shaped)
    client = httpx.Client()
    try:
        backend = from_config(
            {"provider": "memos", "config": {"base_url": "http://127.0.0.1:9", "timeout": 2.0}},
            api_key=KEY,
            base_url=server.url,
            http_client=client,
        )
        backend.rerank("q", DOCS)
        assert backend._clients.sync() is client
    finally:
        client.close()
    assert server.requests[0].path == "/rerank"


# ---------------------------------------------------------------- Mem0's names and keys


def test_mem0_cohere_block_as_it_is(server: LoopbackServer) -> None:
    server.script(cohere_shaped)
    block = {  # CohereRerankerConfig's fields, as Mem0 dumps them, plus our base_url
        "provider": None,
        "model": "rerank-v3.5",
        "api_key": KEY,
        "top_k": 3,
        "return_documents": False,
        "max_chunks_per_doc": None,
        "base_url": server.url,
    }
    backend = from_config({"provider": "cohere", "config": block})
    assert isinstance(backend, CohereReranker) and backend.model == "rerank-v3.5"
    assert [r.index for r in backend.rerank("q", DOCS)] == expected_order(DOCS)
    assert server.requests[0].path == "/v2/rerank"  # Cohere v2, not Mem0's v1 client
    with pytest.raises(InvalidInputError, match="max_tokens_per_doc"):
        from_config({"provider": "cohere", "config": {**block, "max_chunks_per_doc": 10}})


def test_mem0_zero_entropy_block(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.script(cohere_shaped)
    monkeypatch.setenv("ZERO_ENTROPY_API_KEY", KEY)  # Mem0's variable
    block = {"model": "zerank-1-small", "api_key": None, "top_k": None, "base_url": server.url}
    backend = from_config({"provider": "zero_entropy", "config": block})
    assert isinstance(backend, ZeroEntropyReranker)
    backend.rerank("q", DOCS)
    assert server.requests[0].body["model"] == "zerank-1-small"
    assert header(server.requests[0], "Authorization") == f"Bearer {KEY}"


@pytest.mark.parametrize("provider", ["sentence_transformer", "huggingface"])
def test_mem0_local_blocks_score_like_mem0s_own_provider(provider: str, tiny_ce_dir: Path) -> None:
    from mem0.utils.factory import RerankerFactory

    block: dict[str, Any] = {"model": str(tiny_ce_dir), "device": "cpu", "batch_size": 2}
    memories = [{"id": str(i), "memory": text} for i, text in enumerate(TEXTS)]
    theirs = RerankerFactory.create(provider, dict(block)).rerank(QUERY, memories)
    ours = from_config({"provider": provider, "config": block})
    assert isinstance(ours, CrossEncoderReranker)
    assert ours.max_batch_tokens == 2 * 512  # batch_size pairs of max_length tokens
    results = ours.rerank(QUERY, TEXTS)
    assert [r.index for r in results] == [int(m["id"]) for m in theirs]
    assert [r.score for r in results] == pytest.approx(
        [m["rerank_score"] for m in theirs], abs=1e-5
    )


def test_mem0_model_defaults_are_mem0s() -> None:
    st = from_config({"provider": "sentence_transformer", "config": {"model": None}})
    hf = from_config({"provider": "huggingface"})
    assert st.model == "cross-encoder/ms-marco-MiniLM-L-6-v2"  # type: ignore[attr-defined]
    assert hf.model == "BAAI/bge-reranker-base"  # type: ignore[attr-defined]


def test_mem0_llm_reranker_block(server: LoopbackServer) -> None:
    server.script(*[chat_completion] * len(DOCS))
    block = {  # LLMRerankerConfig's fields, nested llm as Mem0 documents it for Ollama & co.
        "provider": "openai",
        "model": "gpt-test",
        "api_key": KEY,
        "top_k": None,
        "temperature": 0.0,
        "max_tokens": 7,
        "scoring_prompt": None,
        "llm": {"provider": "openai", "config": {"openai_base_url": server.url + "/v1"}},
    }
    backend = from_config({"provider": "llm_reranker", "config": block})
    assert isinstance(backend, LLMReranker)
    assert [r.index for r in backend.rerank("q", DOCS)] == by_grade(DOCS)
    body = server.requests[0].body
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("gpt-test", 7, 0.0)
    with pytest.raises(InvalidInputError, match="instruction"):
        from_config({"provider": "llm_reranker", "config": {**block, "scoring_prompt": "Rate."}})


def test_a_model_name_never_picks_the_backend(tiny_qwen_dir: Path) -> None:
    hf = from_config({"provider": "huggingface", "config": {"model": "Qwen/Qwen3-Reranker-0.6B"}})
    assert type(hf) is CrossEncoderReranker
    qwen = from_config({"provider": "qwen", "config": {"model": "BAAI/bge-reranker-base"}})
    assert type(qwen) is QwenReranker


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"provider": "qwen3"},
            r"provider 'qwen3'. Did you mean 'qwen'.*Valid providers: cohere, ",
        ),
        ({"provider": None}, r"Valid providers: .*sentence_transformer"),
        ({"provider": "qwen", "config": {"modle": "x"}}, r"\['modle'\].*Valid options: device,"),
        ({"provider": "memos", "config": {"top_k": 3}}, r"\['top_k'\].*max_retries"),
        ({"provider": "huggingface", "config": {"batch": 3}}, r"Mem0's keys.*batch_size"),
        ({"provider": "http"}, r"needs option\(s\) \['base_url'\]"),
        ({"provider": "qwen", "settings": {}}, r"top-level key\(s\) \['settings'\]"),
        ({"provider": "qwen", "config": ["model"]}, r"must be a mapping"),
        ("qwen", r"is a mapping"),
        ({"provider": "qwen", "config": {"thresholds": [0.1, 0.2]}}, r"four cut points"),
        ({"provider": "llm", "config": {"llm": {"model": "x"}}}, r"Mem0 LLM provider"),
        ({"provider": "llm", "config": {"llm": {"provider": "nope"}}}, r"Unknown Mem0 LLM"),
        ({"provider": "huggingface", "config": {"batch_size": 0}}, r"batch_size must be"),
    ],
)
def test_bad_configs_are_invalid_input(config: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        from_config(config)


# Issue 27: an unknown option is an InvalidInputError naming the closest valid one, in
# every backend's constructor and every part of a config (never a bare TypeError).
@pytest.mark.parametrize(
    ("build", "closest"),
    [
        (lambda: QwenReranker(modle="x"), "model"),
        (lambda: CrossEncoderReranker("m", normalise=False), "normalize"),
        (lambda: EmbeddingReranker(max_lenght=64), "max_length"),
        (lambda: MemOSReranker(api_key=KEY, timout=3), "timeout"),
        (lambda: CohereReranker(api_key=KEY, max_tokens_per_document=9), "max_tokens_per_doc"),
        (lambda: HTTPReranker("http://127.0.0.1:9", api_fromat="tei"), "api_format"),
        (lambda: ZeroEntropyReranker(api_key=KEY, latancy="fast"), "latency"),
        (lambda: LLMReranker(OverlapReranker(), use_logprob=False), "use_logprobs"),
        (lambda: FallbackReranker(rerankerz=[]), "rerankers"),
        (lambda: from_config({"provider": "qwen", "config": {"modle": "x"}}), "model"),
        (lambda: from_config({"provider": "huggingface", "config": {"batch": 3}}), "batch_size"),
        (lambda: from_config({"provider": "qwen", "confg": {}}), "config"),
        (lambda: from_config({"provider": "cohre"}), "cohere"),
        (
            lambda: from_config({"provider": "qwen", "config": {"thresholds": {"parital": 0.3}}}),
            "partial",
        ),
        (
            lambda: from_config(
                {"provider": "llm", "config": {"llm": {"provider": "openai", "confg": {}}}}
            ),
            "config",
        ),
    ],
)
def test_an_unknown_option_names_the_closest_valid_one(build: Any, closest: str) -> None:
    with pytest.raises(InvalidInputError, match=rf"Did you mean '{closest}' for '\w+'\?") as raised:
        build()
    assert KEY not in str(raised.value)


def test_top_n_on_a_backend_says_where_it_goes() -> None:
    for build in (
        lambda: MemOSReranker(api_key=KEY, top_k=3),
        lambda: from_config({"provider": "embedding", "config": {"top_n": 3}}),
    ):
        with pytest.raises(InvalidInputError, match=r"pass top_n to each call"):
            build()


def test_deeply_nested_fallbacks_are_refused() -> None:
    config: dict[str, Any] = {"provider": "http", "config": {"base_url": "http://127.0.0.1:9"}}
    for _ in range(9):
        config = {"provider": "fallback", "config": {"rerankers": [config]}}
    assert isinstance(from_config(config["config"]["rerankers"][0]), FallbackReranker)  # 8 deep
    for _ in range(5000):  # far past the recursion limit: still a clear, cheap error
        config = {"provider": "fallback", "config": {"rerankers": [config]}}
    with pytest.raises(InvalidInputError, match="nested more than 8 levels"):
        from_config(config)


def fallback_levels(levels: int) -> dict[str, Any]:
    """``levels`` fallback configs, each wrapping the next, around one http config."""
    config: dict[str, Any] = {"provider": "http", "config": {"base_url": "http://127.0.0.1:9"}}
    for _ in range(levels):
        config = {"provider": "fallback", "config": {"rerankers": [config]}}
    return config


def test_the_fallback_nesting_limit_is_exactly_eight_levels() -> None:
    from memos_rerank_integrations.mem0 import Mem0RerankerConfig

    deepest = fallback_levels(8)
    check_config(deepest)
    Mem0RerankerConfig(backend="fallback", **deepest["config"])
    backend: Any = from_config(deepest)
    levels = 0
    while isinstance(backend, FallbackReranker):
        levels, backend = levels + 1, backend.rerankers[0]
    assert levels == 8 and isinstance(backend, HTTPReranker)
    too_deep = fallback_levels(9)
    for build in (from_config, check_config):
        with pytest.raises(InvalidInputError, match="nested more than 8 levels"):
            build(too_deep)
    with pytest.raises(pydantic.ValidationError, match="nested more than 8 levels"):
        Mem0RerankerConfig(backend="fallback", **too_deep["config"])


def test_mem0_llm_errors_never_show_the_key() -> None:
    llm = {"provider": "openai", "config": {"api_key": KEY, "no_such_option": 1}}
    with pytest.raises(InvalidInputError) as raised:
        from_config({"provider": "llm", "config": {"llm": llm}})
    assert KEY not in str(raised.value) and raised.value.__cause__ is None
    assert raised.value.__context__ is None


# ---------------------------------------------------------------- to_config


def every_backend(tiny_qwen_dir: Path, tiny_ce_dir: Path, url: str) -> list[Any]:
    return [
        QwenReranker(tiny_qwen_dir, instruction="Find memories", dtype="float32", max_length=512),
        CrossEncoderReranker(tiny_ce_dir, normalize=False, query_template="Q: {query}"),
        EmbeddingReranker(max_length=128, thresholds=StageThresholds(0.1, 0.3, 0.5, 0.7)),
        MemOSReranker("memos-reranker-4b", api_key=KEY, base_url=url, timeout=3.5),
        CohereReranker(api_key=KEY, base_url=url, max_tokens_per_doc=512),
        HTTPReranker(url, api_key=KEY, template="qwen3", on_too_long="raise"),
        ZeroEntropyReranker(api_key=KEY, base_url=url + "/v1", latency="fast"),
        FallbackReranker([MemOSReranker(api_key=KEY, base_url=url), HTTPReranker(url)]),
    ]


def test_to_config_round_trips_every_backend(
    tiny_qwen_dir: Path, tiny_ce_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for backend in every_backend(tiny_qwen_dir, tiny_ce_dir, "http://127.0.0.1:9"):
        config = backend.to_config()
        text = json.dumps(config)  # plain data
        assert KEY not in text, type(backend).__name__
        assert config["provider"] in text
        monkeypatch.setenv("MEMOS_API_KEY", "k")
        monkeypatch.setenv("CO_API_KEY", "k")
        monkeypatch.setenv("ZERO_ENTROPY_API_KEY", "k")
        rebuilt = from_config(json.loads(text))
        assert type(rebuilt) is type(backend)
        assert rebuilt.to_config() == config
        assert repr(rebuilt) == repr(backend)


def test_to_config_holds_the_explicit_options_only(tiny_qwen_dir: Path) -> None:
    assert QwenReranker().to_config() == {"provider": "qwen", "config": {}}
    backend = QwenReranker(
        tiny_qwen_dir, dtype="bfloat16", thresholds=StageThresholds(0.1, 0.2, 0.3, 0.4)
    )
    assert backend.to_config() == {
        "provider": "qwen",
        "config": {
            "model": str(tiny_qwen_dir),
            "dtype": "bfloat16",
            "thresholds": [0.1, 0.2, 0.3, 0.4],
        },
    }
    torch = pytest.importorskip("torch")
    typed = QwenReranker(device=torch.device("cpu"), dtype=torch.float32)
    assert typed.to_config()["config"] == {"device": "cpu", "dtype": "float32"}


def test_the_rebuilt_backend_ranks_the_same(tiny_qwen_dir: Path, tiny_ce_dir: Path) -> None:
    for backend in every_backend(tiny_qwen_dir, tiny_ce_dir, "http://127.0.0.1:9")[:3]:
        rebuilt = from_config(backend.to_config())
        assert ranking(rebuilt.rerank(QUERY, TEXTS)) == ranking(backend.rerank(QUERY, TEXTS))


def test_what_a_config_cannot_hold_is_a_type_error() -> None:
    client = httpx.Client()
    try:
        cases = [
            (HTTPReranker("http://127.0.0.1:9", http_client=client), "http_client"),
            (MemOSReranker(api_key=KEY, async_http_client=httpx.AsyncClient()), "async_http"),
            (HTTPReranker("http://127.0.0.1:9", count_tokens=len), "count_tokens"),
            (FallbackReranker([OverlapReranker()]), r"rerankers\[0\].*to_config"),
        ]
        for backend, message in cases:
            with pytest.raises(TypeError, match=message):
                backend.to_config()
    finally:
        client.close()

    class MyQwen(QwenReranker):
        pass

    with pytest.raises(TypeError, match="not one of this package's backends"):
        MyQwen().to_config()


def test_import_stays_light() -> None:
    code = (
        "import sys; from memos_rerank_integrations import from_config\n"
        "b = from_config({'provider': 'memos', 'config': {'api_key': 'k'}})\n"
        "b.to_config()\n"
        "heavy = [n for n in ('torch', 'transformers', 'langchain_core', 'llama_index', "
        "'cohere', 'mem0') if n in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=SUBPROCESS_ENV
    ).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- LlamaIndex


def test_llama_index_postprocessor_to_dict_and_back(server: LoopbackServer) -> None:
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

    from memos_rerank_integrations.llama_index import RerankPostprocessor

    server.script(cohere_shaped, cohere_shaped)
    post = RerankPostprocessor(
        reranker=MemOSReranker(api_key=KEY, base_url=server.url),
        top_n=2,
        min_stage="weak",
        thresholds=StageThresholds(0.1, 0.3, 0.5, 0.7),
        metadata_mode=MetadataMode.LLM,
    )
    data = post.to_dict()
    assert data["reranker"] == {"provider": "memos", "config": {"base_url": server.url}}
    assert data["min_stage"] == "weak" and data["class_name"] == "RerankPostprocessor"
    text = post.to_json()
    assert KEY not in text
    rebuilt = RerankPostprocessor.from_json(text, reranker=post.reranker)
    assert rebuilt.to_dict() == data

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MEMOS_API_KEY", KEY)
        restored = RerankPostprocessor.from_dict(json.loads(text))
    assert isinstance(restored.reranker, MemOSReranker) and restored.to_dict() == data
    assert (restored.top_n, restored.min_stage, restored.metadata_mode) == (
        2,
        Stage.WEAK,
        MetadataMode.LLM,
    )
    nodes = [NodeWithScore(node=TextNode(text=d, id_=d), score=0.5) for d in DOCS]
    out = restored.postprocess_nodes(nodes, QueryBundle("q"))
    assert [n.node.id_ for n in out] == [DOCS[i] for i in expected_order(DOCS)[:2]]


def test_llama_index_pickling_keeps_the_backend() -> None:
    from memos_rerank_integrations.llama_index import RerankPostprocessor

    post = RerankPostprocessor(reranker=HTTPReranker("http://127.0.0.1:9", model="m"), top_n=3)
    restored = pickle.loads(pickle.dumps(post))
    assert isinstance(restored.reranker, HTTPReranker)
    assert restored.reranker.to_config() == post.reranker.to_config()
    assert restored.top_n == 3
    client = httpx.Client()
    try:
        held = RerankPostprocessor(reranker=HTTPReranker("http://127.0.0.1:9", http_client=client))
        with pytest.raises(TypeError, match="http_client"):  # not silently dropped
            pickle.dumps(held)
    finally:
        client.close()


def _short_query(query: str) -> bool:
    return len(query.split()) <= 3


def test_llama_index_skip_if_is_never_dropped_silently() -> None:
    from memos_rerank_integrations.llama_index import RerankPostprocessor

    backend = HTTPReranker("http://127.0.0.1:9", model="m")
    named = RerankPostprocessor(reranker=backend, skip_if=_short_query)
    assert pickle.loads(pickle.dumps(named)).skip_if is _short_query
    anonymous = RerankPostprocessor(reranker=backend, skip_if=lambda q: not q)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(anonymous)
    with pytest.raises(TypeError, match="skip_if"):
        named.to_dict()
    restored = RerankPostprocessor.from_dict(
        RerankPostprocessor(reranker=backend).to_dict(), skip_if=_short_query
    )
    assert restored.skip_if is _short_query
