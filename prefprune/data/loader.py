"""``load_preferences``: any supported source -> canonical ``datasets.Dataset`` + report."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow as pa

from prefprune.data.containers import Container, RawRow, read_container
from prefprune.data.fields import Pair, ReadContext
from prefprune.data.formats import (
    CANONICAL_COLUMNS,
    CONVERTERS,
    Converter,
    detect_format,
)
from prefprune.data.jsontext import deep_field, too_deep
from prefprune.data.messages import PLAIN, Rendering
from prefprune.data.options import DataOptions
from prefprune.data.report import IngestionReport, RowIssue, SkippedRow
from prefprune.data.splits import SOURCE_SPLITS
from prefprune.errors import DataError

_CANONICAL_TYPES = {
    "id": pa.string(),
    "prompt": pa.string(),
    "chosen": pa.string(),
    "rejected": pa.string(),
    "source_format": pa.string(),
    "source_file": pa.string(),
    "source_row": pa.int64(),
    "source_split": pa.string(),
}


@dataclass
class LoadResult:
    """The canonical dataset and the account of every input row."""

    dataset: datasets.Dataset
    report: IngestionReport


def load_preferences(source: str | os.PathLike, options: DataOptions | None = None, *,
                     rendering: Rendering | None = None) -> LoadResult:
    """Load preference pairs from a file, a saved dataset directory or a hub name, read as
    ``options`` say (default: the layout detected, every column under its canonical name).

    Bad rows are skipped and reported, or raise :class:`DataError` on the first one with
    ``options.strict``. ``rendering`` says how message lists become text (default: the plain
    rendering). ``source_row`` is the 1-based line for JSON-lines input and the 0-based record
    index otherwise (see ``containers``).
    """
    options = options or DataOptions()
    container, fmt, context = open_source(source, options, rendering)
    pairs, skipped = _convert_all(container, fmt, context, options.strict)
    pairs = _drop_unplaceable(pairs, skipped, container, options.strict)
    report = IngestionReport(container.label, fmt, len(container.rows), len(pairs), skipped,
                             container.kind)
    return LoadResult(_to_dataset(pairs, fmt, container.label), report)


def open_source(source: str | os.PathLike, options: DataOptions,
                rendering: Rendering | None = None) -> tuple[Container, str, ReadContext]:
    """The raw rows of ``source``, its layout (``options.format``, or detected) and the checked
    column mapping: everything a reader or a writer of the source needs to find its pairs."""
    container = read_container(source, options)
    mapping = check_mapping(dict(options.columns), container)
    fmt = options.format if options.format != "auto" else detect_layout(container, mapping)
    return container, fmt, ReadContext(mapping, options.label_values, rendering or PLAIN)


def check_mapping(mapping: dict[str, str], container: Container) -> dict[str, str]:
    """Reject mappings onto columns the data lacks (:class:`DataOptions` has already checked
    the canonical names)."""
    for canonical, column in mapping.items():
        if column not in container.columns:
            raise DataError(f"{container.label}: column '{column}' (mapped to '{canonical}') "
                            f"not found; available columns: {', '.join(container.columns)}")
    return mapping


def detect_layout(container: Container, mapping: Mapping[str, str]) -> str:
    """Detect the format from the first row that parsed as an object."""
    first = next((row.record for row in container.rows if isinstance(row.record, dict)), None)
    if first is None:
        raise DataError(f"{container.label}: no readable record to detect the format from")
    try:
        return detect_format(first, mapping)
    except DataError as exc:
        raise DataError(f"{container.label}: {exc}") from exc


def _convert_all(
    container: Container, fmt: str, context: ReadContext, strict: bool
) -> tuple[list[tuple[RawRow, Pair]], list[SkippedRow]]:
    """Convert every row; collect issues, or raise on the first one when strict."""
    convert = CONVERTERS[fmt]
    kept: list[tuple[RawRow, Pair]] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    for raw in container.rows:
        try:
            pair = convert_row(raw, convert, context)
            _check_unique(pair.id, raw.position, seen, container.unit)
        except RowIssue as issue:
            row = SkippedRow(container.label, raw.position, issue.field, issue.reason,
                             issue.detail, container.unit)
            if strict:
                raise DataError(row.message()) from issue
            skipped.append(row)
            continue
        kept.append((raw, pair))
    return kept, skipped


def _drop_unplaceable(pairs: list[tuple[RawRow, Pair]], skipped: list[SkippedRow],
                      container: Container, strict: bool) -> list[tuple[RawRow, Pair]]:
    """When some rows name a known source split (TL;DR's train/valid1/valid2, a dataset's
    train/test), the source's splits are used; a row whose split is missing or unknown then
    cannot be placed. It is skipped and reported, rather than turning the whole source into a
    random split (which would put train rows into test)."""
    known = [isinstance(p.split, str) and p.split in SOURCE_SPLITS for _, p in pairs]
    if all(known) or not any(known):
        return pairs
    names = ", ".join(SOURCE_SPLITS)
    kept = []
    for (raw, pair), ok in zip(pairs, known):
        if ok:
            kept.append((raw, pair))
            continue
        row = SkippedRow(container.label, raw.position, "split", "unknown_split",
                         f"split {pair.split!r} is not one of {names}, which the other rows "
                         "use", container.unit)
        if strict:
            raise DataError(row.message())
        skipped.append(row)
    return kept


def convert_row(raw: RawRow, convert: Converter, context: ReadContext) -> Pair:
    """One raw row through the format's converter. A record nested deeper than
    :data:`~prefprune.data.jsontext.MAX_DEPTH` is refused first: its metadata would make
    pyarrow and ``datasets`` recurse past their limits and fail the whole source."""
    if raw.error is not None:
        raise RowIssue(raw.error_reason, raw.error_field, raw.error)
    if not isinstance(raw.record, dict):
        raise RowIssue("wrong_type", None,
                       f"record is {type(raw.record).__name__}, not an object")
    deep = deep_field(raw.record)
    if deep is not None:
        raise RowIssue("too_deep", deep, too_deep(deep))
    return convert(raw.record, context, raw.split)


def _check_unique(row_id: str, position: int, seen: dict[str, int], unit: str) -> None:
    """Ids must be unique; the first occurrence wins and later ones are reported."""
    if row_id in seen:
        raise RowIssue("duplicate_id", "id",
                       f"id '{row_id}' already used at {unit} {seen[row_id]}")
    seen[row_id] = position


def _to_dataset(pairs: list[tuple[RawRow, Pair]], fmt: str, label: str) -> datasets.Dataset:
    """Canonical columns with fixed types, then metadata columns in first-seen order."""
    canonical = {
        "id": [p.id for _, p in pairs],
        "prompt": [p.prompt for _, p in pairs],
        "chosen": [p.chosen for _, p in pairs],
        "rejected": [p.rejected for _, p in pairs],
        "source_format": [fmt] * len(pairs),
        "source_file": [label] * len(pairs),
        "source_row": [raw.position for raw, _ in pairs],
        "source_split": [p.split for _, p in pairs],
    }
    arrays = {name: pa.array(values, _CANONICAL_TYPES[name]) for name, values in canonical.items()}
    metas = [{_meta_name(k): v for k, v in p.meta.items()} for _, p in pairs]
    for name in dict.fromkeys(k for meta in metas for k in meta):
        arrays[name] = _meta_array([meta.get(name) for meta in metas])
    return datasets.Dataset(pa.table(arrays))


def _meta_name(key: str) -> str:
    """Source columns that clash with canonical names are kept under ``meta_<name>``."""
    return f"meta_{key}" if key in CANONICAL_COLUMNS else key


def _meta_array(values: list[Any]) -> pa.Array:
    """Verbatim values; a column mixing incompatible types is stored as JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                         for v in values], pa.string())
