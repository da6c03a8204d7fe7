"""Where a QwenReranker call spends its time, by wall clock (not ``torch.profiler``).

``torch.profiler`` adds tens of microseconds to every op it records, so on calls made
of many small ops (a one-memory call: ~45 ops per layer on 20-40 rows) it overstates
the share of everything that is not a big matmul. This script times the packed
engine's parts with ``time.perf_counter`` around each: the projections (oneDNN
prepacked linears, with the SiLU, the gate-times-up product and the residual adds
that run inside them, and their achieved GFLOP/s from the shapes they ran), attention,
RMSNorm, rotary, the log-sum-exp merges; the rest of ``PackedQwen3.forward`` (views,
copies, Python) is what is left of the engine's time, and the rest of
the call (tokenization, planning, the score head) what is left of the call's.

Workloads: those of ``bench_qwen.py`` (*memory*, *rag*, *one_memory*, each call on its
own) and *small*: turns of 8 calls of 2 short memories each, scored together with
``rerank_many`` as ``memos-rerank serve`` fuses the small calls of 8 clients (the
shape of ``bench_serve.py``'s small calls: one fused turn of a model worker).

It wraps the engine's methods on the loaded instance for the run (instrumentation
only: the numbers are those of the code as shipped, plus a few microseconds per
wrapped call, which the script measures and reports as ``overhead``).

    PYTHONPATH=src python benchmarks/breakdown_qwen.py --dtypes bfloat16,float32 --rounds 3

writes ``benchmarks/results/breakdown_qwen-<machine>.json`` (``--out`` elsewhere), keyed
by dtype and workload. ``--smoke`` runs one round on a tiny model.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import _common
from bench_qwen import (
    DEFAULT_MODEL_DIR,
    build_model,
    gemm_rate,
    machine,
    make_workloads,
    package_scores,
    sentence,
)

from memos_rerank_integrations import QwenReranker


class Clock:
    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.flops = 0.0

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.flops = 0.0

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


class TimedLinear:
    """An engine ``Linear``, its calls timed and their FLOPs counted on ``clock``. The
    fused forms (``silu``, ``times``, ``plus``: the activation, product or residual
    add done inside the matmul) count as projections."""

    def __init__(self, clock: Clock, linear: Any) -> None:
        self.clock, self.linear = clock, linear

    def _timed(self, method: str, x: torch.Tensor, *other: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out: torch.Tensor = getattr(self.linear, method)(x, *other)
        self.clock.seconds["linear"] += time.perf_counter() - start
        self.clock.calls["linear"] += 1
        self.clock.flops += 2.0 * x.shape[0] * x.shape[1] * out.shape[-1]
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed("__call__", x)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed("silu", x)

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self._timed("times", x, other)

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self._timed("plus", x, other)


def instrument(engine: Any, clock: Clock) -> None:
    for layer in engine.layers:
        for name in ("q", "k", "v", "qkv", "out", "gate", "up", "down"):
            linear = getattr(layer, name)
            if linear is None:  # q/k/v stacked, or not
                continue
            if not linear.packed:
                raise SystemExit("the engine's linears are not prepacked here")
            setattr(layer, name, TimedLinear(clock, linear))
    for name, part in (
        ("_attention", "attention"),
        ("_masked", "attention"),
        ("_rms_norm", "rms_norm"),
        ("_rope", "rotary"),
        ("_norm_rope", "q/k norm + rotary"),
        ("_merge", "merge"),
        ("forward", "engine"),
    ):
        setattr(engine, name, clock.wrap(part, getattr(engine, name)))


def wrapper_overhead() -> float:
    """Seconds one wrapped call adds (a wrapped no-op, timed)."""
    probe = Clock()
    noop = probe.wrap("noop", lambda: None)
    start = time.perf_counter()
    for _ in range(10_000):
        noop()
    return (time.perf_counter() - start) / 10_000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtypes", "--dtype", dest="dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--workloads",
        "--workload",
        dest="workloads",
        default="one_memory,memory,rag,small",
        help="comma-separated: memory, rag, one_memory, small",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    _common.add_output_arguments(parser, "breakdown_qwen")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = _common.run_info()
    out = _common.output_path(args, "breakdown_qwen")
    report: dict[str, Any] = {"machine": machine(), "results": {}}
    with tempfile.TemporaryDirectory() as directory:
        if args.smoke:
            args.rounds = 1
            path = build_model(Path(directory), tiny=True)
        else:
            path = build_model(args.model_dir)
        for name in args.dtypes.split(","):
            report["results"][name] = measure(args, path, name)
    _common.write(out, report, run)


def turns(seed: int) -> dict[str, list[list[tuple[str, list[str]]]]]:
    """Each workload's turns: the calls a turn scores (one, or several fused)."""
    out = {name: [[call] for call in calls] for name, calls in make_workloads(seed).items()}
    rng = random.Random(f"{seed}-small")
    out["small"] = [
        [(sentence(rng, 6, 10), [sentence(rng, 3, 18) for _ in range(2)]) for _ in range(8)]
        for _ in range(2)
    ]
    return out


