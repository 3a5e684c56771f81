"""The pruning experiment of SPEC §4: train, score, remove (or relabel) the top-f pairs per
method, retrain from the same initialisation, and measure test accuracy, over several seeds.

Everything an experiment does is fixed by one :class:`ExperimentConfig`, which is saved as
``config.yaml`` next to the results, so ``prefprune experiment --config DIR/config.yaml``
repeats a run. Each finished step is saved as it ends (base models, score tables, one JSON per
retrain), so an interrupted experiment started again resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import yaml

from prefprune.detection import detection_report
from prefprune.errors import ExperimentError
from prefprune.influence.scores import ALL_SCORES, InfluenceConfig, ScoreResult, compute_scores
from prefprune.layer_cache import FrozenLayerCache
from prefprune.pipeline import PreparedData, prepare_data, with_layer_cache
from prefprune.progress import progress_bar
from prefprune.pruning import inject_flips, relabel_pairs, remove_pairs, select
from prefprune.reward_model import RewardModel, RewardModelConfig, save_json_atomic
from prefprune.training import TrainConfig, evaluate, train_reward_model

#: Scores an experiment ranks pairs by unless told otherwise (SPEC §4 step 3).
DEFAULT_METHODS = ("if", "grad_dot", "grad_cos", "flip", "loss", "random")
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of an experiment. ``data=None`` is the embedded synthetic set.

    ``data_options`` are :func:`~prefprune.pipeline.prepare_data`'s reading options (format,
    columns, hub_config, ...). ``inject_flips`` swaps a seeded share of the training labels
    (seeded per replicate) and keeps the truth, for detection metrics. ``helpful`` adds the
    arm that removes the most helpful pairs; ``relabel`` the arm that flips the top harmful
    pairs instead of removing them. ``layer_cache_mb`` sizes the frozen-layer cache when
    ``model.lora_layers`` is set.
    """

    data: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    split_seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    fractions: tuple[float, ...] = (0.05, 0.1, 0.2)
    seeds: tuple[int, ...] = (0, 1, 2)
    helpful: bool = True
    relabel: bool = True
    inject_flips: float = 0.0
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    layer_cache_mb: float = 2048.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(ALL_SCORES))
        if unknown or not self.methods:
            raise ExperimentError(f"unknown methods {unknown}; choose from "
                                  f"{', '.join(ALL_SCORES)}")
        if not self.seeds:
            raise ExperimentError("an experiment needs at least one seed")
        for fraction in self.fractions:
            if not 0 < fraction < 1:
                raise ExperimentError(f"fractions must be in (0, 1), got {fraction}")
        if not 0 <= self.inject_flips < 1:
            raise ExperimentError(f"inject_flips must be in [0, 1), got {self.inject_flips}")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["model"] = self.model.to_dict()
        data["train"] = dataclasses.asdict(self.train)
        data["influence"] = self.influence.to_dict()
        return json.loads(json.dumps(data))  # tuples -> lists: plain YAML

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ExperimentError(f"unknown experiment settings: {', '.join(unknown)}")
        kwargs = dict(data)
        for name in ("split_fractions", "methods", "fractions", "seeds"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        kwargs["model"] = RewardModelConfig.from_dict(data.get("model") or {})
        kwargs["train"] = _dataclass_from(TrainConfig, data.get("train") or {})
        influence = dict(data.get("influence") or {})
        if "scores" in influence:
            influence["scores"] = tuple(influence["scores"])
        kwargs["influence"] = _dataclass_from(InfluenceConfig, influence)
        return cls(**kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ExperimentError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ExperimentError(f"{path}: expected a mapping of settings")
        try:
            return cls.from_dict(data)
        except (TypeError, ExperimentError) as exc:
            raise ExperimentError(f"{path}: {exc}") from exc


def _dataclass_from(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ExperimentError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class Arm:
    """One retrain: which pairs a method picks, how many, and what is done to them."""

    seed: int
    method: str | None = None  # None: the unpruned baseline
    fraction: float = 0.0
    direction: str = "harmful"
    action: str = "remove"

    @property
    def key(self) -> str:
        if self.method is None:
            return f"seed{self.seed}-base"
        return (f"seed{self.seed}-{self.method}-{self.direction}-{self.action}-"
                f"{self.fraction:g}")

    @property
    def group(self) -> str:
        """The comparison this arm belongs to (e.g. ``remove harmful``)."""
        return "baseline" if self.method is None else f"{self.action} {self.direction}"


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
            for method in config.methods]


@dataclass
class ExperimentResult:
    """Every run's record, the per-seed score tables and detection metrics, and the summary."""

    config: ExperimentConfig
    runs: list[dict[str, Any]]
    detection: dict[str, dict[str, dict[str, float]]]  # seed -> score -> metric
    summary: dict[str, Any]
    data: dict[str, Any]
    scores: dict[int, pd.DataFrame] = field(repr=False, default_factory=dict)
    train_texts: dict[int, datasets.Dataset] = field(repr=False, default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "data": self.data, "runs": self.runs,
                "detection": self.detection, "summary": self.summary,
                "seconds": self.seconds}


class Experiment:
    """Runs (or resumes) one experiment in ``output``; see the module docstring."""

    def __init__(self, config: ExperimentConfig, output: str | Path, *,
                 progress: bool = True,
                 on_run: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.output = Path(output)
        self.progress = progress
        self.on_run = on_run
        self.cache = (FrozenLayerCache(config.layer_cache_mb)
                      if config.model.lora_layers and config.layer_cache_mb > 0 else None)

    def run(self) -> ExperimentResult:
        start = time.perf_counter()
        self._claim_output()
        data = prepare_data(self.config.data, **self.config.data_options,
                            fractions=self.config.split_fractions, seed=self.config.split_seed)
        self._check_splits(data)
        runs, detection, tables, texts = [], {}, {}, {}
        arms = {seed: arms_of(self.config, seed) for seed in self.config.seeds}
        total = sum(len(a) + 1 for a in arms.values())
        with progress_bar("experiment runs", total, self.progress) as advance:
            for seed in self.config.seeds:
                train = self._training_pairs(data, seed)
                base, model = self._base(seed, train, data)
                runs.append(base)
                advance(1)
                table = self._scores(seed, model, train, data)
                tables[seed], texts[seed] = table, train
                if "label_flipped" in table:
                    detection[str(seed)] = detect(table, self.config.methods)
                for arm in arms[seed]:
                    runs.append(self._retrain(arm, train, table, data))
                    advance(1)
        result = ExperimentResult(self.config, runs, detection, summarise(runs, detection),
                                  self._data_summary(data), tables, texts,
                                  time.perf_counter() - start)
        save_json_atomic(self.output / RESULTS_FILE, result.to_dict())
        return result

    # --- bookkeeping ---------------------------------------------------------------------

    def _claim_output(self) -> None:
        """Write config.yaml, or check that the directory holds this very experiment."""
        path = self.output / CONFIG_FILE
        text = self.config.to_yaml()
        if path.exists():
            saved = ExperimentConfig.from_yaml(path)
            if saved != self.config:
                raise ExperimentError(
                    f"{self.output} holds a different experiment (its {CONFIG_FILE} differs); "
                    "use another --output, or rerun with --config "
                    f"{path} to resume it")
            return
        self.output.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def _check_splits(self, data: PreparedData) -> None:
        for name in ("train", "validation", "test"):
            if len(data.splits[name]) == 0:
                raise ExperimentError(f"the {name} split of {data.source} is empty")

    def _data_summary(self, data: PreparedData) -> dict[str, Any]:
        report = data.report
        return {"source": data.source, "format": report.format, "read": report.read,
                "kept": report.kept, "skipped": len(report.skipped),
                "skipped_by_reason": report.by_reason(), "sizes": data.sizes(),
                "train_fingerprint": data.fingerprint}

    def _training_pairs(self, data: PreparedData, seed: int) -> datasets.Dataset:
        train = data.splits["train"]
        if self.config.inject_flips > 0:
            train = inject_flips(train, self.config.inject_flips, seed)
        return train

    def _run_path(self, arm: Arm) -> Path:
        return self.output / "runs" / f"{arm.key}.json"

    def _new_model(self, seed: int) -> RewardModel:
        return with_layer_cache(RewardModel.create(self.config.model, seed=seed),
                                self.config.layer_cache_mb, self.cache)

    def _train_config(self, seed: int) -> TrainConfig:
        return dataclasses.replace(self.config.train, seed=seed)

    # --- the steps -----------------------------------------------------------------------

    def _base(self, seed: int, train: datasets.Dataset,
              data: PreparedData) -> tuple[dict[str, Any], RewardModel]:
        """The unpruned model of one replicate: loaded when saved, else trained and saved."""
        arm = Arm(seed)
        model_dir = self.output / "models" / f"seed{seed}"
        record_path = self._run_path(arm)
        if model_dir.exists() and record_path.exists():
            model = with_layer_cache(RewardModel.load(model_dir), self.config.layer_cache_mb,
                                     self.cache)
            return json.loads(record_path.read_text()), model
        model, record = self._fit(arm, train, data, pairs_affected=0, flipped_affected=None)
        model.save(model_dir, seed=seed)
        save_json_atomic(record_path, record)
        self._announce(record)
        return record, model

    def _scores(self, seed: int, model: RewardModel, train: datasets.Dataset,
                data: PreparedData) -> pd.DataFrame:
        path = self.output / "scores" / f"seed{seed}.parquet"
        if path.exists():
            return pd.read_parquet(path)
        config = dataclasses.replace(self.config.influence, scores=self.config.methods,
                                     seed=seed)
        result: ScoreResult = compute_scores(
            model, train, data.splits["validation"], config,
            work_dir=path.with_name(path.name + ".work"), progress=self.progress)
        result.save(path)
        return result.table

    def _retrain(self, arm: Arm, train: datasets.Dataset, table: pd.DataFrame,
                 data: PreparedData) -> dict[str, Any]:
        path = self._run_path(arm)
        if path.exists():
            return json.loads(path.read_text())
        chosen = select(table, arm.method, arm.fraction, arm.direction).ids
        changed = remove_pairs(train, chosen) if arm.action == "remove" \
            else relabel_pairs(train, chosen)
        flipped = None
        if "label_flipped" in table:
            picked = table.set_index("id").loc[list(chosen), "label_flipped"]
            flipped = float(picked.astype(bool).mean())
        _, record = self._fit(arm, changed, data, len(chosen), flipped)
        save_json_atomic(path, record)
        self._announce(record)
        return record

    def _fit(self, arm: Arm, train: datasets.Dataset, data: PreparedData, pairs_affected: int,
             flipped_affected: float | None) -> tuple[RewardModel, dict[str, Any]]:
        """Train from the replicate's initialisation on ``train``; measure on test."""
        start = time.perf_counter()
        model = self._new_model(arm.seed)
        trained = train_reward_model(model, train, self._train_config(arm.seed),
                                     progress=self.progress)
        test = evaluate(model, data.splits["test"], progress=False)
        record = {**dataclasses.asdict(arm), "key": arm.key, "group": arm.group,
                  "train_pairs": len(train), "pairs_affected": pairs_affected,
                  "flipped_share_of_affected": flipped_affected,
                  "test_accuracy": test.accuracy, "test_loss": test.loss,
                  "final_train_loss": trained.epoch_losses[-1],
                  "seconds": time.perf_counter() - start}
        return model, record

    def _announce(self, record: dict[str, Any]) -> None:
        if self.on_run is not None:
            self.on_run(record)


def detect(table: pd.DataFrame, methods: tuple[str, ...],
           fraction: float = 0.1) -> dict[str, dict[str, float]]:
    """Detection quality of each score against ``label_flipped`` (SPEC §4 step 7)."""
    truth = table["label_flipped"].astype(bool).to_numpy()
    return {m: detection_report(table[m].to_numpy(), truth, fraction)
            for m in methods if m in table}


# --- statistics --------------------------------------------------------------------------------

def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile: tabulated up to 9 degrees of freedom, a Cornish–Fisher
    expansion beyond (error < 0.001 from 10 on), so no SciPy is needed at run time."""
    if df < 1:
        return math.nan
    exact = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646,
             8: 2.3060, 9: 2.2622}
    if df in exact:
        return exact[df]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_interval(values: list[float]) -> dict[str, float | int | None]:
    """Mean and 95% t interval half-width over seeds (``None`` with one seed)."""
    array = np.asarray(values, dtype=np.float64)
    n = len(array)
    half = None
    if n > 1:
        half = float(t_quantile_975(n - 1) * array.std(ddof=1) / math.sqrt(n))
    return {"mean": float(array.mean()), "ci95": half, "n": n}


def _by_key(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["seed"], r["method"], r["fraction"], r["direction"], r["action"]): r
            for r in runs}


def _arm_shapes(runs: list[dict[str, Any]]) -> Iterator[tuple[str, float, str, str]]:
    seen = []
    for r in runs:
        shape = (r["method"], r["fraction"], r["direction"], r["action"])
        if r["method"] is not None and shape not in seen:
            seen.append(shape)
    yield from seen


def summarise(runs: list[dict[str, Any]],
              detection: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Mean and 95% interval per arm, paired differences against no pruning and against
    random pruning of the same size and kind, and detection metrics averaged over seeds."""
    index = _by_key(runs)
    seeds = sorted({r["seed"] for r in runs})
    baseline = [index[(s, None, 0.0, "harmful", "remove")]["test_accuracy"] for s in seeds]
    arms = []
    for method, fraction, direction, action in _arm_shapes(runs):
        done = [s for s in seeds if (s, method, fraction, direction, action) in index]
        acc = [index[(s, method, fraction, direction, action)]["test_accuracy"] for s in done]
        loss = [index[(s, method, fraction, direction, action)]["test_loss"] for s in done]
        base = [index[(s, None, 0.0, "harmful", "remove")]["test_accuracy"] for s in done]
        entry = {"method": method, "fraction": fraction, "direction": direction,
                 "action": action, "seeds": done,
                 "test_accuracy": mean_interval(acc), "test_loss": mean_interval(loss),
                 "vs_baseline": mean_interval([a - b for a, b in zip(acc, base)])}
        random_key = [(s, "random", fraction, direction, action) for s in done]
        if method != "random" and all(k in index for k in random_key):
            entry["vs_random"] = mean_interval(
                [a - index[k]["test_accuracy"] for a, k in zip(acc, random_key)])
        arms.append(entry)
    return {"baseline": {"test_accuracy": mean_interval(baseline), "seeds": seeds},
            "arms": arms, "detection": _mean_detection(detection)}


def _mean_detection(detection: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for per_seed in detection.values():
        for method, metrics in per_seed.items():
            for metric, value in metrics.items():
                out.setdefault(method, {}).setdefault(metric, []).append(value)
    return {m: {k: mean_interval(v) for k, v in metrics.items()} for m, metrics in out.items()}


# --- the demo ----------------------------------------------------------------------------------

#: Methods the demo compares: influence, gradient similarity and the two controls.
DEMO_METHODS = ("if", "grad_cos", "loss", "random")


def demo_config(seed: int = 0, model: RewardModelConfig | None = None,
                train: TrainConfig | None = None) -> ExperimentConfig:
    """The demo: the 10% arm for IF, gradient cosine, loss and random, one seed, on the
    embedded synthetic set, sized for a few minutes on two CPU cores.

    LoRA adapts the top layer only, so every retrain reads the frozen layers from the cache;
    one epoch at a high rate with small batches (101 steps on the ~800 train pairs) already
    reaches ~0.9 test accuracy against the true preference.
    """
    return ExperimentConfig(
        methods=DEMO_METHODS, fractions=(0.1,), seeds=(seed,), helpful=False, relabel=False,
        model=model or RewardModelConfig(lora_layers=1),
        train=train or TrainConfig(epochs=1, batch_size=8, learning_rate=5e-3))


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

