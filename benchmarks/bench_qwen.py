"""QwenReranker vs the Qwen3-Reranker model card recipe, on a Qwen3-0.6B-shaped model.

The model has Qwen3-Reranker-0.6B's shape (28 layers, hidden 1024, 16 query / 8 KV
heads, head_dim 128, intermediate 3072, vocab 151,669, tied embeddings) and random
weights, built offline by ``memos_rerank_integrations.testing``; its tokenizer is a
small byte-level BPE trained on the benchmark's word list, so whole words are single
tokens as in the real vocabulary. Both sides score the same inputs at the same dtype
in one process, interleaved per round (best round of each).

    PYTHONPATH=src python benchmarks/bench_qwen.py --threads 1 --repeats 2

writes ``benchmarks/results/bench_qwen-<machine>.json`` (``--out`` elsewhere); the model
is built once into ``benchmarks/.models/``. ``--smoke`` runs one round on a tiny model.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import _common

from memos_rerank_integrations import QwenReranker
from memos_rerank_integrations._engine.cpu import cpu_has_amx
from memos_rerank_integrations._engine.linear import can_prepack
from memos_rerank_integrations._local.runtime import clear_model_cache, resolve_dtype
from memos_rerank_integrations._qwen_prompt import DEFAULT_INSTRUCTION, PROMPT_PREFIX, PROMPT_SUFFIX

QWEN3_06B_SHAPE = {
    "vocab_size": 151669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}

_WORD_LIST = """
user likes prefers playing badminton tennis coffee tea morning evening weekend travel trip
beijing hangzhou shanghai meeting project deadline backend developer frontend python rust
music jazz piano guitar books science fiction space exploration movies restaurant dinner
vegetarian spicy food noodles dumplings baijiu moutai wine beer allergy peanuts doctor
appointment tuesday wednesday friday sunday january march july october birthday sister
brother mother father friend colleague manager team office remote home apartment rent
budget savings salary bank card password login mobile app issue support ticket reply
concise detailed summary report slides presentation conference paper review deadline
gym running swimming yoga hiking mountain beach camera photos painting garden plants
cat dog vet walk park city train flight hotel booking visa passport language chinese
english spanish learning course exam study notes podcast news weather rain snow sunny
the a an of to in on at for with about from by and or but is was are were has have
had will would can could should this that these those my your his her their our it
"""
WORDS = _WORD_LIST.split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + "."


def make_workloads(seed: int) -> dict[str, list[tuple[str, list[str]]]]:
    rng = random.Random(seed)
    return {
        "memory": [(sentence(rng, 6, 10), [sentence(rng, 3, 18) for _ in range(20)])],
        "rag": [(sentence(rng, 6, 10), [sentence(rng, 60, 160) for _ in range(12)])],
        "one_memory": [(sentence(rng, 6, 10), [sentence(rng, 3, 18)]) for _ in range(6)],
    }


DEFAULT_MODEL_DIR = _common.MODELS / "qwen3-0.6b-shaped"


def build_model(directory: Path, *, tiny: bool = False) -> Path:
    """The benchmark model in ``directory`` (built there if missing): Qwen3-0.6B's
    shape, or with ``tiny`` the small default shape of the testing helper."""
    if (directory / "config.json").exists():
        return directory
    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    rng = random.Random(1234)
    texts = [sentence(rng, 5, 40) for _ in range(3000)] + [DEFAULT_INSTRUCTION] * 20
    if tiny:
        return build_tiny_qwen_reranker(directory, tokenizer_vocab_size=1024, training_texts=texts)
    return build_tiny_qwen_reranker(
        directory, tokenizer_vocab_size=4096, training_texts=texts, **QWEN3_06B_SHAPE
    )


class Recipe:
    """The model card's transformers code (tokenize, left pad, full logits, [no, yes])."""

    def __init__(self, path: Path, dtype: torch.dtype, max_length: int = 8192) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.max_length = max_length
        self.prefix = self.tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")

    def __call__(self, query: str, documents: Sequence[str]) -> list[float]:
        pairs = [
            f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
            for doc in documents
        ]
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix) - len(self.suffix),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix + ele + self.suffix
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**inputs).logits[:, -1, :]
        pair = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
        scores: list[float] = torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()
        return scores


