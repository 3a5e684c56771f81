"""Detection metrics against independent computations (scipy/brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prefprune.detection import auroc, average_precision, detection_report, share_found_in_top


def brute_auroc(scores, truth):
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    truth = rng.random(40) < 0.3
    assert auroc(scores, truth) == pytest.approx(brute_auroc(scores, truth))


def test_perfect_and_inverted_scores():
    truth = [True, True, False, False, False]
    assert auroc([5, 4, 3, 2, 1], truth) == 1.0
    assert auroc([1, 2, 3, 4, 5], truth) == 0.0
    assert average_precision([5, 4, 3, 2, 1], truth) == 1.0
    assert share_found_in_top([5, 4, 3, 2, 1], truth, 1) == 0.5


def test_average_precision_by_hand():
    # ranked truth: T F T F -> precision at hits 1/1 and 2/3
    assert average_precision([4, 3, 2, 1], [True, False, True, False]) == pytest.approx(
        (1 + 2 / 3) / 2)


def test_degenerate_inputs():
    assert np.isnan(auroc([1, 2], [True, True]))
    with pytest.raises(ValueError):
        auroc([1, 2, 3], [True, False])
    report = detection_report([3, 2, 1, 0] * 5, [True, False, False, False] * 5)
    assert set(report) == {"auroc", "average_precision", "found_in_top_10%"}
