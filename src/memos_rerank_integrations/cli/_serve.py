"""``memos-rerank serve``: a local model over HTTP in every dialect the server speaks."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Any

from ._input import UserError
from ._options import (
    MAX_COUNT,
    MAX_NAME_LENGTH,
    MAX_PATH_LENGTH,
    add_model_options,
    backend_choice,
    build_backend,
    checked_instruction,
    int_in,
    number_in,
    positive_float,
    spellings,
    text_of_at_most,
    tokens_or_none,
)

__all__ = ["API_KEY_ENV", "add_parser", "run"]

API_KEY_ENV = "MEMOS_RERANK_API_KEY"
SERVE_BACKENDS = ("qwen", "cross_encoder")
# MemOS caps queries at 2,048 tokens; the server does the same by default.
_MEMOS_QUERY_TOKENS = 2048
# Defaults of the server (kept here so that --help works without the server extra).
_DEFAULT_REQUEST_TOKENS = 262_144
_DEFAULT_LIMIT_CONCURRENCY = 256
_DEFAULT_HEADER_TIMEOUT = 10.0
_DEFAULT_SHUTDOWN_TIMEOUT = 10.0
# Upper bounds of the numeric options (all checked before the model loads).
_MAX_BODY_BYTES = 1024 * 1024 * 1024
_MAX_QUERY_TOKENS = 1_048_576
_MAX_CONCURRENCY = 100_000
_MAX_BATCH_WINDOW_MS = 10_000.0
_MAX_BATCH_DOCUMENTS = 100_000
# Tokens per model turn on a CPU (a request with more is scored in slices).
_CPU_BATCH_TOKENS = 2048
_MAX_MODEL_WORKERS = 1024

logger = logging.getLogger("memos_rerank_integrations.cli")


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a local model over HTTP in the MemOS, TEI, Cohere, Jina and vLLM shapes",
        description="Serve a local reranker over HTTP: POST /rerank (MemOS shape, or "
        "text-embeddings-inference's with 'texts'), POST /v1/rerank (Cohere v1, Jina, vLLM), "
        "POST /v2/rerank (Cohere v2), POST /score (vLLM), GET /info, /v1/models, /health "
        "and /openapi.json. Rerank routes take 'Authorization: Bearer KEY' or 'Token KEY'.",
    )
    serve.add_argument(
        "--model",
        required=True,
        type=text_of_at_most(MAX_PATH_LENGTH),
        help="Hugging Face id or local directory",
    )
    serve.add_argument(
        "--backend",
        type=backend_choice(SERVE_BACKENDS),
        default="qwen",
        help=f"{', '.join(spellings(SERVE_BACKENDS))} (default: qwen)",
    )
    add_model_options(serve)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        type=text_of_at_most(MAX_NAME_LENGTH),
        help="interface to bind (default 127.0.0.1)",
    )
    serve.add_argument("--port", type=int_in(1, 65535), default=8080, help="port (default 8080)")
    serve.add_argument(
        "--api-key",
        default=None,
        help=f"require this key on the rerank endpoints (default: ${API_KEY_ENV}; "
        "prefer the variable, command lines are visible to other users)",
    )
    serve.add_argument(
        "--model-name",
        type=text_of_at_most(MAX_NAME_LENGTH),
        help="model name reported in responses (default: --model)",
    )
    limits = serve.add_argument_group(
        "request limits (all checked before any model work)",
        "A request over a limit gets a 4xx that says which limit and how to split the call.",
    )
    limits.add_argument(
        "--max-documents",
        type=int_in(1, MAX_COUNT),
        default=1000,
        help="documents per request (1000)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=int_in(1, _MAX_BODY_BYTES),
        default=4 * 1024 * 1024,
        help="request body size in bytes (4 MiB); larger bodies get 413, unread",
    )
    limits.add_argument(
        "--max-query-tokens",
        type=int_in(1, _MAX_QUERY_TOKENS),
        default=_MEMOS_QUERY_TOKENS,
        help="cut queries to this many tokens, like MemOS (2048; qwen backend: "
        "cross-encoders cut query and document to the model's max_length)",
    )
    limits.add_argument(
        "--max-request-tokens",
        type=tokens_or_none,
        default=_DEFAULT_REQUEST_TOKENS,
        help=f"tokens one request may cost, every query-document prompt counted "
        f"({_DEFAULT_REQUEST_TOKENS}; 'none' for no budget); more gets 413",
    )
    limits.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a client has to send its request body (30); slower gets 408",
    )
    connections = serve.add_argument_group("connections (passed to uvicorn)")
    connections.add_argument(
        "--limit-concurrency",
        type=int_in(1, _MAX_CONCURRENCY),
        default=_DEFAULT_LIMIT_CONCURRENCY,
        help=f"open connections or in-flight requests beyond which new requests get 503 "
        f"({_DEFAULT_LIMIT_CONCURRENCY}); a new connection first closes the one that has "
        "waited longest without sending a request",
    )
    connections.add_argument(
        "--timeout-keep-alive",
        type=positive_float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (5)",
    )
    connections.add_argument(
        "--header-timeout",
        type=positive_float,
        default=_DEFAULT_HEADER_TIMEOUT,
        help=f"seconds a connection has to send a complete request line and headers "
        f"({_DEFAULT_HEADER_TIMEOUT:g}); idle or trickling connections are closed after it",
    )
    connections.add_argument(
        "--write-timeout",
        type=positive_float,
        default=None,
        help="seconds a client may take no part of an answer before its connection is "
        "aborted (default: the header timeout)",
    )
    connections.add_argument(
        "--shutdown-timeout",
        type=positive_float,
        default=_DEFAULT_SHUTDOWN_TIMEOUT,
        help=f"seconds a shutdown (SIGTERM, Ctrl-C) waits for requests in progress before "
        f"cancelling them ({_DEFAULT_SHUTDOWN_TIMEOUT:g})",
    )
    serve.add_argument(
        "--no-batching", action="store_true", help="run requests one at a time (no micro-batching)"
    )
    serve.add_argument(
        "--no-metrics", action="store_true", help="do not serve Prometheus metrics at /metrics"
    )
    serve.add_argument(
        "--batch-window-ms",
        type=number_in(0.0, _MAX_BATCH_WINDOW_MS, allow_low=True),
        default=5.0,
        help="milliseconds a request waits for others to share its forward pass (5)",
    )
    serve.add_argument(
        "--max-batch-documents",
        type=int_in(1, _MAX_BATCH_DOCUMENTS),
        default=None,
        help="documents per fused forward batch (default: 128 on CUDA, 32 elsewhere)",
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int_in(1, 10**7),
        default=None,
        help="also bound each model turn by its requests' tokens: short requests are fused "
        "up to it, a longer one is scored in slices of its documents, so short requests "
        "get in between (default: 2048 on a CPU, where a turn of that many already fills "
        "the cores; documents only on CUDA)",
    )
    serve.add_argument(
        "--model-workers",
        type=_model_workers,
        default=None,
        metavar="N|auto",
        help="threads that run the model at once on the same weights: the first takes "
        "requests while it is free, on every core the others leave; each other takes "
        "requests only while those before it are busy, on its share of the cores "
        "(qwen backend only). auto (default): 2 on CPU, 1 on a GPU or for a model "
        "without replicas",
    )
    serve.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info"
    )
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server import config, create_app
    from ..server._core import check_api_key

    _log_to_stderr(args.log_level)
    # Checked before the model loads, so a bad option fails in a second, not a minute.
    api_key = check_api_key(args.api_key or os.environ.get(API_KEY_ENV) or None)
    model_name = _checked_model_name(args.model_name or args.model)
    _check_listening(args.host, args.port)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "Serving on %s without an API key: anyone who can reach it can use it.", args.host
        )
    extra = {"max_query_length": args.max_query_tokens} if args.backend == "qwen" else {}
    backend = build_backend(
        args.backend,
        args.model,
        device=args.device,
        dtype=args.dtype,
        instruction=checked_instruction(args),
        **extra,
    )
    workers = args.model_workers
    if workers is None:
        workers = _auto_model_workers(backend, args.device)
    elif workers > 1 and not callable(getattr(backend, "replica", None)):
        logger.warning(
            "--model-workers %d ignored: the %s backend's model has no replicas, so its "
            "calls would only take turns; serving with one model worker.",
            workers,
            args.backend,
        )
        workers = 1
    app = create_app(
        backend,
        model_name=model_name,
        api_key=api_key,
        max_documents=args.max_documents,
        max_body_bytes=args.max_body_bytes,
        max_request_tokens=args.max_request_tokens,
        body_timeout=args.body_timeout,
        batching=not args.no_batching,
        batch_window_ms=args.batch_window_ms,
        max_batch_documents=args.max_batch_documents or _default_batch_documents(args.device),
        max_batch_tokens=args.max_batch_tokens or _default_batch_tokens(args.device),
        model_workers=workers,
        model_cores=_shared_cores(workers),
        metrics=not args.no_metrics,
    )
    logger.info("Loading %s model %s", args.backend, args.model)
    # Load (and warm up) now, so a bad model fails here and not on the first request;
    # on the model's own thread, the one that runs every request: torch then keeps a
    # single team of OpenMP threads, which runs faster than two (see runtime).
    app.state.batcher.submit("warm-up", ["warm-up"]).result()
    server = uvicorn.Server(
        config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            limit_concurrency=args.limit_concurrency,
            timeout_keep_alive=args.timeout_keep_alive,
            header_timeout=args.header_timeout,
            write_timeout=args.write_timeout,
            shutdown_timeout=args.shutdown_timeout,
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


def _checked_model_name(name: str) -> str:
    """The name responses report: printable text (no control characters, no lone
    surrogates), else a :class:`UserError`."""
    if not name.isprintable():
        raise UserError(
            f"The model name {name[:40]!r} (--model-name, else --model) holds a control or "
            "unprintable character; pass --model-name with a plain name."
        )
    return name


def _check_listening(host: str, port: int) -> None:
    """Bind ``(host, port)`` as uvicorn will, and let go at once: a port in use or a
    host that is not this machine's is a :class:`UserError` now, before the model
    loads, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"Cannot listen on {host}:{port}: {reason}.") from None