class CardPromptCrossEncoder:
    """sentence-transformers' ``CrossEncoder`` on the same checkpoint (it scores a
    ``*ForCausalLM`` with yes/no tokens by its ``LogitScore`` module), fed the model
    card's prompt as the pair (prompt prefix + instruction + query, document +
    suffix): the same token ids as the recipe, so the same scores."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(path), device="cpu", model_kwargs={"dtype": dtype})

    def __call__(self, query: str, documents: Sequence[str]) -> list[float]:
        head = f"{PROMPT_PREFIX}<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>:"
        pairs = [(head, f" {document}{PROMPT_SUFFIX}") for document in documents]
        return [float(score) for score in self.model.predict(pairs, batch_size=32)]


def package_scores(reranker: QwenReranker) -> Callable[[str, Sequence[str]], list[float]]:
    def run(query: str, documents: Sequence[str]) -> list[float]:
        scores = [0.0] * len(documents)
        for result in reranker.rerank(query, documents):
            scores[result.index] = result.score
        return scores

    return run


def reset_peak_rss() -> None:
    # Linux: "5" resets the process's peak resident set size (VmHWM).
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(
    score: Callable[[str, Sequence[str]], list[float]],
    calls: list[tuple[str, list[str]]],
    repeats: int,
) -> tuple[float, list[list[float]], float]:
    """Best wall time of the whole workload over ``repeats``; scores; peak RSS above
    the RSS before the run (the run's working memory, weights excluded)."""
    # Give memory freed by the previous run back to the OS first, so the baseline is honest.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = rss_mib("VmRSS")
    reset_peak_rss()
    best = float("inf")
    scores: list[list[float]] = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores = [score(query, documents) for query, documents in calls]
        best = min(best, time.perf_counter() - start)
    return best, scores, rss_mib("VmHWM") - baseline


def gemm_rate(dtype: torch.dtype, rows: int = 1024) -> float:
    """FLOP/s of a [rows x 1024] @ [1024 x 3072] matmul (the model's MLP shape), best
    of five trials, by the fastest way this torch has: ``torch.mm``, or oneDNN's
    prepacked linear (what the package runs on CPU), whichever is faster here."""
    a = torch.randn(rows, 1024, dtype=dtype)
    b = torch.randn(1024, 3072, dtype=dtype)
    ways: list[Callable[[], object]] = [lambda: a @ b]
    if can_prepack(b):
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), None)
        ways.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    best = float("inf")
    for way in ways:
        for _ in range(3):
            way()
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                way()
            best = min(best, time.perf_counter() - start)
    return 2 * rows * 1024 * 3072 * 4 / best


