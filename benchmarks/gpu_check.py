"""The local Qwen backend on CUDA: scores checked against the model-card recipe, and
timed against it (and against vLLM's offline scorer when ``vllm`` is importable).

On a machine with a CUDA device it builds the Qwen3-0.6B-shaped benchmark model (as
``bench_qwen.py``), then for float32 and bfloat16 runs the ``memory``, ``rag`` and
``one_memory`` workloads through ``QwenReranker(device="cuda")`` and the recipe on
the same device:

- float32: every score within 1e-4 of the recipe's;
- bfloat16: the largest difference from the float32 recipe within the bf16 drift
  bound (0.05); whether each call keeps its top-5 is recorded (random weights leave
  gaps that a bf16 drift can swap).

It exits 1 if a check fails, 0 when all pass, and 0 with a message on a machine
without CUDA (nothing to check).

    PYTHONPATH=src python benchmarks/gpu_check.py

writes ``benchmarks/results/gpu_check-<machine>.json`` (``--out`` elsewhere);
``--smoke`` uses a tiny model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import bench_qwen  # noqa: E402

from memos_rerank_integrations import QwenReranker  # noqa: E402

FP32_TOLERANCE = 1e-4
BF16_DRIFT = 0.05


class DeviceRecipe(bench_qwen.Recipe):
    """The model card's recipe, on ``device``."""

    def __init__(self, path: Path, dtype: torch.dtype, device: str) -> None:
        super().__init__(path, dtype)
        self.model.to(device)
        self.device = device

    def __call__(self, query: str, documents: Sequence[str]) -> list[float]:
        original = self.tokenizer.pad
        device = self.device

        def pad(*args: Any, **kwargs: Any) -> Any:
            return original(*args, **kwargs).to(device)

        self.tokenizer.pad = pad  # type: ignore[method-assign]
        try:
            return super().__call__(query, documents)
        finally:
            self.tokenizer.pad = original  # type: ignore[method-assign]


def timed(
    score: Callable[[str, Sequence[str]], list[float]], calls: list[tuple[str, list[str]]]
) -> tuple[float, list[list[float]]]:
    best, scores = float("inf"), []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        scores = [score(query, documents) for query, documents in calls]
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, scores


def vllm_scores(path: Path, dtype: str) -> Callable[[str, Sequence[str]], list[float]] | None:
    try:
        from vllm import LLM
    except ImportError:
        return None
    from bench_vllm import DOCUMENT_TEMPLATE, HF_OVERRIDES, QUERY_TEMPLATE

    llm = LLM(model=str(path), runner="pooling", dtype=dtype, hf_overrides=HF_OVERRIDES)

    def score(query: str, documents: Sequence[str]) -> list[float]:
        q = QUERY_TEMPLATE.format(query=query)
        ds = [DOCUMENT_TEMPLATE.format(document=d) for d in documents]
        return [o.outputs.score for o in llm.score(q, ds, use_tqdm=False)]

    return score


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=bench_qwen.DEFAULT_MODEL_DIR)
    _common.add_output_arguments(parser, "gpu_check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to check.")
        return 0
    run = _common.run_info()
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            model = bench_qwen.build_model(Path(scratch) / "model", tiny=True)
        else:
            model = bench_qwen.build_model(args.model_dir)
        workloads = bench_qwen.make_workloads(seed=3)
        reference = DeviceRecipe(model, torch.float32, "cuda")
        expected = {name: [reference(q, d) for q, d in calls] for name, calls in workloads.items()}
        report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "checks": {}}
        failed = False
        for dtype_name in ("float32", "bfloat16"):
            dtype = getattr(torch, dtype_name)
            recipe = DeviceRecipe(model, dtype, "cuda")
            reranker = QwenReranker(model, dtype=dtype_name, device="cuda")
            package = bench_qwen.package_scores(reranker)
            package("warm up", ["a short memory"])
            recipe("warm up", ["a short memory"])
            other = vllm_scores(model, dtype_name)
            for name, calls in workloads.items():
                seconds, scores = timed(package, calls)
                recipe_seconds, _ = timed(recipe, calls)
                entry: dict[str, Any] = {
                    "seconds": round(seconds, 4),
                    "recipe_seconds": round(recipe_seconds, 4),
                    "vs_recipe": round(recipe_seconds / seconds, 2),
                    **bench_qwen.compare(scores, expected[name]),
                }
                if other is not None:
                    vllm_seconds, _ = timed(other, calls)
                    entry["vs_vllm"] = round(vllm_seconds / seconds, 2)
                bound = FP32_TOLERANCE if dtype_name == "float32" else BF16_DRIFT
                entry["passed"] = entry["max_abs_diff"] <= bound
                failed = failed or not entry["passed"]
                report["checks"][f"{dtype_name}/{name}"] = entry
                print(dtype_name, name, entry, flush=True)
    _common.write(_common.output_path(args, "gpu_check"), report, run)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
