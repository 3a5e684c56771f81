"""The floor a reward model must beat: "the shorter answer wins", on each replicate's test split.

On HH-RLHF harmless the rejected answer is often the longer one (it complies with a harmful
request at length), so a model that only learned length would look better than chance. This
prints, for the data and split settings of an experiment config, the test accuracy of the
length rule per replicate (each replicate's own split with ``split_per_seed``) and its mean.

    python bench/length_baseline.py bench/configs/hh-clean.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics

from prefprune import ExperimentConfig, prepare_data


def shorter_wins(test) -> float:
    """Share of pairs whose chosen response is shorter (in characters; a tie counts half)."""
    scores = [1.0 if len(c) < len(r) else 0.5 if len(c) == len(r) else 0.0
              for c, r in zip(test["chosen"], test["rejected"])]
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an experiment config (its data and split settings)")
    args = parser.parse_args()
    config = ExperimentConfig.from_yaml(args.config)
    per_seed = {}
    for seed in config.seeds:
        data = prepare_data(config.data, **{**config.data_kwargs(),
                                            "seed": config.replicate_split_seed(seed)})
        per_seed[seed] = shorter_wins(data.splits["test"])
    values = list(per_seed.values())
    print(json.dumps({"shorter_wins": per_seed, "mean": statistics.mean(values),
                      "sd": statistics.stdev(values) if len(values) > 1 else 0.0}, indent=2))


if __name__ == "__main__":
    main()
