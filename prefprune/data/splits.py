"""Train/validation/test splits and dataset fingerprints.

Splits are grouped by prompt because pairs sharing a prompt are near-duplicates
for a reward model: a prompt in both train and test would leak and inflate
test accuracy.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence

import datasets

from prefprune.errors import DataError

SPLITS = ("train", "validation", "test")
#: Train/validation/test shares of data without source splits, wherever a default is needed.
DEFAULT_SPLIT_FRACTIONS = (0.6, 0.15, 0.25)
#: Source split names (TL;DR and Hugging Face conventions) -> our split.
SOURCE_SPLITS = {
    "train": "train",
    "valid1": "validation",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
    "valid2": "test",
    "test": "test",
}


def split_preferences(
    ds: datasets.Dataset,
    *,
    fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Split into ``train``/``validation``/``test``.

    The source's own splits are used when every row has a known
    ``source_split`` (TL;DR: train, valid1 -> validation, valid2 -> test). If the
    source has train and test but no validation rows, validation is carved out
    of train, grouped by prompt. Otherwise all rows get a seeded split grouped
    by prompt, with sizes as close to ``fractions`` as the groups allow. Fractions summing
    below one leave the remaining prompt groups out of every split: a quick run on a seeded
    sample of the data, which the caller reports (``PreparedData.left_out``).
    Rows keep their dataset order inside each split.
    """
    _check_fractions(fractions)
    by_source = _source_assignment(ds)
    if by_source is None:
        indices = _grouped(ds["prompt"], range(len(ds)), fractions, seed)
    else:
        indices = {name: [i for i, s in enumerate(by_source) if s == name] for name in SPLITS}
        if not indices["validation"] and indices["train"] and indices["test"]:
            share = fractions[1] / (fractions[0] + fractions[1])
            carved = _grouped(ds["prompt"], indices["train"], (1 - share, share, 0.0), seed)
            indices.update(train=carved["train"], validation=carved["validation"])
    return datasets.DatasetDict({name: ds.select(sorted(indices[name])) for name in SPLITS})


def _check_fractions(fractions: Sequence[float]) -> None:
    """Three non-negative fractions with a positive sum of at most one."""
    if len(fractions) != 3 or min(fractions) < 0 or not 0 < sum(fractions) <= 1 + 1e-6:
        raise DataError(f"fractions must be three non-negative numbers summing to at most 1 "
                        f"(less leaves the rest of the data out), got {tuple(fractions)}")


def _source_assignment(ds: datasets.Dataset) -> list[str] | None:
    """Our split name per row from ``source_split``, or None if any row lacks a known one."""
    if "source_split" not in ds.column_names or len(ds) == 0:
        return None
    mapped = [SOURCE_SPLITS.get(s) if isinstance(s, str) else None for s in ds["source_split"]]
    return None if None in mapped else mapped


def _grouped(
    prompts: Sequence[str], rows: Sequence[int], fractions: Sequence[float], seed: int
) -> dict[str, list[int]]:
    """Assign whole prompt groups, in seeded random order, to the split furthest below target;
    the share the fractions leave over is a fourth, unused bucket."""
    groups: dict[str, list[int]] = {}
    for i in rows:
        groups.setdefault(prompts[i], []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    shares = [*fractions, max(0.0, 1 - sum(fractions))]
    targets = [f * len(rows) for f in shares]
    buckets: list[list[int]] = [[] for _ in shares]
    open_buckets = [k for k, share in enumerate(shares) if share > 1e-9]
    for group in order:
        best = max(open_buckets, key=lambda k: targets[k] - len(buckets[k]))
        buckets[best].extend(group)
    return dict(zip(SPLITS, buckets))


def fingerprint(ds: datasets.Dataset) -> str:
    """First 16 hex digits of a sha256 over id, prompt, chosen, rejected in row order.

    Order-sensitive on purpose: it identifies the exact training input of a run.
    """
    digest = hashlib.sha256()
    columns = ["id", "prompt", "chosen", "rejected"]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"cannot fingerprint: dataset lacks columns {missing}")
    for batch in ds.select_columns(columns).iter(batch_size=1000):
        for row in zip(*(batch[c] for c in columns)):
            digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]
