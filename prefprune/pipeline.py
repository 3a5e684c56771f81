"""The steps a user runs end to end: prepare data, train and evaluate, evaluate a saved model,
score every training pair.

The CLI only parses arguments and prints; everything it does goes through these functions with
the same defaults, so a Python user gets exactly what ``prefprune train`` or ``prefprune demo``
would produce. With LoRA on the top layers only (``lora_layers``), these steps serve the
frozen layers from a :class:`~prefprune.layer_cache.FrozenLayerCache`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from prefprune import distributed
from prefprune.data import (
    DataError,
    IngestionReport,
    default_dataset_path,
    fingerprint,
    load_preferences,
    split_preferences,
)
from prefprune.influence.scores import InfluenceConfig, ScoreResult, compute_scores
from prefprune.layer_cache import FrozenLayerCache
from prefprune.reward_model import METADATA_FILE, RewardModel, RewardModelConfig
from prefprune.training import (
    EvalResult,
    TrainConfig,
    TrainResult,
    evaluate,
    resolve_device,
    train_reward_model,
)

#: Splits a trained model is measured on; train is fitted, not measured.
EVAL_SPLITS = ("validation", "test")
#: RAM for cached frozen-layer activations when LoRA adapts only the top layers.
DEFAULT_LAYER_CACHE_MB = 2048.0


def with_layer_cache(model: RewardModel, budget_mb: float = DEFAULT_LAYER_CACHE_MB,
                     cache: FrozenLayerCache | None = None) -> RewardModel:
    """Serve ``model``'s frozen lower layers from ``cache`` (a new one of ``budget_mb`` when not
    given) if LoRA adapts only its top layers; a budget of 0 turns caching off."""
    if model.config.lora_layers and budget_mb > 0:
        model.use_layer_cache(cache or FrozenLayerCache(budget_mb))
    return model


@dataclass
class PreparedData:
    """Loaded and split pairs, with the account of every input row and the train fingerprint."""

    splits: datasets.DatasetDict
    report: IngestionReport
    fingerprint: str
    source: str

    def sizes(self) -> dict[str, int]:
        """Pairs per split, for summaries."""
        return {name: len(split) for name, split in self.splits.items()}


def prepare_data(
    source: str | os.PathLike | None = None,
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    strict: bool = False,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    seed: int = 0,
    hub_config: str | None = None,
    hub_split: str | None = None,
    data_dir: str | None = None,
) -> PreparedData:
    """Load ``source`` (``None``: the embedded synthetic set) and split it train/validation/test.

    The source's own splits win when it has them (see :func:`split_preferences`); ``fractions``
    and ``seed`` only shape a prompt-grouped split of data without them.
    """
    path = default_dataset_path() if source is None else source
    loaded = load_preferences(path, format=format, columns=columns, strict=strict,
                              hub_config=hub_config, hub_split=hub_split, data_dir=data_dir)
    splits = split_preferences(loaded.dataset, fractions=fractions, seed=seed)
    return PreparedData(splits, loaded.report, fingerprint(splits["train"]), str(path))


@dataclass
class TrainOutcome:
    """A trained model with its training record and its scores on the held-out splits."""

    model: RewardModel
    train: TrainResult
    metrics: dict[str, EvalResult]
    data: PreparedData
    seconds: float


def train_and_evaluate(
    data: PreparedData,
    model_config: RewardModelConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    layer_cache_mb: float = DEFAULT_LAYER_CACHE_MB,
) -> TrainOutcome:
    """Train a fresh reward model (seeded by ``train_config.seed``) on the train split and
    evaluate it on every non-empty held-out split; save it to ``output`` when given.

    The saved metadata records the training settings, the train fingerprint and the metrics,
    so that a model directory says on its own what it was trained on and how well it did.
    """
    train_config = train_config or TrainConfig()
    start = time.perf_counter()
    model = with_layer_cache(RewardModel.create(model_config, seed=train_config.seed),
                             layer_cache_mb)
    result = train_reward_model(model, data.splits["train"], train_config, progress=progress)
    metrics = {name: evaluate(model, data.splits[name], progress=progress)
               for name in EVAL_SPLITS if len(data.splits[name])}
    outcome = TrainOutcome(model, result, metrics, data, time.perf_counter() - start)
    if output is not None:
        if distributed.is_main_process():  # under torchrun every rank holds the same model
            save_outcome(outcome, train_config, Path(output))
        distributed.barrier()
    return outcome


def save_outcome(outcome: TrainOutcome, train_config: TrainConfig, output: Path) -> Path:
    """Save the model with the metadata that makes a run traceable to its data and settings."""
    return outcome.model.save(
        output,
        train_config=train_config.to_dict(),
        data_fingerprint=outcome.data.fingerprint,
        source=outcome.data.source,
        ingestion={k: v for k, v in outcome.data.report.to_dict().items() if k != "skipped"},
        metrics=metrics_dict(outcome.metrics),
        train=outcome.train.to_dict(),
    )


def evaluate_saved(
    model_path: str | os.PathLike,
    data: PreparedData | datasets.Dataset,
    split: str = "test",
    *,
    device: str = "auto",
    progress: bool = True,
) -> EvalResult:
    """Load a saved reward model and evaluate it on ``split`` of ``data`` (or on a dataset)."""
    pairs = data if isinstance(data, datasets.Dataset) else _split_of(data, split)
    model = RewardModel.load(model_path).to(resolve_device(device))
    return evaluate(model, pairs, progress=progress)


def recorded_seed(model_path: str | os.PathLike) -> int:
    """The training seed a saved prefprune model records, 0 when it records none.

    Evaluating on data without source splits must reuse it: another seed gives another split,
    and the "test" pairs could then include pairs the model was trained on.
    """
    meta_file = Path(model_path) / METADATA_FILE
    if not meta_file.is_file():
        return 0
    meta = json.loads(meta_file.read_text())
    return int(meta.get("metadata", {}).get("train_config", {}).get("seed", 0))


def _split_of(data: PreparedData, split: str) -> datasets.Dataset:
    """One split by name, with an error that lists the names there are."""
    if split not in data.splits:
        raise DataError(f"unknown split '{split}'; expected one of {', '.join(data.splits)}")
    return data.splits[split]


def metrics_dict(metrics: Mapping[str, EvalResult]) -> dict[str, Any]:
    """JSON form of per-split metrics (without the per-pair margins)."""
    return {name: result.to_dict() for name, result in metrics.items()}


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
    validation = _split_of(data, "validation")
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


def score_pairs(
    data: PreparedData,
    model: RewardModel | str | os.PathLike | None = None,
    influence_config: InfluenceConfig | None = None,
    *,
    model_config: RewardModelConfig | None = None,
    train_config: TrainConfig | None = None,
    target_column: str | None = None,
    output: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    layer_cache_mb: float = DEFAULT_LAYER_CACHE_MB,
) -> ScoreOutcome:
    """Score every training pair of ``data`` against its validation split.

    ``model`` is a trained :class:`RewardModel`, a saved model directory, or ``None`` to train
    one first with ``model_config``/``train_config``. With ``output`` the table and sidecar are
    written there; intermediate shards go to ``work_dir`` (default: ``<output>.work``) so that
    an interrupted run, started again, resumes.
    """
    trained = None
    if model is None:
        trained = train_and_evaluate(data, model_config, train_config, progress=progress,
                                     layer_cache_mb=layer_cache_mb)
        model = trained.model
    elif not isinstance(model, RewardModel):
        model = with_layer_cache(RewardModel.load(model), layer_cache_mb)
    if work_dir is None and output is not None:
        work_dir = Path(output).with_name(Path(output).name + ".work")
    result = compute_scores(model, data.splits["train"], validation_targets(data, target_column),
                            influence_config, work_dir=work_dir, progress=progress)
    result.metadata["source"] = data.source
    result.metadata["model_trained_on"] = model.metadata.get("data_fingerprint")
    if trained is not None:
        result.metadata["model_metrics"] = metrics_dict(trained.metrics)
    paths = None
    if output is not None:
        if distributed.is_main_process():  # every rank returns the same merged table
            paths = result.save(output)
        distributed.barrier()
    return ScoreOutcome(result, model, trained, paths)
