"""The ``memos-rerank`` command: ``serve`` a local model over HTTP, ``rerank`` from
the shell, and ``demo``.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ._exceptions import RerankError
from ._types import Reranker, RerankResult

__all__ = ["API_KEY_ENV", "main"]

API_KEY_ENV = "MEMOS_RERANK_API_KEY"

_PROG = "memos-rerank"
_SERVE_BACKENDS = ("qwen", "cross-encoder")
_RERANK_BACKENDS = (*_SERVE_BACKENDS, "embedding")
# Documents are scored in chunks of this size so progress can be shown; results
# do not depend on it (every backend scores documents independently).
_CHUNK = 64

logger = logging.getLogger("memos_rerank_integrations.cli")


class _UserError(Exception):
    """A problem with the command line or its input: reported in one line."""


@dataclass(frozen=True)
class _Document:
    text: str
    line: int
    record: dict[str, Any] | None


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
        help="serve a local model with the MemOS (/rerank) and Cohere v2 (/v2/rerank) APIs",
        description="Serve a local reranker over HTTP: POST /rerank (MemOS shape, "
        "'Authorization: Token KEY'), POST /v2/rerank (Cohere v2 shape, "
        "'Authorization: Bearer KEY') and GET /health.",
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
    serve.add_argument("--max-documents", type=_positive_int, default=1000)
    serve.add_argument("--max-body-bytes", type=_positive_int, default=4 * 1024 * 1024)
    serve.add_argument(
        "--no-batching", action="store_true", help="run requests one at a time (no micro-batching)"
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
    demo.set_defaults(run=_demo)

    compare = commands.add_parser(
        "compare",
        help="rerank documents with several backends and print the orders side by side",
        add_help=False,  # --help reaches the command's own parser (in ._compare)
    )
    compare.set_defaults(run=_compare)
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


def _build_backend(args: argparse.Namespace) -> Reranker:
    options: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.instruction is not None:
        if args.backend != "qwen":
            raise _UserError("--instruction applies to --backend qwen only.")
        options["instruction"] = args.instruction
    if args.backend == "cross-encoder":
        if not args.model:
            raise _UserError("--model is required with --backend cross-encoder.")
        from ._cross_encoder import CrossEncoderReranker

        return CrossEncoderReranker(args.model, **options)
    # Without --model, these use their documented default model.
    model = {"model": args.model} if args.model else {}
    if args.backend == "qwen":
        from ._qwen import QwenReranker

        return QwenReranker(**model, **options)
    from ._embedding import EmbeddingReranker

    return EmbeddingReranker(**model, **options)


# -- serve ---------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server import create_app

    _log_to_stderr(args.log_level)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "Serving on %s without an API key: anyone who can reach it can use it.", args.host
        )
    backend = _build_backend(args)
    logger.info("Loading %s model %s", args.backend, args.model)
    # Load (and warm up) now, so a bad model fails here and not on the first request.
    backend.rerank("warm-up", ["warm-up"])
    app = create_app(
        backend,
        model_name=args.model_name or args.model,
        api_key=api_key,
        max_documents=args.max_documents,
        max_body_bytes=args.max_body_bytes,
        batching=not args.no_batching,
        batch_window_ms=args.batch_window_ms,
        max_batch_documents=args.max_batch_documents or _default_batch_documents(args.device),
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
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
    from ._local_engine import resolve_device

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
    if not args.query.strip():
        raise _UserError("--query must not be empty.")
    documents = _read_documents(args.input, args.format)
    if not documents:
        raise _UserError(f"No documents in {_input_name(args.input)}.")
    backend = _build_backend(args)
    texts = [document.text for document in documents]
    results = _score_with_progress(backend, args.query, texts, show=not args.no_progress)
    if args.top_n is not None:
        results = results[: args.top_n]
    output = {
        "query": args.query,
        "backend": args.backend,
        "model": getattr(backend, "model", args.model),
        "results": [
            _result_json(rank, result, documents) for rank, result in enumerate(results, 1)
        ],
    }
    sys.stdout.write(json.dumps(output, ensure_ascii=False, indent=2) + "\n")
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


def _input_name(path: str) -> str:
    return "stdin" if path == "-" else path


def _read_documents(path: str, fmt: str) -> list[_Document]:
    if path == "-":
        return _parse_documents(sys.stdin, fmt, name="stdin")
    with open(path, encoding="utf-8") as stream:
        return _parse_documents(stream, fmt, name=path)


def _parse_documents(stream: Iterable[str], fmt: str, *, name: str) -> list[_Document]:
    lines = [(number, line.rstrip("\r\n")) for number, line in enumerate(stream, 1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    if fmt == "auto":
        jsonl_name = name.endswith((".jsonl", ".ndjson"))
        fmt = "jsonl" if jsonl_name or (lines and _is_json_object(lines[0][1])) else "lines"
    if fmt == "lines":
        return [_Document(text=line, line=number, record=None) for number, line in lines]
    return [_json_document(name, number, line) for number, line in lines]


def _is_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _json_document(name: str, number: int, line: str) -> _Document:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise _UserError(f"{name} line {number}: not valid JSON ({exc}).") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise _UserError(
            f"{name} line {number}: expected a JSON object with a string 'text' field "
            "(use --format lines for plain text)."
        )
    return _Document(text=record["text"], line=number, record=record)


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


def _demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("._demo", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._demo":
            raise
        raise _UserError("The demo is not available in this installation.") from None
    code = demo.main(list(args.demo_args))
    return code if isinstance(code, int) else 0


def _compare(args: argparse.Namespace) -> int:
    from ._compare import main as compare_main

    return compare_main(list(args.demo_args))


if __name__ == "__main__":
    sys.exit(main())