def unique_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Distinct token positions (nodes of the prefix trie of the recipe's sequences):
    the least any exact method must run through the model."""
    prefixes: set[tuple[int, ...]] = set()
    for sequence in sequences:
        for end in range(1, len(sequence) + 1):
            prefixes.add(tuple(sequence[:end]))
    return len(prefixes)


def non_embedding_parameters(path: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    return total - model.get_input_embeddings().weight.numel()


def top5(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:5]


def compare(a: list[list[float]], b: list[list[float]]) -> dict[str, Any]:
    """Max |a - b|, whether every call keeps its top-5 order, and the smallest gap
    between neighbours of ``b``'s top six (a drift above it can swap them)."""
    diff = max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))
    same_top5 = all(top5(xs) == top5(ys) for xs, ys in zip(a, b, strict=True))
    gaps = [
        high - low for ys in b for high, low in itertools.pairwise(sorted(ys, reverse=True)[:6])
    ]
    return {
        "max_abs_diff": diff,
        "same_top5": same_top5,
        "smallest_top_gap": min(gaps, default=float("nan")),
    }


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "cpu": info.get("Model name", "?").strip(),
        "cpus": info.get("CPU(s)", "?").strip(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # bf16 matrix instructions: AMX tiles, or AVX-512 BF16 dot products.
        "amx_tiles": cpu_has_amx(),
        "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    _common.add_output_arguments(parser, "bench_qwen")
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated; bfloat16 is skipped (with a message) on CPUs without native "
        "bf16 matrix units unless --force-bf16",
    )
    parser.add_argument("--force-bf16", action="store_true")
    parser.add_argument("--workloads", default="memory,rag,one_memory")
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler top ops of one package call"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 avoids OpenMP stalls when other jobs share the cores)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = _common.run_info()
    args.out = _common.output_path(args, "bench_qwen")
    if args.smoke:
        args.repeats = 1
        with tempfile.TemporaryDirectory() as directory:
            return measure(args, run, build_model(Path(directory), tiny=True))
    return measure(args, run, build_model(args.model_dir))


