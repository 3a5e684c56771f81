"""PrefpruneCallback and ``score --checkpoints`` on HH pairs with MiniLM: three figures for
docs/benchmarks.md.

1. **Callback overhead**: TRL RewardTrainer's ``train()`` wall time with the callback over the
   same run without it (the runs alternate; median of ``--repeats`` each).
2. **Scoring cost**: ``score --checkpoints`` over scoring the final model once, with the
   callback's records and without them (the run trained without the callback).
3. **Agreement** with prefprune's own ``--ensemble-kind checkpoints`` trained on the same pairs
   with the same settings (examples/trl_reward_model.py: LoRA rank 8 on every layer, AdamW
   5e-3, 8 pairs per step, 2 epochs, 512 tokens): Spearman and top-10% overlap of the combined
   scores; for scale, the agreement of recorded members with members scored afresh and of
   each run's own two members.

    python bench/trl_bench.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --output bench/out/trl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import trl_reward_model as example

from prefprune import InfluenceConfig, RewardModelConfig, TrainConfig
from prefprune.data import DataOptions
from prefprune.ensemble import EnsembleConfig, spearman, top_overlap
from prefprune.integrations import PrefpruneCallback
from prefprune.integrations.trl import TrlConfig, trl_reading
from prefprune.model import default_backbone
from prefprune.model.loading import ADAPTER_WEIGHTS
from prefprune.pipeline import prepare_data, rendering_of
from prefprune.scoring import score_pairs

SCORES = ("if", "grad_cos", "loss")


def overhead(rows: list[dict[str, Any]], out: Path, repeats: int, *,
             train: Callable[..., float] = example.train_with_trl, backbone: str | None = None,
             epochs: int = 2) -> dict[str, Any]:
    """Train with and without the callback, alternating which goes first; ``train`` is an
    example's ``train_with_trl`` (the reward model's by default)."""
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    inside = []
    for r in range(repeats):
        for arm in (("without", "with") if r % 2 == 0 else ("with", "without")):
            callback = PrefpruneCallback()
            seconds[arm].append(train(
                rows, out / f"run-{arm}-{r}", backbone=backbone or default_backbone(),
                epochs=epochs, callbacks=[callback] if arm == "with" else []))
            if arm == "with":
                inside.append(callback.seconds)
            print(f"  {arm} callback, repeat {r}: {seconds[arm][-1]:.1f} s", flush=True)
    with_, without = statistics.median(seconds["with"]), statistics.median(seconds["without"])
    return {"seconds": seconds, "callback_seconds": inside, "ratio": with_ / without}


def timed_score(data: Any, output: Path, score_batch: int = 32,
                **kwargs: Any) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    outcome = score_pairs(data, influence_config=InfluenceConfig(
        scores=SCORES, score_batch_size=score_batch), output=output, progress=False, **kwargs)
    return time.perf_counter() - start, outcome.result.table


def agreement(ours: pd.DataFrame, theirs: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per combined score, on the pairs both tables score."""
    both = ours.merge(theirs, on="id", suffixes=("_a", "_b"))
    return {score: {"spearman": spearman(both[f"{score}_ens_a"].to_numpy(),
                                         both[f"{score}_ens_b"].to_numpy()),
                    "top10_overlap": top_overlap(both[f"{score}_ens_a"].to_numpy(),
                                                 both[f"{score}_ens_b"].to_numpy()),
                    "pairs": len(both)} for score in SCORES}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs saved bit-identical adapters (the callback must not change training)."""
    first, second = load_file(str(a / ADAPTER_WEIGHTS)), load_file(str(b / ADAPTER_WEIGHTS))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k])
                                                 for k in first)


def member_agreement(output: Path) -> dict[str, Any]:
    """The agreement between a score run's ensemble members, from its sidecar."""
    return json.loads(output.with_suffix(".json").read_text())["ensemble"]["agreement"]


def checkpoint_figures(data_file: Path, out: Path, trl: TrlConfig, own_model: RewardModelConfig,
                       own_train: TrainConfig, score_batch: int = 32) -> dict[str, Any]:
    """Figures 2 and 3 for the runs ``out/run-with-0`` (recorded by the callback) and
    ``out/run-without-0``: the scoring cost, the agreement of recorded with fresh members, and
    the agreement with prefprune's own checkpoint ensemble trained with ``own_model`` and
    ``own_train`` on the same pairs."""
    recorded, plain = out / "run-with-0", out / "run-without-0"
    reader, trl = trl_reading(recorded, data_file, DataOptions(), rendering_of(recorded), trl)
    data = prepare_data(data_file, rendering=reader)
    print("2. scoring cost", flush=True)
    one, one_table = timed_score(data, out / "one.parquet", score_batch, model=recorded, trl=trl)
    from_records, trl_table = timed_score(data, out / "records.parquet", score_batch,
                                          trl=trl.replace(checkpoints=str(recorded)))
    afresh, fresh_table = timed_score(data, out / "afresh.parquet", score_batch,
                                      trl=trl.replace(checkpoints=str(plain)))
    results: dict[str, Any] = {
        "same_weights_with_and_without_callback": same_weights(recorded, plain),
        "recorded_vs_afresh": agreement(trl_table, fresh_table),
        "scoring_seconds": {"one_model": one, "checkpoints_recorded": from_records,
                            "checkpoints_afresh": afresh},
        "scoring_ratio": {"checkpoints_recorded": from_records / one,
                          "checkpoints_afresh": afresh / one}}
    print("3. agreement with prefprune's own checkpoint ensemble", flush=True)
    own_seconds, own_table = timed_score(  # the pairs read as TRL read them
        data, out / "own.parquet", score_batch, model_config=own_model, train_config=own_train,
        ensemble=EnsembleConfig(members=2, kind="checkpoints"))
    results["own_train_and_score_seconds"] = own_seconds
    results["agreement"] = agreement(trl_table, own_table)
    results["training_margin_sd"] = {"trl": float(one_table["margin"].std()),
                                     "own": float(own_table["margin"].std())}
    results["member_agreement"] = {name: member_agreement(out / f"{name}.parquet")
                                   for name in ("records", "own")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an HH-RLHF file")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    data_file = example.write_pairs(args.data, args.pairs, args.output / "hh.jsonl")
    rows = example.train_rows(data_file)
    print(f"1. callback overhead ({len(rows)} training pairs, 2 epochs)", flush=True)
    results: dict[str, Any] = {"pairs": args.pairs, "train_pairs": len(rows),
                               "overhead": overhead(rows, args.output, args.repeats)}
    results.update(checkpoint_figures(
        data_file, args.output, TrlConfig(max_length=example.MAX_LENGTH),
        RewardModelConfig(lora_layers=0, max_length=example.MAX_LENGTH),
        TrainConfig(epochs=2, batch_size=example.STEP["batch_size"],
                    learning_rate=example.STEP["learning_rate"],
                    warmup_ratio=example.STEP["warmup_ratio"], device="cpu")))
    (args.output / "trl_bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
