"""Score the training pairs of one model the way a run asks for: the influence engine on the
model, then the ensemble members and the out-of-fold baseline, each saved as it finishes.

``score_pairs`` (one command) and the experiment (every replicate) share this one function, so
a score means the same in both. The result is one table: the engine's columns, ``<score>_ens``
columns for an ensemble (docs/method.md, section 5) and ``oof`` for the out-of-fold loss, each
with its rank, plus the sidecar records of what was combined and how much the members agreed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from prefprune.crossfit import out_of_fold_loss
from prefprune.ensemble import EnsembleConfig, add_columns, combine, ensembled, member_seeds
from prefprune.errors import InfluenceError
from prefprune.influence import InfluenceConfig, ScoreResult, compute_scores
from prefprune.influence.results import ranked_columns
from prefprune.model import FrozenLayerCache, RewardModel, RewardModelConfig
from prefprune.training import TrainConfig, train_reward_model


def score_training_pairs(
    model: RewardModel,
    train: Any,
    targets: Any | Mapping[str, Any],
    influence: InfluenceConfig,
    *,
    ensemble: EnsembleConfig | None = None,
    model_config: RewardModelConfig | None = None,
    train_config: TrainConfig | None = None,
    cache: FrozenLayerCache | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    checkpoints: list[pd.DataFrame] | None = None,
    checkpoint_weights: list[float] | None = None,
) -> ScoreResult:
    """Every requested score of every pair of ``train`` (see the module docstring).

    ``model`` was trained on ``train`` with ``train_config`` (its seed is the base seed);
    seed-ensemble members and fold models are trained the same way from ``model_config``. A
    checkpoint ensemble's members are the ``checkpoints`` tables its training captured
    (:class:`~prefprune.checkpoints.CheckpointCapture`), or of a TRL run's saved checkpoints,
    weighted by ``checkpoint_weights`` (:func:`~prefprune.checkpoints.score_saved_checkpoints`).
    """
    ensemble = ensemble or EnsembleConfig()
    train_config = train_config or TrainConfig()
    model_config = model_config or model.config
    work = Path(work_dir) if work_dir is not None else None
    result = compute_scores(model, train, targets, influence,
                            work_dir=_sub(work, "base"), progress=progress)
    table, meta = result.table, dict(result.metadata)
    if ensemble.enabled:
        if ensemble.kind == "checkpoints":
            if checkpoints is None or len(checkpoints) != ensemble.members:
                raise InfluenceError("a checkpoint ensemble is captured while the model trains; "
                                     "train it here (no --model), or use seed ensembles")
            members, seeds = list(checkpoints), [train_config.seed]
        else:
            seeds = member_seeds(train_config.seed, ensemble.members)
            members = [table] + [
                _member_table(k, seed, train, targets, influence, model_config, train_config,
                              cache, work, progress) for k, seed in enumerate(seeds) if k]
        columns, agreement = combine(members, ensembled(ranked_columns(table)),
                                     ensemble.combine, checkpoint_weights)
        table = add_columns(table, columns)
        meta["ensemble"] = {**ensemble.to_dict(), "seeds": seeds, "agreement": agreement}
    if "oof" in influence.scores:
        loss, record = out_of_fold_loss(train, model_config, train_config,
                                        folds=influence.oof_folds, seed=train_config.seed,
                                        cache=cache, work_dir=_sub(work, "oof"),
                                        progress=progress)
        table = add_columns(table, {"oof": loss})
        meta["oof"] = record
    return ScoreResult(table, meta)


def _sub(work: Path | None, name: str) -> Path | None:
    return None if work is None else work / name


def _member_table(k: int, seed: int, train: Any, targets: Any, influence: InfluenceConfig,
                  model_config: RewardModelConfig, train_config: TrainConfig,
                  cache: FrozenLayerCache | None, work: Path | None,
                  progress: bool) -> pd.DataFrame:
    """Member ``k`` of a seed ensemble: trained from ``seed`` and scored; the table is kept
    in the work folder so a resumed run does not train it again."""
    path = _sub(work, f"member{k}.parquet")
    if path is not None and path.is_file():
        return pd.read_parquet(path)
    member = RewardModel.create(model_config, seed=seed, cache=cache)
    train_reward_model(member, train, train_config.replace(seed=seed), progress=progress)
    result = compute_scores(member, train, targets, influence,
                            work_dir=_sub(work, f"member{k}"), progress=progress)
    if path is not None:
        result.save(path)
    return result.table
