"""Process start to first score: QwenReranker and ``memos-rerank rerank`` against the
model card's recipe and against the time to read the weights.

Every contender runs in a fresh Python process, timed from its spawn to the moment
it has a score (a marker line on stdout), with the weights in the page cache (the
file is read once first): the model card's transformers recipe
(``bench_qwen.Recipe``: tokenizer and ``AutoModelForCausalLM`` load, one forward),
``QwenReranker`` in bfloat16 and float32, ``memos-rerank rerank`` of one line on a
pipe (until the process exits), and two ways to read the weights: ``cat
model.safetensors > /dev/null`` (the bytes alone) and a Python process that imports
torch and reads every byte of the weights once through torch
(``safetensors.torch.load_file``, then the maximum of each tensor's bytes; nothing
copied): what any torch-based reranker pays before its first operation. The
contenders alternate within each round (the order rotates from round to round), and
each is reported by its best and median round, with its memory at its first score
(anonymous and file-backed resident memory, and the peak). ``--baseline-src`` adds
``QwenReranker`` run from another source tree (e.g. a ``git worktree`` of an earlier
commit), for A/B comparisons.

    PYTHONPATH=src python benchmarks/bench_first_score.py --repeats 5

writes ``benchmarks/results/bench_first_score-<machine>.json`` (``--out`` elsewhere);
``--smoke`` runs one round on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _common

BENCHMARKS = Path(__file__).resolve().parent
QUERY = "What are the user's hobbies?"
DOCUMENT = "User likes playing badminton on weekends."

# Each child prints "MARK <name> <seconds since spawn>" as it goes, and "SCORE <x>".
_CHILD_PRELUDE = """
import sys, time
START = float(sys.argv[1])
def mark(name):
    print("MARK", name, time.time() - START, flush=True)
def memory():
    fields = ("VmHWM", "RssAnon", "RssFile")
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in fields:
            print("MEMORY", key, int(value.split()[0]) / 1024, flush=True)
"""

_RECIPE_CHILD = (
    _CHILD_PRELUDE
    + """
import torch
mark("import_torch")
sys.path.insert(0, sys.argv[2])
from bench_qwen import Recipe
recipe = Recipe(sys.argv[3], getattr(torch, sys.argv[4]))
mark("loaded")
score = recipe(sys.argv[5], [sys.argv[6]])[0]
mark("scored")
print("SCORE", score, flush=True)
memory()
"""
)

_PACKAGE_CHILD = (
    _CHILD_PRELUDE
    + """
import torch
mark("import_torch")
from memos_rerank_integrations import QwenReranker
mark("import_package")
reranker = QwenReranker(sys.argv[3], dtype=sys.argv[4], device="cpu")
reranker._loaded()
mark("loaded")
score = reranker.rerank(sys.argv[5], [sys.argv[6]])[0].score
mark("scored")
print("SCORE", score, flush=True)
memory()
"""
)


_LOAD_CHILD = (
    _CHILD_PRELUDE
    + """