def measure(args: argparse.Namespace, run: dict[str, Any], path: Path) -> None:
    started = time.perf_counter()
    gemm_rows = 128 if args.smoke else 1024
    workloads = make_workloads(args.seed)
    report: dict[str, Any] = {"machine": machine(), "results": {}}
    print(json.dumps(report["machine"]))

    parameters = non_embedding_parameters(path)
    report["non_embedding_parameters"] = parameters
    default_dtype = resolve_dtype(None, torch.device("cpu"))
    report["default_dtype"] = str(default_dtype)

    reference: dict[str, list[list[float]]] = {}
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    wanted = args.workloads.split(",")
    workloads = {name: calls for name, calls in workloads.items() if name in wanted}
    native_bf16 = default_dtype == torch.bfloat16
    if torch.bfloat16 in dtypes and not native_bf16 and not args.force_bf16:
        dtypes.remove(torch.bfloat16)
        small = torch.randn(256, 256, dtype=torch.bfloat16)
        start = time.perf_counter()
        small @ small
        bf16_rate = 2 * 256**3 / (time.perf_counter() - start)
        report["bfloat16_skipped"] = (
            "this CPU has no native bf16 matrix units (no avx512_bf16 / AMX): bf16 matmuls "
            f"run at {bf16_rate / 1e9:.2f} GFLOP/s here, against "
            f"{gemm_rate(torch.float32, gemm_rows) / 1e9:.1f} GFLOP/s in fp32"
        )
        print("bfloat16 skipped:", report["bfloat16_skipped"], flush=True)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        recipe = Recipe(path, dtype)
        try:
            card_st: CardPromptCrossEncoder | None = CardPromptCrossEncoder(path, dtype)
        except ImportError as exc:
            card_st = None
            report["sentence_transformers"] = f"skipped: {exc}"
        reranker = QwenReranker(path, dtype=dtype, device="cpu")
        scorer = reranker._loaded()
        recipe("warm up", ["a short memory"])
        if card_st is not None:
            card_st("warm up", ["a short memory"])
        reranker.rerank("warm up", ["a short memory"])  # fills the instruction cache
        package = package_scores(reranker)
        rates = []
        report["results"][name] = {}
        for workload, calls in workloads.items():
            # Interleaved, best of each: the machine is shared, so load changes over time.
            recipe_run: tuple[float, list[list[float]], float] = (float("inf"), [], 0.0)
            package_run: tuple[float, list[list[float]], float] = (float("inf"), [], 0.0)
            st_run: tuple[float, list[list[float]], float] = (float("inf"), [], 0.0)
            for _ in range(1 if workload == "rag" else args.repeats):
                rates.append(gemm_rate(dtype, gemm_rows))
                recipe_run = min(recipe_run, timed(recipe, calls, 1), key=lambda run: run[0])
                package_run = min(package_run, timed(package, calls, 2), key=lambda run: run[0])
                if card_st is not None:
                    st_run = min(st_run, timed(card_st, calls, 1), key=lambda run: run[0])
            r_seconds, r_scores, r_peak = recipe_run
            seconds, scores, peak = package_run
            pairs = sum(len(documents) for _, documents in calls)
            sequences = [
                sequence
                for query, documents in calls
                for sequence in reranker._tokenize(scorer.tokens, [(query, documents)])[
                    0
                ].sequences()
            ]
            rate = max(rates)
            floor = unique_tokens(sequences) * 2 * parameters / rate
            entry = {
                "pairs": pairs,
                "recipe_s": r_seconds,
                "package_s": seconds,
                "recipe_pairs_per_s": pairs / r_seconds,
                "package_pairs_per_s": pairs / seconds,
                "speedup": r_seconds / seconds,
                "recipe_tokens": sum(len(s) for s in sequences),
                "unique_tokens": unique_tokens(sequences),
                "gemm_tflops": rate / 1e12,
                "floor_s": floor,
                "fraction_of_floor": floor / seconds,
                "recipe_peak_extra_mib": r_peak,
                "package_peak_extra_mib": peak,
                "vs_recipe_same_dtype": compare(scores, r_scores),
            }
            if card_st is not None:
                entry["st_card_prompt_s"] = st_run[0]
                entry["st_card_prompt_pairs_per_s"] = pairs / st_run[0]
                entry["speedup_vs_st"] = st_run[0] / seconds
                entry["st_vs_recipe"] = compare(st_run[1], r_scores)
            if args.profile:
                entry["profile"] = profile_call(package, calls)
            if dtype == torch.float32:
                reference[workload] = r_scores
            elif workload in reference:  # drift needs the fp32 run of the same invocation
                entry["vs_recipe_fp32"] = compare(scores, reference[workload])
                entry["recipe_bf16_vs_recipe_fp32"] = compare(r_scores, reference[workload])
            report["results"][name][workload] = entry
            print(
                f"[{name}] {workload:10s} recipe {r_seconds:8.3f} s  package {seconds:8.3f} s  "
                f"ST {st_run[0]:8.3f} s  "
                f"x{entry['speedup']:.2f}  floor {entry['fraction_of_floor']:.0%}  "
                f"peak +{r_peak:.0f}/+{peak:.0f} MiB  "
                f"diff {entry['vs_recipe_same_dtype']['max_abs_diff']:.2e}",
                flush=True,
            )
        del recipe, reranker, scorer, package, card_st
        clear_model_cache()
        gc.collect()

    # The package's default dtype vs the recipe as the model card runs it on CPU (fp32).
    if default_dtype == torch.float32 or "memory" not in reference:
        return finish(report, args, run, started)
    default = QwenReranker(path, device="cpu")
    default.rerank("warm up", ["a short memory"])
    seconds, scores, _ = timed(package_scores(default), workloads["memory"], args.repeats + 1)
    fp32_recipe = report["results"]["float32"]["memory"]["recipe_s"]
    report["default_vs_recipe_fp32_memory"] = {
        "dtype": str(default_dtype),
        "package_s": seconds,
        "recipe_fp32_s": fp32_recipe,
        "speedup": fp32_recipe / seconds,
        **compare(scores, reference["memory"]),
    }
    print(f"[default={default_dtype}] memory x{fp32_recipe / seconds:.2f} vs recipe fp32")
    del default
    clear_model_cache()
    gc.collect()
    finish(report, args, run, started)


