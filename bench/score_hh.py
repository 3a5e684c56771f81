"""Influence benchmark: time to score every training pair, as a ratio to one training epoch.

    python bench/score_hh.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \
        --model bench/out/hh_model --out bench/out/score_hh.json

On the shared HH-RLHF pairs (split 60/15/25 by prompt, seed 0) with a reward model trained by
bench/train_hh.py, in one process: one training epoch of a fresh model (``t_epoch``), then
scoring with CG-IF (Gauss–Newton), gradient similarity alone, and the exact Gauss–Newton solve
in the dual (the reference, reusing the CG run's gradient shards). Reports each time as a
ratio to ``t_epoch``, CG iterations and final residual, and Spearman agreement between the
methods. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scipy.stats import spearmanr

from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.model import RewardModel
from prefprune.pipeline import prepare_data
from prefprune.scoring import validation_targets
from prefprune.training import TrainConfig, train_reward_model


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/out/score_hh.json"))
    parser.add_argument("--hessian-samples", type=int, default=0,
                        help="also run CG on the exact Hessian over this many pairs (slow)")
    args = parser.parse_args()

    data = prepare_data(args.data, seed=0)
    train, targets = data.splits["train"], validation_targets(data)
    model = RewardModel.load(args.model)
    fresh = RewardModel.create(model.config, seed=0)
    _, t_epoch = timed(lambda: train_reward_model(fresh, train, TrainConfig(
        epochs=1, batch_size=16, learning_rate=2e-3),
                                                  progress=False))
    runs = {
        "cg_if": InfluenceConfig(scores=("if", "flip"), damping=0.1),
        "grad_similarity": InfluenceConfig(scores=("grad_dot", "grad_cos")),
        "direct_if": InfluenceConfig(scores=("if", "flip", "self_influence", "loss"),
                                     solver="direct", damping=0.1),
    }
    if args.hessian_samples:
        runs["hessian_cg_if"] = InfluenceConfig(scores=("if",), curvature="hessian", damping=0.1,
                                                curvature_samples=args.hessian_samples,
                                                max_iter=50)
    results, figures = {}, {"t_epoch_seconds": t_epoch, "n_train": len(train)}
    # The exact reference reuses the CG run's finished gradient shards (same work dir): its
    # time is the validation pass plus the dual solve, not a fresh gradient pass.
    shared = args.out.with_name("score_hh.work")
    work_dirs = {"cg_if": shared, "direct_if": shared}
    for name, config in runs.items():
        result, seconds = timed(lambda c=config, n=name: compute_scores(
            model, train, targets, c, work_dir=work_dirs.get(n), progress=False))
        results[name] = result
        figures[name] = {"seconds": seconds, "ratio_to_epoch": seconds / t_epoch,
                         "stages": result.metadata["timings_seconds"],
                         "solves": {t: {k: v for k, v in s.items() if k != "residuals"}
                                    for t, s in result.metadata.get("solves", {}).items()},
                         "damping": result.metadata.get("damping")}
    cg, direct = results["cg_if"].table, results["direct_if"].table
    sim = results["grad_similarity"].table
    figures["spearman"] = {
        "cg_if_vs_direct_if": spearmanr(cg["if"], direct["if"]).statistic,
        "cg_flip_vs_direct_flip": spearmanr(cg["flip"], direct["flip"]).statistic,
        "if_vs_grad_dot": spearmanr(direct["if"], sim["grad_dot"]).statistic,
        "if_vs_grad_cos": spearmanr(direct["if"], sim["grad_cos"]).statistic,
        "if_vs_loss": spearmanr(direct["if"], direct["loss"]).statistic,
    }
    if "hessian_cg_if" in results:
        figures["spearman"]["hessian_if_vs_ggn_if"] = spearmanr(
            results["hessian_cg_if"].table["if"], direct["if"]).statistic
    figures["n_parameters"] = results["cg_if"].metadata["n_parameters"]
    figures["gradient_cache"] = results["cg_if"].metadata["gradient_cache"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
