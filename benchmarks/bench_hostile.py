"""What hostile input costs the server and the CLI: time, answer and memory.

Each scenario runs the real ``memos-rerank`` command in a subprocess, with the
tiny offline Qwen3 model of ``memos_rerank_integrations.testing``:

- ``amplify``: ``memos-rerank serve`` with its defaults; one 105 kB request (a
  100 kB query and 400 one-character documents, so every document is scored
  with the whole query). Reported: status, seconds to the answer, the server's
  RSS before and after, and its peak RSS (VmHWM) growth.
- ``amplify-no-budget``: the same with ``--max-request-tokens none``, so the
  request is scored (bounded by the query cap, ``--max-query-tokens 2048``, and
  by how the backend tokenizes).
- ``cli-baseline``: the same with an empty first line (the process without the line);
- ``cli-line``: ``memos-rerank rerank`` reading one 50 MB line, with a model path
  that does not exist, so it stops right after reading: the CLI's own memory for
  the line (peak RSS of the process), without the model.
- ``cli-line-qwen``: the same line scored by the tiny Qwen model (peak RSS).

    PYTHONPATH=src python benchmarks/bench_hostile.py --timeout 300

writes ``benchmarks/results/bench_hostile-<machine>.json`` (``--out`` elsewhere).
``--smoke`` uses a 1 MiB line instead of 50 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

import _common

WORDS = ("memory", "hobby", "badminton", "travel", "Beijing", "user", "prefers", "tea")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def amplifying_body() -> dict[str, Any]:
    query = " ".join(WORDS[i % len(WORDS)] for i in range(20_000))[:100_000]
    return {"query": query, "documents": ["x"] * 400}


def serve(model: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "memos_rerank_integrations.cli", "serve"]
    command += ["--model", str(model), "--port", str(port), "--log-level", "warning", *extra]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        before = rss_kib(process.pid)
        body = amplifying_body()
        size = len(json.dumps(body))
        started = time.perf_counter()
        try:
            response = httpx.post(f"{url}/rerank", json=body, timeout=timeout)
            status: int | str = response.status_code
            message = response.json().get("message", "")[:160] if status != 200 else ""
        except httpx.TimeoutException:
            status, message = "client timeout", f"no answer within {timeout:g} s"
        seconds = time.perf_counter() - started
        after = rss_kib(process.pid)
        return {
            "request_bytes": size,
            "status": status,
            "message": message,
            "seconds": round(seconds, 2),
            "rss_before_mib": round(before["VmRSS"] / 1024, 1),
            "rss_after_mib": round(after["VmRSS"] / 1024, 1),
            "peak_growth_mib": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
        }
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def cli_line(model: str, megabytes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "line.txt"
        with path.open("w") as stream:
            chunk = " ".join(WORDS) + " "
            stream.write((chunk * (megabytes * 1024 * 1024 // len(chunk) + 1))[: megabytes << 20])
            stream.write("\nsecond document\n")
        command = [sys.executable, "-m", "memos_rerank_integrations.cli", "rerank"]
        command += ["--query", "hobbies", "--input", str(path), "--model", model]
        command += ["--dtype", "float32", "--no-progress"]
        started = time.perf_counter()
        with (Path(directory) / "err").open("w+b") as err:
            process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            err.seek(0)
            stderr = err.read().decode(errors="replace").strip()
        seconds = time.perf_counter() - started
    return {
        "line_mib": megabytes,
        "exit": process.returncode,
        "stderr": stderr[-200:],
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios", default="cli-baseline,cli-line,amplify,amplify-no-budget,cli-line-qwen"
    )
    parser.add_argument("--line-mib", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=600.0)
    _common.add_output_arguments(parser, "bench_hostile")
    args = parser.parse_args()
    run = _common.run_info()
    out = _common.output_path(args, "bench_hostile")
    if args.smoke:
        args.line_mib = 1

    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        model = build_tiny_qwen_reranker(Path(directory) / "tiny-qwen")
        for scenario in args.scenarios.split(","):
            if scenario == "amplify":
                result = serve(model, [], args.timeout)
            elif scenario == "amplify-no-budget":
                result = serve(model, ["--max-request-tokens", "none"], args.timeout)
            elif scenario == "cli-baseline":
                result = cli_line("/no/such/model", 0)
            elif scenario == "cli-line":
                result = cli_line("/no/such/model", args.line_mib)
            elif scenario == "cli-line-qwen":
                result = cli_line(str(model), args.line_mib)
            else:
                raise SystemExit(f"unknown scenario {scenario!r}")
            print(json.dumps({scenario: result}), flush=True)
            results[scenario] = result
    environment = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
    }
    _common.write(out, {"environment": environment, **results}, run)


if __name__ == "__main__":
    main()
