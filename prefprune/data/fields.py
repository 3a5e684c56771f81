"""What every layout's converter shares: the converted pair, how a row is read, and the checks
on its fields, each raising :class:`~prefprune.data.report.RowIssue` with a stable reason."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefprune.data.messages import PLAIN, Rendering
from prefprune.data.report import RowIssue


@dataclass
class Pair:
    """A converted row: the canonical text fields plus verbatim source metadata."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    split: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadContext:
    """How rows are read: the user's column mapping, the label convention of A/B layouts
    (``label_values``), and how message lists become text."""

    mapping: Mapping[str, str] = field(default_factory=dict)
    label_values: tuple[str, str] | None = None
    rendering: Rendering = PLAIN

    def key(self, canonical: str) -> str:
        """The user's column holding a canonical field."""
        return self.mapping.get(canonical, canonical)


def row_hash(record: Any) -> str:
    """sha256 hex of the record's canonical JSON: a stable id for rows without one."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def value_of(record: dict, key: str, label: str) -> Any:
    """The value at ``key``; absent or null is a missing field."""
    value = record.get(key)
    if value is None:
        raise RowIssue("missing_field", label, f"'{label}' is missing or null")
    return value


def text_of(record: dict, key: str, label: str) -> str:
    """A non-blank string field."""
    value = value_of(record, key, label)
    if not isinstance(value, str):
        raise RowIssue("wrong_type", label, f"'{label}' is {type(value).__name__}, not str")
    if not value.strip():
        raise RowIssue("empty_field", label, f"'{label}' is empty")
    return value


def object_of(record: dict, key: str, label: str) -> dict:
    """A JSON-object field."""
    value = value_of(record, key, label)
    if not isinstance(value, dict):
        raise RowIssue("wrong_type", label, f"'{label}' is {type(value).__name__}, not an object")
    return value


def check_distinct(chosen: str, rejected: str, label: str) -> None:
    """Two responses that differ only in surrounding whitespace express no preference."""
    if chosen.strip() == rejected.strip():
        raise RowIssue("identical_responses", label, "the two responses are identical")


def check_responses(chosen: str, rejected: str, labels: tuple[str, str]) -> None:
    """Both responses non-empty, and different."""
    for label, response in zip(labels, (chosen, rejected)):
        if not response.strip():
            raise RowIssue("empty_field", label, f"the '{label}' response is empty")
    check_distinct(chosen, rejected, labels[1])


def user_id(record: dict, context: ReadContext) -> str | None:
    """The user's own id (mapped column, or a column named ``id``), as a string."""
    key = context.key("id")
    if key not in record:
        return None
    value = value_of(record, key, key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowIssue("wrong_type", key, f"id '{key}' is {type(value).__name__}, not str/int")
    if not str(value).strip():
        raise RowIssue("empty_field", key, f"id '{key}' is empty")
    return str(value)


def split_of(record: dict, container_split: str | None) -> str | None:
    """A record's own ``split`` field wins over the split it was stored under."""
    value = record.get("split")
    return value if isinstance(value, str) else container_split


def other_columns(record: dict, used: set[str]) -> dict[str, Any]:
    """Unmapped user columns, kept verbatim as metadata."""
    return {k: v for k, v in record.items() if k not in used}


def make_pair(record: dict, context: ReadContext, split: str | None, texts: tuple[str, str, str],
              used: set[str]) -> Pair:
    """The pair of a row whose texts are known: its id (the user's, or a hash of the row) and
    its other columns as metadata."""
    row_id = user_id(record, context) or row_hash(record)[:16]
    return Pair(row_id, *texts, split_of(record, split),
                other_columns(record, {*used, context.key("id"), "split"}))
