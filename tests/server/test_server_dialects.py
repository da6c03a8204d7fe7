"""Every client's dialect against the real server, with the real client packages where
they install (cohere v1 and v2, tei-client, langchain-community's JinaRerank, requests)
and the exact wire requests of the others (infinity, MemOS's http_bge, vLLM)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest
import requests
from langchain_core.documents import Document
from tei_client import HttpClient

from memos_rerank_integrations import CrossEncoderReranker, HTTPReranker, QwenReranker
from memos_rerank_integrations.server import create_app
from memos_rerank_integrations.server._cohere import CohereV1RerankRequest
from memos_rerank_integrations.server._memos import MemOSRerankRequest
from memos_rerank_integrations.server._tei import TEIRerankRequest
from memos_rerank_integrations.server._vllm import ScoreRequest
from memos_rerank_integrations.testing import build_tiny_cross_encoder, build_tiny_qwen_reranker

from ..support.server import DOCUMENTS, QUERY, LiveServer, WordOverlapReranker

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def backend() -> WordOverlapReranker:
    return WordOverlapReranker()


@pytest.fixture(scope="module")
def live(backend: WordOverlapReranker) -> Iterator[LiveServer]:
    app = create_app(backend, model_name="tiny-test", api_key=KEY, max_documents=10)
    with LiveServer(app) as server:
        yield server


def expected(backend: WordOverlapReranker, top_n: int | None = None) -> list[tuple[int, float]]:
    return [(r.index, r.score) for r in backend.rerank(QUERY, DOCUMENTS, top_n)]


# -- Cohere v1 (also Mem0's cohere provider), Jina, vLLM: /v1/rerank ----------------------


def test_cohere_v1_client(live: LiveServer, backend: WordOverlapReranker) -> None:
    client = cohere.Client(api_key=KEY, base_url=live.url, timeout=10)
    response = client.rerank(model="rerank-english-v3.0", query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [(r.index, r.relevance_score) for r in response.results] == expected(backend, 3)
    assert all(r.document is None for r in response.results)
    assert response.meta is not None and response.meta.api_version is not None
    assert response.meta.api_version.version == "1"
    with_documents = client.rerank(
        model="m", query=QUERY, documents=DOCUMENTS, return_documents=True
    )
    assert [r.document.text for r in with_documents.results if r.document] == [
        DOCUMENTS[index] for index, _ in expected(backend)
    ]


async def test_cohere_v1_async_client_with_object_documents(
    live: LiveServer, backend: WordOverlapReranker
) -> None:
    client = cohere.AsyncClient(api_key=KEY, base_url=live.url, timeout=10)
    documents = [{"text": text, "id": str(i)} for i, text in enumerate(DOCUMENTS)]
    response = await client.rerank(
        model="m", query=QUERY, documents=documents, return_documents=True, top_n=2
    )
    assert [(r.index, r.relevance_score) for r in response.results] == expected(backend, 2)
    # Object documents come back as they were sent.
    assert [r.document.model_dump() for r in response.results if r.document] == [
        documents[i] for i, _ in expected(backend, 2)
    ]


def test_v1_rank_fields_rank_the_named_fields(
    live: LiveServer, backend: WordOverlapReranker
) -> None:
    documents = [{"title": f"memory {i}", "body": text} for i, text in enumerate(DOCUMENTS)]
    response = httpx.post(
        f"{live.url}/v1/rerank",
        json={"query": QUERY, "documents": documents, "rank_fields": ["title", "body"]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200
    texts = [f"title: memory {i}\nbody: {text}" for i, text in enumerate(DOCUMENTS)]
    want = backend.rerank(QUERY, texts)
    assert [(r["index"], r["relevance_score"]) for r in response.json()["results"]] == [
        (r.index, r.score) for r in want
    ]
    missing = httpx.post(
        f"{live.url}/v1/rerank",
        json={"query": QUERY, "documents": [{"title": "no text"}]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert missing.status_code == 400
    assert (
        "'documents[0]' must be a string or an object with a 'text' field"
        in (missing.json()["message"])
    )


def test_langchain_jina_rerank(
    live: LiveServer, backend: WordOverlapReranker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_community.document_compressors import jina_rerank

    # JinaRerank has no base_url option: it posts to this module constant.
    monkeypatch.setattr(jina_rerank, "JINA_API_URL", f"{live.url}/v1/rerank")
    compressor = jina_rerank.JinaRerank(jina_api_key=KEY, top_n=3)
    documents = [Document(page_content=text, metadata={"n": i}) for i, text in enumerate(DOCUMENTS)]
    kept = compressor.compress_documents(documents, QUERY)
    assert [(d.metadata["n"], d.metadata["relevance_score"]) for d in kept] == expected(backend, 3)
    # Its error path reads "detail" from the body.
    wrong = jina_rerank.JinaRerank(jina_api_key="nope")
    with pytest.raises(RuntimeError, match="The API key is invalid"):
        wrong.compress_documents(documents, QUERY)


def test_memos_http_bge_reranker_wire_request(
    live: LiveServer, backend: WordOverlapReranker
) -> None:
    """Exactly what MemOS's ``src/memos/reranker/http_bge.py`` sends, to its default path
    (``MOS_RERANKER_URL`` defaults to ``.../v1/rerank``), with the key in
    ``headers_extra`` (its ``token`` option is never sent)."""
    headers_extra = {"Authorization": f"Bearer {KEY}"}
    headers = {"Content-Type": "application/json", **headers_extra}
    payload = {"model": "bge-reranker-v2-m3", "query": QUERY, "documents": DOCUMENTS}
    resp = requests.post(f"{live.url}/v1/rerank", headers=headers, json=payload, timeout=10)
    resp.raise_for_status()
    data = resp.json()
    # http_bge reads results[].index / relevance_score (else data[].score, else all 0.0).
    assert "results" in data
    scored = [
        (r["index"], float(r.get("relevance_score", r.get("score", 0.0)))) for r in data["results"]
    ]
    assert scored == expected(backend)
    # Without the header it gets a 401, which http_bge turns into 0.0 for everything.
    del headers["Authorization"]
    assert (
        requests.post(
            f"{live.url}/v1/rerank", headers=headers, json=payload, timeout=10
        ).status_code
        == 401
    )


def test_memos_documentation_requests_post(live: LiveServer, backend: WordOverlapReranker) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Token {KEY}"}
    data = {"model": "memos-reranker-0.6b", "query": QUERY, "documents": DOCUMENTS, "top_n": 3}
    res = requests.post(
        url=f"{live.url}/rerank", headers=headers, data=json.dumps(data), timeout=10
    )
    body = res.json()
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == expected(backend, 3)
    assert body["usage"]["total_tokens"] > 0


def test_infinity_client_wire_request(live: LiveServer, backend: WordOverlapReranker) -> None:
    """infinity-client (it pins an older httpx, so it is not installed here) posts
    RerankInput and parses ReRankResult: results, model, usage are required."""
    body = {
        "query": QUERY,
        "documents": DOCUMENTS,
        "return_documents": True,
        "model": "default/not-specified",
    }
    response = httpx.post(
        f"{live.url}/rerank", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    data = response.json()
    assert {"results", "model", "usage"} <= set(data)
    assert {"prompt_tokens", "total_tokens"} <= set(data["usage"])
    assert [(r["index"], r["relevance_score"]) for r in data["results"]] == expected(backend)
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in data["results"])


def test_http_reranker_with_its_defaults(live: LiveServer, backend: WordOverlapReranker) -> None:
    """This package's own client: Bearer to /rerank, the Cohere-shaped body."""
    client = HTTPReranker(live.url, api_key=KEY, max_retries=0)
    got = client.rerank(QUERY, DOCUMENTS, top_n=2)
    assert [(r.index, r.score) for r in got] == expected(backend, 2)
    tei = HTTPReranker(live.url, api_key=KEY, api_format="tei", max_retries=0)
    assert [(r.index, r.score) for r in tei.rerank(QUERY, DOCUMENTS)] == expected(backend)
    v1 = HTTPReranker(live.url, api_key=KEY, path="v1/rerank", max_retries=0)
    assert [(r.index, r.score) for r in v1.rerank(QUERY, DOCUMENTS)] == expected(backend)


