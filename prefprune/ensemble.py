"""Stable scores: combine the scores of several models, and say how much they agree.

A single model's ranking of the training pairs is fragile: two runs that differ only in their
seed can rank the flipped labels at the top or nowhere. An ensemble scores every pair with
several members and combines them per pair, keeping the spread:

* ``seeds``: members trained independently from different seeds (each a full training and
  scoring); the base model is member 0;
* ``checkpoints``: members are the checkpoints of one training run (TracIn-CP style), scored
  from gradients captured while training (see :mod:`prefprune.checkpoints`).

Combination (``combine``): ``zscore`` averages each member's standardised harm, ``rank``
averages each member's rank (as a harm: higher = more harmful). Each combined score is a new
column ``<score>_ens`` with its own rank, and ``<score>_ens_sd`` is the per-pair spread across
members (not a score: it has no rank and cannot be selected by). The agreement between
members (mean pairwise Spearman correlation, mean overlap of their top 10%) goes to the
sidecar and the report.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from prefprune.config import Settings, setting
from prefprune.influence.formulas import ranks

#: Suffix of a combined score column and of its per-pair spread.
SUFFIX = "_ens"
SPREAD = "_ens_sd"
#: Scores that are not ensembled: the random control is a control, not an estimate.
NOT_ENSEMBLED = frozenset({"random"})


@dataclass(frozen=True)
class EnsembleConfig(Settings):
    """Whether and how to combine several models' scores (docs/method.md, section 5)."""

    section: ClassVar[str] = "ensemble"

    members: int | None = setting(
        None, min=2, help="Combine the scores of this many models (2 or more); default: one "
                          "model, no ensemble.")
    kind: str = setting("seeds", choices=("seeds", "checkpoints"),
                        help="Members trained from different seeds, or the checkpoints of one "
                             "training run (TracIn-CP style, cheaper).")
    combine: str = setting("zscore", choices=("zscore", "rank"),
                           help="Average the members' standardised harm, or their ranks.")

    @property
    def enabled(self) -> bool:
        return self.members is not None


def member_seeds(seed: int, members: int) -> list[int]:
    """Training seeds of a seed ensemble: member 0 is the base model's own seed."""
    return [seed + 1000 * k for k in range(members)]


def ensembled(columns: Sequence[str]) -> list[str]:
    """The score columns an ensemble combines (``if``, ``if@target``, ...)."""
    return [c for c in columns if c.split("@")[0] not in NOT_ENSEMBLED]


def ensemble_name(column: str, suffix: str = SUFFIX) -> str:
    """``if`` -> ``if_ens``; ``if@subreddit=tifu`` -> ``if_ens@subreddit=tifu``."""
    score, at, target = column.partition("@")
    return f"{score}{suffix}{at}{target}"


def combine(members: Sequence[pd.DataFrame], scores: Sequence[str], how: str = "zscore",
            weights: Sequence[float] | None = None
            ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Per score: the combined harm, its spread, and the members' agreement.

    ``members`` are score tables of the same pairs in the same order (their ``id`` columns
    must match). ``weights`` (default: equal) weigh the members' mean and spread: a TRL run's
    checkpoints weigh by their learning rates, as TracIn-CP does. Returns
    ``({column: values}, {score: agreement})``.
    """
    ids = members[0]["id"].tolist()
    for table in members[1:]:
        if table["id"].tolist() != ids:
            raise ValueError("ensemble members must score the same pairs in the same order")
    share = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(share) != len(members) or not (share >= 0).all() or share.sum() <= 0:
        raise ValueError("ensemble weights must be one non-negative number per member, "
                         "not all zero")
    share = share / share.sum()
    columns: dict[str, np.ndarray] = {}
    agreement: dict[str, dict[str, float]] = {}
    for score in ensembled(scores):
        stack = np.stack([table[score].to_numpy(dtype=np.float64) for table in members])
        scaled = _standardise(stack) if how == "zscore" else _rank_harm(stack)
        mean = share @ scaled
        columns[ensemble_name(score)] = mean
        columns[ensemble_name(score, SPREAD)] = _spread(scaled, mean, share)
        agreement[score] = member_agreement(stack)
    return columns, agreement


def _spread(scaled: np.ndarray, mean: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Per-pair standard deviation across members, weighted by ``share`` (summing to one);
    with equal shares it is the sample standard deviation (ddof=1)."""
    unbiased = 1.0 - float((share**2).sum())
    variance = share @ (scaled - mean) ** 2 / unbiased if unbiased > 0 else 0.0 * mean
    return np.sqrt(variance)


def add_columns(table: pd.DataFrame, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """``table`` with the combined columns, each score with its ``rank_`` beside it (joined
    at once: a per-target ensemble adds hundreds of columns)."""
    added = dict(columns)
    added.update({f"rank_{name}": ranks(values) for name, values in columns.items()
                  if SPREAD not in name})
    return pd.concat([table, pd.DataFrame(added, index=table.index)], axis=1)


def _standardise(stack: np.ndarray) -> np.ndarray:
    """Each member's harm as z-scores, so members on different scales weigh the same."""
    mean = stack.mean(axis=1, keepdims=True)
    sd = stack.std(axis=1, keepdims=True)
    return np.where(sd > 0, (stack - mean) / np.where(sd > 0, sd, 1.0), 0.0)


def _rank_harm(stack: np.ndarray) -> np.ndarray:
    """Each member's ranks as a harm in [0, 1]: 1 for its most harmful pair."""
    n = stack.shape[1]
    return np.stack([(n - ranks(row)) / max(1, n - 1) for row in stack])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by position, as the rank columns are)."""
    ra, rb = ranks(a).astype(np.float64), ranks(b).astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> float:
    """Share of ``a``'s top ``fraction`` (by harm) that is also in ``b``'s."""
    k = max(1, round(fraction * len(a)))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def member_agreement(stack: np.ndarray) -> dict[str, float]:
    """Mean pairwise Spearman and top-10% overlap between the members (rows of ``stack``)."""
    pairs = list(itertools.combinations(range(len(stack)), 2))
    if not pairs:
        return {"spearman": float("nan"), "top10_overlap": float("nan"), "members": 1}
    return {"spearman": float(np.nanmean([spearman(stack[i], stack[j]) for i, j in pairs])),
            "top10_overlap": float(np.mean([top_overlap(stack[i], stack[j])
                                            for i, j in pairs])),
            "members": len(stack)}