def profile_call(
    score: Callable[[str, Sequence[str]], list[float]], calls: list[tuple[str, list[str]]]
) -> list[dict[str, Any]]:
    """torch.profiler's top ops by self CPU time over one run of the workload."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for query, documents in calls:
            score(query, documents)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1000,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:10]
    ]


def finish(
    report: dict[str, Any], args: argparse.Namespace, run: dict[str, Any], started: float
) -> None:
    report["total_s"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    print(f"total {report['total_s']:.0f} s")
    table = markdown(report)  # also settles each fraction of the floor on the run's best rate
    _common.write(args.out, report, run)
    print(table)


def gap_text(gap: float) -> str:
    return "n/a (one document per call)" if gap != gap else f"{gap:.2e}"


def markdown(report: dict[str, Any]) -> str:
    """The results as markdown tables (printed at the end of a run)."""
    lines = [
        "| dtype | workload | pairs | recipe pairs/s | ST (card prompt) pairs/s "
        "| package pairs/s | vs recipe | vs ST "
        "| unique / recipe tokens | floor reached | max abs diff vs recipe "
        "| peak extra MiB recipe / package |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, results in report["results"].items():
        # The best GEMM rate seen for this dtype anywhere in the run: on a shared machine
        # a single measurement can land in a busy moment and overstate the fraction.
        rate = max(r["gemm_tflops"] for r in results.values()) * 1e12
        for workload, r in results.items():
            floor = r["unique_tokens"] * 2 * report["non_embedding_parameters"] / rate
            r["fraction_of_floor"] = floor / r["package_s"]
            st = r.get("st_card_prompt_pairs_per_s")
            vs_st = f"{r['speedup_vs_st']:.2f}x" if st is not None else "n/a"
            lines.append(
                f"| {dtype} | {workload} | {r['pairs']} | {r['recipe_pairs_per_s']:.2f} "
                f"| {st if st is None else f'{st:.2f}'} "
                f"| {r['package_pairs_per_s']:.2f} | {r['speedup']:.2f}x | {vs_st} "
                f"| {r['unique_tokens']} / {r['recipe_tokens']} "
                f"| {r['fraction_of_floor']:.0%} | {r['vs_recipe_same_dtype']['max_abs_diff']:.1e} "
                f"| {r['recipe_peak_extra_mib']:.0f} / {r['package_peak_extra_mib']:.0f} |"
            )
    if "bfloat16" in report["results"]:
        lines.append("")
        lines.append(
            "| bf16 vs fp32 recipe | max abs diff | same top-5 order "
            "| smallest gap in the fp32 top 6 |"
        )
        lines.append("|---|---|---|---|")
        for workload, r in report["results"]["bfloat16"].items():
            for label, key in (
                ("package bf16", "vs_recipe_fp32"),
                ("recipe bf16", "recipe_bf16_vs_recipe_fp32"),
            ):
                if key not in r:
                    continue
                lines.append(
                    f"| {label}, {workload} | {r[key]['max_abs_diff']:.2e} "
                    f"| {r[key]['same_top5']} | {gap_text(r[key]['smallest_top_gap'])} |"
                )
    default = report.get("default_vs_recipe_fp32_memory")
    if default:
        lines.append("")
        lines.append(
            f"Package default dtype ({default['dtype']}) vs the recipe in fp32, memory "
            f"workload: **{default['speedup']:.1f}x**; max abs diff "
            f"{default['max_abs_diff']:.2e}, same top-5 order: {default['same_top5']}."
        )
    gemm = ", ".join(
        f"{dtype} {max(r['gemm_tflops'] for r in results.values()) * 1e3:.1f} GFLOP/s"
        for dtype, results in report["results"].items()
    )
    lines.append(f"GEMM rate measured in the run (best): {gemm}.")
    if "bfloat16_skipped" in report:
        lines.append(f"bfloat16 not run: {report['bfloat16_skipped']}.")
    for dtype, results in report["results"].items():
        for workload, r in results.items():
            if "profile" in r:
                lines.append("")
                lines.append(f"Top ops by self CPU time, one {workload} run, {dtype}:")
                lines.append("")
                lines.append("| op | self ms | share | calls |")
                lines.append("|---|---|---|---|")
                for op in r["profile"]:
                    lines.append(
                        f"| `{op['op']}` | {op['self_ms']:.0f} | {op['share']:.1%} "
                        f"| {op['calls']} |"
                    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
