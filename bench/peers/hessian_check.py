"""Is the damped exact Hessian positive definite on compare.py's subset? prefprune's CG on the
exact Hessian detects negative curvature; the exact-Hessian peers do not.

    .venv-peers/bin/python bench/peers/hessian_check.py \
        ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz > bench/out/peers-hessian-check.log
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from scipy.stats import spearmanr

from prefprune import (
    InfluenceConfig,
    RewardModel,
    compute_scores,
    load_preferences,
    split_preferences,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", default="bench/out/hh_model")
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-val", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-iter", type=int, default=34)
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = split_preferences(load_preferences(args.data).dataset, seed=0)
    train = splits["train"].select(range(args.n_train))
    val = splits["validation"].select(range(args.n_val))
    model = RewardModel.load(args.model)
    model.config = dataclasses.replace(model.config, max_length=args.max_length)
    ref = compute_scores(model, train, val, InfluenceConfig(scores=("if",), solver="direct",
                                                            score_batch_size=16), progress=False)
    hess = compute_scores(model, train, val, InfluenceConfig(
        scores=("if",), curvature="hessian", negative_curvature="stop", max_iter=args.max_iter,
        score_batch_size=16), progress=False)
    solve = hess.metadata["solves"]["validation"]
    print(json.dumps({
        "damping": hess.metadata["damping"], "message": solve["message"],
        "iterations": solve["iterations"], "negative_curvature": solve["negative_curvature"],
        "final_residual": solve["final_residual"],
        "spearman_vs_ggn_reference": float(spearmanr(hess.table["if"],
                                                     ref.table["if"]).statistic)}))


if __name__ == "__main__":
    main()
