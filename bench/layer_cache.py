"""Frozen-layer cache benchmark: what restricting LoRA to the top layers and caching the frozen
layers buys in time, and what it costs in accuracy.

    python bench/layer_cache.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \
        --out bench/out/layer_cache.json

On the shared HH-RLHF pairs (split 60/15/25 by prompt, seed 0), default backbone, LoRA r=8,
max_length 128, the same training settings for every variant (``--epochs``, batch 8, lr 5e-3,
seed 0), in one process:

* ``all_layers``: LoRA on all six layers (the default model);
* ``top1_uncached``: LoRA on the top layer only, every forward through all layers;
* ``top1_cached``: the same model with the frozen layers served by a FrozenLayerCache (the
  first epoch fills it: its time is reported apart from the later epochs).

Reports seconds per epoch as ratios to ``all_layers`` and test accuracy and loss of each.
Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prefprune.model import RewardModel, RewardModelConfig
from prefprune.pipeline import prepare_data
from prefprune.training import TrainConfig, evaluate, train_reward_model

VARIANTS = {
    "all_layers": (None, False),
    "top1_uncached": (1, False),
    "top1_cached": (1, True),
}


def run(variant: str, data, epochs: int) -> dict:
    layers, cached = VARIANTS[variant]
    config = RewardModelConfig(lora_layers=layers, layer_cache_mb=2048.0 if cached else 0.0)
    model = RewardModel.create(config, seed=0)
    start = time.perf_counter()
    trained = train_reward_model(model, data.splits["train"],
                                 TrainConfig(epochs=epochs, batch_size=8, learning_rate=5e-3),
                                 progress=False)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test = evaluate(model, data.splits["test"], progress=False)
    return {"parameters": model.num_trainable, "epoch_seconds": trained.epoch_seconds,
            "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
            "test_accuracy": test.accuracy, "test_loss": test.loss,
            "final_train_loss": trained.epoch_losses[-1],
            "cache": model.layer_cache.stats.to_dict() if model.layer_cache else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--out", type=Path, default=Path("bench/out/layer_cache.json"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = prepare_data(args.data, seed=0)
    results = {name: run(name, data, args.epochs) for name in VARIANTS}
    reference = results["all_layers"]["epoch_seconds"][-1]
    for result in results.values():
        result["last_epoch_ratio_to_all_layers"] = result["epoch_seconds"][-1] / reference
    report = {"variants": results, "epochs": args.epochs, "date": time.strftime("%Y-%m-%d"),
              "train_pairs": len(data.splits["train"]), "test_pairs": len(data.splits["test"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
