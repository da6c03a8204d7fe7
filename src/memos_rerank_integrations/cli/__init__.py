"""The ``memos-rerank`` command: ``serve`` a local model over HTTP, ``rerank`` from
the shell, and ``demo`` (each a subcommand of one ``argparse`` parser).

User errors (bad model path, unreadable input, bad options) end with a one-line
message on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .._exceptions import RerankError
from .._types import Reranker, RerankResult
from ._input import Document as _Document
from ._input import UserError as _UserError
from ._input import clean_text as _clean_text
from ._input import input_name as _input_name
from ._input import read_documents as _read_documents

__all__ = ["API_KEY_ENV", "main"]

API_KEY_ENV = "MEMOS_RERANK_API_KEY"

_PROG = "memos-rerank"
# MemOS caps queries at 2,048 tokens; the server does the same by default.
_MEMOS_QUERY_TOKENS = 2048
# Defaults of the server (kept here so that --help works without the server extra).
_DEFAULT_REQUEST_TOKENS = 262_144
_DEFAULT_LIMIT_CONCURRENCY = 256
_DEFAULT_HEADER_TIMEOUT = 10.0
_SERVE_BACKENDS = ("qwen", "cross-encoder")
_RERANK_BACKENDS = (*_SERVE_BACKENDS, "embedding")
# Documents are scored in chunks of this size so progress can be shown; results
# do not depend on it (every backend scores documents independently).
_CHUNK = 64

logger = logging.getLogger("memos_rerank_integrations.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memos-rerank`` command line; returns the process exit code."""
    parser = _parser()
    # Options after ``demo`` / ``compare`` belong to that command, which parses them itself.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("demo", "compare"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.demo_args = extra
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except (_UserError, RerankError, ImportError, OSError) as exc:
        sys.stderr.write(f"{_PROG}: error: {_one_line(exc)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{_PROG}: interrupted\n")
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Relevance reranking: serve a local model, or rerank from files."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve a local model over HTTP in the MemOS, TEI, Cohere, Jina and vLLM shapes",
        description="Serve a local reranker over HTTP: POST /rerank (MemOS shape, or "
        "text-embeddings-inference's with 'texts'), POST /v1/rerank (Cohere v1, Jina, vLLM), "
        "POST /v2/rerank (Cohere v2), POST /score (vLLM), GET /info, /v1/models, /health "
        "and /openapi.json. Rerank routes take 'Authorization: Bearer KEY' or 'Token KEY'.",
    )
    serve.add_argument("--model", required=True, help="Hugging Face id or local directory")
    serve.add_argument("--backend", choices=_SERVE_BACKENDS, default="qwen")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument(
        "--api-key",
        default=None,
        help=f"require this key on the rerank endpoints (default: ${API_KEY_ENV}; "
        "prefer the variable, command lines are visible to other users)",
    )
    serve.add_argument("--model-name", help="model name reported in responses (default: --model)")
    limits = serve.add_argument_group(
        "request limits (all checked before any model work)",
        "A request over a limit gets a 4xx that says which limit and how to split the call.",
    )
    limits.add_argument(
        "--max-documents", type=_positive_int, default=1000, help="documents per request (1000)"
    )
    limits.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=4 * 1024 * 1024,
        help="request body size in bytes (4 MiB); larger bodies get 413, unread",
    )
    limits.add_argument(
        "--max-query-tokens",
        type=_positive_int,
        default=_MEMOS_QUERY_TOKENS,
        help="cut queries to this many tokens, like MemOS (2048; qwen backend: "
        "cross-encoders cut query and document to the model's max_length)",
    )
    limits.add_argument(
        "--max-request-tokens",
        type=_tokens_or_none,
        default=_DEFAULT_REQUEST_TOKENS,
        help=f"tokens one request may cost, every query-document prompt counted "
        f"({_DEFAULT_REQUEST_TOKENS}; 'none' for no budget); more gets 413",
    )
    limits.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a client has to send its request body (30); slower gets 408",
    )
    connections = serve.add_argument_group("connections (passed to uvicorn)")
    connections.add_argument(
        "--limit-concurrency",
        type=_positive_int,
        default=_DEFAULT_LIMIT_CONCURRENCY,
        help=f"open connections or in-flight requests beyond which new requests get 503 "
        f"({_DEFAULT_LIMIT_CONCURRENCY}); a new connection first closes the one that has "
        "waited longest without sending a request",
    )
    connections.add_argument(
        "--timeout-keep-alive",
        type=_positive_float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (5)",
    )
    connections.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=_DEFAULT_HEADER_TIMEOUT,
        help=f"seconds a connection has to send a complete request line and headers "
        f"({_DEFAULT_HEADER_TIMEOUT:g}); idle or trickling connections are closed after it",
    )
    serve.add_argument(
        "--no-batching", action="store_true", help="run requests one at a time (no micro-batching)"
    )
    serve.add_argument(
        "--no-metrics", action="store_true", help="do not serve Prometheus metrics at /metrics"
    )
    serve.add_argument("--batch-window-ms", type=float, default=5.0)
    serve.add_argument(
        "--max-batch-documents",
        type=_positive_int,
        default=None,
        help="documents per fused forward batch (default: 128 on CUDA, 32 elsewhere)",
    )
    serve.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info"
    )
    serve.set_defaults(run=_serve)

    rerank = commands.add_parser(
        "rerank",
        help="rerank documents from a file or stdin and print ranked JSON",
        description="Read documents from --input (or stdin) and print the ranking as JSON "
        "on stdout. Formats: 'lines' (one document per line; blank lines are skipped) or "
        "'jsonl' (one JSON object per line with a string 'text' field; other fields are "
        "echoed as 'record'). 'auto' (default) picks jsonl for *.jsonl / *.ndjson files "
        "or when the first non-blank line is a JSON object, else lines.",
    )
    rerank.add_argument("--query", required=True)
    rerank.add_argument("--input", default="-", help="file to read, '-' for stdin (default)")
    rerank.add_argument("--format", choices=("auto", "lines", "jsonl"), default="auto")
    rerank.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="input that is not valid UTF-8 text (undecodable bytes, lone surrogates in "
        "JSON escapes or in --query): 'strict' (default) stops with an error naming the "
        "line, 'replace' puts U+FFFD in its place",
    )
    rerank.add_argument("--backend", choices=_RERANK_BACKENDS, default="qwen")
    rerank.add_argument(
        "--model",
        help="Hugging Face id or local directory (default: Qwen/Qwen3-Reranker-0.6B for qwen, "
        "the packaged all-MiniLM-L6-v2 for embedding; required for cross-encoder)",
    )
    _add_model_options(rerank)
    rerank.add_argument("--top-n", type=_positive_int, default=None)
    rerank.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr for long inputs"
    )
    rerank.set_defaults(run=_rerank)

    # The demo lives in its own module (written separately); it is imported only
    # when this subcommand runs, so the others work even where it is absent.
    demo = commands.add_parser(
        "demo",
        help="rerank the MemOS examples end to end (options go to the demo)",
        add_help=False,  # --help reaches the demo's own parser
    )
    demo.set_defaults(run=_run_demo)

    compare = commands.add_parser(
        "compare",
        help="rerank documents with several backends and print the orders side by side",
        add_help=False,  # --help reaches the command's own parser (in ._compare)
    )
    compare.set_defaults(run=_run_compare)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: per device)")
    parser.add_argument("--instruction", help="task instruction (qwen backend only)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _tokens_or_none(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    return _positive_int(text)


def _build_backend(args: argparse.Namespace, **extra: Any) -> Reranker:
    options: dict[str, Any] = {"device": args.device, "dtype": args.dtype, **extra}
    if args.instruction is not None:
        if args.backend != "qwen":
            raise _UserError("--instruction applies to --backend qwen only.")
        options["instruction"] = args.instruction
    if args.backend == "cross-encoder":
        if not args.model:
            raise _UserError("--model is required with --backend cross-encoder.")
        from .._local.cross_encoder import CrossEncoderReranker

        return CrossEncoderReranker(args.model, **options)
    # Without --model, these use their documented default model.
    model = {"model": args.model} if args.model else {}
    if args.backend == "qwen":
        from .._local.qwen import QwenReranker

        return QwenReranker(**model, **options)
    from .._local.embedding import EmbeddingReranker

    return EmbeddingReranker(**model, **options)


# -- serve ---------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server import config, create_app
    from ..server._core import check_api_key

    _log_to_stderr(args.log_level)
    # Checked before the model loads, so a bad key fails in a second, not a minute.
    api_key = check_api_key(args.api_key or os.environ.get(API_KEY_ENV) or None)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "Serving on %s without an API key: anyone who can reach it can use it.", args.host
        )
    extra = {"max_query_length": args.max_query_tokens} if args.backend == "qwen" else {}
    backend = _build_backend(args, **extra)
    logger.info("Loading %s model %s", args.backend, args.model)
    # Load (and warm up) now, so a bad model fails here and not on the first request.
    backend.rerank("warm-up", ["warm-up"])
    app = create_app(
        backend,
        model_name=args.model_name or args.model,
        api_key=api_key,
        max_documents=args.max_documents,
        max_body_bytes=args.max_body_bytes,
        max_request_tokens=args.max_request_tokens,
        body_timeout=args.body_timeout,
        batching=not args.no_batching,
        batch_window_ms=args.batch_window_ms,
        max_batch_documents=args.max_batch_documents or _default_batch_documents(args.device),
        metrics=not args.no_metrics,
    )
    server = uvicorn.Server(
        config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            limit_concurrency=args.limit_concurrency,
            timeout_keep_alive=args.timeout_keep_alive,
            header_timeout=args.header_timeout,
        )
    )
    # uvicorn handles SIGINT/SIGTERM (drains requests, runs the app's shutdown, which
    # stops the model thread), then re-raises the signal to the handler it found:
    # this no-op one, so a requested shutdown exits with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _ignore_signal)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return exc.code if isinstance(exc.code, int) else 1
    return 0 if server.started else 1


