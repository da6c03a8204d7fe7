"""Reading the command line's documents: lines or JSON lines from a file or stdin,
decoded as UTF-8 line by line, with lone surrogates refused (or replaced with
``errors="replace"``). Shared by ``memos-rerank rerank`` and ``memos-rerank compare``:
bad input is a :class:`UserError` (one line, no traceback), never a crash.

Input is bounded, and a bound is reported as soon as it is passed, without reading
further: a line holds at most :data:`MAX_LINE_BYTES` bytes, the input at most
:data:`MAX_INPUT_BYTES` bytes and :data:`MAX_DOCUMENTS` documents, the query at most
:data:`MAX_QUERY_LENGTH` characters. A JSON record nests at most
:data:`MAX_JSON_DEPTH` levels and holds only numbers that are finite JSON numbers a
float can hold (no ``NaN`` or ``Infinity``, integers of at most
:data:`MAX_INTEGER_DIGITS` digits), so the JSON written back is valid JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from .._types import lone_surrogate, replace_surrogates

__all__ = [
    "MAX_DOCUMENTS",
    "MAX_INPUT_BYTES",
    "MAX_INTEGER_DIGITS",
    "MAX_JSON_DEPTH",
    "MAX_LINE_BYTES",
    "MAX_QUERY_LENGTH",
    "Document",
    "UserError",
    "checked_query",
    "clean_text",
    "input_name",
    "read_documents",
]

MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_INPUT_BYTES = 256 * 1024 * 1024
MAX_DOCUMENTS = 100_000
MAX_QUERY_LENGTH = 65_536
MAX_JSON_DEPTH = 32
# Every integer of at most this many digits converts to a float.
MAX_INTEGER_DIGITS = 308


class UserError(Exception):
    """A problem with the command line or its input: reported in one line."""


@dataclass(frozen=True)
class Document:
    text: str
    line: int
    record: dict[str, Any] | None


def input_name(path: str) -> str:
    return "stdin" if path == "-" else path


def checked_query(query: str, errors: str) -> str:
    """``--query`` checked: at most :data:`MAX_QUERY_LENGTH` characters, valid
    Unicode text (see :func:`clean_text`), not blank; else a :class:`UserError`."""
    if len(query) > MAX_QUERY_LENGTH:
        raise UserError(
            f"--query is {len(query)} characters long; at most {MAX_QUERY_LENGTH} are accepted."
        )
    query = clean_text(query, errors, where="--query")
    if not query.strip():
        raise UserError("--query must not be empty.")
    return query


def read_documents(path: str, fmt: str, errors: str) -> list[Document]:
    if path == "-":
        binary = getattr(sys.stdin, "buffer", None)
        if binary is None:  # a text stream without bytes underneath (e.g. in tests)
            return _parse_documents(_text_lines(sys.stdin), fmt, name="stdin", errors=errors)
        return _parse_documents(_decoded_lines(binary, errors), fmt, name="stdin", errors=errors)
    with open(path, "rb") as stream:
        return _parse_documents(_decoded_lines(stream, errors), fmt, name=path, errors=errors)


def _size(size: int) -> str:
    mib = 1024 * 1024
    return f"{size // mib} MiB" if size % mib == 0 else f"{size} bytes"


def _bounded_lines(stream: IO[Any]) -> Iterator[tuple[int, Any]]:
    """(line number, the line with its ending) from a binary or text stream, each read
    only up to the line limit: a longer line, or more input than the total limit, is a
    :class:`UserError` at once (the rest is never read). A text stream's limits count
    characters."""
    total = 0
    # Room for the line ending ("\r\n") on top of the longest line.
    limit = MAX_LINE_BYTES + 2
    for number in itertools.count(1):
        raw = stream.readline(limit)
        if not raw:
            return
        total += len(raw)
        if total > MAX_INPUT_BYTES:
            raise UserError(
                f"The input is larger than {_size(MAX_INPUT_BYTES)} (at line {number}); "
                "split it into several runs."
            )
        if len(raw.rstrip(b"\r\n" if isinstance(raw, bytes) else "\r\n")) > MAX_LINE_BYTES:
            raise UserError(
                f"line {number} is longer than {_size(MAX_LINE_BYTES)}; a document may hold "
                f"at most {MAX_LINE_BYTES} bytes."
            )
        yield number, raw


def _decoded_lines(stream: IO[bytes], errors: str) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending), decoded line by line as UTF-8 so
    that an undecodable byte is reported with its line and column."""
    for number, raw in _bounded_lines(stream):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        end = len(raw)
        while end and raw[end - 1] in b"\r\n":
            end -= 1
        try:
            # Decoded from a view: no copy of a huge line without its line ending.
            line = str(memoryview(raw)[:end], "utf-8", errors)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"line {number}, byte {exc.start + 1}: not valid UTF-8 (byte "
                f"0x{raw[exc.start]:02x}); convert the input to UTF-8, or pass "
                "--errors replace to replace undecodable bytes with U+FFFD."
            ) from None
        del raw
        yield number, line


