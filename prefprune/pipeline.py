"""The steps a user runs end to end: prepare data, train and evaluate, evaluate a saved model.

The CLI only parses arguments and prints; everything it does goes through these functions with
the same defaults, so a Python user gets exactly what ``prefprune train`` or ``prefprune demo``
would produce.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from prefprune.data import (
    DataError,
    IngestionReport,
    default_dataset_path,
    fingerprint,
    load_preferences,
    split_preferences,
)
from prefprune.detection import detection_report
from prefprune.influence.scores import ALL_SCORES, InfluenceConfig, ScoreResult, compute_scores
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
) -> TrainOutcome:
    """Train a fresh reward model (seeded by ``train_config.seed``) on the train split and
    evaluate it on every non-empty held-out split; save it to ``output`` when given.

    The saved metadata records the training settings, the train fingerprint and the metrics,
    so that a model directory says on its own what it was trained on and how well it did.
    """
    train_config = train_config or TrainConfig()
    start = time.perf_counter()
    model = RewardModel.create(model_config, seed=train_config.seed)
    result = train_reward_model(model, data.splits["train"], train_config, progress=progress)
    metrics = {name: evaluate(model, data.splits[name], progress=progress)
               for name in EVAL_SPLITS if len(data.splits[name])}
    outcome = TrainOutcome(model, result, metrics, data, time.perf_counter() - start)
    if output is not None:
        save_outcome(outcome, train_config, Path(output))
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


def demo_train_config(seed: int = 0) -> TrainConfig:
    """Training settings of the demo, sized to finish in a few minutes on two CPU cores.

    One epoch at a high rate with small batches (101 steps on the ~800 synthetic train pairs)
    already reaches ~86% test accuracy with MiniLM; at the library default (batch 16, 5e-4)
    one epoch barely moves the loss.
    """
    return TrainConfig(epochs=1, batch_size=8, learning_rate=5e-3, seed=seed)


@dataclass
class DemoResult:
    """What ``prefprune demo`` reports: the trained outcome and the demo's wall time."""

    outcome: TrainOutcome
    seconds: float
    scores: ScoreResult | None = None
    detection: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs of the headline table, in reading order."""
        data, train = self.outcome.data, self.outcome.train
        report = data.report
        test = self.outcome.metrics["test"]
        sizes = data.sizes()
        return [
            ("data", f"{Path(report.source).name} ({report.format})"),
            ("rows read = kept + skipped",
             f"{report.read} = {report.kept} + {len(report.skipped)}"),
            ("train / validation / test pairs",
             f"{sizes['train']} / {sizes['validation']} / {sizes['test']}"),
            ("backbone", self.outcome.model.config.backbone or "default (all-MiniLM-L6-v2)"),
            ("trainable parameters", f"{self.outcome.model.num_trainable:,}"),
            ("epochs", str(len(train.epoch_losses))),
            ("final train loss", f"{train.epoch_losses[-1]:.4f}"),
            ("test accuracy (vs true preference)", f"{test.accuracy:.4f}"),
            ("test loss", f"{test.loss:.4f}"),
            ("seconds per epoch", f"{sum(train.epoch_seconds) / len(train.epoch_seconds):.1f}"),
            ("training tokens/s", f"{train.tokens_per_second:,.0f}"),
            *self._scoring_rows(),
            ("wall seconds", f"{self.seconds:.1f}"),
        ]

    def _scoring_rows(self) -> list[tuple[str, str]]:
        if self.scores is None:
            return []
        meta = self.scores.metadata
        solve = meta["solves"]["validation"] if meta.get("solves") else None
        rows = [("scoring seconds", f"{sum(meta['timings_seconds'].values()):.1f}")]
        if solve is not None:
            rows.append(("CG iterations / final residual",
                         f"{solve['iterations']} / {solve['final_residual']:.1e}"))
        return rows


def run_demo(
    *,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    model_config: RewardModelConfig | None = None,
    train_config: TrainConfig | None = None,
) -> DemoResult:
    """Train and evaluate the default backbone on the embedded synthetic set, then score every
    training pair and measure how well each score finds the simulated annotators' flipped labels.

    The synthetic test split is labelled by the generator's true preference, so test accuracy
    measures agreement with the truth, not with noisy annotators. ``seed`` seeds the split and
    training (it replaces ``train_config.seed``).
    """
    start = time.perf_counter()
    train_config = dataclasses.replace(train_config or demo_train_config(), seed=seed)
    data = prepare_data(seed=seed)
    outcome = train_and_evaluate(data, model_config, train_config, output=output,
                                 progress=progress)
    scored = score_pairs(data, outcome.model, InfluenceConfig(scores=DEMO_SCORES, seed=seed),
                         progress=progress).result
    return DemoResult(outcome, time.perf_counter() - start, scored, flip_detection(scored.table))


#: Scores the demo computes: influence, gradient similarity and the two controls.
DEMO_SCORES = ("if", "grad_cos", "loss", "random")


def flip_detection(table: Any, fraction: float = 0.1) -> dict[str, dict[str, float]]:
    """Detection quality of each score against known flipped labels (the synthetic set's
    ``label_flipped`` ground truth, or injected flips); empty when the data has none."""
    if "label_flipped" not in table:
        return {}
    truth = table["label_flipped"].astype(bool).to_numpy()
    return {name: detection_report(table[name].to_numpy(), truth, fraction)
            for name in ALL_SCORES if name in table}


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
) -> ScoreOutcome:
    """Score every training pair of ``data`` against its validation split.

    ``model`` is a trained :class:`RewardModel`, a saved model directory, or ``None`` to train
    one first with ``model_config``/``train_config``. With ``output`` the table and sidecar are
    written there; intermediate shards go to ``work_dir`` (default: ``<output>.work``) so that
    an interrupted run, started again, resumes.
    """
    trained = None
    if model is None:
        trained = train_and_evaluate(data, model_config, train_config, progress=progress)
        model = trained.model
    elif not isinstance(model, RewardModel):
        model = RewardModel.load(model)
    if work_dir is None and output is not None:
        work_dir = Path(output).with_name(Path(output).name + ".work")
    result = compute_scores(model, data.splits["train"], validation_targets(data, target_column),
                            influence_config, work_dir=work_dir, progress=progress)
    result.metadata["source"] = data.source
    result.metadata["model_trained_on"] = model.metadata.get("data_fingerprint")
    if trained is not None:
        result.metadata["model_metrics"] = metrics_dict(trained.metrics)
    paths = result.save(output) if output is not None else None
    return ScoreOutcome(result, model, trained, paths)
