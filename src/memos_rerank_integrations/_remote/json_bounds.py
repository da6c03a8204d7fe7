"""A bound on the objects a JSON answer may make, checked before it is parsed.

The byte cap (:data:`~._remote.http.MAX_RESPONSE_BYTES`) bounds what a server sends,
not what parsing it builds: 60 MB of ``{},`` are twenty million dicts, gigabytes of
memory. :func:`json_shape_problem` reads the raw text once, in linear time, counting
items (arrays, objects and the commas between their elements) and nesting depth, and
stops as soon as a bound is passed, so an answer over it is refused before
``json.loads`` (or a vendor SDK) builds a single object.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = [
    "BASE_RESPONSE_ITEMS",
    "ITEMS_PER_DOCUMENT",
    "MAX_RESPONSE_DEPTH",
    "NOT_JSON",
    "json_shape_problem",
    "max_response_items",
]

# A ranking needs a handful of items per document ({"index", "relevance_score"}, a
# returned document {"text"}, ...) plus some for the envelope (id, meta, usage,
# warnings): these leave room for far more than any service sends.
ITEMS_PER_DOCUMENT = 64
BASE_RESPONSE_ITEMS = 4096
# Rankings nest about four deep (results, an item, its document, a field of it).
MAX_RESPONSE_DEPTH = 32
# The problem json_shape_problem names for text that cannot be JSON at all.
NOT_JSON = "is not valid JSON"


def max_response_items(n_documents: int) -> int:
    """The most items an answer for a request of ``n_documents`` documents may hold."""
    return BASE_RESPONSE_ITEMS + ITEMS_PER_DOCUMENT * n_documents


# One token per match: a string, a bracket or a comma. The text is first rid of its
# escaped backslashes and quotes (two replaces, in C), so a string is just quote,
# non-quotes, quote; its closing quote is optional, so that an unterminated string
# ends the scan. No match ever backtracks and finditer resumes where the previous one
# ended: the whole scan is one pass. Whitespace, numbers, literals and colons are
# skipped inside the regex engine (the pattern has no groups, so it searches for
# the tokens' first characters alone).
_TOKENS = r'"[^"]*"?|[\[\]{},]'
_BYTE_TOKENS = re.compile(_TOKENS.encode("ascii"))
_TEXT_TOKENS = re.compile(_TOKENS)
# What a token's first character (str) or byte (int) is; anything else is a string.
_OPEN, _CLOSE, _COMMA = 1, 2, 3
_KINDS: dict[str | int, int] = {}
for _chars, _kind in (("[{", _OPEN), ("]}", _CLOSE), (",", _COMMA)):
    for _char in _chars:
        _KINDS[_char] = _KINDS[ord(_char)] = _kind


def _token_starts(content: bytes | bytearray | str) -> Iterator[str | int]:
    """The first character (str) or byte (int) of each token of ``content``, read after
    dropping ``\\\\`` and ``\\"``: inside JSON strings (read left to right, as the
    parser does) those are whole escapes, and what remains delimits the same strings.
    A backslash outside a string is invalid JSON, where the parser stops; the text
    before it is the same either way."""
    if isinstance(content, str):
        text = content.replace("\\\\", "").replace('\\"', "") if "\\" in content else content
        yield from (text[found.start()] for found in _TEXT_TOKENS.finditer(text))
    else:
        data = content.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in content else content
        yield from (data[found.start()] for found in _BYTE_TOKENS.finditer(data))


def json_shape_problem(
    content: bytes | bytearray | str, *, max_items: int, max_depth: int = MAX_RESPONSE_DEPTH
) -> str | None:
    """Why ``content`` must not be given to a JSON parser, or ``None``.

    A problem is: more than ``max_items`` items (each ``[``, ``{`` and ``,`` outside
    strings), nesting deeper than ``max_depth``, a closing bracket with nothing open,
    or more strings than valid JSON within those items could hold. The text is read
    in linear time (two replaces and one regex pass, at most ``4 * max_items + 1``
    tokens of it looked at in Python, whatever its size). Passing is no promise that
    the text is valid JSON; the parser still decides that.
    """
    # Valid JSON holds at most 2 * items + 1 strings (keys and values, each first in
    # its container or after a comma) and no more closing than opening brackets.
    max_tokens = 4 * max_items + 1
    items = depth = 0
    for tokens, start in enumerate(_token_starts(content), start=1):
        kind = _KINDS.get(start)
        if kind == _OPEN:
            items += 1
            depth += 1
            if depth > max_depth:
                return f"is nested deeper than {max_depth} levels"
        elif kind == _CLOSE:
            if depth == 0:
                return NOT_JSON
            depth -= 1
        elif kind == _COMMA:
            items += 1
        if items > max_items:
            return f"holds more than {max_items:,} JSON items"
        if tokens > max_tokens:
            return NOT_JSON
    return None
