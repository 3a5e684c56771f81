"""prefprune: find the preference pairs that make a reward model worse.

The public API follows the data flow — records → model → gradients → scores →
selection → retrain → report:

>>> from prefprune import PruneConfig, prepare_data, prune_source, score_pairs, train_and_evaluate
>>> data = prepare_data("pairs.jsonl")                 # read, account for every row, split
>>> outcome = train_and_evaluate(data)                 # LoRA reward model, BT loss
>>> scores = score_pairs(data, outcome.model)          # IF, flip, gradient similarity, ...
>>> scores.result.table.nsmallest(10, "rank_if")       # the ten most harmful pairs
>>> prune_source(scores.result.table, "pairs.jsonl", "pruned/", PruneConfig(fraction=0.1))

``Experiment(ExperimentConfig(...), "runs/x").run()`` is the whole protocol of
docs/method.md: train, score, prune per method and fraction, retrain, compare over seeds;
``write_report`` renders it.

Every score is a harm: larger = more harmful, rank 1 = the most harmful pair. Every setting
lives in a validated config (``RewardModelConfig``, ``TrainConfig``, ``InfluenceConfig``,
``PruneConfig``, ``ExperimentConfig``); every user-facing error is a ``PrefpruneError``.
"""

from prefprune.data import (
    DataOptions,
    IngestionReport,
    LoadResult,
    default_dataset_path,
    default_expert_validation_path,
    fingerprint,
    generate_synthetic,
    load_preferences,
    split_preferences,
)
from prefprune.ensemble import EnsembleConfig
from prefprune.errors import (
    ConfigError,
    ConvergenceWarning,
    DataError,
    ExperimentError,
    InfluenceError,
    ModelError,
    OutputError,
    PrefpruneError,
    PrefpruneWarning,
    SelectionError,
    StaleDataWarning,
)
from prefprune.experiment import (
    Experiment,
    ExperimentConfig,
    ExperimentResult,
    ValidateConfig,
    Validation,
    ValidationResult,
    demo_config,
)
from prefprune.influence import ALL_SCORES, InfluenceConfig, ScoreResult, compute_scores
from prefprune.integrations.trl import load_model
from prefprune.model import FrozenLayerCache, RewardModel, RewardModelConfig
from prefprune.pipeline import (
    PreparedData,
    TrainOutcome,
    evaluate_saved,
    prepare_data,
    train_and_evaluate,
)
from prefprune.pruning import PruneConfig, inject_flips, prune_source, select
from prefprune.report import write_report
from prefprune.scoring import ScoreOutcome, score_pairs
from prefprune.training import EvalResult, TrainConfig, TrainResult, evaluate, train_reward_model

__version__ = "0.1.0"

__all__ = [
    "ALL_SCORES",
    "ConfigError",
    "ConvergenceWarning",
    "DataError",
    "DataOptions",
    "EnsembleConfig",
    "EvalResult",
    "Experiment",
    "ExperimentConfig",
    "ExperimentError",
    "ExperimentResult",
    "FrozenLayerCache",
    "InfluenceConfig",
    "InfluenceError",
    "IngestionReport",
    "LoadResult",
    "ModelError",
    "OutputError",
    "PrefpruneError",
    "PrefpruneWarning",
    "PreparedData",
    "PruneConfig",
    "RewardModel",
    "RewardModelConfig",
    "ScoreOutcome",
    "ScoreResult",
    "SelectionError",
    "StaleDataWarning",
    "TrainConfig",
    "TrainOutcome",
    "TrainResult",
    "ValidateConfig",
    "Validation",
    "ValidationResult",
    "compute_scores",
    "default_dataset_path",
    "default_expert_validation_path",
    "demo_config",
    "evaluate",
    "evaluate_saved",
    "fingerprint",
    "generate_synthetic",
    "inject_flips",
    "load_model",
    "load_preferences",
    "prepare_data",
    "prune_source",
    "score_pairs",
    "select",
    "split_preferences",
    "train_and_evaluate",
    "train_reward_model",
    "write_report",
]
