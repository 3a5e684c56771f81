"""Statistics over replicate seeds: means, 95% t intervals, paired differences.

Every retrain is paired with its seed's unpruned baseline and with the random removal of the
same size and kind at that seed: pairing removes the seed-to-seed spread that both share, so a
one-point effect can show through a five-point spread between seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from prefprune.experiment.records import Arm, RunRecord


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile: tabulated up to 9 degrees of freedom, a Cornish–Fisher
    expansion beyond (error < 0.001 from 10 on), so no SciPy is needed at run time."""
    if df < 1:
        return math.nan
    exact = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646,
             8: 2.3060, 9: 2.2622}
    if df in exact:
        return exact[df]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_interval(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean and 95% t interval half-width over seeds (``None`` with one seed)."""
    array = np.asarray(list(values), dtype=np.float64)
    n = len(array)
    half = None
    if n > 1:
        half = float(t_quantile_975(n - 1) * array.std(ddof=1) / math.sqrt(n))
    return {"mean": float(array.mean()), "ci95": half, "n": n}


def _shapes(runs: list[RunRecord]) -> list[tuple[str | None, float, str, str]]:
    """Every pruned arm shape, in the order the runs first show it."""
    return list(dict.fromkeys(r.arm.shape for r in runs if r.arm.method is not None))


def summarise(runs: list[RunRecord],
              detection: Mapping[str, Mapping[str, Mapping[str, float]]],
              agreement: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None
              ) -> dict[str, Any]:
    """Mean and 95% interval per arm, paired differences against no pruning and against
    random pruning of the same size and kind, and detection metrics and ensemble agreement
    averaged over seeds."""
    index = {r.arm: r for r in runs}
    seeds = sorted({r.arm.seed for r in runs})
    baseline = [index[Arm(s)].test_accuracy for s in seeds if Arm(s) in index]
    arms = []
    for shape in _shapes(runs):
        done = [index[Arm(s, *shape)] for s in seeds if Arm(s, *shape) in index]
        acc = [r.test_accuracy for r in done]
        base = [index[Arm(r.arm.seed)].test_accuracy for r in done]
        method, fraction, direction, action = shape
        entry = {"method": method, "fraction": fraction, "direction": direction,
                 "action": action, "seeds": [r.arm.seed for r in done],
                 "test_accuracy": mean_interval(acc),
                 "test_loss": mean_interval(r.test_loss for r in done),
                 "vs_baseline": mean_interval(a - b for a, b in zip(acc, base))}
        controls = [index.get(r.arm.with_method("random")) for r in done]
        if method != "random" and all(controls):
            entry["vs_random"] = mean_interval(
                a - c.test_accuracy for a, c in zip(acc, controls))
        arms.append(entry)
    return {"baseline": {"test_accuracy": mean_interval(baseline), "seeds": seeds},
            "arms": arms, "detection": mean_detection(detection),
            "agreement": mean_detection(agreement or {})}


def mean_detection(detection: Mapping[str, Mapping[str, Mapping[str, float]]]
                   ) -> dict[str, dict[str, Any]]:
    """Per score and metric: the mean and interval over seeds (``values[seed][score]``)."""
    out: dict[str, dict[str, list[float]]] = {}
    for per_seed in detection.values():
        for method, metrics in per_seed.items():
            for metric, value in metrics.items():
                out.setdefault(method, {}).setdefault(metric, []).append(value)
    return {m: {k: mean_interval(v) for k, v in metrics.items()} for m, metrics in out.items()}
