"""prefprune: find the preference pairs that make a reward model worse.

The public API follows the data flow — records → model → gradients → scores:

>>> from prefprune import prepare_data, train_and_evaluate, score_pairs
>>> data = prepare_data("pairs.jsonl")                 # read, account for every row, split
>>> outcome = train_and_evaluate(data)                 # LoRA reward model, BT loss
>>> scores = score_pairs(data, outcome.model)          # IF, flip, gradient similarity, ...
>>> scores.result.table.nsmallest(10, "rank_if")       # the ten most harmful pairs

Every score is a harm: larger = more harmful, rank 1 = the most harmful pair.
"""

from prefprune.data import (
    DataError,
    IngestionReport,
    LoadResult,
    default_dataset_path,
    fingerprint,
    generate_synthetic,
    load_preferences,
    split_preferences,
)
from prefprune.influence.scores import (
    ALL_SCORES,
    InfluenceConfig,
    InfluenceError,
    ScoreResult,
    compute_scores,
)
from prefprune.pipeline import (
    PreparedData,
    ScoreOutcome,
    TrainOutcome,
    evaluate_saved,
    prepare_data,
    run_demo,
    score_pairs,
    train_and_evaluate,
)
from prefprune.reward_model import ModelError, RewardModel, RewardModelConfig
from prefprune.training import EvalResult, TrainConfig, TrainResult, evaluate, train_reward_model

__version__ = "0.1.0"

__all__ = [
    "ALL_SCORES",
    "DataError",
    "EvalResult",
    "InfluenceConfig",
    "InfluenceError",
    "IngestionReport",
    "LoadResult",
    "ModelError",
    "PreparedData",
    "RewardModel",
    "RewardModelConfig",
    "ScoreOutcome",
    "ScoreResult",
    "TrainConfig",
    "TrainOutcome",
    "TrainResult",
    "compute_scores",
    "default_dataset_path",
    "evaluate",
    "evaluate_saved",
    "fingerprint",
    "generate_synthetic",
    "load_preferences",
    "prepare_data",
    "run_demo",
    "score_pairs",
    "split_preferences",
    "train_and_evaluate",
    "train_reward_model",
]
