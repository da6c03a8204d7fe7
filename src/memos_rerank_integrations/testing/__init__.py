"""Tiny models with random weights, built offline, for tests, notebooks and benchmarks.

They go through the same ``save_pretrained`` / ``from_pretrained`` path as real
checkpoints, so the real loading code runs without downloading anything.
"""

from __future__ import annotations

from ._encoders import build_tiny_cross_encoder
from ._qwen import build_tiny_qwen_reranker

__all__ = ["build_tiny_cross_encoder", "build_tiny_qwen_reranker"]
