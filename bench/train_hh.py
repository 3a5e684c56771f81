"""Foundation benchmark: ingest the shared HH-RLHF pairs, train the default reward model, report.

    python bench/train_hh.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \
        --out bench/out/train_hh.json

Split 60/15/25 grouped by prompt (seed 0), default backbone (all-MiniLM-L6-v2), LoRA r=8,
max_length 128, 3 epochs. Prints the ingestion report, test accuracy, seconds per epoch and
tokens per second, and writes them as JSON. Figures are for the closing note and
docs/benchmarks.md, never asserted by a test (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from prefprune.model import RewardModelConfig
from prefprune.pipeline import prepare_data, train_and_evaluate
from prefprune.training import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="path to hh-rlhf-harmless-base-test.jsonl.gz")
    parser.add_argument("--out", type=Path, default=Path("bench/out/train_hh.json"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="also save the trained model")
    args = parser.parse_args()

    start = time.perf_counter()
    data = prepare_data(args.data, seed=args.seed)
    print(data.report.render())
    print({name: len(split) for name, split in data.splits.items()})
    outcome = train_and_evaluate(
        data,
        RewardModelConfig(max_length=args.max_length, lora_r=args.lora_r, lora_layers=0),
        TrainConfig(epochs=args.epochs, seed=args.seed, batch_size=16, learning_rate=2e-3),
        output=args.save,
    )
    figures = {
        "ingestion": data.report.to_dict(),
        "splits": {name: len(split) for name, split in data.splits.items()},
        "test": outcome.metrics["test"].to_dict(),
        "validation": outcome.metrics["validation"].to_dict(),
        "train": outcome.train.to_dict(),
        "seconds_per_epoch": sum(outcome.train.epoch_seconds) / len(outcome.train.epoch_seconds),
        "tokens_per_second": outcome.train.tokens_per_second,
        "trainable_parameters": outcome.model.num_trainable,
        "wall_seconds": time.perf_counter() - start,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    headline = ("test", "seconds_per_epoch", "tokens_per_second", "wall_seconds")
    print(json.dumps({k: figures[k] for k in headline}, indent=2))


if __name__ == "__main__":
    main()
