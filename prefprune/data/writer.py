"""Write a source back in its own container and layout, with some pairs removed or relabelled.

Pairs are found by id, the same way the loader makes them: every raw row is converted again,
so a pair maps back to exactly the row it came from, whatever the container. Later rows with
the same id (which the loader skipped as duplicates) share the pair's fate, so that a removed
pair cannot come back as its own duplicate. Other skipped rows (malformed ones) and rows not
named are written unchanged, byte for byte where the container allows it (JSON lines, a JSON
array of records, CSV); a relabelled row is rewritten in the source layout (TL;DR: ``choice``
flipped; A/B layouts: the label, in its own convention; HH and generic: the chosen and
rejected fields swapped).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from prefprune.data.containers import Container, RawRow, csv_field_limit, read_bytes
from prefprune.data.fields import ReadContext
from prefprune.data.formats import CONVERTERS
from prefprune.data.jsontext import records_of
from prefprune.data.loader import convert_row, open_source
from prefprune.data.options import DataOptions
from prefprune.data.pairwise import flip_label
from prefprune.data.report import RowIssue
from prefprune.errors import DataError
from prefprune.files import replacing_folder, write_atomic, write_bytes_atomic


@dataclass
class RewriteReport:
    """What the rewrite did: rows written, and the ids removed or relabelled."""

    output: Path
    rows_in: int
    rows_out: int
    removed: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)
    duplicate_rows: int = 0  # rows beyond a pair's first that were removed/relabelled with it


def rewrite_source(
    source: str | os.PathLike,
    output: str | os.PathLike,
    options: DataOptions | None = None,
    *,
    remove: set[str] | frozenset[str] = frozenset(),
    relabel: set[str] | frozenset[str] = frozenset(),
) -> RewriteReport:
    """Copy ``source`` (read as ``options`` say) to ``output`` without the pairs in ``remove``
    and with the labels of the pairs in ``relabel`` flipped. Raises :class:`DataError` when an
    id is not in the source (the scores were computed on other data)."""
    container, fmt, context = open_source(source, options or DataOptions())
    actions = _row_actions(container, fmt, context, set(remove), set(relabel))
    missing = (set(remove) | set(relabel)) - {pid for pid, _ in actions.values()}
    if missing:
        raise DataError(f"{container.label}: {len(missing)} selected pair(s) are not in this "
                        f"source (e.g. id '{sorted(missing)[0]}'); were the scores computed on "
                        "other data?")
    flip = _Relabeller(fmt, context)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = _WRITERS[container.kind](container, output, actions, flip)
    report = RewriteReport(output, len(container.rows), written)
    for pid, action in dict(actions.values()).items():
        (report.removed if action == "remove" else report.relabelled).append(pid)
    report.duplicate_rows = len(actions) - len(report.removed) - len(report.relabelled)
    return report


def _row_actions(container: Container, fmt: str, context: ReadContext, remove: set[str],
                 relabel: set[str]) -> dict[int, tuple[str, str]]:
    """Row index in the container -> (pair id, "remove" | "relabel") for every row that
    carries a named pair's id (its first row and any later duplicates)."""
    convert = CONVERTERS[fmt]
    actions: dict[int, tuple[str, str]] = {}
    for index, raw in enumerate(container.rows):
        try:
            pid = convert_row(raw, convert, context).id
        except RowIssue:
            continue
        if pid in remove:
            actions[index] = (pid, "remove")
        elif pid in relabel:
            actions[index] = (pid, "relabel")
    return actions


@dataclass(frozen=True)
class _Relabeller:
    """Flips a raw record's label in its own layout: TL;DR's ``choice``, an A/B layout's label
    value (in its own convention and type), or the chosen and rejected fields of the others."""

    fmt: str
    context: ReadContext

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        record = dict(record)
        if self.fmt == "tldr":
            record["choice"] = 1 - int(record["choice"])
            return record
        if self.fmt == "pairwise":
            key = self.context.key("label")
            record[key] = flip_label(record[key], self.context.label_values)
            return record
        chosen, rejected = self.context.key("chosen"), self.context.key("rejected")
        record[chosen], record[rejected] = record[rejected], record[chosen]
        return record


def _atomic_bytes(path: Path, data: bytes) -> None:
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    write_bytes_atomic(path, data)


def _write_json_lines(container: Container, output: Path, actions: dict[int, tuple[str, str]],
                      flip: _Relabeller) -> int:
    """Untouched lines are copied byte for byte, with their own line endings (blank lines and
    a byte-order mark included); a relabelled line keeps its ending."""
    lines = read_bytes(Path(container.label)).splitlines(keepends=True)
    by_line = {container.rows[i].position: a for i, a in actions.items()}
    records = {row.position: row.record for row in container.rows}
    out = []
    for number, line in enumerate(lines, start=1):
        action = by_line.get(number, (None, None))[1]
        if action == "remove":
            continue
        if action == "relabel":
            body = line.rstrip(b"\r\n")
            bom = codecs.BOM_UTF8 if body.startswith(codecs.BOM_UTF8) else b""
            text = json.dumps(flip(records[number]), ensure_ascii=False).encode()
            line = bom + text + line[len(body):]
        out.append(line)
    _atomic_bytes(output, b"".join(out))
    return sum(1 for line in out if line.strip(codecs.BOM_UTF8 + b" \t\r\n"))


