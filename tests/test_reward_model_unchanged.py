"""The reward model's scores did not move when the objective seam (reward model or DPO) went in.

``fixtures/reward_model_scores.parquet`` was written by this very procedure before the seam
existed; every score must come out the same (up to float rounding across CPUs).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from conftest import build_tiny_backbone
from helpers import FIXTURES, pairs

from prefprune import (
    InfluenceConfig,
    RewardModel,
    RewardModelConfig,
    TrainConfig,
    compute_scores,
    train_reward_model,
)

COLUMNS = ["id", "if", "flip", "grad_dot", "grad_cos", "self_influence", "loss", "margin"]


def test_reward_model_scores_equal_the_table_saved_before_the_seam(tmp_path: Path):
    backbone = build_tiny_backbone("bert", tmp_path / "bert", seed=0)
    config = RewardModelConfig(backbone=str(backbone), max_length=48, lora_layers=1,
                               feature_cache=None)
    model = RewardModel.create(config, seed=3)
    train = pairs(40, 11, "t")
    train_reward_model(model, train, TrainConfig(epochs=4, batch_size=8, learning_rate=0.1,
                                                 seed=3), progress=False)
    result = compute_scores(model, train, pairs(12, 12, "v"), InfluenceConfig(
        scores=("if", "flip", "grad_dot", "grad_cos", "self_influence", "loss"),
        solver="direct", damping=10.0), progress=False)
    saved = pd.read_parquet(FIXTURES / "reward_model_scores.parquet")
    pd.testing.assert_frame_equal(result.table[COLUMNS], saved, check_exact=False,
                                  rtol=1e-4, atol=1e-7)