def measure(args: argparse.Namespace, path: Path, dtype_name: str) -> dict[str, Any]:
    """The breakdown of each workload in ``dtype_name``, one loaded model."""
    dtype = getattr(torch, dtype_name)
    reranker = QwenReranker(model=str(path), dtype=dtype, device="cpu")
    score = package_scores(reranker)

    def run(turn: list[tuple[str, list[str]]]) -> None:
        if len(turn) == 1:
            score(*turn[0])
        else:  # fused, as the server's model worker runs them
            reranker.rerank_many([(query, documents, None) for query, documents in turn])

    workloads = turns(args.seed)
    wanted = args.workloads.split(",")
    for workload in wanted:  # warm: instruction cache, allocator
        for turn in workloads[workload]:
            run(turn)
    engine = reranker._loaded().engine  # instrumentation: the loaded engine
    if engine is None:
        raise SystemExit("this model runs on transformers' forward here, not the packed engine")
    clock = Clock()
    instrument(engine, clock)
    results: dict[str, Any] = {}
    for workload in wanted:
        clock.reset()
        start = time.perf_counter()
        for _ in range(args.rounds):
            for turn in workloads[workload]:
                run(turn)
        wall = time.perf_counter() - start
        rate = gemm_rate(dtype, 128 if args.smoke else 1024)
        seconds = dict(clock.seconds)
        engine_time = seconds.pop("engine")
        parts = {name: seconds[name] for name in sorted(seconds, key=lambda n: -seconds[n])}
        wrapped_calls = sum(clock.calls.values())
        overhead = wrapper_overhead() * wrapped_calls
        parts["rest of the engine"] = engine_time - sum(parts.values())
        parts["outside the engine"] = wall - engine_time
        entry = {
            "dtype": dtype_name,
            "workload": workload,
            "rounds": args.rounds,
            "turns": args.rounds * len(workloads[workload]),
            "wall_s": wall,
            "engine_s": engine_time,
            "parts_s": parts,
            "calls": dict(clock.calls),
            "linear_gflops": clock.flops / seconds["linear"] / 1e9,
            "gemm_rate_gflops": rate / 1e9,
            "wrapper_overhead_s": overhead,
        }
        results[workload] = entry
        print(f"{workload} {dtype_name}: {args.rounds} rounds, wall {wall:.3f} s")
        for name, value in parts.items():
            print(f"  {name:20s} {value:8.3f} s {100 * value / wall:5.1f}%")
        print(
            f"  linears ran at {entry['linear_gflops']:.0f} GFLOP/s against a best GEMM rate"
            f" of {entry['gemm_rate_gflops']:.0f}; wrappers added ~{overhead:.3f} s",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
