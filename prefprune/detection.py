"""How well a score finds known-bad pairs (injected or simulated label flips).

Rank statistics only, so any monotone score works, and no extra dependency is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _validate(scores: Sequence[float], truth: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores and truth must be 1-D of equal length, got {s.shape}, {t.shape}")
    return s, t


def auroc(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """P(score of a random bad pair > score of a random good pair), ties counting one half
    (the Mann–Whitney statistic). NaN when either class is empty."""
    s, t = _validate(scores, truth)
    positives, negatives = int(t.sum()), int((~t).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    rank_sum = ranks[t].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Mean precision at the rank of each bad pair, scanning from the highest score."""
    s, t = _validate(scores, truth)
    if not t.any():
        return float("nan")
    hits = t[np.argsort(-s, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def share_found_in_top(scores: Sequence[float], truth: Sequence[bool], k: int) -> float:
    """Share of all bad pairs that are among the ``k`` highest scores."""
    s, t = _validate(scores, truth)
    if not t.any():
        return float("nan")
    top = np.argsort(-s, kind="stable")[:k]
    return float(t[top].sum() / t.sum())


def detection_report(scores: Sequence[float], truth: Sequence[bool],
                     fraction: float = 0.1) -> dict[str, float]:
    """AUROC, average precision, and the share of bad pairs in the top ``fraction``."""
    k = max(1, round(fraction * len(scores)))
    return {"auroc": auroc(scores, truth), "average_precision": average_precision(scores, truth),
            f"found_in_top_{fraction:.0%}": share_found_in_top(scores, truth, k)}
