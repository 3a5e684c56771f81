"""PrefpruneCallback's overhead on a TRL DPOTrainer run, for docs/benchmarks.md: the training of
examples/trl_dpo.py (SmolLM2-135M-Instruct, LoRA on the top 2 layers, 8 pairs per step) with
the callback over the same run without it, the runs alternated, median of ``--repeats`` each;
and whether the final adapters are bit-identical (the callback must not change training).

    python bench/trl_dpo_bench.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --output bench/out/trl-dpo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import trl_bench  # puts examples/ on the path, for trl_dpo
import trl_dpo

from prefprune.model.backbones import resolve_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an HH-RLHF file")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rows = trl_bench.example.train_rows(
        trl_bench.example.write_pairs(args.data, args.pairs, args.output / "hh.jsonl"))
    print(f"callback overhead, DPO ({len(rows)} training pairs, {args.epochs} epochs)",
          flush=True)
    results = {"pairs": args.pairs, "train_pairs": len(rows), "epochs": args.epochs,
               "overhead": trl_bench.overhead(rows, args.output, args.repeats,
                                              train=trl_dpo.train_with_trl,
                                              backbone=resolve_backbone(args.backbone),
                                              epochs=args.epochs),
               "same_weights_with_and_without_callback": trl_bench.same_weights(
                   args.output / "run-with-0", args.output / "run-without-0")}
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
