"""Paired difference between two scores' retrains in one arm of an experiment.

The experiment's summary compares every score with random removal and with no pruning; a
question such as "does gradient cosine find helpful pairs better than IF?" needs the two
scores compared with each other, paired by seed::

    python bench/paired.py bench/out/hh-flips20/results.json --group "remove helpful" \\
        grad_cos if

prints mean ± half-width of the 95% t interval (points of test accuracy) over the seeds both
scores ran, and each seed's difference. ``none`` names the unpruned baseline. With ``--other``
the second score is read from another experiment run on the same splits (another backbone,
say), which pairs two models seed by seed::

    python bench/paired.py bench/out/hh-clean-smollm2/results.json none none \
        --other bench/out/hh-clean/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefprune.experiment.stats import mean_interval


def accuracies(results: Path, group: str) -> dict[tuple[str, int], float]:
    """Test accuracy by (score, seed) in one arm; the unpruned baseline is score ``none``."""
    runs = json.loads(results.read_text())["runs"]
    return {(r["method"] or "none", r["seed"]): r["test_accuracy"] for r in runs
            if r["group"] in (group, "baseline")}


def paired(results: Path, group: str, first: str, second: str,
           other: Path | None = None) -> dict:
    """Test-accuracy differences ``first − second`` per seed, and their mean interval."""
    mine = accuracies(results, group)
    theirs = accuracies(other, group) if other is not None else mine
    seeds = sorted(s for m, s in mine if m == first and (second, s) in theirs)
    if not seeds:
        raise SystemExit(f"{results}: no seed ran both {first} and {second} in {group!r}")
    diffs = [mine[first, s] - theirs[second, s] for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, **mean_interval(diffs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="an experiment's results.json")
    parser.add_argument("--group", default="remove harmful",
                        help="arm: 'remove harmful', 'remove helpful' or 'relabel harmful'")
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--other", type=Path,
                        help="read the second score from this results.json (same splits)")
    args = parser.parse_args()
    out = paired(args.results, args.group, args.first, args.second, args.other)
    seeds = ", ".join(f"{s}: {d * 100:+.1f}" for s, d in zip(out["seeds"], out["per_seed"]))
    half = f" ± {out['ci95'] * 100:.1f}" if out["ci95"] is not None else ""
    print(f"{args.group}: {args.first} − {args.second} = {out['mean'] * 100:+.1f}{half} points "
          f"over {out['n']} seeds ({seeds})")


if __name__ == "__main__":
    main()
