"""The rerank server under 32 concurrent clients, with and without micro-batching.

The server is the real ``memos-rerank serve`` process serving a Qwen3-0.6B-shaped
model with random weights (built offline once, as in ``bench_qwen.py``). For each
mode (batching on / off) and workload, 32 clients start together and each sends
``--rounds`` requests back to back to ``POST /v2/rerank``:

- ``small``: 1-4 short memories per request;
- ``memory``: 20 memories per request (a typical agent-memory recall).

Meanwhile a probe calls ``GET /health`` every 50 ms. Reported: requests/s and
documents/s over the whole run, request latency p50/p99, and /health p50/p99/max.

    PYTHONPATH=src python benchmarks/bench_server.py

writes ``benchmarks/results/bench_server-<machine>.json`` (``--out`` elsewhere).
``--clients``, ``--small-rounds`` and ``--memory-rounds`` set the load; ``--smoke``
runs 2 clients on a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
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
import bench_qwen  # noqa: E402  (the shared model shape, word list and model builder)


@dataclass
class Result:
    mode: str
    workload: str
    clients: int
    requests: int
    documents: int
    seconds: float
    requests_per_s: float
    documents_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    health_p50_ms: float
    health_p99_ms: float
    health_max_ms: float
    health_samples: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def make_requests(
    workload: str, clients: int, rounds: int, seed: int
) -> list[list[tuple[str, list[str]]]]:
    rng = random.Random(seed)
    per_client = []
    for _ in range(clients):
        calls = []
        for _ in range(rounds):
            size = rng.randint(1, 4) if workload == "small" else 20
            query = bench_qwen.sentence(rng, 6, 10)
            calls.append((query, [bench_qwen.sentence(rng, 3, 18) for _ in range(size)]))
        per_client.append(calls)
    return per_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """``memos-rerank serve`` as a subprocess."""

    def __init__(
        self, model: Path, *, batching: bool, dtype: str | None, max_batch_documents: int | None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "memos_rerank_integrations.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        if not batching:
            command.append("--no-batching")
        if dtype:
            command += ["--dtype", dtype]
        if max_batch_documents:
            command += ["--max-batch-documents", str(max_batch_documents)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(command, env=env)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(30)


async def run_scenario(
    url: str, mode: str, workload: str, calls: list[list[tuple[str, list[str]]]]
) -> Result:
    latencies: list[float] = []
    health: list[float] = []
    limits = httpx.Limits(max_connections=len(calls) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

        async def one_client(own: list[tuple[str, list[str]]]) -> None:
            for query, documents in own:
                started = time.perf_counter()
                body = {"model": "bench", "query": query, "documents": documents}
                response = await client.post("/v2/rerank", json=body)
                response.raise_for_status()
                assert len(response.json()["results"]) == len(documents)
                latencies.append(time.perf_counter() - started)

        async def probe(stop: asyncio.Event) -> None:
            while not stop.is_set():
                started = time.perf_counter()
                (await client.get("/health")).raise_for_status()
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        prober = asyncio.create_task(probe(stop))
        started = time.perf_counter()
        await asyncio.gather(*(one_client(own) for own in calls))
        seconds = time.perf_counter() - started
        stop.set()
        await prober
    requests = sum(len(own) for own in calls)
    documents = sum(len(docs) for own in calls for _, docs in own)
    return Result(
        mode=mode,
        workload=workload,
        clients=len(calls),
        requests=requests,
        documents=documents,
        seconds=round(seconds, 2),
        requests_per_s=round(requests / seconds, 3),
        documents_per_s=round(documents / seconds, 2),
        latency_p50_ms=round(percentile(latencies, 50) * 1000, 1),
        latency_p99_ms=round(percentile(latencies, 99) * 1000, 1),
        health_p50_ms=round(percentile(health, 50) * 1000, 2),
        health_p99_ms=round(percentile(health, 99) * 1000, 2),
        health_max_ms=round(max(health) * 1000, 2),
        health_samples=len(health),
    )


def table(results: list[Result]) -> str:
    lines = [
        "| workload | mode | requests | req/s | docs/s | p50 ms | p99 ms | /health p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.mode} | {r.requests} | {r.requests_per_s:.2f} | "
            f"{r.documents_per_s:.1f} | {r.latency_p50_ms:.0f} | {r.latency_p99_ms:.0f} | "
            f"{r.health_p99_ms:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=bench_qwen.DEFAULT_MODEL_DIR)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--small-rounds", type=int, default=2)
    parser.add_argument("--memory-rounds", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="server dtype (default: per device)")
    parser.add_argument(
        "--max-batch-documents", type=int, default=None, help="server option (default: its own)"
    )
    parser.add_argument("--modes", default="batching,single", help="batching and/or single")
    parser.add_argument("--workloads", default="small,memory")
    _common.add_output_arguments(parser, "bench_server")
    args = parser.parse_args()
    run = _common.run_info()
    out = _common.output_path(args, "bench_server")
    if args.smoke:
        args.clients, args.small_rounds, args.memory_rounds = 2, 1, 1
        with tempfile.TemporaryDirectory() as directory:
            results = measure(args, bench_qwen.build_model(Path(directory), tiny=True))
    else:
        results = measure(args, bench_qwen.build_model(args.model_dir))
    print(table(results))
    import torch

    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cuda": torch.cuda.is_available(),
    }
    _common.write(out, {"environment": environment, "results": [asdict(r) for r in results]}, run)


def measure(args: argparse.Namespace, model: Path) -> list[Result]:
    rounds = {"small": args.small_rounds, "memory": args.memory_rounds}
    results: list[Result] = []
    for batching in (mode == "batching" for mode in args.modes.split(",")):
        mode = "micro-batching" if batching else "one at a time"
        server_options = {"dtype": args.dtype, "max_batch_documents": args.max_batch_documents}
        with Server(model, batching=batching, **server_options) as server:
            # Not measured: the first forward passes of each shape are slow (kernel
            # selection, allocator growth).
            for workload in ("small", "memory"):
                warm_up = make_requests(workload, 4, 1, seed=1)
                asyncio.run(run_scenario(server.url, mode, workload, warm_up))
            for workload in args.workloads.split(","):
                calls = make_requests(workload, args.clients, rounds[workload], seed=7)
                result = asyncio.run(run_scenario(server.url, mode, workload, calls))
                print(json.dumps(asdict(result)), flush=True)
                results.append(result)
    results.sort(key=lambda r: (r.workload, r.mode))
    return results


if __name__ == "__main__":
    main()
