"""Run (or resume) a pruning experiment: train, score, remove or relabel the top-f pairs per
method, retrain from the same initialisation, and measure test accuracy, over several seeds
(docs/method.md, section 4).

Everything an experiment does is fixed by one :class:`ExperimentConfig`, saved as
``config.yaml`` next to the results, so ``prefprune experiment --config DIR/config.yaml``
repeats a run. Each finished step is saved as it ends (base models, score tables, one JSON per
retrain), so an interrupted experiment started again resumes where it stopped. The folder
also records the fingerprints of the data it was started on: a rerun on changed data is
refused, never answered with stale results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from prefprune.checkpoints import CheckpointCapture, saved_checkpoints
from prefprune.data import fingerprint
from prefprune.detection import detection_report
from prefprune.errors import ExperimentError
from prefprune.experiment.config import ExperimentConfig
from prefprune.experiment.folder import RunFolder, check_splits, split_fingerprints
from prefprune.experiment.records import Arm, RunRecord
from prefprune.experiment.stats import summarise
from prefprune.experiment.trained import TrainedModel, replicate_table
from prefprune.files import (
    write_json_atomic,
)
from prefprune.influence.results import (
    ScoreResult,
    model_fingerprint,
    score_table_entries,
    sidecar_of,
)
from prefprune.model import FrozenLayerCache, RewardModel, RewardModelConfig
from prefprune.model.reward_model import MODEL_FILES
from prefprune.pipeline import (
    PreparedData,
    data_summary,
    metrics_dict,
    prepare_data,
    rendering_of,
    truncation,
)
from prefprune.progress import progress_bar
from prefprune.pruning import inject_flips, relabel_pairs, remove_pairs, select
from prefprune.scoring import score_pairs, score_training_pairs
from prefprune.training import evaluate, train_reward_model

RESULTS_FILE = "results.json"
#: What an experiment writes into its folder besides its settings (``overwrite`` removes
#: exactly these): results, report and figures, one record per run, a model folder and a
#: score table per replicate, and a given model's own table (``trained_model``).
OWN_ENTRIES = (RESULTS_FILE, "report.md", "report.html", "figures/*.png", "runs/*.json",
               *(f"models/seed*/{name}" for name in MODEL_FILES),
               *score_table_entries("scores/seed*"), *score_table_entries("scores/model"))


def arms_of(config: ExperimentConfig, seed: int) -> list[Arm]:
    """Every pruned retrain of one replicate, in a fixed order."""
    shapes = [("harmful", "remove")]
    if config.helpful:
        shapes.append(("helpful", "remove"))
    if config.relabel:
        shapes.append(("harmful", "relabel"))
    return [Arm(seed, method, fraction, direction, action)
            for direction, action in shapes
            for fraction in config.fractions
            for method in config.arm_methods(direction, action)]


@dataclass
class ExperimentResult:
    """Every run's record, the per-seed score tables and detection metrics, and the summary."""

    config: ExperimentConfig
    runs: list[RunRecord]
    detection: dict[str, dict[str, dict[str, float]]]  # seed -> score -> metric
    summary: dict[str, Any]
    data: dict[str, Any]
    scores: dict[int, pd.DataFrame] = field(repr=False, default_factory=dict)
    train_texts: dict[int, datasets.Dataset] = field(repr=False, default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "data": self.data,
                "runs": [r.to_dict() for r in self.runs], "detection": self.detection,
                "summary": self.summary, "seconds": self.seconds}


