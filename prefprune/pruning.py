"""Choose pairs by score and apply the choice: remove them, or flip their labels.

Selection works on a score table (one row per training pair, every score a harm: larger = more
harmful). ``harmful`` takes the top fraction by harm, ``helpful`` the bottom fraction (the pairs
whose removal the score predicts would hurt most). Ties break by table order, so a selection
is a pure function of the table.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import pandas as pd

from prefprune.config import Settings, setting
from prefprune.data import DataOptions, fingerprint, load_preferences
from prefprune.data.writer import RewriteReport, rewrite_source
from prefprune.errors import ConfigError, DataError, SelectionError, StaleDataWarning
from prefprune.files import (
    check_folder,
    claim_folder,
    remove_owned,
    write_json_atomic,
    write_text_atomic,
)
from prefprune.influence import ALL_SCORES
from prefprune.influence.results import ranked_columns, sidecar_of
from prefprune.progress import quiet_datasets

DIRECTIONS = ("harmful", "helpful")


class PruneConfigError(ConfigError, SelectionError):
    """A :class:`PruneConfig` setting is invalid."""


@dataclass(frozen=True)
class PruneConfig(Settings):
    """Which pairs a prune acts on, and what it does to them.

    One declaration serves ``prefprune prune`` (its flags are these fields),
    :func:`prune_source`, and every arm of an experiment, whose fractions obey the same
    limits as ``fraction``.
    """

    section: ClassVar[str] = "prune"
    error: ClassVar[type[ConfigError]] = PruneConfigError

    by: str = setting("if", help="Score column to rank by (e.g. if, grad_cos, loss, flip, or "
                                 "if@subreddit=tifu).")
    fraction: float = setting(0.1, above=0.0, below=1.0,
                              help="Share of the scored pairs to act on.")
    direction: str = setting("harmful", choices=DIRECTIONS,
                             help="harmful takes the largest harms, helpful the smallest.")
    relabel: bool = setting(False, help="Flip the selected pairs' labels instead of removing "
                                        "them.")

    @property
    def action(self) -> str:
        return "relabel" if self.relabel else "remove"


@dataclass(frozen=True)
class Selection:
    """The pairs chosen by one score, in rank order (most extreme first)."""

    config: PruneConfig
    ids: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"by": self.config.by, "fraction": self.config.fraction,
                "direction": self.config.direction, "pairs": len(self.ids)}


def selection_size(total: int, fraction: float) -> int:
    """Pairs in the top ``fraction`` of ``total`` (rounded; at least one)."""
    return max(1, round(fraction * total))


def score_columns(table: pd.DataFrame) -> list[str]:
    """The columns a selection may rank by: the scores. prefprune writes a ``rank_<score>``
    beside each; a table made by hand may also use a score's name (``if``, ``if@target``).

    Metadata (``source_row``, ``margin``) and the ranks themselves are not scores: ranking by
    ``rank_if`` would take the pairs with the *largest* rank number, the least harmful.
    """
    ranked = ranked_columns(table)
    return [c for c in table.columns if c in ranked or str(c).split("@")[0] in ALL_SCORES]


def select(table: pd.DataFrame, config: PruneConfig) -> Selection:
    """The top ``config.fraction`` of ``table`` by score column ``config.by`` in
    ``config.direction``."""
    by = config.by
    scores = score_columns(table)
    if by not in scores:
        what = "has no column" if by not in table.columns else "has no score column"
        raise SelectionError(f"the score table {what} {by!r}; rank by one of its scores: "
                             f"{', '.join(scores)}")
    values = table[by].to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        raise SelectionError(f"score {by!r} has missing values; cannot rank by it")
    key = -values if config.direction == "harmful" else values
    order = np.argsort(key, kind="stable")[: selection_size(len(table), config.fraction)]
    return Selection(config, tuple(table["id"].astype(str).to_numpy()[order]))


def remove_pairs(dataset: datasets.Dataset, ids: Iterable[str]) -> datasets.Dataset:
    """``dataset`` without the pairs whose id is in ``ids``; every other row unchanged."""
    drop = set(ids)
    return dataset.select([i for i, pid in enumerate(dataset["id"]) if pid not in drop])


def relabel_pairs(dataset: datasets.Dataset, ids: Iterable[str]) -> datasets.Dataset:
    """``dataset`` with chosen and rejected swapped on the pairs in ``ids``.

    A ``label_flipped`` ground-truth column, when present, is toggled with them, so detection
    metrics keep describing which labels are wrong.
    """
    flip = set(ids)
    mask = [pid in flip for pid in dataset["id"]]
    columns = {"chosen": [r if m else c for c, r, m in zip(dataset["chosen"],
                                                          dataset["rejected"], mask)],
               "rejected": [c if m else r for c, r, m in zip(dataset["chosen"],
                                                            dataset["rejected"], mask)]}
    if "label_flipped" in dataset.column_names:
        columns["label_flipped"] = [bool(f) != m for f, m in zip(dataset["label_flipped"], mask)]
    order = dataset.column_names
    with quiet_datasets():
        for name, values in columns.items():
            dataset = dataset.remove_columns(name).add_column(
                name, values, feature=dataset.features[name])
        return dataset.select_columns(order)


def inject_flips(dataset: datasets.Dataset, share: float, seed: int) -> datasets.Dataset:
    """Swap the labels of a seeded ``share`` of the pairs, keeping the truth.

    ``injected_flip`` marks the swapped pairs; ``label_flipped`` becomes "this label is wrong
    now": the data's own ground truth (if any) toggled by the injection.
    """
    if not 0 <= share < 1:
        raise SelectionError(f"the injected flip share must be in [0, 1), got {share}")
    if "label_flipped" not in dataset.column_names:
        with quiet_datasets():
            dataset = dataset.add_column("label_flipped", [False] * len(dataset))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(dataset), size=round(share * len(dataset)), replace=False)
    ids = [dataset["id"][i] for i in sorted(chosen)]
    marked = set(ids)
    dataset = relabel_pairs(dataset, ids)
    with quiet_datasets():
        return dataset.add_column("injected_flip", [pid in marked for pid in dataset["id"]])


@dataclass
class PruneResult:
    """What ``prune`` wrote: the rewritten source, the evidence file and the summary."""

    selection: Selection
    rewrite: RewriteReport
    removed_file: Path
    summary_file: Path
    summary: dict[str, Any]
    table: pd.DataFrame

    def selected_scores(self) -> list[tuple[str, float]]:
        """(id, score) of every selected pair, most extreme first."""
        values = self.table.set_index(self.table["id"].astype(str))[self.selection.config.by]
        return [(pid, float(values[pid])) for pid in self.selection.ids]


#: What ``prune`` writes into its folder besides the data (replaced with ``overwrite``).
REMOVED_FILE = "removed.jsonl"
SUMMARY_FILE = "prune.json"


def read_scores(path: str | os.PathLike) -> pd.DataFrame:
    """A score table written by ``prefprune score`` (Parquet), checked to be usable."""
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable score table (Parquet): {exc}") from exc
    return check_score_table(table, str(path))


def check_score_table(table: pd.DataFrame, where: str = "the score table") -> pd.DataFrame:
    """A score table needs a unique ``id`` per row and at least one score column."""
    if "id" not in table.columns:
        raise DataError(f"{where}: no 'id' column, so its rows cannot be matched to pairs")
    ids = table["id"].astype(str)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DataError(f"{where}: {len(duplicated)} duplicated id(s) (e.g. "
                        f"'{duplicated.iloc[0]}'); each pair must appear once")
    if not score_columns(table):
        raise DataError(f"{where}: no score column (one of {', '.join(ALL_SCORES)}, or a "
                        "column with a rank_<column> beside it)")
    return table


def prune_source(
    scores: pd.DataFrame | str | os.PathLike,
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: PruneConfig | None = None,
    *,
    overwrite: bool = False,
    data_options: DataOptions | None = None,
) -> PruneResult:
    """Remove (or relabel) the pairs ``config`` selects (default: the top 10% by IF) from
    ``source``.

    ``output`` is a new or empty folder (or, with ``overwrite``, an earlier prune output) that
    receives the source rewritten in its own format and layout under its own name,
    ``removed.jsonl`` (one line per affected pair: action, every score and rank, metadata and
    texts) and ``prune.json`` (the selection and the counts). A score table saved with its
    sidecar must come from this very data (same pairs, same fingerprint), or nothing is
    written.
    """
    table = read_scores(scores) if not isinstance(scores, pd.DataFrame) else \
        check_score_table(scores)
    config = config or PruneConfig()
    chosen = select(table, config)
    output = Path(output)
    inputs = [source] if isinstance(scores, pd.DataFrame) else [source, scores]
    check_folder(output, "prune", overwrite=overwrite, inputs=inputs)
    options = data_options or DataOptions()  # strict: a bad row stops it before any output
    texts = load_preferences(source, options).dataset
    if not isinstance(scores, pd.DataFrame):
        _check_same_data(Path(scores), texts, source)
    relabel = config.relabel
    ids = set(chosen.ids)
    claim_folder(output, "prune", overwrite=overwrite)
    remove_owned(output, (REMOVED_FILE, SUMMARY_FILE))
    rewrite = rewrite_source(source, output / _output_name(source), options,
                             remove=set() if relabel else ids, relabel=ids if relabel else set())
    removed_file = output / REMOVED_FILE
    _write_evidence(removed_file, table, chosen, texts)
    summary = {**chosen.to_dict(), "action": config.action, "source": str(source),
               "output": str(rewrite.output), "rows_in": rewrite.rows_in,
               "rows_out": rewrite.rows_out, "scored_pairs": len(table)}
    summary_file = write_json_atomic(output / SUMMARY_FILE, summary)
    return PruneResult(chosen, rewrite, removed_file, summary_file, summary, table)


def _check_same_data(scores: Path, texts: datasets.Dataset, source: str | os.PathLike) -> None:
    """The sidecar records the fingerprint of every pair the scored source yielded; pruning
    other data with it would act on the wrong pairs, or on some and silently not others."""
    sidecar = sidecar_of(scores)
    if not sidecar.is_file():
        warnings.warn(f"{scores} has no sidecar ({sidecar.name}), so prune cannot check that "
                      f"it was computed on {source}", StaleDataWarning, stacklevel=3)
        return
    try:
        expected = json.loads(sidecar.read_text()).get("source_fingerprint")
    except (OSError, ValueError) as exc:
        raise DataError(f"{sidecar}: not a readable score sidecar: {exc}") from exc
    if expected and expected != fingerprint(texts):
        raise DataError(f"{scores} was computed on other data than {source} ({len(texts)} "
                        f"pairs now, fingerprint {fingerprint(texts)}; the scores record "
                        f"{expected}). Score this data again before pruning it")


def _output_name(source: str | os.PathLike) -> str:
    """The source's own file name; a hub name becomes a saved dataset directory."""
    path = Path(source)
    return path.name if path.exists() else str(source).replace("/", "__")


def _write_evidence(path: Path, table: pd.DataFrame, chosen: Selection,
                    texts: datasets.Dataset) -> None:
    """One JSON line per affected pair, most extreme first: why it was picked, and what."""
    row_of = {pid: i for i, pid in enumerate(texts["id"])}
    by_id = table.set_index(table["id"].astype(str))
    lines = []
    for rank, pid in enumerate(chosen.ids, start=1):
        record = {"id": pid, "action": chosen.config.action, "selected_rank": rank,
                  **json.loads(by_id.loc[pid].drop(labels="id").to_json())}
        pair = texts[row_of[pid]]
        record.update({k: pair[k] for k in ("prompt", "chosen", "rejected", "source_file",
                                            "source_row")})
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text_atomic(path, "\n".join(lines) + "\n")