async def test_http_reranker_async(live: LiveServer, backend: WordOverlapReranker) -> None:
    client = HTTPReranker(live.url, api_key=KEY, max_retries=0)
    got = await client.arerank(QUERY, DOCUMENTS)
    assert [(r.index, r.score) for r in got] == expected(backend)


# -- text-embeddings-inference: /rerank with texts, /info -------------------------------


def tei_client(live: LiveServer) -> HttpClient:
    return HttpClient(live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)


def test_tei_client_reads_info_then_reranks(live: LiveServer, backend: WordOverlapReranker) -> None:
    client = tei_client(live)
    info = client.info()
    assert info.server_model_id == "tiny-test"
    assert info.server_model_type.value == "reranker"
    assert info.max_client_batch_size == 10
    result = client.rerank(QUERY, DOCUMENTS, return_text=True)
    assert [(r.index, r.score) for r in result.ranks] == expected(backend)
    assert [r.text for r in result.ranks] == [DOCUMENTS[i] for i, _ in expected(backend)]
    assert all(r.text is None for r in client.rerank(QUERY, DOCUMENTS).ranks)


async def test_tei_client_async(live: LiveServer, backend: WordOverlapReranker) -> None:
    result = await tei_client(live).async_rerank(QUERY, DOCUMENTS)
    assert [(r.index, r.score) for r in result.ranks] == expected(backend)


