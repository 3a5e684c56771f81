"""JSON nested too deeply for the tools that read it, found without recursing.

Python's ``json`` parser recurses once per nesting level and raises ``RecursionError`` near
1,000 levels; pyarrow and ``datasets`` recurse as well and fail near 60. One hostile record must
not make a whole file unreadable, so

* a record nested more than :data:`MAX_DEPTH` levels is skipped and reported (reason
  ``too_deep``, with the field that holds the deep value), whether the parser refused it or
  not (:func:`deep_field`, :func:`deep_text_field`);
* a JSON array the parser cannot take whole is cut into its elements by a flat scan
  (:func:`records_of`), so that each element is parsed, kept or skipped on its own; the writer
  uses the same scan to copy untouched elements back byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: Deepest nesting of lists and objects a record may have, the record itself counting as one.
#: Real preference data stays below 10 (a message list in a record is 3); pyarrow and
#: ``datasets`` fail near 60.
MAX_DEPTH = 32

#: What the flat scan needs to see: whole strings (so that brackets inside them are skipped)
#: and the structural characters.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},:]')
_NON_SPACE = re.compile(r"\S")


@dataclass(frozen=True)
class Member:
    """One direct member of a JSON array or object: its key (in an object) and the span of
    its value in the text."""

    key: str | None
    start: int
    end: int


@dataclass(frozen=True)
class Records:
    """The array of records in a JSON text: where it opens and closes, and its elements."""

    open: int
    close: int
    elements: list[Member]


def too_deep(field: str | None) -> str:
    """The detail of a ``too_deep`` skip."""
    what = f"'{field}'" if field else "the record"
    return f"{what} is nested more than {MAX_DEPTH} levels deep"


def nesting_depth(value: Any, limit: int) -> int:
    """Levels of lists and objects in a parsed ``value`` (0 for a scalar), level by level
    rather than recursively; counting stops once ``limit`` is passed."""
    depth, level = 0, [value]
    while depth <= limit:
        level = [v for v in level if isinstance(v, dict | list)]
        if not level:
            return depth
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def deep_field(record: dict) -> str | None:
    """The first field of a parsed record nested past :data:`MAX_DEPTH`, or None."""
    return next((key for key, value in record.items()
                 if nesting_depth(value, MAX_DEPTH) >= MAX_DEPTH), None)


def deep_text_field(text: str) -> str | None:
    """The field of a record's JSON text that the parser cannot take (it recursed too deep),
    or None when the record is not an object or the field cannot be told."""
    start = _first_char(text, 0)
    if start >= len(text) or text[start] != "{":
        return None
    try:
        found, _ = members(text, start)
    except ValueError:
        return None
    return next((m.key for m in found if not _parses(text[m.start:m.end])), None)


def records_of(text: str) -> Records | None:
    """The array of records of a JSON file, a list or ``{"data": [...]}``, found by the flat
    scan; None when the text is something else (JSON lines, one object, not JSON)."""
    root = _first_char(text, 0)
    try:
        if root < len(text) and text[root] == "{":
            found, close = members(text, root)
            data = [m for m in found if m.key == "data" and text[m.start] == "["]
            if not data or _first_char(text, close + 1) < len(text):
                return None
            root = data[-1].start  # the parser keeps the last of repeated keys too
        if root >= len(text) or text[root] != "[":
            return None
        elements, close = members(text, root)
    except ValueError:
        return None
    return Records(root, close, elements)


def members(text: str, start: int) -> tuple[list[Member], int]:
    """The direct members of the array or object whose bracket is at ``start``, and the
    index of its closing bracket. ValueError when the brackets never close."""
    found: list[Member] = []
    depth, key, begin = 0, None, start + 1
    for token in _TOKEN.finditer(text, start):
        mark = token.group()
        if mark in ("[", "{"):
            depth += 1
        elif mark in ("]", "}"):
            depth -= 1
            if depth == 0:
                _add(found, text, key, begin, token.start())
                return found, token.start()
        elif depth == 1 and mark == ",":
            _add(found, text, key, begin, token.start())
            key, begin = None, token.end()
        elif depth == 1 and mark == ":":
            key, begin = _key(text[begin:token.start()]), token.end()
    raise ValueError(f"the bracket at character {start} is never closed")


def _add(found: list[Member], text: str, key: str | None, begin: int, end: int) -> None:
    """A member's value span, without the whitespace around it (an empty one is no member)."""
    start = _first_char(text, begin)
    while end > start and text[end - 1].isspace():
        end -= 1
    if end > start:
        found.append(Member(key, start, end))


def _first_char(text: str, at: int) -> int:
    """Index of the first non-whitespace character from ``at`` (``len(text)`` if none)."""
    match = _NON_SPACE.search(text, at)
    return match.start() if match else len(text)


def _key(text: str) -> str | None:
    try:
        key = json.loads(text)
    except ValueError:
        return None
    return key if isinstance(key, str) else None


def _parses(text: str) -> bool:
    """Whether the parser takes ``text`` without recursing too deep (other errors are not
    this module's concern)."""
    try:
        json.loads(text)
    except RecursionError:
        return False
    except ValueError:
        return True
    return True
