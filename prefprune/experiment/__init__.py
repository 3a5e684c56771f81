"""The pruning experiment: configuration, the resumable runner, typed run records, and the
statistics over seeds that decide whether pruning helped."""

from prefprune.experiment.config import (
    DEFAULT_METHODS,
    DEMO_METHODS,
    ExperimentConfig,
    RunConfig,
    ValidateConfig,
    demo_config,
)
from prefprune.experiment.folder import CONFIG_FILE
from prefprune.experiment.records import Arm, RunRecord
from prefprune.experiment.runner import (
    RESULTS_FILE,
    Experiment,
    ExperimentResult,
    arms_of,
    detect,
    headline,
)
from prefprune.experiment.stats import mean_interval, summarise, t_quantile_975
from prefprune.experiment.validation import Validation, ValidationResult

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_METHODS",
    "DEMO_METHODS",
    "RESULTS_FILE",
    "Arm",
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "RunConfig",
    "RunRecord",
    "ValidateConfig",
    "Validation",
    "ValidationResult",
    "arms_of",
    "demo_config",
    "detect",
    "headline",
    "mean_interval",
    "summarise",
    "t_quantile_975",
]
