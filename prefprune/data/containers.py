"""Read raw records from a container (JSONL, JSON, CSV, Parquet, saved HF dataset, hub).

Containers only produce raw records with their exact position; what a record
*means* is the job of :mod:`prefprune.data.formats`. Positions are exact so a
later step can write a pruned dataset back in the input's own layout by
re-reading the input and keeping the rows whose position survived:

* JSON-lines input (``.jsonl``, ``.jsonl.gz``, or a ``.json`` file that holds
  JSON lines, like the original TL;DR ``comparisons/batch*.json``): the 1-based
  physical line number. Blank lines are not records and are not counted.
* everything else: the 0-based record index (for CSV the index of the data
  record after the header, which differs from the line when quoted fields span
  lines; for a dataset with several splits, the index within its split).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from prefprune.data.jsontext import deep_text_field, records_of, too_deep
from prefprune.data.options import DataOptions
from prefprune.errors import DataError

#: ``owner/name``: the only shape read from the hub without ``hub=True``.
_HUB_ID = re.compile(r"^[\w][\w.-]*/[\w][\w.-]*$")


@dataclass(frozen=True)
class RawRow:
    """One record as found in the container, or the reason it could not be parsed."""

    position: int
    record: Any = None
    error: str | None = None
    split: str | None = None
    error_reason: str = "malformed_json"
    error_field: str | None = None


@dataclass
class Container:
    """All raw rows of one source plus what is needed to describe positions."""

    kind: str
    label: str
    unit: str
    rows: list[RawRow]
    columns: list[str] = field(default_factory=list)


def read_container(source: str | os.PathLike, options: DataOptions) -> Container:
    """All raw rows of ``source``, read as :func:`locate_source` says."""
    where = locate_source(source, options)
    if where == "hub":
        container = _read_hub(str(source), options)
    elif where == "folder":
        container = _read_saved_dataset(Path(source), options.hub_split)
    else:
        container = _FILE_READERS[where](Path(source))
    if not container.rows:
        raise DataError(f"{container.label}: contains no records")
    if not container.columns:
        container.columns = _union_of_keys(row.record for row in container.rows)
    return container


def locate_source(source: str | os.PathLike, options: DataOptions) -> str:
    """How ``source`` is read: ``hub``, ``folder`` (a saved dataset) or a file suffix, decided
    without reading it, so that a command can check its data before it loads a model.

    A local file or folder wins; else a hub dataset, but only when the name looks like a hub
    id (``owner/name``) or ``options.hub`` says so: a mistyped file name is reported at once
    instead of spending the network retries of a hub lookup on it."""
    path = Path(source)
    if options.hub:
        return "hub"
    if path.is_dir():
        return "folder"
    if path.exists():
        suffix = _data_suffix(path.name)
        if not suffix:
            raise DataError(f"{path}: unknown file type; expected one of .jsonl, .jsonl.gz, "
                            ".json, .csv, .parquet, a saved Hugging Face dataset directory or a "
                            "hub dataset name")
        return suffix
    if _looks_like_hub_id(str(source)):
        return "hub"
    raise DataError(f"{source}: file not found (a hub dataset is read when named as "
                    "owner/name, or with --hub)")


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name``, without a data-file suffix, whose owner is not a local folder (then it
    is a local path that does not exist)."""
    if not _HUB_ID.match(name) or _data_suffix(name):
        return False
    return not Path(name.split("/")[0]).exists()


def _data_suffix(name: str) -> str:
    """The container suffix of a file name, ignoring a trailing ``.gz``."""
    base = name.lower().removesuffix(".gz")
    return next((s for s in _FILE_READERS if base.endswith(s)), "")


def _union_of_keys(records: Iterable[Any]) -> list[str]:
    """Column names of schemaless input: the keys of all object records, in first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        if isinstance(record, dict):
            keys.update(dict.fromkeys(record))
    return list(keys)


def read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped when the name ends in ``.gz``."""
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc
    if not data.strip():
        raise DataError(f"{path}: empty file")
    return data


def _read_jsonl(path: Path) -> Container:
    return _json_lines(path, read_bytes(path), "jsonl")


