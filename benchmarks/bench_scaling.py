"""How QwenReranker's cost grows with the number of memories and the length of the
documents, against the model card recipe where the recipe fits in memory.

Qwen3-0.6B's layer shape (hidden 1024, 16/8 heads, head_dim 128, intermediate 3072,
vocab 151,669) with ``--layers`` decoder layers (default 4, so that the largest
cases finish on a small CPU; time per token scales with the layer count, the
recipe's full-vocabulary logits do not). Random weights, built offline into
``benchmarks/.models/``; fp32, one call per case.

    PYTHONPATH=src python benchmarks/bench_scaling.py --threads 1

writes ``benchmarks/results/bench_scaling-<machine>.json`` (``--out`` elsewhere);
``benchmarks/plot.py`` draws it. ``--smoke`` runs the smallest cases on a tiny model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import _common
from bench_qwen import (
    QWEN3_06B_SHAPE,
    WORDS,
    Recipe,
    machine,
    package_scores,
    sentence,
    timed,
)

from memos_rerank_integrations import QwenReranker
from memos_rerank_integrations._local.runtime import clear_model_cache

# The recipe materialises [rows x padded length x vocabulary] float logits; above this
# estimate it is not run (it would not fit next to everything else in 24 GiB).
RECIPE_LIMIT_BYTES = 8 * 2**30


def build_model(directory: Path, layers: int, *, tiny: bool = False) -> Path:
    if (directory / "config.json").exists():
        return directory
    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    rng = random.Random(1234)
    texts = [sentence(rng, 5, 40) for _ in range(3000)]
    shape = {**QWEN3_06B_SHAPE, "num_hidden_layers": layers}
    if tiny:  # the testing helper's small layers, the real vocabulary (the recipe's logits)
        shape = {"vocab_size": QWEN3_06B_SHAPE["vocab_size"], "num_hidden_layers": layers}
    return build_tiny_qwen_reranker(
        directory, tokenizer_vocab_size=4096, training_texts=texts, **shape
    )


def document_of(rng: random.Random, tokens: int) -> str:
    # Words of the benchmark vocabulary are single tokens (plus a leading space).
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def cases(seed: int, smoke: bool = False) -> list[tuple[str, str, int, tuple[str, list[str]]]]:
    rng = random.Random(seed)
    out = []
    for n in (1, 10) if smoke else (1, 10, 100, 1000):
        out.append(
            (
                "memories",
                str(n),
                n,
                (sentence(rng, 6, 10), [sentence(rng, 3, 18) for _ in range(n)]),
            )
        )
    for tokens in (16, 128) if smoke else (16, 128, 1024, 8192, 32768):
        docs = [document_of(rng, tokens) for _ in range(2)]
        out.append(("document_tokens", str(tokens), 2, (sentence(rng, 6, 10), docs)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="default: benchmarks/.models/qwen3-0.6b-shaped-<layers>-layers",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    _common.add_output_arguments(parser, "bench_scaling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = _common.run_info()
    out = _common.output_path(args, "bench_scaling")
    if args.smoke:
        with tempfile.TemporaryDirectory() as directory:
            report = measure(args, build_model(Path(directory), args.layers, tiny=True))
    else:
        default = _common.MODELS / f"qwen3-0.6b-shaped-{args.layers}-layers"
        report = measure(args, build_model(args.model_dir or default, args.layers))
    _common.write(out, report, run)


def measure(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    max_length = 32768 + 256
    report: dict[str, Any] = {
        "machine": machine(),
        "layers": args.layers,
        "max_batch_tokens": args.max_batch_tokens,
        "dtype": "float32",
        "results": [],
    }
    reranker = QwenReranker(
        path,
        dtype="float32",
        device="cpu",
        max_length=max_length,
        max_batch_tokens=args.max_batch_tokens,
    )
    package = package_scores(reranker)
    package("warm up", ["a short memory"])
    recipe = Recipe(path, torch.float32, max_length=max_length)
    recipe("warm up", ["a short memory"])
    vocab = QWEN3_06B_SHAPE["vocab_size"]
    for axis, label, pairs, call in cases(args.seed, args.smoke):
        query, documents = call
        tokens = reranker.count_tokens(query, documents)
        longest = max(
            len(s)
            for s in reranker._tokenize(reranker._tokenizer(), [(query, documents)])[0].sequences()
        )
        recipe_logits = len(documents) * longest * vocab * 4
        seconds, _, peak = timed(package, [call], 1)
        entry: dict[str, Any] = {
            "axis": axis,
            "size": label,
            "pairs": pairs,
            "prompt_tokens": tokens,
            "package_s": seconds,
            "package_pairs_per_s": pairs / seconds,
            "package_peak_extra_mib": peak,
            "recipe_logits_estimate_mib": recipe_logits / 2**20,
        }
        if recipe_logits <= RECIPE_LIMIT_BYTES:
            r_seconds, _, r_peak = timed(recipe, [call], 1)
            entry.update(
                recipe_s=r_seconds,
                recipe_pairs_per_s=pairs / r_seconds,
                recipe_peak_extra_mib=r_peak,
                speedup=r_seconds / seconds,
            )
        else:
            entry["recipe"] = (
                f"not run: its logits alone would take {recipe_logits / 2**30:.0f} GiB"
            )
        report["results"].append(entry)
        print(json.dumps(entry), flush=True)
        gc.collect()
    del recipe
    clear_model_cache()
    report["load_average_at_end"] = os.getloadavg()
    return report


if __name__ == "__main__":
    main()
