"""Which score finds wrong labels, and how stable is it: the synthetic set, with the trusted
(expert-labelled) target and with the noisy one.

    python bench/detection.py --out bench/out/detection.json

Trains ``--seeds`` models with the default recipe (each capturing a checkpoint ensemble of its
epochs), scores every training pair at several dampings against both targets, and reports per
score: flip-detection AUROC and the share of flips in the top 10% / 20% (mean and range over
seeds), the same for seed ensembles of the first and last half of the seeds (z-score mean),
their top-10% agreement (stability), checkpoint ensembles, and the cost of a checkpoint
ensemble as a ratio to one model's scoring (CPU seconds, measured in this process). Work is
saved after every model, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prefprune.checkpoints import CheckpointCapture
from prefprune.data import default_expert_validation_path, load_preferences
from prefprune.detection import auroc, share_found_in_top
from prefprune.ensemble import combine, top_overlap
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.model import FrozenLayerCache, RewardModel, RewardModelConfig
from prefprune.pipeline import prepare_data
from prefprune.training import TrainConfig, train_reward_model

DAMPINGS = (0.1, 1.0, 10.0, 100.0)
SIMILARITY = ("grad_dot", "grad_cos", "loss")


def cpu() -> float:
    return time.process_time()


def detection(values: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    n = len(values)
    return {"auroc": auroc(values, truth),
            "top10": share_found_in_top(values, truth, max(1, round(0.1 * n))),
            "top20": share_found_in_top(values, truth, max(1, round(0.2 * n)))}


ENSEMBLED = ("if", "grad_cos", "grad_dot")


def score_model(model, train, targets, capture_tables) -> tuple[pd.DataFrame, dict]:
    """Every score column for one model: similarity scores once, IF/flip/self-influence per
    damping; plus each checkpoint table's columns, prefixed ``ckpt<k>:``. The scoring of the
    scores a checkpoint ensemble combines is timed alone: the cost it is compared with."""
    start = cpu()
    compute_scores(model, train, targets, InfluenceConfig(scores=ENSEMBLED, solver="direct",
                                                          damping=10.0), progress=False)
    single_seconds = cpu() - start
    base = compute_scores(model, train, targets, InfluenceConfig(
        scores=SIMILARITY, solver="direct"), progress=False).table
    columns = {name: base[name].to_numpy() for name in base.columns
               if name.split("@")[0] in SIMILARITY}
    for damping in DAMPINGS:
        table = compute_scores(model, train, targets, InfluenceConfig(
            scores=("if", "flip", "self_influence"), solver="direct", damping=damping),
            progress=False).table
        for name in table.columns:
            if name.split("@")[0] in ("if", "flip", "self_influence"):
                columns[f"{name} d={damping:g}"] = table[name].to_numpy()
    for k, table in enumerate(capture_tables):
        for name in table.columns:
            if name.split("@")[0] in ENSEMBLED:
                columns[f"ckpt{k}:{name}"] = table[name].to_numpy()
    return pd.DataFrame(columns), {"single_scoring_cpu_s": single_seconds}


def run_model(seed: int, data, targets, cache, out: Path) -> tuple[pd.DataFrame, dict]:
    path = out / f"seed{seed}.parquet"
    meta_path = out / f"seed{seed}.json"
    if path.exists():
        return pd.read_parquet(path), json.loads(meta_path.read_text())
    train = data.splits["train"]
    recipe = TrainConfig(seed=seed)
    model = RewardModel.create(RewardModelConfig(), seed=seed, cache=cache)
    capture = CheckpointCapture(model, train, targets, InfluenceConfig(
        scores=ENSEMBLED, solver="direct", damping=10.0), members=recipe.epochs,
        epochs=recipe.epochs)
    start = cpu()
    train_reward_model(model, train, recipe, progress=False, capture=capture)
    captured_train = cpu() - start
    member_seconds = capture.cpu_seconds
    plain = RewardModel.create(RewardModelConfig(), seed=seed, cache=cache)
    start = cpu()
    train_reward_model(plain, train, recipe, progress=False)
    plain_train = cpu() - start
    table, meta = score_model(model, train, targets, capture.tables)
    meta.update(captured_train_cpu_s=captured_train, plain_train_cpu_s=plain_train,
                checkpoint_scoring_cpu_s=member_seconds)
    table.to_parquet(path)
    meta_path.write_text(json.dumps(meta, indent=2))
    return table, meta


def summarise(tables: list[pd.DataFrame], truth: np.ndarray, metas: list[dict]) -> dict:
    half = len(tables) // 2
    out: dict = {"single": {}, "ensemble": {}, "stability": {}, "checkpoints": {}}
    for column in tables[0].columns:
        if column.startswith("ckpt"):
            continue
        per_seed = [detection(t[column].to_numpy(), truth) for t in tables]
        out["single"][column] = {m: [r[m] for r in per_seed] for m in per_seed[0]}
        if column.split("@")[0].startswith("loss") or "self_influence" in column:
            continue
        first, second = (combine([t.assign(id=range(len(t)))[["id", column]]
                                  .rename(columns={column: "s"}) for t in group], ["s"])[0]
                         ["s_ens"] for group in (tables[:half], tables[half:2 * half]))
        out["ensemble"][column] = {"first": detection(first, truth),
                                   "second": detection(second, truth)}
        singles = [top_overlap(tables[i][column].to_numpy(), tables[j][column].to_numpy())
                   for i in range(len(tables)) for j in range(i + 1, len(tables))]
        out["stability"][column] = {"ensembles_top10_overlap": top_overlap(first, second),
                                    "singles_top10_overlap_mean": float(np.mean(singles))}
    for target in ("expert", "noisy"):
        for score in ("if", "grad_cos", "grad_dot"):
            name = f"{score}@{target}"
            members = [[t[c].to_numpy() for c in t.columns
                        if c.startswith("ckpt") and c.endswith(":" + name)] for t in tables]
            results = []
            for stack in members:
                frame = [pd.DataFrame({"id": range(len(v)), "s": v}) for v in stack]
                results.append(detection(combine(frame, ["s"])[0]["s_ens"], truth))
            out["checkpoints"][name] = {m: [r[m] for r in results] for m in results[0]}
    out["cost"] = {key: [m[key] for m in metas] for key in metas[0]}
    # what the ensemble adds: gradients kept while training, and the checkpoints' scoring
    out["cost"]["checkpoint_ensemble_over_single_scoring"] = [
        (m["captured_train_cpu_s"] - m["plain_train_cpu_s"] + m["checkpoint_scoring_cpu_s"])
        / m["single_scoring_cpu_s"] for m in metas]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/out/detection.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(None)
    expert = load_preferences(default_expert_validation_path()).dataset
    targets = {"expert": expert, "noisy": data.splits["validation"]}
    cache = FrozenLayerCache(RewardModelConfig().layer_cache_mb)
    truth = np.asarray(data.splits["train"]["label_flipped"], dtype=bool)
    tables, metas = [], []
    for seed in range(args.seeds):
        table, meta = run_model(seed, data, targets, cache, work)
        tables.append(table)
        metas.append(meta)
        print(f"seed {seed} done", flush=True)
    result = summarise(tables, truth, metas)
    result["flips"] = int(truth.sum())
    result["pairs"] = len(truth)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
