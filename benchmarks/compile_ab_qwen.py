"""Would ``torch.compile`` pay for the packed Qwen engine's elementwise work? An A/B.

The work of a call that is not a matmul (RMSNorm with float32 statistics, rotary:
separate torch ops, each a pass over memory) is what a compiler could fuse. This
script loads one ``QwenReranker`` and times the same workloads, interleaved, best of
``--rounds``, with the engine's RMSNorm (and then also its rotary embedding) replaced
by ``torch.compile``-d versions (inductor's C++ backend fuses each into one loop):

    eager        the engine as shipped
    c_rms        RMSNorm compiled (dynamic shapes)
    c_rms_rope   RMSNorm and rotary compiled

It is an experiment, not a mode of the package: it swaps the engine's methods on the
class for the run. The compile time of the first calls is reported separately. Where
the prepacked engine runs q's and k's norm and rotary in one pass (``_norm_rope``, pair
order), ``_rope`` is not called, and ``c_rms_rope`` compiles only the RMSNorm left.
It needs a C++ compiler.

    PYTHONPATH=src python benchmarks/compile_ab_qwen.py --dtype bfloat16

writes ``benchmarks/results/compile_ab_qwen-<machine>.json`` (``--out`` elsewhere).
``--smoke`` runs one round of one workload on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import _common
from bench_qwen import DEFAULT_MODEL_DIR, build_model, machine, make_workloads

import memos_rerank_integrations._engine.qwen3 as engine_module
from memos_rerank_integrations import QwenReranker


def rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``Qwen3RMSNorm``'s arithmetic (float32 statistics), as transformers writes it
    (``weight=None``: folded into the next projections, as the engine does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) if weight is None else weight * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat(
        (x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]),
        -1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workloads", default="rag,memory,one_memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    _common.add_output_arguments(parser, "compile_ab_qwen")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = _common.run_info()
    out = _common.output_path(args, "compile_ab_qwen")
    if args.smoke:
        args.rounds, args.workloads = 1, "memory"
        with tempfile.TemporaryDirectory() as directory:
            report = measure(args, build_model(Path(directory), tiny=True))
    else:
        report = measure(args, build_model(args.model_dir))
    _common.write(out, report, run)


def measure(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    reranker = QwenReranker(path, dtype=getattr(torch, args.dtype), device="cpu")
    reranker.rerank("warm up", ["a short memory"])
    engine_class: Any = engine_module.PackedQwen3
    eager_rms, eager_rope = engine_class._rms_norm, engine_class._rope
    compiled_rms = torch.compile(rms, dynamic=True)
    compiled_rope = torch.compile(rope, dynamic=True)

    def c_rms(self: Any, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
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
    return report


if __name__ == "__main__":
    main()
