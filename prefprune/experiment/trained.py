"""An experiment around a model trained elsewhere: ``trained_model`` (``experiment --model``).

Users who train with TRL will not retrain in prefprune just to score: their run's own model
(a TRL ``RewardTrainer``/``DPOTrainer`` output, a PEFT adapter or a prefprune folder) is what
the scores are taken at, read on the tokens it was trained on (docs/trl.md). Proving that
pruning helps still needs retraining, and a fair comparison retrains every arm the same way:
the unpruned baseline and each pruned set are trained by prefprune, from each replicate's
seed, with the model's recipe (objective, β, backbone, LoRA shape, max_length) and the
experiment's training settings. The model's own test metrics are reported beside them.

The model is scored once; replicates differ in their retraining seed and in the random
control, which each draws anew. A run that trained against a reference prefprune cannot
rebuild (TRL's frozen copy of an adapter, a separate reference model) or from weights it
cannot name (a full-weight run) is refused: its retrains would be another experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from prefprune.data import Rendering
from prefprune.ensemble import add_columns
from prefprune.errors import ExperimentError
from prefprune.experiment.config import ExperimentConfig
from prefprune.influence.formulas import random_column
from prefprune.influence.results import ScoreResult
from prefprune.integrations.trl import TrlConfig, load_model, trl_reading
from prefprune.integrations.trl_encoding import TrlEncoder, as_trl_read
from prefprune.model import RewardModel, RewardModelConfig
from prefprune.model.backbones import resolve_backbone
from prefprune.model.policy import DPOPolicy
from prefprune.pipeline import rendering_of


@dataclass
class TrainedModel:
    """The given model, the recipe its retrains follow, and how its data is read."""

    path: Path
    model: RewardModel
    rendering: Rendering
    trl: TrlConfig

    @property
    def recipe(self) -> RewardModelConfig:
        """How the retrains are built: the model's own settings (objective, β, backbone,
        LoRA shape, max_length) with the experiment's cache settings."""
        return self.model.config

    @classmethod
    def load(cls, config: ExperimentConfig) -> TrainedModel:
        """Load ``config.trained_model`` with the experiment's runtime (cache) settings; refuse
        one whose training prefprune cannot repeat (see the module docstring)."""
        path = Path(config.trained_model or "")
        trust = config.model.trust_remote_code
        rendering, trl = trl_reading(path, config.data, config.data_options,
                                     rendering_of(path, trust_remote_code=trust), config.trl)
        model = load_model(path, runtime=config.model, trust_remote_code=trust, trl=trl)
        _check_retrainable(model, path)
        return cls(path, model, rendering, trl)

    def training_pairs(self, train: datasets.Dataset) -> datasets.Dataset:
        """The pairs the model was trained on: for a TRL run, without those TRL left out."""
        if isinstance(self.model.encoder, TrlEncoder):
            return as_trl_read(self.model.encoder, train, {})[0]
        return train

    def summary(self, test: dict[str, Any]) -> dict[str, Any]:
        """What the report says about the model: where it is, its recipe, its test metrics
        (on the test pairs it can read: for a TRL run, those within its max_length)."""
        return {"path": str(self.path), "recipe": self.recipe.to_dict(),
                "trl": self.trl.to_dict() if isinstance(self.model.encoder, TrlEncoder)
                else None, "test": test}


def _check_retrainable(model: RewardModel, path: Path) -> None:
    if isinstance(model, DPOPolicy) and (model.reference_adapter or model.reference_model):
        raise ExperimentError(f"{path}: the run trained against its own reference (a frozen "
                              "adapter copy or a separate model), which prefprune's retrains "
                              "cannot rebuild; score it with `prefprune score --model` instead")
    base = Path(resolve_backbone(model.config.backbone)).resolve()
    if base == path.resolve() or path.resolve() in base.parents:
        raise ExperimentError(f"{path}: a full-weight model, so the weights its training "
                              "started from are unknown and the experiment cannot retrain "
                              "it; score it with `prefprune score --model` instead")


def replicate_table(shared: ScoreResult, seed: int) -> ScoreResult:
    """Replicate ``seed``'s table: the model's scores, with its own random control."""
    table: pd.DataFrame = shared.table
    if "random" in table:
        table = add_columns(table.drop(columns=["random", "rank_random"]),
                            {"random": random_column(len(table), seed)})
    return replace(shared, table=table, metadata={**shared.metadata, "random_seed": seed})
