"""The ``memos-rerank`` command: one ``argparse`` tree of subcommands, each in its
own module: ``serve`` a local model over HTTP, ``rerank`` from the shell, ``compare``
several backends side by side, and the ``demo``.

Exit codes: 0 done; 1 the input, a model or a backend failed (a one-line message on
stderr, never a traceback); 2 the command line itself is wrong (argparse's usage
message); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .._exceptions import RerankError
from . import _compare, _demo, _rerank, _serve
from ._input import UserError
from ._serve import API_KEY_ENV

__all__ = ["API_KEY_ENV", "main"]

_PROG = "memos-rerank"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memos-rerank`` command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except (UserError, RerankError, ImportError, OSError) as exc:
        sys.stderr.write(f"{_PROG}: error: {_one_line(exc)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{_PROG}: interrupted\n")
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Relevance reranking: serve a local model, rerank from files, compare "
        "backends, or run the demo.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (_serve, _rerank, _compare, _demo):
        command.add_parser(commands)
    return parser
