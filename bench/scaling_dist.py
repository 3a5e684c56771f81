"""Scale-out benchmark: time and peak memory of training and scoring with K=1 and K=2 processes.

    python bench/scaling_dist.py --out bench/out/scaling

On the embedded synthetic TL;DR-like set (the first ``--pairs`` train and ``--val`` validation
pairs) with the default MiniLM reward model (LoRA r=8, 74k parameters), one torch thread per
process:

1. K=1 (plain ``python``): one training epoch, then every default score with the per-pair
   gradient cache (CG); the model is saved for the runs below.
2. K=2 (``torchrun --standalone --nproc-per-node 2``, gloo): the same epoch (timed; its
   weights differ from K=1's through dropout masks), then the same scoring of run 1's model,
   so that the two score tables are comparable.
3. K=1, the saved model, gradient similarity with a zero memory budget (streaming: nothing of
   size pairs × parameters is held).
4. K=1, the saved model, IF and gradient similarity through a random projection to
   ``--projection`` dimensions, for the rank agreement with run 1.

Each process reports, per stage, wall seconds, its own CPU seconds (``time.process_time``:
meaningful on a shared machine where wall time moves with other people's load) and its peak
resident memory (``ru_maxrss``). Not a test: figures for docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from prefprune import distributed
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.model import RewardModel, RewardModelConfig
from prefprune.pipeline import prepare_data
from prefprune.training import TrainConfig, train_reward_model


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stage:
    """Wall and CPU seconds of a ``with`` block."""

    def __enter__(self) -> Stage:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def worker(args: argparse.Namespace) -> None:
    """One process of one run; writes ``<label>-rank<r>.json`` (and rank 0 the scores)."""
    torch.set_num_threads(1)
    data = prepare_data(None, seed=0)
    train = data.splits["train"].select(range(args.pairs))
    validation = data.splits["validation"].select(range(args.val))
    report: dict = {"label": args.label, "pairs": args.pairs, "val": args.val}
    if args.train:
        model = RewardModel.create(RewardModelConfig(lora_layers=0), seed=0)
        with Stage() as stage:
            trained = train_reward_model(model, train, TrainConfig(epochs=1, batch_size=16,
                                                                   learning_rate=2e-3),
                                         progress=False)
        report.update(train_seconds=stage.wall, train_cpu_seconds=stage.cpu,
                      train_tokens=trained.tokens, peak_rss_after_train_mb=peak_rss_mb())
        if args.save_model and distributed.is_main_process():
            model.save(args.save_model)
    if args.model:  # score a saved model: dropout makes K=2 training differ from K=1
        model = RewardModel.load(args.model)
    config = InfluenceConfig(scores=tuple(args.scores), memory_budget_mb=args.budget, damping=0.1,
                             projection_dim=args.projection, shard_size=args.shard_size)
    with Stage() as stage:
        result = compute_scores(model, train, validation, config, progress=False)
    report.update(score_seconds=stage.wall, score_cpu_seconds=stage.cpu, peak_rss_mb=peak_rss_mb(),
                  world_size=distributed.world_size(), parameters=model.num_trainable,
                  stages=result.metadata["timings_seconds"],
                  gradient_cache=result.metadata["gradient_cache"],
                  solves={k: v["iterations"] for k, v in result.metadata.get("solves", {}).items()})
    out = Path(args.out)
    (out / f"{args.label}-rank{distributed.rank()}.json").write_text(json.dumps(report, indent=2))
    if distributed.is_main_process():
        result.table.to_parquet(out / f"{args.label}.parquet")


def launch(out: Path, label: str, processes: int, extra: list[str], common: list[str]) -> float:
    script = [__file__, "worker", "--out", str(out), "--label", label, *common, *extra]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", f"--nproc-per-node={processes}", *script]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def agreement(a: pd.DataFrame, b: pd.DataFrame, scores: list[str]) -> dict:
    return {s: {"spearman": float(spearmanr(a[s], b[s]).statistic),
                "relative_error": float(np.linalg.norm(a[s] - b[s]) / np.linalg.norm(b[s]))}
            for s in scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/scaling"))
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--projection", type=int, default=1024)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--pairs", str(args.pairs), "--val", str(args.val)]
    model = str(args.out / "model_k1")
    walls = {
        "k1": launch(args.out, "k1", 1, ["--train", "--save-model", model], common),
        "k2": launch(args.out, "k2", 2, ["--train", "--model", model], common),
        "k1_streaming": launch(args.out, "k1_streaming", 1,
                               ["--model", model, "--budget", "0",
                                "--scores", "grad_dot", "grad_cos"], common),
        "k1_projected": launch(args.out, "k1_projected", 1,
                               ["--model", model, "--projection", str(args.projection),
                                "--scores", "if", "grad_dot", "grad_cos"], common),
    }
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(args.out.glob("*-rank*.json"))}
    tables = {label: pd.read_parquet(args.out / f"{label}.parquet") for label in walls}
    summary = {
        "wall_seconds": walls, "reports": reports,
        "k2_vs_k1": agreement(tables["k2"], tables["k1"], ["if", "flip", "grad_dot", "loss"]),
        "projected_vs_k1": agreement(tables["k1_projected"], tables["k1"],
                                     ["if", "grad_dot", "grad_cos"]),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def parse_worker() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--val", type=int, required=True)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--save-model")
    parser.add_argument("--budget", type=float, default=2048.0)
    parser.add_argument("--projection", type=int)
    parser.add_argument("--shard-size", type=int, default=16)  # 8 shards: work for 2 ranks
    parser.add_argument("--scores", nargs="+", default=list(InfluenceConfig().scores))
    return parser.parse_args(sys.argv[2:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(parse_worker())
    else:
        main()
