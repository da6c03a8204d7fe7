"""Reading the command line's documents: lines or JSON lines from a file or stdin,
decoded as UTF-8 line by line, with lone surrogates refused (or replaced with
``errors="replace"``). Shared by ``memos-rerank rerank`` and ``memos-rerank compare``:
bad input is a :class:`UserError` (one line, no traceback), never a crash.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .._types import lone_surrogate, replace_surrogates

__all__ = ["Document", "UserError", "clean_text", "input_name", "read_documents"]


class UserError(Exception):
    """A problem with the command line or its input: reported in one line."""


@dataclass(frozen=True)
class Document:
    text: str
    line: int
    record: dict[str, Any] | None


def input_name(path: str) -> str:
    return "stdin" if path == "-" else path


def read_documents(path: str, fmt: str, errors: str) -> list[Document]:
    if path == "-":
        binary = getattr(sys.stdin, "buffer", None)
        if binary is None:  # a text stream without bytes underneath (e.g. in tests)
            return _parse_documents(_text_lines(sys.stdin), fmt, name="stdin", errors=errors)
        return _parse_documents(_decoded_lines(binary, errors), fmt, name="stdin", errors=errors)
    with open(path, "rb") as stream:
        return _parse_documents(_decoded_lines(stream, errors), fmt, name=path, errors=errors)


def _decoded_lines(stream: Iterable[bytes], errors: str) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending), decoded line by line as UTF-8 so
    that an undecodable byte is reported with its line and column."""
    for number, raw in enumerate(stream, 1):
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


def _text_lines(stream: Iterable[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(stream, 1):
        yield number, line.rstrip("\r\n")


def _parse_documents(
    lines: Iterable[tuple[int, str]], fmt: str, *, name: str, errors: str
) -> list[Document]:
    documents: list[Document] = []
    chosen = fmt
    for number, line in lines:
        if not line or line.isspace():
            continue
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


def _is_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
    except RecursionError:
        return True  # JSON, nested too deeply: reported as such when it is read


def _json_document(name: str, number: int, line: str, errors: str) -> Document:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{name} line {number}: not valid JSON ({exc}).") from None
    except RecursionError:
        raise UserError(f"{name} line {number}: JSON nested too deeply.") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UserError(
            f"{name} line {number}: expected a JSON object with a string 'text' field "
            "(use --format lines for plain text)."
        )
    record = _clean_record(record, errors, f"{name} line {number}")
    return Document(text=record["text"], line=number, record=record)
