"""The three TRL figures of docs/benchmarks.md for a DPOTrainer run (examples/trl_dpo.py:
SmolLM2-135M-Instruct, LoRA on the top 2 layers, 8 pairs per step, a checkpoint per epoch):

1. PrefpruneCallback's overhead: the training with the callback over the same run without it,
   the runs alternated, median of ``--repeats`` each; and whether the final adapters are
   bit-identical (the callback must not change training);
2. the cost of ``score --checkpoints`` over scoring the final model once, with the callback's
   records and without them;
3. the agreement (Spearman, top-10% overlap) with prefprune's own ``--ensemble-kind
   checkpoints`` DPO run on the same pairs with the same settings.

    python bench/trl_dpo_bench.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --output bench/out/trl-dpo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import trl_bench  # puts examples/ on the path, for trl_dpo
import trl_dpo

from prefprune import RewardModelConfig, TrainConfig
from prefprune.integrations.trl import TrlConfig
from prefprune.model.backbones import resolve_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an HH-RLHF file")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=2,
                        help="a checkpoint per epoch: 2 gives the 2-member ensemble")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    data_file = trl_bench.example.write_pairs(args.data, args.pairs, args.output / "hh.jsonl")
    rows = trl_bench.example.train_rows(data_file)
    backbone = resolve_backbone(args.backbone)
    print(f"callback overhead, DPO ({len(rows)} training pairs, {args.epochs} epochs)",
          flush=True)
    results = {"pairs": args.pairs, "train_pairs": len(rows), "epochs": args.epochs,
               "overhead": trl_bench.overhead(rows, args.output, args.repeats,
                                              train=trl_dpo.train_with_trl, backbone=backbone,
                                              epochs=args.epochs)}
    own_model = RewardModelConfig(
        backbone=backbone, objective="dpo", beta=trl_dpo.STEP["beta"],
        lora_layers=trl_dpo.TOP_LAYERS, lora_r=trl_dpo.LORA["r"],
        lora_alpha=trl_dpo.LORA["lora_alpha"],
        target_modules=tuple(trl_dpo.LORA["target_modules"]), max_length=trl_dpo.MAX_LENGTH)
    results.update(trl_bench.checkpoint_figures(
        data_file, args.output, TrlConfig(), own_model,
        TrainConfig(epochs=args.epochs, batch_size=trl_dpo.STEP["batch_size"],
                    learning_rate=trl_dpo.STEP["learning_rate"], device="cpu"),
        score_batch=trl_dpo.SCORE_BATCH))
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
