"""Pick a backbone's training recipe by measurement: unpruned test accuracy per recipe.

Each recipe (LoRA layers, learning rate, epochs) is trained on the replicate splits of an
experiment config (``split_per_seed``) and measured on each split's test pairs; every recipe
sees the same splits, so recipes are compared by paired differences. The runs are experiment
folders under ``--output`` (no pruning arms), so an interrupted grid resumes, and the frozen
layers' output is shared through the feature cache.

    python bench/recipe.py bench/configs/hh-clean.yaml --backbone smollm2-135m-instruct \\
        --layers 1,2,4 --learning-rates 5e-3,1e-3 --seeds 0,1,2 --output bench/out/recipe
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from prefprune import ExperimentConfig, InfluenceConfig
from prefprune.experiment import Experiment
from prefprune.experiment.stats import mean_interval
from prefprune.files import write_json_atomic


def recipe_config(base: ExperimentConfig, backbone: str, layers: int, rate: float,
                  epochs: int, seeds: tuple[int, ...]) -> ExperimentConfig:
    """The base config's data and splits, this recipe, and nothing pruned but a random 10%
    (an experiment needs one arm; random removal is the cheapest)."""
    return base.replace(
        seeds=seeds, fractions=(0.1,), helpful=False, relabel=False, inject_flips=0.0,
        prune_by=("random",), helpful_by=None, relabel_by=None,
        model=base.model.replace(backbone=backbone, lora_layers=layers),
        train=base.train.replace(learning_rate=rate, epochs=epochs),
        influence=InfluenceConfig(scores=("random",)),
        ensemble=base.ensemble.replace(members=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment config whose data and splits to use")
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--layers", default="1,2,4")
    parser.add_argument("--learning-rates", default="5e-3,1e-3")
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    base = ExperimentConfig.from_yaml(args.config)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    grid = itertools.product([int(x) for x in args.layers.split(",")],
                             [float(x) for x in args.learning_rates.split(",")],
                             [int(x) for x in args.epochs.split(",")])
    table = args.output / "recipes.json"  # earlier invocations' recipes stay in it
    rows = json.loads(table.read_text()) if table.exists() else {}
    for layers, rate, epochs in grid:
        name = f"layers{layers}-lr{rate:g}-epochs{epochs}"
        config = recipe_config(base, args.backbone, layers, rate, epochs, seeds)
        result = Experiment(config, args.output / name, progress=False).run()
        accuracy = {r.arm.seed: r.test_accuracy for r in result.runs if r.arm.method is None}
        seconds = [r.seconds for r in result.runs if r.arm.method is None]
        rows[name] = {"accuracy": accuracy, "seconds_per_run": float(np.mean(seconds)),
                      "summary": mean_interval([accuracy[s] for s in seeds]),
                      "frozen_layers": result.data.get("frozen_layers")}
        print(name, json.dumps(rows[name]["summary"]), flush=True)
        write_json_atomic(table, rows)


if __name__ == "__main__":
    main()
