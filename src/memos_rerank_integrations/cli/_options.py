"""What the subcommands share: argparse value types, the model options, and building
a backend from its registry name (any spelling the registry knows, e.g.
``cross-encoder`` for ``cross_encoder``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from .._config import from_config
from .._configurable import REGISTRY, provider_named
from .._local.qwen import MAX_INSTRUCTION_LENGTH
from .._types import Reranker
from ._input import MAX_QUERY_LENGTH, UserError, clean_text

__all__ = [
    "MAX_COUNT",
    "MAX_NAME_LENGTH",
    "MAX_PATH_LENGTH",
    "add_input_options",
    "add_model_options",
    "backend_choice",
    "build_backend",
    "checked_instruction",
    "int_in",
    "number_in",
    "positive_float",
    "positive_int",
    "text_of_at_most",
    "tokens_or_none",
]

# Upper bounds of the options without one of their own: counts (--top-n, documents),
# names (--device, --dtype, --host, --model-name) and paths (--model, --input).
MAX_COUNT = 1_000_000
MAX_NAME_LENGTH = 256
MAX_PATH_LENGTH = 4096
# An option value is shown in an error up to this many characters.
_SHOWN = 40
# More characters than any integer within these bounds has (digits, sign, "_", spaces).
_LONGEST_INT = 32


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _parse_int(text: str) -> int | None:
    if len(text) > _LONGEST_INT:
        return None  # longer than any value in range: no int() of a huge string
    try:
        return int(text)
    except ValueError:
        return None


def int_in(low: int, high: int) -> Any:
    """An argparse ``type``: an integer from ``low`` to ``high``, else a usage error
    (exit 2) that states the range."""

    def parse(text: str) -> int:
        value = _parse_int(text)
        if value is None or not low <= value <= high:
            wanted = "a positive integer" if low == 1 else f"an integer from {low}"
            raise argparse.ArgumentTypeError(
                f"must be {wanted} (at most {high}), got {_shown(text)}"
            )
        return value

    return parse


def number_in(low: float, high: float, *, allow_low: bool = False) -> Any:
    """An argparse ``type``: a finite number above ``low`` (or equal to it with
    ``allow_low``) and at most ``high``, else a usage error (exit 2)."""

    def parse(text: str) -> float:
        try:
            value = float(text) if len(text) <= _LONGEST_INT else math.nan
        except ValueError:
            value = math.nan
        above = value >= low if allow_low else value > low
        if not (math.isfinite(value) and above and value <= high):
            if allow_low:
                wanted = f"a number from {low:g}"
            else:
                wanted = "a positive number" if low == 0 else f"a number above {low:g}"
            raise argparse.ArgumentTypeError(
                f"must be {wanted} (at most {high:g}), got {_shown(text)}"
            )
        return value

    return parse


positive_int = int_in(1, MAX_COUNT)
positive_float = number_in(0.0, 3600.0)


_TOKENS = int_in(1, 10**9)


def tokens_or_none(text: str) -> int | None:
    """A token budget (1 to 10**9), or ``none`` for no budget."""
    if text.strip().lower() == "none":
        return None
    parsed: int = _TOKENS(text)
    return parsed


def text_of_at_most(limit: int) -> Any:
    """An argparse ``type``: a string with something besides white space, of at most
    ``limit`` characters, else a usage error (exit 2)."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("must not be empty")
        if len(text) > limit:
            raise argparse.ArgumentTypeError(
                f"must be at most {limit} characters, got {len(text)}: {_shown(text)}"
            )
        return text

    return parse


def backend_choice(names: Sequence[str]) -> Any:
    """An argparse ``type`` that takes any registry spelling of one of ``names`` and
    gives the registry name."""

    def parse(text: str) -> str:
        provider = provider_named(text.strip())
        if provider is None or provider.name not in names:
            raise argparse.ArgumentTypeError(
                f"unknown backend {text!r}; use one of: {', '.join(spellings(names))}"
            )
        return provider.name

    return parse


def spellings(names: Sequence[str]) -> list[str]:
    """How the command line shows these backends: the first alias, else the name."""
    return [
        (provider.aliases or (provider.name,))[0] for provider in REGISTRY if provider.name in names
    ]


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """The query and where the documents come from (``rerank``, ``compare``)."""
    parser.add_argument(
        "--query", required=True, help=f"the query (at most {MAX_QUERY_LENGTH} characters)"
    )
    parser.add_argument(
        "--input",
        default="-",
        type=text_of_at_most(MAX_PATH_LENGTH),
        help="file to read, '-' for stdin (default)",
    )
    parser.add_argument("--format", choices=("auto", "lines", "jsonl"), default="auto")
    parser.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="input that is not valid UTF-8 text (undecodable bytes, lone surrogates in "
        "JSON escapes or in --query): 'strict' (default) stops with an error naming the "
        "line, 'replace' puts U+FFFD in its place",
    )


def add_model_options(parser: argparse.ArgumentParser, *, instruction: bool = True) -> None:
    name = text_of_at_most(MAX_NAME_LENGTH)
    parser.add_argument(
        "--device", type=name, help="cpu, cuda, cuda:1, mps (default: best available)"
    )
    parser.add_argument(
        "--dtype", type=name, help="float32, bfloat16, float16 (default: per device)"
    )
    if instruction:
        parser.add_argument(
            "--instruction",
            help=f"task instruction (qwen backend only; at most {MAX_INSTRUCTION_LENGTH} "
            "characters)",
        )


def checked_instruction(args: argparse.Namespace) -> str | None:
    """``--instruction`` as given, or a :class:`UserError` when it is longer than
    :data:`MAX_INSTRUCTION_LENGTH` characters or not valid Unicode text (``--errors
    replace`` puts U+FFFD in place of a lone surrogate where the command has it)."""
    instruction: str | None = getattr(args, "instruction", None)
    if instruction is None:
        return None
    if len(instruction) > MAX_INSTRUCTION_LENGTH:
        raise UserError(
            f"--instruction is {len(instruction)} characters long; at most "
            f"{MAX_INSTRUCTION_LENGTH} are accepted."
        )
    return clean_text(instruction, getattr(args, "errors", "strict"), where="--instruction")


def build_backend(
    name: str,
    target: str | None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    instruction: str | None = None,
    **extra: Any,
) -> Reranker:
    """The registry's backend ``name``: ``target`` is the model (local and cloud
    backends; their documented default without it) or, for ``http``, the server's URL."""
    provider = provider_named(name)
    assert provider is not None
    spelled = spellings([provider.name])[0]
    options: dict[str, Any] = dict(extra)
    if provider.local:
        options.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    if instruction is not None:
        if provider.name != "qwen":
            raise UserError("--instruction applies to --backend qwen only.")
        options["instruction"] = instruction
    if provider.name == "cross_encoder" and not target:
        raise UserError(f"{spelled} needs a model: --model MODEL (compare: {spelled}=MODEL).")
    if provider.name == "http":
        if not target:
            raise UserError("http needs the server's URL (compare: http=URL).")
        options["base_url"] = target
    elif target:
        options["model"] = target
    return from_config({"provider": provider.name, "config": options})
