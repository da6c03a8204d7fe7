"""Would ``torch.compile`` pay for the packed Qwen engine's elementwise work? An A/B.

On a CPU with AMX tiles the bf16 projections run at ~1.2 TFLOP/s on one core, and the
work that is not a matmul (RMSNorm with float32 statistics, rotary, separate torch ops
each a pass over memory) becomes a third of a call. This script loads one
``QwenReranker`` and times the same workloads, interleaved, best of ``--rounds``, with
the engine's RMSNorm (and then also its rotary embedding) replaced by
``torch.compile``-d versions (inductor's C++ backend fuses each into one loop):

    eager        the engine as shipped
    c_rms        RMSNorm compiled (dynamic shapes)
    c_rms_rope   RMSNorm and rotary compiled

It is an experiment, not a mode of the package: it swaps the engine's methods on the
class for the run. The compile time of the first calls is reported separately.

Written for the engine of stop 23 (raw results: ``compile_ab_qwen.json``). Since stop
25 the prepacked engine runs q's and k's norm and rotary as ``_norm_rope`` (pair
order), so there ``_rope`` is no longer called and ``c_rms_rope`` compiles only the
RMSNorm that is left.

    PYTHONPATH=src python benchmarks/compile_ab_qwen.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_qwen import build_model, machine, make_workloads

import memos_rerank_integrations._engine.qwen3 as engine_module
from memos_rerank_integrations import QwenReranker


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Qwen3RMSNorm``'s arithmetic (float32 statistics), as transformers writes it."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat(
        (x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]),
        -1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3-0.6b-shaped"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workloads", default="rag,memory,one_memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    path = build_model(args.model_dir)
    reranker = QwenReranker(path, dtype=getattr(torch, args.dtype), device="cpu")
    reranker.rerank("warm up", ["a short memory"])
    engine_class: Any = engine_module.PackedQwen3
    eager_rms, eager_rope = engine_class._rms_norm, engine_class._rope
    compiled_rms = torch.compile(rms, dynamic=True)
    compiled_rope = torch.compile(rope, dynamic=True)

    def c_rms(self: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = compiled_rms(x, weight, self.eps)
        return out

    def c_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(compiled_rope(x, cos, sin))

    methods = {
        "eager": (eager_rms, staticmethod(eager_rope)),
        "c_rms": (c_rms, staticmethod(eager_rope)),
        "c_rms_rope": (c_rms, staticmethod(c_rope)),
    }

    def use(name: str) -> None:
        norm, rotary = methods[name]
        engine_class._rms_norm = norm
        engine_class._rope = rotary

    workloads = make_workloads(args.seed)
    wanted = args.workloads.split(",")
    report: dict[str, Any] = {"machine": machine(), "dtype": args.dtype, "results": {}}
    start = time.perf_counter()
    for name in methods:  # compiles on first use of each shape
        use(name)
        for workload in wanted:
            for query, documents in workloads[workload]:
                reranker.rerank(query, documents)
    report["first_calls_s"] = time.perf_counter() - start
    print(f"first calls (compiles included): {report['first_calls_s']:.1f} s")
    try:
        for workload in wanted:
            calls = workloads[workload]
            best = dict.fromkeys(methods, float("inf"))
            scores: dict[str, list[list[float]]] = {}
            for _ in range(args.rounds):
                for name in methods:
                    use(name)
                    began = time.perf_counter()
                    scores[name] = [
                        [r.score for r in sorted(reranker.rerank(q, d), key=lambda r: r.index)]
                        for q, d in calls
                    ]
                    best[name] = min(best[name], time.perf_counter() - began)
            eager = scores["eager"]
            entry = {
                name: {
                    "seconds": seconds,
                    "speedup": best["eager"] / seconds,
                    "max_abs_diff_vs_eager": max(
                        abs(a - b)
                        for xs, ys in zip(scores[name], eager, strict=True)
                        for a, b in zip(xs, ys, strict=True)
                    ),
                }
                for name, seconds in best.items()
            }
            report["results"][workload] = entry
            print(workload, json.dumps(entry), flush=True)
    finally:
        use("eager")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