def _json_lines(path: Path, data: bytes, kind: str) -> Container:
    """One JSON value per line; a bad line becomes a row with an error, not a failure."""
    rows = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            # utf-8-sig on the first line: a byte-order mark is not part of the record
            rows.append(_json_row(number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as exc:
            rows.append(RawRow(number, error=f"invalid JSON: {exc}"))
    return Container(kind, str(path), "line", rows)


def _json_row(position: int, text: str) -> RawRow:
    """One record's JSON text, parsed; a record too deep for the parser is skipped alone."""
    try:
        return RawRow(position, json.loads(text))
    except json.JSONDecodeError as exc:
        return RawRow(position, error=f"invalid JSON: {exc}")
    except RecursionError:
        field = deep_text_field(text)
        return RawRow(position, error=too_deep(field), error_reason="too_deep",
                      error_field=field)


def _read_json(path: Path) -> Container:
    """A JSON list of records or ``{"data": [...]}``; JSON lines in a .json file also work."""
    data = read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
        value = json.loads(text)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    except RecursionError:
        return _read_deep_json(path, data, text)
    except json.JSONDecodeError as exc:
        if _first_line_is_object(data):
            return _json_lines(path, data, "json_lines")
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if isinstance(value, dict):
        if not isinstance(value.get("data"), list):
            return _json_lines(path, data, "json_lines")  # one record per line, maybe just one
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}")
    return Container("json", str(path), "row", [RawRow(i, r) for i, r in enumerate(value)])


def _read_deep_json(path: Path, data: bytes, text: str) -> Container:
    """A JSON file with a record too deep for the parser: its array is cut into elements by a
    flat scan and each is parsed on its own, so that only the deep one is skipped."""
    records = records_of(text)
    if records is None:
        return _json_lines(path, data, "json_lines")
    rows = [_json_row(i, text[m.start:m.end]) for i, m in enumerate(records.elements)]
    return Container("json", str(path), "row", rows)


def _first_line_is_object(data: bytes) -> bool:
    """Whether the content looks like JSON lines (its first line is a JSON object)."""
    first = data.removeprefix(codecs.BOM_UTF8).lstrip().split(b"\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False


def _read_csv(path: Path) -> Container:
    """CSV with a header; all values are strings, empty cells are empty strings."""
    data = read_bytes(path)
    try:
        with csv_field_limit(len(data)):
            reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
            records = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot parse CSV: {exc}") from exc
    rows = [_csv_row(i, record, len(reader.fieldnames or [])) for i, record in enumerate(records)]
    return Container("csv", str(path), "row", rows, list(reader.fieldnames or []))


@contextmanager
def csv_field_limit(size: int) -> Iterator[None]:
    """Let one cell be as long as the whole file (``csv`` refuses cells over 131,072
    characters, which one long response in a JSON file does not). The limit is the ``csv``
    module's global setting, so it is put back afterwards; the cap keeps it within a C long."""
    previous = csv.field_size_limit()
    csv.field_size_limit(min(max(size, previous), 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_row(index: int, record: dict, width: int) -> RawRow:
    """A CSV record with more cells than header fields is malformed, not silently cut."""
    if None in record:
        extra = len(record[None])
        detail = f"{width + extra} cells but the header has {width}"
        return RawRow(index, error=detail, error_reason="malformed_row")
    return RawRow(index, record)


def _read_parquet(path: Path) -> Container:
    """Parquet via pyarrow; nulls stay None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    rows = [RawRow(i, r) for i, r in enumerate(table.to_pylist())]
    return Container("parquet", str(path), "row", rows, table.column_names)


def _read_saved_dataset(path: Path, split: str | None) -> Container:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``; a split
    is chosen among those it has."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a saved Hugging Face dataset directory: {exc}") from exc
    if split is None:
        return _from_dataset(loaded, "hf_disk", str(path), None)
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path}: a saved dataset without splits has no split '{split}'; "
                        "drop --hub-split")
    if split not in loaded:
        raise DataError(f"{path}: no split '{split}'; its splits are "
                        f"{', '.join(loaded) or 'none'}")
    return _from_dataset(loaded[split], "hf_disk", str(path), split)


def _read_hub(name: str, options: DataOptions) -> Container:
    """A hub dataset; only reached when ``source`` is not a local path."""
    try:
        with _quiet_hub():
            loaded = datasets.load_dataset(name, options.hub_config, split=options.hub_split,
                                           data_dir=options.data_dir)
    except Exception as exc:  # the hub raises many unrelated types; report them uniformly
        raise DataError(
            f"{name}: not a local path, and loading it as a hub dataset failed: {exc}"
        ) from exc
    return _from_dataset(loaded, "hub", name, options.hub_split)


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """The hub client logs each failed request; the one error prefprune raises says it all."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _from_dataset(
    loaded: datasets.Dataset | datasets.DatasetDict, kind: str, label: str, split: str | None
) -> Container:
    """Rows of a Dataset (tagged with ``split``, the one it was loaded as), or of every split
    of a DatasetDict (tagged with the split's name)."""
    if isinstance(loaded, datasets.DatasetDict):
        parts = [_from_dataset(ds, kind, label, name) for name, ds in loaded.items()]
        rows = [row for part in parts for row in part.rows]
        return Container(kind, label, "row", rows, parts[0].columns if parts else [])
    rows = [RawRow(i, record, split=split) for i, record in enumerate(loaded)]
    return Container(kind, label, "row", rows, list(loaded.column_names))


_FILE_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
