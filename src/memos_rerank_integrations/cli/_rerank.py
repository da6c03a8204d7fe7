"""``memos-rerank rerank``: documents from a file or stdin, ranked, as JSON on stdout."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, TextIO

from .._types import Reranker, RerankResult
from ._input import Document, UserError, checked_query, input_name, read_documents
from ._options import (
    MAX_PATH_LENGTH,
    add_input_options,
    add_model_options,
    backend_choice,
    build_backend,
    checked_instruction,
    positive_int,
    spellings,
    text_of_at_most,
)

__all__ = ["add_parser", "run"]

RERANK_BACKENDS = ("qwen", "cross_encoder", "embedding")
# Documents are scored in chunks of this size so progress can be shown; results
# do not depend on it (every backend scores documents independently).
_CHUNK = 64


def add_parser(commands: Any) -> None:
    rerank = commands.add_parser(
        "rerank",
        help="rerank documents from a file or stdin and print ranked JSON",
        description="Read documents from --input (or stdin) and print the ranking as JSON "
        "on stdout. Formats: 'lines' (one document per line; blank lines are skipped) or "
        "'jsonl' (one JSON object per line with a string 'text' field; other fields are "
        "echoed as 'record'). 'auto' (default) picks jsonl for *.jsonl / *.ndjson files "
        "or when the first non-blank line is a JSON object, else lines.",
    )
    add_input_options(rerank)
    rerank.add_argument(
        "--backend",
        type=backend_choice(RERANK_BACKENDS),
        default="qwen",
        help=f"{', '.join(spellings(RERANK_BACKENDS))} (default: qwen)",
    )
    rerank.add_argument(
        "--model",
        type=text_of_at_most(MAX_PATH_LENGTH),
        help="Hugging Face id or local directory (default: Qwen/Qwen3-Reranker-0.6B for qwen, "
        "the packaged all-MiniLM-L6-v2 for embedding; required for cross-encoder)",
    )
    add_model_options(rerank)
    rerank.add_argument("--top-n", type=positive_int, default=None)
    rerank.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr for long inputs"
    )
    rerank.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    query = checked_query(args.query, args.errors)
    # Every option is checked (the backend built, its weights not loaded) before any
    # input is read.
    backend = build_backend(
        args.backend,
        args.model,
        device=args.device,
        dtype=args.dtype,
        instruction=checked_instruction(args),
    )
    documents = read_documents(args.input, args.format, args.errors)
    if not documents:
        raise UserError(f"No documents in {input_name(args.input)}.")
    texts = [document.text for document in documents]
    results = _score_with_progress(backend, query, texts, show=not args.no_progress)
    del texts
    if args.top_n is not None:
        results = results[: args.top_n]
    output = {
        "query": query,
        "backend": args.backend,
        "model": getattr(backend, "model", args.model),
        "results": [
            _result_json(rank, result, documents) for rank, result in enumerate(results, 1)
        ],
    }
    # Streamed: a huge document is written as it is encoded, not copied into one string.
    json.dump(output, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _result_json(rank: int, result: RerankResult, documents: list[Document]) -> dict[str, Any]:
    document = documents[result.index]
    item: dict[str, Any] = {
        "rank": rank,
        "index": result.index,
        "line": document.line,
        "score": result.score,
        "stage": result.stage.label,
        "text": document.text,
    }
    if document.record is not None:
        item["record"] = document.record
    return item


def _score_with_progress(
    backend: Reranker, query: str, texts: list[str], *, show: bool
) -> list[RerankResult]:
    progress = _Progress(len(texts), sys.stderr) if show and len(texts) > _CHUNK else None
    results: list[RerankResult] = []
    for start in range(0, len(texts), _CHUNK):
        chunk = backend.rerank(query, texts[start : start + _CHUNK])
        results.extend(
            RerankResult(index=start + r.index, score=r.score, stage=r.stage) for r in chunk
        )
        if progress is not None:
            progress(len(chunk))
    if progress is not None:
        progress(0, done=True)
    results.sort(key=lambda result: (-result.score, result.index))
    return results


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain counter."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = total
        self._count = 0
        self._stream = stream
        self._bar: Any = None
        try:
            tqdm = importlib.import_module("tqdm").tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="doc", desc="reranking", file=stream, leave=False)

    def __call__(self, step: int, *, done: bool = False) -> None:
        self._count += step
        if self._bar is not None:
            self._bar.update(step)
            if done:
                self._bar.close()
        elif done:
            self._stream.write("\n")
        else:
            self._stream.write(f"\rreranking: {self._count}/{self._total} documents")
        self._stream.flush()