def _text_lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    for number, line in _bounded_lines(stream):
        yield number, line.rstrip("\r\n")


def _parse_documents(
    lines: Iterator[tuple[int, str]], fmt: str, *, name: str, errors: str
) -> list[Document]:
    documents: list[Document] = []
    chosen = fmt
    for number, line in lines:
        if not line or line.isspace():
            continue
        if len(documents) == MAX_DOCUMENTS:
            raise UserError(
                f"{name} holds more than {MAX_DOCUMENTS} documents (line {number}); split "
                "it into several runs."
            )
        if chosen == "auto":
            jsonl_name = name.endswith((".jsonl", ".ndjson"))
            chosen = "jsonl" if jsonl_name or _is_json_object(line) else "lines"
        if chosen == "lines":
            text = clean_text(line, errors, where=f"{name} line {number}")
            documents.append(Document(text=text, line=number, record=None))
        else:
            documents.append(_json_document(name, number, line, errors))
    return documents


def clean_text(text: str, errors: str, *, where: str) -> str:
    """Refuse (or replace) lone surrogates: they come from JSON escapes such as
    "\\ud800" or undecodable command-line bytes, and no tokenizer or output accepts them."""
    found = lone_surrogate(text)
    if found is None:
        return text
    if errors == "replace":
        return replace_surrogates(text)
    position, char = found
    raise UserError(
        f"{where}: character {position + 1} is a lone surrogate "
        f"(U+{ord(char):04X}), not valid Unicode text; fix the input, or pass "
        "--errors replace to replace it with U+FFFD."
    )


def _clean_record(value: Any, errors: str, where: str) -> Any:
    """``value`` with every string cleaned (:func:`clean_text`); recursive, so call it
    only on a record whose depth is checked."""
    if isinstance(value, str):
        return clean_text(value, errors, where=where)
    if isinstance(value, list):
        return [_clean_record(item, errors, where) for item in value]
    if isinstance(value, dict):
        return {
            clean_text(key, errors, where=where): _clean_record(item, errors, where)
            for key, item in value.items()
        }
    return value


def _depth_over(record: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels in ``record`` (the
    record itself is level 1); walked without recursion."""
    stack = [(record, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class _NotAJSONNumber(Exception):
    """A number in a record that cannot be written back as valid JSON."""


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _NotAJSONNumber(
            f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INTEGER_DIGITS})"
        )
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise _NotAJSONNumber(f"the number {shown} is too large for a float")
    return value


def _constant(text: str) -> float:
    raise _NotAJSONNumber(f"{text} is not a JSON number")


def _ignored(text: str) -> None:
    return None


def _is_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        # Numbers are not converted here: a bad one is reported when the line is read.
        parsed = json.loads(line, parse_int=_ignored, parse_float=_ignored, parse_constant=_ignored)
    except ValueError:
        return False
    except RecursionError:
        return True  # JSON, nested too deeply: reported as such when it is read
    return isinstance(parsed, dict)


def _json_document(name: str, number: int, line: str, errors: str) -> Document:
    too_deep = f"{name} line {number}: JSON nested more than {MAX_JSON_DEPTH} levels deep."
    try:
        record = json.loads(line, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    except _NotAJSONNumber as exc:
        raise UserError(
            f"{name} line {number}: {exc}; numbers must be finite and fit a float."
        ) from None
    except ValueError as exc:
        raise UserError(f"{name} line {number}: not valid JSON ({exc}).") from None
    except RecursionError:
        raise UserError(too_deep) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UserError(
            f"{name} line {number}: expected a JSON object with a string 'text' field "
            "(use --format lines for plain text)."
        )
    if _depth_over(record, MAX_JSON_DEPTH):
        raise UserError(too_deep)
    record = _clean_record(record, errors, f"{name} line {number}")
    return Document(text=record["text"], line=number, record=record)
