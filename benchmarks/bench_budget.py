"""Latency budgets on the benchmark's model: what a budget costs when it never runs
out, and how the answer degrades as the budget shrinks.

A 64-passage RAG call (passages of 60-160 words, as ``bench_qwen.py``'s ``rag``
workload) on the Qwen3-0.6B-shaped model (random weights, built offline). ``T`` is the
full rerank's time (best of three). Then:

- overhead: ``rerank`` against ``rerank_within`` with a budget of 10 T (never runs
  out), interleaved, ``--repeats`` times each; the ratio of the medians;
- degradation: for budgets of T/32 ... 1.5 T, the documents scored and the time taken
  (median of ``--repeats``), directly and through LangChain's ``RerankCompressor``;
- a budget smaller than one passage's cost (T/200): nothing scored, the time taken.

After each budgeted call the model's lock must be free (no work left running).

    PYTHONPATH=src python benchmarks/bench_budget.py

writes ``benchmarks/results/bench_budget-<machine>.json`` (``--out`` elsewhere;
``python benchmarks/plot.py`` draws its table and ``docs/assets/budget.svg``);
``--smoke`` runs a tiny model once.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import bench_qwen  # noqa: E402

from memos_rerank_integrations import QwenReranker  # noqa: E402
from memos_rerank_integrations._calls import Budget  # noqa: E402

FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0, 1.5)


def rag_call(seed: int = 11, passages: int = 64) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    query = bench_qwen.sentence(rng, 6, 10)
    return query, [bench_qwen.sentence(rng, 60, 160) for _ in range(passages)]


def idle(reranker: QwenReranker) -> bool:
    lock = reranker._loaded().lock
    free = lock.acquire(blocking=False)
    if free:
        lock.release()
    return free


def timed(function: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=bench_qwen.DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", default=None, help="default: the package's choice")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passages", type=int, default=64)
    _common.add_output_arguments(parser, "bench_budget")
    args = parser.parse_args()
    run = _common.run_info()
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            model = bench_qwen.build_model(Path(scratch) / "model", tiny=True)
            args.repeats, args.passages = 1, 16
        else:
            model = bench_qwen.build_model(args.model_dir)
        report = measure(model, args)
    _common.write(_common.output_path(args, "bench_budget"), report, run)


def measure(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from langchain_core.documents import Document

    from memos_rerank_integrations.langchain import RerankCompressor

    reranker = QwenReranker(model, dtype=args.dtype, device="cpu")
    query, documents = rag_call(passages=args.passages)
    reranker.rerank("warm up", documents[:2])
    full = min(timed(lambda: reranker.rerank(query, documents))[0] for _ in range(3))
    print(f"T = {full:.3f} s for {len(documents)} passages", flush=True)

    # Overhead: a budget that never runs out, interleaved with plain calls.
    plain, budgeted = [], []
    for _ in range(args.repeats):
        plain.append(timed(lambda: reranker.rerank(query, documents))[0])
        budget = Budget(full * 10_000)
        seconds, results = timed(
            lambda b=budget: reranker.rerank_within(query, documents, budget=b)
        )
        assert len(results) == len(documents)
        budgeted.append(seconds)
    overhead = statistics.median(budgeted) / statistics.median(plain)
    print(f"overhead of a budget that never runs out: {overhead:.3f}x", flush=True)

    docs = [Document(page_content=text) for text in documents]
    rows = []
    for fraction in (*FRACTIONS, 1 / 200):
        budget_s = full * fraction
        direct, through, scored, idle_after = [], [], [], True
        for _ in range(args.repeats):
            budget = Budget(budget_s * 1000)
            seconds, results = timed(
                lambda b=budget: reranker.rerank_within(query, documents, budget=b)
            )
            idle_after = idle_after and idle(reranker)
            direct.append(seconds)
            scored.append(len(results))
            compressor = RerankCompressor(reranker=reranker, budget_ms=budget_s * 1000)
            seconds, kept = timed(lambda c=compressor: c.compress_documents(docs, query))
            assert sorted(d.page_content for d in kept) == sorted(documents)
            through.append(seconds)
        row = {
            "budget_fraction_of_T": round(fraction, 4),
            "budget_s": round(budget_s, 4),
            "scored_median": statistics.median(scored),
            "scored_fraction": round(statistics.median(scored) / len(documents), 3),
            "elapsed_median_s": round(statistics.median(direct), 4),
            "elapsed_max_s": round(max(direct), 4),
            "overrun_max_s": round(max(direct) - budget_s, 4),
            "langchain_elapsed_max_s": round(max(through), 4),
            "idle_after": idle_after,
        }
        print(row, flush=True)
        rows.append(row)
    return {
        "environment": bench_qwen.machine(),
        "passages": len(documents),
        "full_seconds": round(full, 4),
        "overhead_never_runs_out": round(overhead, 3),
        "budgets": rows,
    }


if __name__ == "__main__":
    main()
