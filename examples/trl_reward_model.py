"""TRL's RewardTrainer on HH-RLHF pairs, then prefprune on the run as TRL left it: score every
training pair with the run's checkpoints, prune the most harmful 10%, and write the pruned
file. On the CPU, with MiniLM, in a few minutes (docs/trl.md).

    python examples/trl_reward_model.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --output trl-example

DATA is any HH-RLHF file (``chosen``/``rejected`` transcripts), e.g. the hub's
``Anthropic/hh-rlhf`` harmless-base test file. The steps, each what a user would run:

1. ``hh.jsonl``: the first ``--pairs`` pairs, read and split train/validation/test by prefprune
   (a ``split`` column), so that TRL and prefprune read the same pairs;
2. TRL's ``RewardTrainer`` (LoRA) on the train rows, a checkpoint per epoch, with
   :class:`~prefprune.integrations.PrefpruneCallback` recording what scoring needs;
3. ``prefprune score hh.jsonl --checkpoints trl/ ...``: every checkpoint scores every training
   pair against the validation rows, without a gradient pass over the training pairs;
4. ``prefprune prune scores.parquet hh.jsonl --by if_ens ...``: ``pruned/hh.jsonl`` is the
   file without the 10% of training pairs the checkpoints agree hurt most.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefprune.data import DataOptions, load_preferences, split_preferences
from prefprune.model import default_backbone

#: LoRA and optimiser settings shared with prefprune's own trainer (bench/trl_bench.py compares
#: the two on them): rank 8 on every layer's query and value, AdamW at 5e-3 with 10% warm-up
#: and a linear decay, 8 pairs per step.
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}
STEP = {"batch_size": 8, "learning_rate": 5e-3, "warmup_ratio": 0.1}
#: MiniLM reads 512 positions; TRL leaves out the pairs longer than this.
MAX_LENGTH = 512


def write_pairs(source: str, pairs: int, path: Path, seed: int = 0) -> Path:
    """The first ``pairs`` HH pairs, split by prompt 60/20/20, as JSON lines with a ``split``
    column: prefprune keeps a source's own splits, and TRL trains on the ``train`` rows."""
    loaded = load_preferences(source, DataOptions(format="hh")).dataset
    splits = split_preferences(loaded.select(range(min(pairs, len(loaded)))),
                               fractions=(0.6, 0.2, 0.2), seed=seed)
    with path.open("w") as out:
        for name, rows in splits.items():
            for row in rows:
                out.write(json.dumps({"id": row["id"], "prompt": row["prompt"],
                                      "chosen": row["chosen"], "rejected": row["rejected"],
                                      "split": name}) + "\n")
    return path


def train_rows(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")}
            for r in rows if r["split"] == "train"]


def train_with_trl(rows: list[dict[str, Any]], output: Path, *, backbone: str, epochs: int,
                   callbacks: list[Any]) -> float:
    """TRL's RewardTrainer on ``rows`` into ``output``, a checkpoint per epoch; the seconds
    ``train()`` took."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    steps = epochs * -(-len(rows) // STEP["batch_size"])
    args = RewardConfig(
        output_dir=str(output), num_train_epochs=epochs,
        per_device_train_batch_size=STEP["batch_size"], learning_rate=STEP["learning_rate"],
        warmup_steps=round(STEP["warmup_ratio"] * steps), save_strategy="epoch",
        logging_steps=1, max_length=MAX_LENGTH, report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, disable_tqdm=True, seed=0,
        # a BERT tokenizer has no eos token for TRL to append: its [SEP] ends a text
        eos_token=None if tokenizer.eos_token else tokenizer.sep_token)
    trainer = RewardTrainer(model=backbone, args=args, processing_class=tokenizer,
                            train_dataset=datasets.Dataset.from_list(rows),
                            peft_config=LoraConfig(task_type="SEQ_CLS", **LORA),
                            callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()
    return seconds


def prefprune(*args: str) -> None:
    """Run a ``prefprune`` command as a shell would, echoing it."""
    print("$ prefprune " + " ".join(args), flush=True)
    command = [sys.executable, "-c", "from prefprune.cli import main; main()", *args]
    subprocess.run(command, check=True)


def score_and_prune(data: Path, output: Path, *options: str) -> None:
    """Score ``data`` with every checkpoint of the TRL run in ``output/trl`` (the in-run
    records make it cheap), then write ``data`` without the top 10% by the checkpoint
    ensemble's IF into ``output/pruned``."""
    saved = sorted((output / "trl").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    print(f"checkpoints: {', '.join(p.name for p in saved)}", flush=True)
    scores = output / "scores.parquet"
    prefprune("score", str(data), "--checkpoints", str(output / "trl"), *options,
              "--scores", "if,grad_cos,loss,random", "--output", str(scores), "--quiet",
              "--top", "3")
    prefprune("prune", str(scores), str(data), "--by", "if_ens", "--fraction", "0.1",
              "--output", str(output / "pruned"), "--top", "3")
    print(f"pruned file: {output / 'pruned' / data.name}")


def new_folder(parser: argparse.ArgumentParser, folder: Path) -> None:
    """Create the example's output folder; one that exists is a usage error, never reused, so
    the example's files never mix with what is there."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        parser.error(f"--output {folder} exists; give a new folder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an HH-RLHF file (chosen/rejected transcripts)")
    parser.add_argument("--output", type=Path, required=True, help="a new folder")
    parser.add_argument("--pairs", type=int, default=160, help="HH pairs to use")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default=default_backbone(),
                        help="default: the offline MiniLM")
    args = parser.parse_args()
    from prefprune.integrations import PrefpruneCallback

    new_folder(parser, args.output)
    data = write_pairs(args.data, args.pairs, args.output / "hh.jsonl")
    rows = train_rows(data)
    print(f"TRL RewardTrainer: {len(rows)} training pairs, {args.epochs} epochs", flush=True)
    seconds = train_with_trl(rows, args.output / "trl", backbone=args.backbone,
                             epochs=args.epochs, callbacks=[PrefpruneCallback()])
    print(f"trained in {seconds:.0f} s", flush=True)
    score_and_prune(data, args.output, "--trl-max-length", str(MAX_LENGTH))


if __name__ == "__main__":
    main()
