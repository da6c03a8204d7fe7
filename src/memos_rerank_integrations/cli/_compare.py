"""``memos-rerank compare``: documents through several backends, the orders side by
side with the input (vector) order, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._compare import compare
from .._configurable import provider_named
from ._input import Document, UserError, checked_query, read_documents
from ._options import (
    MAX_PATH_LENGTH,
    add_input_options,
    add_model_options,
    build_backend,
    positive_int,
    spellings,
)

__all__ = ["add_parser", "run"]

_KINDS = ("embedding", "qwen", "cross_encoder", "http", "memos", "cohere", "zero_entropy")
# Columns of one comparison.
MAX_BACKENDS = 16


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "compare",
        help="rerank documents with several backends and print the orders side by side",
        description="Rerank documents with one or more backends and print the orders side by "
        "side, the input (vector) order first. Documents come from --input (or stdin): one per "
        "line, or JSON lines with a string 'text' and an optional numeric 'score' (the vector "
        "score, shown in the first column).",
    )
    add_input_options(parser)
    parser.add_argument(
        "--backend",
        action="append",
        metavar="KIND[=MODEL_OR_URL]",
        help="a column; repeat for more (default: embedding). KIND is one of "
        f"{', '.join(spellings(_KINDS))}; MODEL is a Hugging Face id or a local directory "
        "(required for cross-encoder), http takes the server's base URL "
        "(http=http://127.0.0.1:8080). memos, cohere and zeroentropy read their API keys "
        f"from the environment. At most {MAX_BACKENDS} columns.",
    )
    parser.add_argument(
        "--top-n", type=positive_int, default=None, help="show the best N of each column"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_options(parser, instruction=False)
    parser.set_defaults(run=run)


def _backend(spec: str, args: argparse.Namespace) -> Any:
    if len(spec) > MAX_PATH_LENGTH:
        raise UserError(f"--backend is {len(spec)} characters long; at most {MAX_PATH_LENGTH}.")
    kind, _, target = spec.partition("=")
    provider = provider_named(kind.strip())
    if provider is None or provider.name not in _KINDS:
        raise UserError(
            f"Unknown backend {kind.strip()!r}; use one of: {', '.join(spellings(_KINDS))}."
        )
    return build_backend(
        provider.name, target.strip() or None, device=args.device, dtype=args.dtype
    )


def _vector_scores(documents: list[Document]) -> list[float] | None:
    """The JSON lines' numeric ``score`` fields, when every document has one."""
    scores = []
    for document in documents:
        score = (document.record or {}).get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return None
        # JSON input holds finite numbers a float can hold (see _input).
        scores.append(float(score))
    return scores


def run(args: argparse.Namespace) -> int:
    """``memos-rerank compare``: returns the process exit code."""
    query = checked_query(args.query, args.errors)
    specs = args.backend or ["embedding"]
    if len(specs) > MAX_BACKENDS:
        raise UserError(f"At most {MAX_BACKENDS} --backend columns, got {len(specs)}.")
    # Every option is checked (the backends built, no weights loaded) before any input
    # is read.
    rerankers = {spec: _backend(spec, args) for spec in specs}
    documents = read_documents(args.input, args.format, args.errors)
    texts = [document.text for document in documents]
    scores = _vector_scores(documents)
    if not texts:
        raise UserError("No documents to compare.")
    comparison = compare(
        query, texts, rerankers, vector_scores=scores, top_n=args.top_n, warm_up=True
    )
    if args.json:
        sys.stdout.write(json.dumps(comparison.to_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        sys.stdout.write(comparison.table() + "\n")
    sys.stdout.flush()
    return 0
