"""The ``memos-rerank`` command: one ``argparse`` tree of subcommands, each in its
own module: ``serve`` a local model over HTTP, ``rerank`` from the shell, ``compare``
several backends side by side, and the ``demo``.

Exit codes: 0 done; 1 the input, a model or a backend failed (a one-line message on
stderr, never a traceback); 2 the command line itself is wrong (argparse's usage
message: an unknown option, a value out of its range); 130 interrupted (Ctrl-C, also
when it arrives while a library is being imported and the library reports it as
another error).

The console script (and ``python -m memos_rerank_integrations.cli``) runs
:func:`script`: once the command is done and its output flushed, the process ends
without tearing down the modules it imported (torch's teardown alone takes a
noticeable part of a one-shot ``rerank``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .._exceptions import RerankError
from . import _compare, _demo, _interrupts, _rerank, _serve
from ._input import UserError
from ._serve import API_KEY_ENV

__all__ = ["API_KEY_ENV", "main", "script"]

_PROG = "memos-rerank"
# An error message is shown up to this many characters.
_MESSAGE_LIMIT = 2000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memos-rerank`` command line; returns the process exit code."""
    with _interrupts.watch():
        try:
            args = _parser().parse_args(argv)
            command: Callable[[argparse.Namespace], int] = args.run
            return command(args)
        except KeyboardInterrupt:
            return _interrupted()
        except SystemExit:
            if _interrupts.seen():
                return _interrupted()
            raise
        except (UserError, RerankError, ImportError, OSError) as exc:
            if _interrupts.seen():
                return _interrupted()
            return _error(_one_line(exc))
        except Exception as exc:  # a bug or a library's own error: still one line
            if _interrupts.seen():
                return _interrupted()
            return _error(f"{type(exc).__name__}: {_one_line(exc)}")


def script() -> NoReturn:
    """The ``memos-rerank`` console script: :func:`main` on ``sys.argv``, then the
    process ends with its exit code once stdout and stderr are flushed and logging is
    shut down, skipping the interpreter's teardown (``atexit`` handlers and the
    finalization of every imported module). Output that cannot be flushed (a closed
    pipe) makes the exit code 1 if it was 0."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    logging.shutdown()
    os._exit(code)


def _error(message: str) -> int:
    sys.stderr.write(f"{_PROG}: error: {message}\n")
    return 1


def _interrupted() -> int:
    sys.stderr.write(f"{_PROG}: interrupted\n")
    return 130


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


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