def test_tei_errors_are_in_tei_shape(live: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    empty = httpx.post(f"{live.url}/rerank", json={"query": QUERY, "texts": []}, headers=headers)
    left = httpx.post(
        f"{live.url}/rerank",
        json={"query": QUERY, "texts": DOCUMENTS, "truncation_direction": "Left"},
        headers=headers,
    )
    for response in (empty, left):
        assert response.status_code == 400
        body = response.json()
        assert set(body) == {"error", "error_type", "detail"}
        assert body["error_type"] == "Validation" and body["detail"] == body["error"]
    assert empty.json()["error"] == "'texts' must not be empty."
    assert "'truncation_direction'" in left.json()["error"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dialect-models")
    return {
        "qwen": build_tiny_qwen_reranker(root / "qwen"),
        "cross-encoder": build_tiny_cross_encoder(root / "cross-encoder"),
    }


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@pytest.mark.parametrize("kind", ["qwen", "cross-encoder", "cross-encoder-raw"])
def test_tei_raw_scores_are_the_models_logits(kind: str, tiny_models: dict[str, Path]) -> None:
    if kind == "qwen":
        model: Any = QwenReranker(tiny_models["qwen"], dtype="float32")
    else:
        model = CrossEncoderReranker(
            tiny_models["cross-encoder"], dtype="float32", normalize=kind == "cross-encoder"
        )
    own = model.rerank(QUERY, DOCUMENTS)
    with LiveServer(create_app(model, model_name="tiny")) as live:
        client = HttpClient(live.url, timeout=30)
        plain = client.rerank(QUERY, DOCUMENTS).ranks
        raw = client.rerank(QUERY, DOCUMENTS, raw_scores=True).ranks
    assert [r.index for r in plain] == [r.index for r in raw] == [r.index for r in own]
    if kind == "cross-encoder-raw":  # the backend's scores are logits already
        assert [r.score for r in raw] == pytest.approx([r.score for r in own])
        assert [r.score for r in plain] == pytest.approx(
            [1 / (1 + math.exp(-r.score)) for r in own]
        )
    else:  # the backend's scores are probabilities: raw is their logit
        assert [r.score for r in plain] == pytest.approx([r.score for r in own])
        assert [r.score for r in raw] == pytest.approx([logit(r.score) for r in own], rel=1e-6)


# -- vLLM: /score, /v1/models -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_vllm_score_in_input_order(
    live: LiveServer, backend: WordOverlapReranker, path: str
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    one_to_many = httpx.post(
        f"{live.url}{path}",
        json={"model": "m", "text_1": QUERY, "text_2": DOCUMENTS},
        headers=headers,
    ).json()
    assert one_to_many["object"] == "list" and one_to_many["model"] == "tiny-test"
    assert [d["index"] for d in one_to_many["data"]] == list(range(len(DOCUMENTS)))
    assert [d["score"] for d in one_to_many["data"]] == [backend.score(QUERY, d) for d in DOCUMENTS]
    queries = [f"{QUERY} {i}" for i in range(3)]
    pairs = httpx.post(
        f"{live.url}{path}", json={"text_1": queries, "text_2": DOCUMENTS[:3]}, headers=headers
    ).json()
    assert [d["score"] for d in pairs["data"]] == [
        backend.score(q, d) for q, d in zip(queries, DOCUMENTS[:3], strict=True)
    ]
    mismatch = httpx.post(
        f"{live.url}{path}", json={"text_1": queries, "text_2": DOCUMENTS}, headers=headers
    )
    assert mismatch.status_code == 400
    assert "two lists of the same length" in mismatch.json()["detail"]


def test_vllm_rerank_wire_requests(live: LiveServer, backend: WordOverlapReranker) -> None:
    """What vLLM's own clients send (``top_n`` defaults to 0 there: all documents),
    and what they read: ``results[].document.text``, included by default."""
    headers = {"Authorization": f"Bearer {KEY}"}
    ranked = expected(backend)
    for path in ("/v1/rerank", "/v2/rerank"):
        answer = requests.post(
            f"{live.url}{path}",
            json={"model": "m", "query": QUERY, "documents": DOCUMENTS, "top_n": 0},
            headers=headers,
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [(r["index"], r["relevance_score"]) for r in results] == ranked
    default = requests.post(
        f"{live.url}/v1/rerank",
        json={"model": "m", "query": QUERY, "documents": DOCUMENTS},
        headers=headers,
        timeout=10,
    ).json()
    assert [r["document"] for r in default["results"]] == [
        {"text": DOCUMENTS[index]} for index, _ in ranked
    ]
    without = requests.post(
        f"{live.url}/v1/rerank",
        json={"query": QUERY, "documents": DOCUMENTS, "return_documents": False},
        headers=headers,
        timeout=10,
    ).json()
    assert all("document" not in r for r in without["results"])
    # MemOS's own route keeps its rule: top_n is at least 1.
    memos = requests.post(
        f"{live.url}/rerank",
        json={"query": QUERY, "documents": DOCUMENTS, "top_n": 0},
        headers=headers,
        timeout=10,
    )
    assert memos.status_code == 400
    assert memos.json()["message"] == "'top_n' must be at least 1."


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_vllm_score_takes_truncate_prompt_tokens_minus_one(
    live: LiveServer, backend: WordOverlapReranker, path: str
) -> None:
    """vLLM's -1: cut to the model's own limit (which this server always does)."""
    answer = requests.post(
        f"{live.url}{path}",
        json={"text_1": QUERY, "text_2": DOCUMENTS, "truncate_prompt_tokens": -1},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert [d["score"] for d in answer.json()["data"]] == [
        backend.score(QUERY, d) for d in DOCUMENTS
    ]
    below = requests.post(
        f"{live.url}{path}",
        json={"text_1": QUERY, "text_2": DOCUMENTS, "truncate_prompt_tokens": -2},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert below.status_code == 400


def test_models_and_info_need_no_key(live: LiveServer) -> None:
    models = httpx.get(f"{live.url}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [("tiny-test", "model")]
    info = httpx.get(f"{live.url}/info").json()
    assert info["model_id"] == "tiny-test" and "reranker" in info["model_type"]


# -- errors, and the OpenAPI description ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "keys"),
    [
        ("/rerank", {"query": QUERY}, {"code", "message", "detail"}),
        ("/rerank", {"query": 3, "texts": DOCUMENTS}, {"error", "error_type", "detail"}),
        ("/v1/rerank", {"query": QUERY}, {"message", "detail"}),
        ("/v2/rerank", {"query": QUERY}, {"message", "detail"}),
        ("/score", {"text_1": QUERY}, {"message", "detail"}),
    ],
)
def test_error_bodies_keep_their_keys_and_add_detail(
    live: LiveServer, path: str, body: dict[str, Any], keys: set[str]
) -> None:
    for headers in ({"Authorization": f"Bearer {KEY}"}, {}):
        response = httpx.post(f"{live.url}{path}", json=body, headers=headers)
        assert response.status_code == (400 if headers else 401)
        data = response.json()
        if headers or path != "/rerank" or "texts" not in body:
            assert set(data) == keys
        assert data["detail"] == data.get("message", data.get("error"))


def test_openapi_describes_every_route_from_the_request_models(live: LiveServer) -> None:
    spec = httpx.get(f"{live.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) >= {
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/score",
        "/v1/score",
        "/info",
        "/v1/models",
        "/health",
    }
    schemas = spec["components"]["schemas"]
    for model in (MemOSRerankRequest, TEIRerankRequest, CohereV1RerankRequest, ScoreRequest):
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        published = schemas[model.__name__]
        assert set(published["properties"]) == set(generated["properties"])
        assert published.get("required") == generated.get("required")
        for name, field in generated["properties"].items():
            assert published["properties"][name].get("description") == field.get("description")
    rerank_body = spec["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]
    assert {ref["$ref"] for ref in rerank_body["schema"]["oneOf"]} == {
        "#/components/schemas/MemOSRerankRequest",
        "#/components/schemas/TEIRerankRequest",
    }
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/score"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"400", "401", "413"} <= set(responses)
        assert spec["paths"][path]["post"]["security"] == [{"bearer": []}, {"token": []}]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/rerank", {"query": "q", "documents": ["a", 5]}, "'documents[1]' must be a string"),
        (
            "/v1/rerank",
            {"query": "q", "documents": [1, 2]},
            "'documents[0]' must be a string, got a number. (1 more problem in the request.)",
        ),
        (
            "/v1/rerank",
            {"query": "q", "documents": [{"text": 1}]},
            "'documents[0].text' must be a string, got a number.",
        ),
        (
            "/v1/rerank",
            {"query": "q", "documents": [{"text": "\ud800"}]},
            "'documents[0].text' holds a lone surrogate (U+D800)",
        ),
        ("/score", {"text_1": ["  "], "text_2": ["a"]}, "'text_1[0]' must not be empty."),
        (
            "/v2/rerank",
            {"query": 1, "documents": [2, 3]},
            "'query' must be a string, got a number. (2 more problems in the request.)",
        ),
    ],
)
def test_validation_errors_name_the_real_problem(
    live: LiveServer, path: str, body: dict[str, Any], message: str
) -> None:
    """A union (a string or an object) yields one pydantic error per member; the
    message names the one that fits what was sent."""
    response = httpx.post(
        f"{live.url}{path}",
        content=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 400
    assert message in response.json()["message"]