class Experiment:
    """Runs (or resumes) one experiment in ``output``; see the module docstring.

    ``overwrite`` starts afresh in a folder that holds an earlier prefprune experiment (its
    own files are replaced, nothing else); without it a folder holding another experiment, or
    the same one on other data, is refused.
    """

    def __init__(self, config: ExperimentConfig, output: str | Path, *,
                 progress: bool = True, overwrite: bool = False,
                 on_run: Callable[[RunRecord], None] | None = None) -> None:
        self.config = config
        self.output = Path(output)
        self.progress = progress
        self.folder = RunFolder(output, "experiment", config, OWN_ENTRIES, overwrite=overwrite)
        self.on_run = on_run
        self.cache = FrozenLayerCache.for_config(config.model)
        self.trained: TrainedModel | None = None

    @property
    def recipe(self) -> RewardModelConfig:
        """How every model of the run is built: a trained model's recipe, else the config's."""
        return self.trained.recipe if self.trained is not None else self.config.model

    def run(self) -> ExperimentResult:
        start = time.perf_counter()
        self.folder.check()
        if self.config.trained_model is not None:
            self.trained = TrainedModel.load(self.config)
            self.cache = self.trained.model.layer_cache
        datas = self._prepare()
        self.folder.claim(self._fingerprints(datas))
        runs, detection, tables, texts, agreement = [], {}, {}, {}, {}
        summary = data_summary(datas[self.config.seeds[0]])
        if self.config.split_per_seed:
            summary["sizes_per_seed"] = {str(s): datas[s].sizes() for s in self.config.seeds}
        arms = {seed: arms_of(self.config, seed) for seed in self.config.seeds}
        total = sum(len(a) + 1 for a in arms.values())
        with progress_bar("experiment runs", total, self.progress) as advance:
            if self.trained is not None:
                summary["trained_model"] = self._trained_summary(datas[self.config.seeds[0]])
            for seed in self.config.seeds:
                data = datas[seed]
                train = self._training_pairs(data, seed)
                base, model = self._base(seed, train, data)
                summary.setdefault("truncation", {k: v.to_dict() for k, v in
                                                  truncation(model, data).items()})
                runs.append(base)
                advance(1)
                table, meta = self._scores(seed, model, train, data)
                tables[seed], texts[seed] = table, train
                if "ensemble" in meta:
                    agreement[str(seed)] = meta["ensemble"]["agreement"]
                if "label_flipped" in table:
                    detection[str(seed)] = detect(table, self.config.score_columns())
                for arm in arms[seed]:
                    runs.append(self._retrain(arm, train, table, data))
                    advance(1)
        if self.cache is not None:
            self.cache.flush()
            summary["frozen_layers"] = self.cache.summary()
        result = ExperimentResult(self.config, runs, detection,
                                  summarise(runs, detection, agreement), summary, tables, texts,
                                  time.perf_counter() - start)
        write_json_atomic(self.output / RESULTS_FILE, result.to_dict())
        return result

    # --- bookkeeping ---------------------------------------------------------------------

    def _prepare(self) -> dict[int, PreparedData]:
        """Each replicate's data: one split shared by all, or with ``split_per_seed`` a split
        of its own (a source with its own splits cannot be split anew, so it is refused)."""
        kwargs = self.config.data_kwargs()
        if self.trained is not None:  # every pair of DATA trained the model
            rendering = self.trained.rendering
            kwargs["fractions"] = (1.0, 0.0, 0.0)
        else:
            rendering = rendering_of(self.config.model)
        by_split: dict[int, PreparedData] = {}
        for seed in self.config.seeds:
            split_seed = self.config.replicate_split_seed(seed)
            if split_seed not in by_split:
                by_split[split_seed] = prepare_data(
                    self.config.data, **{**kwargs, "seed": split_seed}, rendering=rendering)
                check_splits(by_split[split_seed])
        if len(by_split) > 1 and len({d.fingerprint for d in by_split.values()}) == 1:
            raise ExperimentError(f"{self.config.data or 'the embedded set'} has its own "
                                  "train/validation/test splits, so split_per_seed cannot draw "
                                  "a new split per replicate; drop it")
        return {s: by_split[self.config.replicate_split_seed(s)] for s in self.config.seeds}

    def _fingerprints(self, datas: dict[int, PreparedData]) -> dict[str, str]:
        """What the folder's saved runs depend on: the shared split, or each replicate's, and
        a given model's weights (its saved score table is theirs)."""
        if not self.config.split_per_seed:
            out = split_fingerprints(datas[self.config.seeds[0]])
        else:
            out = {}
            for seed, data in datas.items():
                out.update(split_fingerprints(data, prefix=f"seed{seed}/"))
        if self.trained is not None:
            out["trained_model"] = model_fingerprint(self.trained.model)
        return out

    def _training_pairs(self, data: PreparedData, seed: int) -> datasets.Dataset:
        train = data.splits["train"]
        if self.trained is not None:
            return self.trained.training_pairs(train)
        if self.config.inject_flips > 0:
            train = inject_flips(train, self.config.inject_flips, seed)
        return train

    def _run_path(self, arm: Arm) -> Path:
        return self.output / "runs" / f"{arm.key}.json"

    def _new_model(self, seed: int) -> RewardModel:
        return RewardModel.create(self.recipe, seed=seed, cache=self.cache)

    # --- the steps -----------------------------------------------------------------------

    def _base(self, seed: int, train: datasets.Dataset,
              data: PreparedData) -> tuple[RunRecord, RewardModel]:
        """The unpruned model of one replicate: loaded when saved, else trained and saved."""
        arm = Arm(seed)
        model_dir = self.output / "models" / f"seed{seed}"
        record_path = self._run_path(arm)
        capture = self._capture(seed, train, data)
        if model_dir.exists() and record_path.exists() and capture is None:
            model = RewardModel.load(model_dir, runtime=self.config.model,
                                     cache=self.cache,
                                     trust_remote_code=self.config.model.trust_remote_code)
            return self._load_record(record_path, train), model
        model, record = self._fit(arm, train, data, pairs_affected=0, flipped_affected=None,
                                  capture=capture)
        model.save(model_dir, overwrite=True, seed=seed)
        write_json_atomic(record_path, record.to_dict())
        self._announce(record)
        return record, model

    def _load_record(self, path: Path, train: datasets.Dataset | None = None) -> RunRecord:
        record = RunRecord.from_dict(json.loads(path.read_text()))
        if train is not None and record.train_fingerprint != fingerprint(train):
            raise ExperimentError(f"{path} was trained on other pairs than this run's; pass "
                                  "--overwrite to start the experiment afresh")
        return record

    def _scores(self, seed: int, model: RewardModel, train: datasets.Dataset,
                data: PreparedData) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The replicate's score table and its sidecar: computed, or loaded when saved."""
        path = self._score_path(seed)
        if path.exists():
            return pd.read_parquet(path), json.loads(sidecar_of(path).read_text())
        if self.trained is not None:
            result = replicate_table(self._trained_scores(data), seed)
            result.save(path)
            return result.table, result.metadata
        result = score_training_pairs(
            model, train, data.splits["validation"], self.config.influence.replace(seed=seed),
            ensemble=self.config.ensemble, model_config=self.config.model,
            train_config=self.config.train.replace(seed=seed), cache=self.cache,
            work_dir=path.with_name(path.name + ".work"), progress=self.progress,
            checkpoints=self._saved_checkpoints(seed))
        result.save(path)
        return result.table, result.metadata

    def _trained_scores(self, data: PreparedData) -> ScoreResult:
        """The given model's scores (computed once, seeded by the first replicate), as
        ``score --model`` takes them: read as the model was trained."""
        assert self.trained is not None
        first = self.config.seeds[0]
        path = self.output / "scores" / "model.parquet"
        if path.exists():
            return ScoreResult(pd.read_parquet(path), json.loads(sidecar_of(path).read_text()))
        return score_pairs(
            data, self.trained.model, self.config.influence.replace(seed=first),
            train_config=self.config.train.replace(seed=first), ensemble=self.config.ensemble,
            output=path, overwrite=True, progress=self.progress, trl=self.trained.trl).result

    def _trained_summary(self, data: PreparedData) -> dict[str, Any]:
        """The given model's own test metrics (measured once, kept with the run records)."""
        assert self.trained is not None
        path = self.output / "runs" / "trained-model.json"
        if path.exists():
            return json.loads(path.read_text())
        test = self.trained.training_pairs(data.splits["test"])
        metrics = metrics_dict({"test": evaluate(self.trained.model, test, progress=False)})
        summary = self.trained.summary(metrics["test"])
        write_json_atomic(path, summary)
        return summary

    def _retrain(self, arm: Arm, train: datasets.Dataset, table: pd.DataFrame,
                 data: PreparedData) -> RunRecord:
        path = self._run_path(arm)
        if path.exists():
            return self._load_record(path)
        chosen = select(table, arm.prune_config()).ids
        changed = remove_pairs(train, chosen) if arm.action == "remove" \
            else relabel_pairs(train, chosen)
        flipped = None
        if "label_flipped" in table:
            picked = table.set_index("id").loc[list(chosen), "label_flipped"]
            flipped = float(picked.astype(bool).mean())
        _, record = self._fit(arm, changed, data, len(chosen), flipped)
        write_json_atomic(path, record.to_dict())
        self._announce(record)
        return record

    def _capture(self, seed: int, train: datasets.Dataset, data: PreparedData
                 ) -> Callable[[RewardModel], CheckpointCapture] | None:
        """For a checkpoint ensemble whose tables are not saved yet: how the base model's
        training captures them (None when there is nothing to capture)."""
        ensemble = self.config.ensemble
        if not ensemble.enabled or ensemble.kind != "checkpoints":
            return None
        where = self._checkpoint_dir(seed)
        if self._score_path(seed).exists() or self._saved_checkpoints(seed) is not None:
            return None
        influence = self.config.influence.replace(seed=seed)
        return lambda model: CheckpointCapture(
            model, train, data.splits["validation"], influence, members=ensemble.members,
            epochs=self.config.train.epochs, work_dir=where)

    def _saved_checkpoints(self, seed: int) -> list[pd.DataFrame] | None:
        ensemble = self.config.ensemble
        if not ensemble.enabled or ensemble.kind != "checkpoints":
            return None
        return saved_checkpoints(self._checkpoint_dir(seed), ensemble.members)

    def _checkpoint_dir(self, seed: int) -> Path:
        return self._score_path(seed).with_name(f"seed{seed}.parquet.work") / "checkpoints"

    def _score_path(self, seed: int) -> Path:
        return self.output / "scores" / f"seed{seed}.parquet"

    def _fit(self, arm: Arm, train: datasets.Dataset, data: PreparedData, pairs_affected: int,
             flipped_affected: float | None,
             capture: Callable[[RewardModel], CheckpointCapture] | None = None
             ) -> tuple[RewardModel, RunRecord]:
        """Train from the replicate's initialisation on ``train``; measure on test."""
        start = time.perf_counter()
        model = self._new_model(arm.seed)
        trained = train_reward_model(model, train, self.config.train.replace(seed=arm.seed),
                                     progress=self.progress,
                                     capture=capture(model) if capture else None)
        test = evaluate(model, data.splits["test"], progress=False)
        record = RunRecord(arm, len(train), pairs_affected, flipped_affected, test.accuracy,
                           test.loss, trained.epoch_losses[-1], time.perf_counter() - start,
                           fingerprint(train))
        return model, record

    def _announce(self, record: RunRecord) -> None:
        if self.on_run is not None:
            self.on_run(record)


def detect(table: pd.DataFrame, methods: tuple[str, ...],
           fraction: float = 0.1) -> dict[str, dict[str, float]]:
    """Detection quality of each score against ``label_flipped`` (docs/method.md, section 4)."""
    truth = table["label_flipped"].astype(bool).to_numpy()
    return {m: detection_report(table[m].to_numpy(), truth, fraction)
            for m in methods if m in table}


def headline(result: ExperimentResult) -> list[dict[str, Any]]:
    """Per method of the first fraction: test accuracy after removing the top pairs, its
    difference from no pruning, and how well the score finds the flipped labels."""
    fraction = result.config.fractions[0]
    rows = [{"method": "no pruning", "fraction": 0.0,
             "test_accuracy": result.summary["baseline"]["test_accuracy"]}]
    for arm in result.summary["arms"]:
        if arm["fraction"] == fraction and (arm["direction"], arm["action"]) == \
                ("harmful", "remove"):
            rows.append({"method": arm["method"], "fraction": fraction,
                         "test_accuracy": arm["test_accuracy"],
                         "vs_baseline": arm["vs_baseline"], "vs_random": arm.get("vs_random"),
                         "detection": result.summary["detection"].get(arm["method"])})
    return rows