def _default_batch_documents(device: str | None) -> int:
    from .._local.runtime import resolve_device

    # A CPU is saturated by one call's worth of rows; a GPU keeps gaining.
    return 128 if resolve_device(device).type == "cuda" else 32


def _ignore_signal(signum: int, frame: object) -> None:
    """Placeholder handler; uvicorn installs its own while serving."""


def _log_to_stderr(level: str) -> None:
    package_logger = logging.getLogger("memos_rerank_integrations")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(level.upper())


# -- rerank --------------------------------------------------------------------------


def _rerank(args: argparse.Namespace) -> int:
    query = _clean_text(args.query, args.errors, where="--query")
    if not query.strip():
        raise _UserError("--query must not be empty.")
    documents = _read_documents(args.input, args.format, args.errors)
    if not documents:
        raise _UserError(f"No documents in {_input_name(args.input)}.")
    backend = _build_backend(args)
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


def _result_json(rank: int, result: RerankResult, documents: list[_Document]) -> dict[str, Any]:
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


# -- demo ----------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("._demo", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._demo":
            raise
        raise _UserError("The demo is not available in this installation.") from None
    code = demo.main(list(args.demo_args))
    return code if isinstance(code, int) else 0


def _run_compare(args: argparse.Namespace) -> int:
    from .._compare import main as compare_main

    return compare_main(list(args.demo_args))