def _kept_records(container: Container, actions: dict[int, tuple[str, str]],
                  flip: _Relabeller) -> list[RawRow]:
    kept = []
    for index, row in enumerate(container.rows):
        action = actions.get(index, (None, None))[1]
        if action == "remove":
            continue
        kept.append(RawRow(row.position, flip(row.record) if action == "relabel" else row.record,
                           row.error, row.split, row.error_reason))
    return kept


def _write_json(container: Container, output: Path, actions: dict[int, tuple[str, str]],
                flip: _Relabeller) -> int:
    """Untouched records, and the text around the array of records, are copied byte for
    byte (a record the loader skipped as too deep to parse included); a relabelled record is
    written in its place, and a removed one is left out with the comma before it."""
    data = read_bytes(Path(container.label))
    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    text = data[len(bom):].decode("utf-8")
    records = records_of(text)
    if records is None or len(records.elements) != len(container.rows):
        raise DataError(f"{container.label}: changed while it was being rewritten")
    elements = records.elements
    pieces = [text[:records.open + 1], text[records.open + 1:elements[0].start]]
    for index, (element, row) in enumerate(zip(elements, container.rows)):
        action = actions.get(index, (None, None))[1]
        if action == "remove":
            continue
        if len(pieces) > 2:  # the separator (comma and spacing) that came before this record
            pieces.append(text[elements[index - 1].end:element.start])
        pieces.append(json.dumps(flip(row.record), ensure_ascii=False) if action == "relabel"
                      else text[element.start:element.end])
    pieces.append(text[elements[-1].end:])
    _atomic_bytes(output, bom + "".join(pieces).encode("utf-8"))
    return len(elements) - sum(a == "remove" for _, a in actions.values())


def _write_csv(container: Container, output: Path, actions: dict[int, tuple[str, str]],
               flip: _Relabeller) -> int:
    """Untouched records (the header, blank lines and malformed rows included) are copied as
    they were, byte for byte with their own line endings; a relabelled record is written
    through the csv module with the file's line ending."""
    data = read_bytes(Path(container.label))
    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    text = data[len(bom):].decode("utf-8")
    ending = "\r\n" if "\r\n" in text else "\n"
    out, header, index, used, written = [], None, -1, 0, 0
    for row, raw in _csv_records(text):
        used += len(raw)
        if header is None or not row:  # the header, or a blank line (not a record)
            header = header if header is not None else row
            out.append(raw)
            continue
        index += 1
        action = actions.get(index, (None, None))[1]
        if action == "remove":
            continue
        if action == "relabel":
            buffer = io.StringIO(newline="")
            csv.writer(buffer, lineterminator=ending).writerow(
                [flip(dict(zip(header, row)))[name] for name in header])
            raw = buffer.getvalue() if raw.endswith("\n") else buffer.getvalue().rstrip("\r\n")
        out.append(raw)
        written += 1
    out.append(text[used:])  # anything after the last record (trailing blanks)
    _atomic_bytes(output, bom + "".join(out).encode("utf-8"))
    return written


def _csv_records(text: str) -> Iterator[tuple[list[str], str]]:
    """Each CSV row with the exact text it was read from (its lines and their endings)."""
    lines = re.split(r"(?<=\n)", text)
    reader = csv.reader(lines)
    consumed = 0
    with csv_field_limit(len(text)):
        for row in reader:
            yield row, "".join(lines[consumed:reader.line_num])
            consumed = reader.line_num


def _write_parquet(container: Container, output: Path, actions: dict[int, tuple[str, str]],
                   flip: _Relabeller) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(container.label)
    records = [row.record for row in _kept_records(container, actions, flip)]
    write_atomic(output, lambda tmp: pq.write_table(pa.Table.from_pylist(records, schema=schema),
                                                   tmp))
    return len(records)


def _write_dataset(container: Container, output: Path, actions: dict[int, tuple[str, str]],
                   flip: _Relabeller) -> int:
    """A saved or hub dataset comes back as a saved dataset directory (one split per split)."""
    kept = _kept_records(container, actions, flip)
    splits: dict[str | None, list[dict[str, Any]]] = {}
    for row in kept:
        splits.setdefault(row.split, []).append(row.record)
    built = {name: datasets.Dataset.from_list(records) for name, records in splits.items()}
    dataset = built[None] if list(built) == [None] else datasets.DatasetDict(built)
    with replacing_folder(output) as tmp:
        dataset.save_to_disk(str(tmp))
    return len(kept)


_WRITERS = {
    "jsonl": _write_json_lines,
    "json_lines": _write_json_lines,
    "json": _write_json,
    "csv": _write_csv,
    "parquet": _write_parquet,
    "hf_disk": _write_dataset,
    "hub": _write_dataset,
}
