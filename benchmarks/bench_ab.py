"""QwenReranker from two source trees, A/B: steady-state pairs/s of each workload.

For checking that a change is no slower: ``--baseline-src`` is another checkout's
``src`` (e.g. a ``git worktree`` of an earlier commit), ``src`` of this checkout the
candidate. Each side runs in a fresh process of its own (one at a time, the order
alternating from round to round) on the benchmark's Qwen3-0.6B-shaped model, with
the same inputs as ``bench_qwen.py``: *memory* (one call of 20 memories), *RAG* (one
call of 12 passages) and *one memory* (6 calls of one memory each), after a warm-up
call, best of three passes per process. Reported per dtype and workload: the best
round of each side and the ratio.

    PYTHONPATH=src python benchmarks/bench_ab.py --baseline-src ../base/src

writes ``benchmarks/results/bench_ab-<machine>.json`` (``--out`` elsewhere);
``--smoke`` runs one round on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _common

BENCHMARKS = Path(__file__).resolve().parent

_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import bench_qwen
from memos_rerank_integrations import QwenReranker

model, dtype, workloads, threads = sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5]
if threads != "0":
    import torch
    torch.set_num_threads(int(threads))
reranker = QwenReranker(model, dtype=dtype, device="cpu")
inputs = bench_qwen.make_workloads(7)
out = {}
for workload in workloads:
    calls = inputs[workload]
    reranker.rerank(*calls[0])  # warm-up
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for query, documents in calls:
            reranker.rerank(query, documents)
        best = min(best, time.perf_counter() - started)
    out[workload] = sum(len(d) for _, d in calls) / best
print("RESULT", json.dumps(out), flush=True)
"""


def run_side(src: Path, model: Path, dtype: str, workloads: str, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(BENCHMARKS), str(model), dtype, workloads, str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, float] = json.loads(line.removeprefix("RESULT "))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path, required=True)
    parser.add_argument("--baseline-label", default=None, help="what the baseline is")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workloads", default="memory,rag,one_memory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    _common.add_output_arguments(parser, "bench_ab")
    args = parser.parse_args()

    from bench_qwen import DEFAULT_MODEL_DIR, build_model

    candidate = _common.REPO / "src"
    run = _common.run_info()
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            model = build_model(Path(scratch) / "model", tiny=True)
            args.rounds, args.dtypes = 1, "float32"
        else:
            model = build_model(args.model_dir or DEFAULT_MODEL_DIR)
        rounds: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            sides = [("baseline", args.baseline_src), ("candidate", candidate)]
            if round_ % 2:
                sides.reverse()
            for dtype in args.dtypes.split(","):
                for side, src in sides:
                    rates = run_side(src, model, dtype, args.workloads, args.threads)
                    rounds.append({"round": round_, "side": side, "dtype": dtype, **rates})
                    print(json.dumps(rounds[-1]), flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for dtype in args.dtypes.split(","):
        for workload in args.workloads.split(","):
            best = {
                side: max(r[workload] for r in rounds if r["side"] == side and r["dtype"] == dtype)
                for side in ("baseline", "candidate")
            }
            summary.setdefault(dtype, {})[workload] = {
                "baseline_pairs_per_s": round(best["baseline"], 3),
                "candidate_pairs_per_s": round(best["candidate"], 3),
                "ratio": round(best["candidate"] / best["baseline"], 3),
            }
    print(json.dumps(summary, indent=1))
    report = {
        "environment": {"threads": args.threads or "torch default"},
        "baseline": {"src": str(args.baseline_src), "label": args.baseline_label},
        "summary": summary,
        "rounds": rounds,
    }
    _common.write(_common.output_path(args, "bench_ab"), report, run)


if __name__ == "__main__":
    main()
