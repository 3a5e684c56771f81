"""Score the training pairs of one model the way a run asks for: the influence engine on the
model, then the ensemble members and the out-of-fold baseline, each saved as it finishes.

``score_pairs`` (the ``score`` command's whole step: data, model, output checks, resume) and
the experiment (every replicate) share ``score_training_pairs``, so a score means the same in
both. The result is one table: the engine's columns, ``<score>_ens``
columns for an ensemble (docs/method.md, section 5) and ``oof`` for the out-of-fold loss, each
with its rank, plus the sidecar records of what was combined and how much the members agreed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from prefprune import distributed
from prefprune.checkpoints import CheckpointCapture, score_saved_checkpoints
from prefprune.crossfit import out_of_fold_loss
from prefprune.ensemble import EnsembleConfig, add_columns, combine, ensembled, member_seeds
from prefprune.errors import DataError, InfluenceError, StaleDataWarning
from prefprune.files import check_folder, check_output_file, claim_folder
from prefprune.influence import InfluenceConfig, ScoreResult, compute_scores
from prefprune.influence.results import (
    is_score_sidecar,
    is_score_table,
    ranked_columns,
    sidecar_of,
)
from prefprune.integrations.trl import TrlConfig, load_model
from prefprune.integrations.trl_checkpoints import final_model, saved_checkpoints
from prefprune.integrations.trl_encoding import TrlEncoder, as_trl_read
from prefprune.model import FrozenLayerCache, RewardModel, RewardModelConfig
from prefprune.pipeline import (
    PreparedData,
    TrainOutcome,
    frozen_layer_summary,
    metrics_dict,
    split_of,
    train_and_evaluate,
)
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


@dataclass
class ScoreOutcome:
    """Scores of every training pair, the model they were taken at, and where they were saved."""

    result: ScoreResult
    model: RewardModel
    trained: TrainOutcome | None
    paths: tuple[Path, Path] | None


def validation_targets(data: PreparedData, by: str | None = None) -> dict[str, datasets.Dataset]:
    """The validation split as one target, plus one target per value of column ``by``.

    Per-group targets (e.g. per subreddit) show whether a pair hurts one slice of the data
    while helping another.
    """
    validation = split_of(data, "validation")
    if len(validation) == 0:
        raise DataError("the validation split is empty; influence needs validation pairs")
    targets = {"validation": validation}
    if by is None:
        return targets
    if by not in validation.column_names:
        raise DataError(f"unknown target column '{by}'; columns are "
                        f"{', '.join(validation.column_names)}")
    values = validation[by]
    for value in sorted({str(v) for v in values}):
        rows = [i for i, v in enumerate(values) if str(v) == value]
        targets[f"{by}={value}"] = validation.select(rows)
    return targets


def check_score_output(output: str | os.PathLike, *, overwrite: bool = False,
                       inputs: list[Any] = ()) -> None:
    """Refuse a score table path that would replace an input or a file prefprune did not
    write (the table, or its ``.json`` sidecar)."""
    check_output_file(output, owned=is_score_table, overwrite=overwrite, inputs=inputs)
    check_output_file(sidecar_of(Path(output)), owned=is_score_sidecar, overwrite=True,
                      inputs=inputs, what="--output's sidecar")


def score_pairs(
    data: PreparedData,
    model: RewardModel | str | os.PathLike | None = None,
    influence_config: InfluenceConfig | None = None,
    *,
    model_config: RewardModelConfig | None = None,
    train_config: TrainConfig | None = None,
    ensemble: EnsembleConfig | None = None,
    target_column: str | None = None,
    output: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    trl: TrlConfig | None = None,
) -> ScoreOutcome:
    """Score every training pair of ``data`` against its validation split.

    ``model`` is a trained :class:`RewardModel`, a saved model directory, or ``None`` to train
    one first with ``model_config``/``train_config``. An ``ensemble`` trains its other members
    (and ``oof`` its fold models) with the same settings: those of ``train_config``, else the
    ones the saved model records. With ``output`` the table and sidecar are written there;
    intermediate shards go to ``work_dir`` (default: ``<output>.work``) so that an interrupted
    run, started again, resumes. Outputs are checked before any work starts.

    A TRL output folder is read as TRL read its pairs, ``trl`` saying what its files cannot;
    ``trl.checkpoints`` scores with each checkpoint the run saved and combines them (a
    checkpoint ensemble; the model defaults to the run's final one), see docs/trl.md.
    """
    if model is None and trl is not None and trl.checkpoints:
        model = final_model(trl.checkpoints)
    model_path = None if model is None or isinstance(model, RewardModel) else Path(model)
    if output is not None:
        check_score_output(output, overwrite=overwrite, inputs=[data.source, model_path])
        if work_dir is None:
            work_dir = Path(output).with_name(Path(output).name + ".work")
    if work_dir is not None:
        check_folder(work_dir, "score-work", resume=True, inputs=[data.source, model_path])
    targets = validation_targets(data, target_column)
    influence_config = influence_config or InfluenceConfig()
    ensemble = ensemble or EnsembleConfig()
    checkpoints = ensemble.enabled and ensemble.kind == "checkpoints"
    trained = None
    if model is None:
        epochs = (train_config or TrainConfig()).epochs
        capture = (lambda new: CheckpointCapture(
            new, data.splits["train"], targets, influence_config, members=ensemble.members,
            epochs=epochs, progress=progress)) if checkpoints else None
        trained = train_and_evaluate(data, model_config, train_config, progress=progress,
                                     capture=capture)
        model = trained.model
    elif model_path is not None:
        model = load_model(model_path, runtime=model_config or RewardModelConfig(),
                           trust_remote_code=trust_remote_code, trl=trl)
    _warn_if_other_data(model, data)
    if work_dir is not None and distributed.is_main_process():
        claim_folder(work_dir, "score-work", resume=True)
    train, read_as_trl, saved = data.splits["train"], None, None
    if isinstance(model.encoder, TrlEncoder):
        train, targets, read_as_trl = as_trl_read(model.encoder, train, targets)
    if trl is not None and trl.checkpoints:
        saved = score_saved_checkpoints(
            saved_checkpoints(trl.checkpoints), train, targets, influence_config, trl=trl,
            work_dir=None if work_dir is None else Path(work_dir) / "checkpoints",
            model=model,  # its own passes are score_training_pairs' "base" shards
            model_work=None if work_dir is None else Path(work_dir) / "base",
            progress=progress)
        ensemble = ensemble.replace(members=len(saved.tables), kind="checkpoints")
    recorded = model.metadata.get("train_config")
    result = score_training_pairs(
        model, train, targets, influence_config,
        ensemble=ensemble, model_config=model.config,
        train_config=train_config or (TrainConfig.from_dict(recorded) if recorded else None),
        cache=model.layer_cache, work_dir=work_dir, progress=progress,
        checkpoints=saved.tables if saved else
        trained.capture.tables if trained and trained.capture else None,
        checkpoint_weights=saved.weights if saved else None)
    if read_as_trl is not None:
        result.metadata["trl"] = read_as_trl
    if saved is not None:
        result.metadata["checkpoints"] = saved.record
    result.metadata["source"] = data.source
    result.metadata["source_fingerprint"] = data.source_fingerprint
    result.metadata["influence_target"] = data.origins.get("validation")
    result.metadata["rendering"] = data.rendering
    result.metadata["model_trained_on"] = model.metadata.get("data_fingerprint")
    result.metadata["frozen_layers"] = frozen_layer_summary(model)
    if trained is not None:
        result.metadata["model_metrics"] = metrics_dict(trained.metrics)
    paths = None
    if output is not None:
        if distributed.is_main_process():  # every rank returns the same merged table
            paths = result.save(output)
        distributed.barrier()
    return ScoreOutcome(result, model, trained, paths)


def _warn_if_other_data(model: RewardModel, data: PreparedData) -> None:
    """Scoring a model on pairs it was not trained on, or read differently, is allowed, but
    the user should know."""
    rendered = model.metadata.get("rendering")
    if rendered and rendered != data.rendering and distributed.is_main_process():
        warnings.warn(f"the model read its training messages with the {rendered} rendering, "
                      f"this data with {data.rendering}", StaleDataWarning, stacklevel=2)
    trained_on = model.metadata.get("data_fingerprint")
    if trained_on and trained_on != data.fingerprint and distributed.is_main_process():
        warnings.warn(f"the model was trained on other pairs (train fingerprint {trained_on}) "
                      f"than this data's train split ({data.fingerprint}); influence assumes "
                      "the model was fitted on the pairs it scores", StaleDataWarning,
                      stacklevel=2)
