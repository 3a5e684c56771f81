"""Paired difference between two scores' retrains in one arm of an experiment.

The experiment's summary compares every score with random removal and with no pruning; a
question such as "does gradient cosine find helpful pairs better than IF?" needs the two
scores compared with each other, paired by seed::

    python bench/paired.py bench/out/hh-flips20/results.json --group "remove helpful" \\
        grad_cos if

prints mean ± half-width of the 95% t interval (points of test accuracy) over the seeds both
scores ran, and each seed's difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefprune.experiment.stats import mean_interval


def paired(results: Path, group: str, first: str, second: str) -> dict:
    """Test-accuracy differences ``first − second`` per seed, and their mean interval."""
    runs = json.loads(results.read_text())["runs"]
    accuracy = {(r["method"], r["seed"]): r["test_accuracy"] for r in runs if r["group"] == group}
    seeds = sorted(s for m, s in accuracy if m == first and (second, s) in accuracy)
    if not seeds:
        raise SystemExit(f"{results}: no seed ran both {first} and {second} in {group!r}")
    diffs = [accuracy[first, s] - accuracy[second, s] for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, **mean_interval(diffs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="an experiment's results.json")
    parser.add_argument("--group", default="remove harmful",
                        help="arm: 'remove harmful', 'remove helpful' or 'relabel harmful'")
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    out = paired(args.results, args.group, args.first, args.second)
    seeds = ", ".join(f"{s}: {d * 100:+.1f}" for s, d in zip(out["seeds"], out["per_seed"]))
    half = f" ± {out['ci95'] * 100:.1f}" if out["ci95"] is not None else ""
    print(f"{args.group}: {args.first} − {args.second} = {out['mean'] * 100:+.1f}{half} points "
          f"over {out['n']} seeds ({seeds})")


if __name__ == "__main__":
    main()
