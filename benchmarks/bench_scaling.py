"""How QwenReranker's cost grows with the number of memories and the length of the
documents, against the model card recipe where the recipe fits in memory.

Qwen3-0.6B's layer shape (hidden 1024, 16/8 heads, head_dim 128, intermediate 3072,
vocab 151,669) with ``--layers`` decoder layers (default 4, so that the largest
cases finish on a small CPU; time per token scales with the layer count, the
recipe's full-vocabulary logits do not). Random weights, built offline.

    PYTHONPATH=src python benchmarks/bench_scaling.py --threads 1 \\
        --json benchmarks/bench_scaling.json --plot benchmarks/bench_scaling.png
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

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
# estimate it is not run ("runs out" on this 24 GiB machine, next to everything else).
RECIPE_LIMIT_BYTES = 8 * 2**30


def build_model(directory: Path, layers: int) -> Path:
    if (directory / "config.json").exists():
        return directory
    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    rng = random.Random(1234)
    texts = [sentence(rng, 5, 40) for _ in range(3000)]
    shape = {**QWEN3_06B_SHAPE, "num_hidden_layers": layers}
    return build_tiny_qwen_reranker(
        directory, tokenizer_vocab_size=4096, training_texts=texts, **shape
    )


def document_of(rng: random.Random, tokens: int) -> str:
    # Words of the benchmark vocabulary are single tokens (plus a leading space).
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def cases(seed: int) -> list[tuple[str, str, int, tuple[str, list[str]]]]:
    rng = random.Random(seed)
    out = []
    for n in (1, 10, 100, 1000):
        out.append(
            (
                "memories",
                str(n),
                n,
                (sentence(rng, 6, 10), [sentence(rng, 3, 18) for _ in range(n)]),
            )
        )
    for tokens in (16, 128, 1024, 8192, 32768):
        docs = [document_of(rng, tokens) for _ in range(2)]
        out.append(("document_tokens", str(tokens), 2, (sentence(rng, 6, 10), docs)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build_model(
        args.model_dir or Path(f"/tmp/qwen3-0.6b-shaped-{args.layers}-layers"), args.layers
    )
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
    for axis, label, pairs, call in cases(args.seed):
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
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)


def plot(report: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for column, axis in enumerate(("memories", "document_tokens")):
        rows = [r for r in report["results"] if r["axis"] == axis]
        sizes = [int(r["size"]) for r in rows]
        for key, name in (("package", "QwenReranker"), ("recipe", "model card recipe")):
            have = [r for r in rows if f"{key}_s" in r]
            x = [int(r["size"]) for r in have]
            axes[0][column].plot(x, [r[f"{key}_pairs_per_s"] for r in have], "o-", label=name)
            axes[1][column].plot(x, [r[f"{key}_peak_extra_mib"] for r in have], "o-", label=name)
        for row in (0, 1):
            axes[row][column].set_xscale("log")
            axes[row][column].set_xticks(sizes)
            axes[row][column].set_xticklabels([str(s) for s in sizes])
            axes[row][column].legend()
            axes[row][column].grid(True, alpha=0.3)
        axes[0][column].set_yscale("log")
        axes[0][column].set_ylabel("pairs/s")
        axes[1][column].set_ylabel("peak extra memory (MiB)")
        axes[1][column].set_xlabel(
            "memories per query" if axis == "memories" else "tokens per document (2 documents)"
        )
    figure.suptitle(
        f"QwenReranker vs recipe, fp32, Qwen3-0.6B shape with {report['layers']} layers, "
        f"max_batch_tokens={report['max_batch_tokens']}"
    )
    figure.tight_layout()
    figure.savefig(target, dpi=90)


if __name__ == "__main__":
    main()
