"""Scaling benchmark: how scoring time and memory grow with training pairs N and LoRA rank r.

    python bench/scaling.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \
        --out bench/out/scaling_cpu.json

On the shared HH-RLHF pairs with the default model (MiniLM, LoRA r=8 on every layer,
max_length 128). Every (N, r) point runs in its own process, so its peak resident memory is
its own: one training epoch of a fresh model (``t_epoch``), then gradient similarity and CG-IF
with Gauss–Newton curvature, each end to end (validation gradients, gradient pass, solve,
scoring); at one N also CG on the exact Hessian (double backward, curvature on a seeded
subsample of 32 pairs, at most 20 iterations) and its Spearman agreement with Gauss–Newton.
Times are reported as ratios to that process's own ``t_epoch`` (the machine is shared); the
fitted exponent b of ``t ≈ a N^b`` comes from a least-squares line in log-log over each
process's CPU seconds, which other jobs on the cores do not inflate. The output is
rewritten after every point, and a rerun skips the points it already holds.
The validation target is a fixed set of 100 pairs; train pairs are the first N of the rest.
Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def peak_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process (user + system): unlike wall time, it does not grow when
    other jobs share the cores, so exponents are fitted on it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def point(data: str, n: int, rank: int, hessian: bool) -> dict:
    """One (N, r) measurement, run inside a fresh process."""
    import torch

    from prefprune.data import load_preferences
    from prefprune.influence import InfluenceConfig, compute_scores
    from prefprune.model import RewardModel, RewardModelConfig
    from prefprune.training import TrainConfig, train_reward_model

    torch.set_num_threads(1)
    pairs = load_preferences(data).dataset
    validation, pool = pairs.select(range(100)), pairs.select(range(100, len(pairs)))
    if n > len(pool):
        raise SystemExit(f"only {len(pool)} training pairs available, asked for {n}")
    train = pool.select(range(n))
    out = {"n": n, "rank": rank, "peak_mb_loaded": peak_mb()}
    model = RewardModel.create(RewardModelConfig(lora_r=rank, lora_layers=0), seed=0)
    out["parameters"] = model.num_trainable
    start, cpu = time.perf_counter(), cpu_seconds()
    # the settings docs/benchmarks.md reports (all-layer LoRA, batch 16, lr 2e-3, damping 0.1)
    result = train_reward_model(model, train, TrainConfig(epochs=1, batch_size=16,
                                                          learning_rate=2e-3), progress=False)
    out["t_epoch"] = time.perf_counter() - start
    out["cpu_epoch"] = cpu_seconds() - cpu
    out["tokens"] = result.tokens
    out["peak_mb_train"] = peak_mb()
    runs = {"grad_similarity": InfluenceConfig(scores=("grad_dot", "grad_cos")),
            "cg_if_gauss_newton": InfluenceConfig(scores=("if",), damping=0.1)}
    if hessian:
        # each exact product is a double backward over the pairs that define H: a seeded
        # subsample of 32 and 20 iterations keep the run to minutes (recorded in the output)
        runs["cg_if_hessian"] = InfluenceConfig(scores=("if",), curvature="hessian", damping=0.1,
                                                curvature_samples=32, max_iter=20)
    tables = {}
    for name, config in runs.items():
        start, cpu = time.perf_counter(), cpu_seconds()
        scored = compute_scores(model, train, validation, config, progress=False)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
        tables[name] = scored.table
        solve = next(iter(scored.metadata.get("solves", {}).values()), {})
        out[name] = {"seconds": seconds, "ratio_to_epoch": seconds / out["t_epoch"],
                     "cpu_seconds": cpu, "cpu_ratio_to_epoch": cpu / out["cpu_epoch"],
                     "peak_mb": peak_mb(), "solve": {k: v for k, v in solve.items()
                                                     if k != "residuals"}}
    if hessian:
        from scipy.stats import spearmanr

        out["spearman_hessian_vs_gauss_newton"] = float(spearmanr(
            tables["cg_if_hessian"]["if"], tables["cg_if_gauss_newton"]["if"]).statistic)
    return out


def exponent(xs: list[float], ys: list[float]) -> float:
    """b in y ≈ a x^b, by least squares on the logs."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--out", type=Path, default=Path("bench/out/scaling_cpu.json"))
    parser.add_argument("--sizes", default="250,500,1000,2000")
    parser.add_argument("--ranks", default="4,8,16")
    parser.add_argument("--rank-n", type=int, default=250, help="N of the rank series")
    parser.add_argument("--hessian-n", type=int, default=250,
                        help="also run exact-Hessian CG at this N (0: never)")
    parser.add_argument("--point", nargs=3, type=int, metavar=("N", "RANK", "HESSIAN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        n, rank, hessian = args.point
        print(json.dumps(point(args.data, n, rank, bool(hessian))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    # the rank series first (small N), then N upwards: a run cut short still has both series
    todo = [(args.rank_n, r) for r in ranks] + [(n, 8) for n in sizes]
    points = json.loads(args.out.read_text())["points"] if args.out.exists() else []
    for n, rank in dict.fromkeys(todo):
        if any(p["n"] == n and p["rank"] == rank for p in points):
            continue  # measured by an earlier, interrupted invocation
        hessian = int(n == args.hessian_n and rank == 8)
        done = subprocess.run([sys.executable, __file__, args.data, "--point", str(n),
                               str(rank), str(hessian)], check=True, capture_output=True,
                              text=True)
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(points[-1]), flush=True)
        write(args.out, points, args.rank_n)
    write(args.out, points, args.rank_n)


def write(out: Path, points: list[dict], rank_n: int) -> None:
    """Save every point so far and the exponents they support (rewritten after each point)."""
    by_n = sorted((p for p in points if p["rank"] == 8), key=lambda p: p["n"])
    by_rank = sorted((p for p in points if p["n"] == rank_n), key=lambda p: p["rank"])
    fits = {}
    for key in ("cpu_epoch", "grad_similarity", "cg_if_gauss_newton"):
        def value(p: dict, key: str = key) -> float:
            return p[key] if key == "cpu_epoch" else p[key]["cpu_seconds"]

        if len(by_n) > 1:
            fits[f"{key}_vs_n"] = exponent([p["n"] for p in by_n], [value(p) for p in by_n])
        if len(by_rank) > 1:
            fits[f"{key}_vs_parameters"] = exponent([p["parameters"] for p in by_rank],
                                                    [value(p) for p in by_rank])
    if len(by_n) > 1:
        fits["peak_mb_vs_n"] = exponent([p["n"] for p in by_n],
                                        [p["cg_if_gauss_newton"]["peak_mb"] for p in by_n])
    report = {"points": points, "exponents": fits,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)

if __name__ == "__main__":
    main()
