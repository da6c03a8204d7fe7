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
from .._types import Reranker
from ._input import UserError

__all__ = [
    "add_input_options",
    "add_model_options",
    "backend_choice",
    "build_backend",
    "positive_float",
    "positive_int",
    "tokens_or_none",
]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def tokens_or_none(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    return positive_int(text)


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
    parser.add_argument("--query", required=True)
    parser.add_argument("--input", default="-", help="file to read, '-' for stdin (default)")
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
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: per device)")
    if instruction:
        parser.add_argument("--instruction", help="task instruction (qwen backend only)")


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
