"""Run as a child process by the QwenReranker memory test: the peak resident memory
(VmHWM) one rerank call of a long document adds, over the RSS just before it, in MiB.

    python tests/support/qwen_memory_child.py MODEL_DIR MAX_BATCH_TOKENS REPEATS
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    import torch

    from memos_rerank_integrations import QwenReranker

    model, budget, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    reranker = QwenReranker(
        model, dtype="float32", device="cpu", max_batch_tokens=budget, max_length=10**6
    )
    query = "Which animal jumps?"
    reranker.rerank("warm up", ["a short memory", "another one"])
    document = "The quick brown fox jumps over the lazy dog; " * repeats
    tokens = reranker.count_tokens(query, [document])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    (result,) = reranker.rerank(query, [document])
    peak = _status("VmHWM") - before
    report = {"tokens": tokens, "peak_extra_mib": peak / 2**20, "score": result.score}
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