def _model_workers(text: str) -> int | None:
    """``--model-workers``: ``auto`` (``None``) or a count from 1 to the maximum."""
    if text.strip().lower() == "auto":
        return None
    count: int = int_in(1, _MAX_MODEL_WORKERS)(text)
    return count


def _auto_model_workers(backend: object, device: str | None) -> int:
    """``--model-workers auto``: two workers on CPU where the model has replicas and
    torch runs on at least two threads (under load each takes half the cores, a lone
    request still gets them all), else one."""
    if not callable(getattr(backend, "replica", None)):
        return 1
    import torch

    from .._local.runtime import resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    return 2 if torch.get_num_threads() >= 2 else 1


def _shared_cores(workers: int) -> int | None:
    """The torch threads ``workers`` model threads share (``None`` for one worker,
    which keeps torch's own setting): the first worker runs on what the busy others
    leave free, each other on its share (see :class:`MicroBatcher`)."""
    if workers == 1:
        return None
    import torch

    cores = torch.get_num_threads()
    share = max(1, cores // workers)
    logger.info(
        "%d model workers: the first on up to %d torch thread(s), the others on %d each",
        workers,
        cores,
        share,
    )
    return cores


def _default_batch_documents(device: str | None) -> int:
    from .._local.runtime import resolve_device

    # A CPU is saturated by one call's worth of rows; a GPU keeps gaining.
    return 128 if resolve_device(device).type == "cuda" else 32


def _default_batch_tokens(device: str | None) -> int | None:
    from .._local.runtime import resolve_device

    # Longer turns gain nothing on a CPU, and make the short requests wait for them.
    return None if resolve_device(device).type == "cuda" else _CPU_BATCH_TOKENS


def _ignore_signal(signum: int, frame: object) -> None:
    """Placeholder handler; uvicorn installs its own while serving."""


def _log_to_stderr(level: str) -> None:
    package_logger = logging.getLogger("memos_rerank_integrations")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(level.upper())