import torch
mark("import_torch")
from safetensors.torch import load_file
tensors = load_file(sys.argv[2])  # mapped: each byte is read below
touched = [t.reshape(-1).view(torch.uint8).max() for t in tensors.values()]
mark("read")
memory()
"""
)


def _first(result: dict[str, Any]) -> float:
    """Seconds from spawn to the child's first score (or, for a reader of the weights,
    to having them; for the CLI and ``cat``, to their exit)."""
    marks = result["marks"]
    return float(marks.get("scored", marks.get("read", result["exited"])))


def _run(command: list[str], *, env: dict[str, str], stdin: str | None = None) -> dict[str, Any]:
    """Run a child; its marks (seconds since spawn), score, and exit time."""
    start = time.time()
    done = subprocess.run(
        [part.replace("{START}", repr(start)) for part in command],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    exited = time.time() - start
    if done.returncode:
        raise RuntimeError(f"{command[:4]} failed:\n{done.stderr[-3000:]}")
    marks: dict[str, float] = {}
    memory: dict[str, float] = {}
    score = None
    for line in done.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["MARK"]:
            marks[parts[1]] = float(parts[2])
        elif parts[:1] == ["MEMORY"]:
            memory[parts[1] + "_mib"] = float(parts[2])
        elif parts[:1] == ["SCORE"]:
            score = float(parts[1])
    if not marks and done.stdout.lstrip().startswith("{"):  # the CLI's JSON
        score = json.loads(done.stdout)["results"][0]["score"]
    return {"marks": marks, "memory": memory, "score": score, "exited": exited}


def _summary(times: list[float]) -> dict[str, Any]:
    return {"min_s": min(times), "median_s": statistics.median(times), "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every child (OMP_NUM_THREADS; default: torch's own choice)",
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also time QwenReranker imported from this src directory (A/B)",
    )
    parser.add_argument(
        "--baseline-label", default=None, help="what the baseline is (e.g. its commit)"
    )
    _common.add_output_arguments(parser, "bench_first_score")
    args = parser.parse_args()

    from bench_qwen import DEFAULT_MODEL_DIR, build_model

    temporary = None
    if args.smoke:
        temporary = tempfile.TemporaryDirectory()
        model = build_model(Path(temporary.name) / "tiny", tiny=True)
        repeats = 1
    else:
        model = build_model(args.model or DEFAULT_MODEL_DIR)
        repeats = args.repeats
    weights = model / "model.safetensors"
    src = str(_common.REPO / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    package_env = {**env, "PYTHONPATH": src}
    python = sys.executable

    def recipe(dtype: str) -> list[str]:
        child = [_RECIPE_CHILD, "{START}", str(BENCHMARKS), str(model), dtype, QUERY, DOCUMENT]
        return [python, "-c", *child]

    def package(dtype: str) -> list[str]:
        return [python, "-c", _PACKAGE_CHILD, "{START}", "-", str(model), dtype, QUERY, DOCUMENT]

    cli = [python, "-m", "memos_rerank_integrations.cli", "rerank", "--query", QUERY]
    cli += ["--model", str(model), "--dtype", "bfloat16", "--device", "cpu"]

    contenders: dict[str, tuple[list[str], dict[str, str], str | None]] = {
        "recipe_bfloat16": (recipe("bfloat16"), package_env, None),
        "package_bfloat16": (package("bfloat16"), package_env, None),
        "cli_bfloat16": (cli, package_env, DOCUMENT + "\n"),
        "read_weights": (["sh", "-c", f"cat '{weights}' > /dev/null"], env, None),
        "load_weights": ([python, "-c", _LOAD_CHILD, "{START}", str(weights)], env, None),
        "recipe_float32": (recipe("float32"), package_env, None),
        "package_float32": (package("float32"), package_env, None),
    }
    if args.baseline_src is not None:
        baseline_env = {**env, "PYTHONPATH": str(args.baseline_src.resolve())}
        for dtype in ("bfloat16", "float32"):
            contenders[f"baseline_{dtype}"] = (
                package(dtype),
                baseline_env,
                None,
            )

    subprocess.run(["sh", "-c", f"cat '{weights}' > /dev/null"], check=True)  # page cache
    names = list(contenders)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            command, child_env, stdin = contenders[name]
            result = _run(command, env=child_env, stdin=stdin)
            runs[name].append(result)
            first = _first(result)
            print(f"round {round_index + 1}/{repeats} {name:18s} {first:7.2f} s", flush=True)

    results: dict[str, Any] = {}
    for name, rounds in runs.items():
        first = [_first(r) for r in rounds]
        entry = _summary(first)
        entry["exited_median_s"] = statistics.median(r["exited"] for r in rounds)
        phases = sorted({mark for r in rounds for mark in r["marks"]})
        if phases:
            entry["phases_median_s"] = {
                mark: statistics.median(r["marks"][mark] for r in rounds if mark in r["marks"])
                for mark in phases
            }
        if rounds[0]["memory"]:  # at the first score (VmHWM: the peak until then)
            entry["memory_at_first_score"] = rounds[0]["memory"]
        scores = [r["score"] for r in rounds if r["score"] is not None]
        if scores:
            entry["score"] = scores[0]
        results[name] = entry

    def ratio(a: str, b: str, key: str) -> float:
        return float(results[a][key] / results[b][key])

    ratios: dict[str, dict[str, float]] = {}
    pairs = [
        ("package_bfloat16", "recipe_bfloat16"),
        ("package_bfloat16", "read_weights"),
        ("cli_bfloat16", "recipe_bfloat16"),
        ("cli_bfloat16", "read_weights"),
        ("package_bfloat16", "load_weights"),
        ("cli_bfloat16", "load_weights"),
        ("package_float32", "recipe_float32"),
        ("package_float32", "read_weights"),
    ]
    if args.baseline_src is not None:
        pairs += [
            ("package_bfloat16", "baseline_bfloat16"),
            ("package_float32", "baseline_float32"),
        ]
    for a, b in pairs:
        ratios[f"{a}/{b}"] = {
            "min": ratio(a, b, "min_s"),
            "median": ratio(a, b, "median_s"),
        }
    score_diffs = {
        dtype: abs(results[f"package_{dtype}"]["score"] - results[f"recipe_{dtype}"]["score"])
        for dtype in ("bfloat16", "float32")
    }
    targets = {
        "first score <= 1.5x recipe (bf16, median)": ratios["package_bfloat16/recipe_bfloat16"][
            "median"
        ]
        <= 1.5,
        "first score <= 3x reading the weights (bf16, median)": ratios[
            "package_bfloat16/read_weights"
        ]["median"]
        <= 3,
        "cli <= 1.5x recipe (median)": ratios["cli_bfloat16/recipe_bfloat16"]["median"] <= 1.5,
        "cli <= 3x reading the weights (median)": ratios["cli_bfloat16/read_weights"]["median"]
        <= 3,
        "first score <= 3x reading the weights through torch (bf16, median)": ratios[
            "package_bfloat16/load_weights"
        ]["median"]
        <= 3,
        "cli <= 3x reading the weights through torch (median)": ratios["cli_bfloat16/load_weights"][
            "median"
        ]
        <= 3,
        "fp32 score within 1e-4 of the recipe": score_diffs["float32"] <= 1e-4,
    }

    print()
    for name, entry in results.items():
        print(f"{name:18s} min {entry['min_s']:7.2f} s  median {entry['median_s']:7.2f} s")
    for name, value in ratios.items():
        print(f"{name:42s} min {value['min']:.2f}x  median {value['median']:.2f}x")
    print(f"|score - recipe|: {score_diffs}")
    for name, met in targets.items():
        print(f"{'met ' if met else 'MISSED'} {name}")

    report = {
        "machine": {
            "cpu": _common.cpu_name(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average_at_start": list(os.getloadavg()),
            "python": sys.version.split()[0],
        },
        "model": str(model.name),
        "weights_bytes": weights.stat().st_size,
        "repeats": repeats,
        "baseline": None
        if args.baseline_src is None
        else {"src": str(args.baseline_src), "label": args.baseline_label},
        "results": results,
        "ratios": ratios,
        "score_abs_diff_vs_recipe": score_diffs,
        "targets": targets,
    }
    _common.write(_common.output_path(args, "bench_first_score"), report, _common.run_info())
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
