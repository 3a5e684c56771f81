"""``prefprune validate``: which score to trust on this data (docs/method.md, section 6).

Two checks, both measured on the user's own data:

* **Linear datamodeling score (LDS, Park et al. 2023).** Train on ``subsets`` seeded random
  subsets that each keep ``subset_fraction`` of the training pairs. For each of ``lds_targets``
  validation pairs v, a score predicts the change of v's loss when the pairs outside a subset
  are removed: the sum of their predicted effects, ``−Σ_{i removed} harm_i(v)`` (a harm is the
  predicted drop of loss when a pair goes). The LDS of v is the Spearman correlation, across
  subsets, between predicted and actual change ``ℓ_v(θ_subset) − ℓ_v(θ_full)``; a score's LDS is
  the mean over targets, with a bootstrap interval over subsets and targets. ``random`` is
  the floor.
  The same is reported for the validation set as a whole (one target, interval by bootstrap
  over subsets).
* **Flip calibration.** Flip a seeded share of the training labels in a copy of the data,
  train and score it, and report how well each score finds the flipped pairs: AUROC, average
  precision, the share found in the top 10% and 20%.

Each retrain is saved as it finishes (``runs/subset<j>.json``), so an interrupted validation
resumes; ``validate.json`` holds every number and the settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch

from prefprune.detection import detection_report
from prefprune.experiment.config import ValidateConfig
from prefprune.experiment.folder import RunFolder, check_splits, split_fingerprints
from prefprune.files import write_json_atomic
from prefprune.influence import ScoreResult
from prefprune.influence.results import score_table_entries
from prefprune.model import FrozenLayerCache, RewardModel, bradley_terry_loss
from prefprune.model.reward_model import MODEL_FILES
from prefprune.pipeline import PreparedData, data_summary, prepare_data, rendering_of
from prefprune.progress import progress_bar
from prefprune.pruning import inject_flips
from prefprune.scoring import score_training_pairs
from prefprune.training import evaluate, train_reward_model

VALIDATE_FILE = "validate.json"
COSTS_FILE = "costs.json"
#: What a validation writes into its folder besides its settings (``overwrite`` removes
#: exactly these).
OWN_ENTRIES = (VALIDATE_FILE, COSTS_FILE, "runs/subset*.json",
               *(f"models/full/{name}" for name in MODEL_FILES),
               *score_table_entries("scores/full"), *score_table_entries("flips/scores"))
#: Name of the whole-validation-set target beside the per-pair targets ``v0``, ``v1``, ...
SET_TARGET = "set"
BOOTSTRAP = 1000


def lds_subsets(n: int, subsets: int, fraction: float, seed: int) -> list[np.ndarray]:
    """The kept rows of each subset: ``round(fraction·n)`` rows, seeded, sorted."""
    rng = np.random.default_rng(seed)
    keep = max(1, min(n - 1, round(fraction * n)))
    return [np.sort(rng.choice(n, size=keep, replace=False)) for _ in range(subsets)]


def predicted_changes(harm: np.ndarray, kept: list[np.ndarray]) -> np.ndarray:
    """``−Σ_{i removed} harm_i`` per subset and target: (subsets, targets) from harm
    (pairs, targets)."""
    total = harm.sum(axis=0)
    return np.stack([-(total - harm[rows].sum(axis=0)) for rows in kept])


def column_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's correlation of each column of ``x`` with the same column of ``y`` (rows are
    observations; ties share their average rank, as a bootstrap draw repeats rows)."""
    return _rank_correlation(_average_ranks(x), _average_ranks(y))


def _rank_correlation(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of two rank matrices (nan where one is constant)."""
    rx, ry = rx - rx.mean(axis=0), ry - ry.mean(axis=0)
    scale = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, (rx * ry).sum(axis=0) / np.where(scale > 0, scale, 1.0),
                        np.nan)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along axis 0, ties averaged; vectorised over columns."""
    rows, cols = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    ordered = np.take_along_axis(x, order, axis=0)
    starts = np.vstack([np.ones((1, cols), bool), ordered[1:] != ordered[:-1]])
    group = (np.cumsum(starts, axis=0) - 1) + np.arange(cols) * rows
    position = np.broadcast_to(np.arange(rows, dtype=np.float64)[:, None], x.shape)
    sums = np.bincount(group.ravel(), weights=position.ravel(), minlength=rows * cols)
    counts = np.bincount(group.ravel(), minlength=rows * cols)
    ranks = np.empty_like(position)
    np.put_along_axis(ranks, order, (sums[group] / counts[group]), axis=0)
    return ranks


def linear_datamodeling_scores(predicted: dict[str, np.ndarray], actual: np.ndarray, *,
                               baseline: str | None = "random", seed: int = 0,
                               resamples: int = BOOTSTRAP) -> dict[str, dict[str, Any]]:
    """Each score's LDS: per target (column), the Spearman correlation across subsets (rows)
    of its predicted change (``predicted[score]``) with the actual change; the mean over
    targets with a 95% percentile bootstrap interval, and the paired difference to
    ``baseline`` (``vs_baseline``) when that score is among them.

    The bootstrap resamples subsets *and* targets, the same draw for every score: every
    target is measured on the same subsets, so their correlations share the subsets' luck;
    resampling targets alone would treat them as independent and give a target-free score
    (``random``, ``loss``) an interval far narrower than its real uncertainty
    (docs/method.md, section 6). The shared draws make the differences paired."""
    per_target = {m: column_spearman(p, actual) for m, p in predicted.items()}
    out: dict[str, dict[str, Any]] = {
        m: {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
            "targets": int(np.isfinite(v).sum()), "per_target": v.tolist()}
        for m, v in per_target.items()}
    subsets, targets = actual.shape
    if targets < 2:
        return out
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in predicted}
    for _ in range(resamples):
        rows = rng.integers(0, subsets, size=subsets)
        cols = rng.integers(0, targets, size=targets)
        ranked_actual = _average_ranks(actual[rows][:, cols])  # once per draw, for every score
        for m, p in predicted.items():
            draw = _rank_correlation(_average_ranks(p[rows][:, cols]), ranked_actual)
            # a draw of repeated subsets can leave a score no variation: nan, left out
            draws[m].append(float(np.nanmean(draw)) if np.isfinite(draw).any() else np.nan)
    for m, values in draws.items():
        out[m]["ci95"] = _percentile_interval(np.asarray(values))
        if baseline in draws and m != baseline:
            out[m][f"vs_{baseline}"] = {
                "mean": out[m]["mean"] - out[baseline]["mean"],
                "ci95": _percentile_interval(np.asarray(values) - np.asarray(draws[baseline]))}
    return out


def _percentile_interval(draws: np.ndarray) -> list[float] | None:
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return None
    return [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]


def set_level_score(predicted: np.ndarray, actual: np.ndarray, *, seed: int = 0,
                    resamples: int = BOOTSTRAP) -> dict[str, Any]:
    """One target, many subsets: the Spearman correlation, with a bootstrap over subsets."""
    value = float(column_spearman(predicted[:, None], actual[:, None])[0])
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(predicted), size=(resamples, len(predicted)))
    interval = _percentile_interval(column_spearman(predicted[rows].T, actual[rows].T))
    return {"spearman": value, **({"ci95": interval} if interval else {})}


@dataclass
class ValidationResult:
    """Every number ``validate.json`` holds."""

    config: ValidateConfig
    lds: dict[str, dict[str, Any]]
    set_level: dict[str, dict[str, Any]]
    flips: dict[str, dict[str, float]]
    data: dict[str, Any]
    costs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "data": self.data, "lds": self.lds,
                "set_level": self.set_level, "flip_calibration": self.flips,
                "costs": self.costs}


class Validation:
    """Runs (or resumes) ``prefprune validate`` in ``output``; see the module docstring."""

    def __init__(self, config: ValidateConfig, output: str | Path, *, progress: bool = True,
                 overwrite: bool = False) -> None:
        self.config = config
        self.output = Path(output)
        self.progress = progress
        self.folder = RunFolder(output, "validation", config, OWN_ENTRIES, overwrite=overwrite)
        self.cache = FrozenLayerCache.for_config(config.model)
        self.costs: dict[str, float] = {}

    def run(self) -> ValidationResult:
        self.folder.check()
        data = prepare_data(self.config.data, **self.config.data_kwargs(),
                            rendering=rendering_of(self.config.model))
        check_splits(data)
        self.folder.claim(split_fingerprints(data))
        costs_path = self.output / COSTS_FILE
        self.costs = json.loads(costs_path.read_text()) if costs_path.exists() else {}
        train = data.splits["train"]
        targets = self._targets(data.splits["validation"])
        model = self._timed("train_full", lambda: self._full_model(train))
        table = self._timed("score", lambda: self._scores(model, train, targets))
        full = _target_losses(model, targets)
        kept = lds_subsets(len(train), self.config.subsets, self.config.subset_fraction,
                           self.config.seed)
        actual = np.stack([self._subset_losses(j, rows, train, targets) - full
                           for j, rows in enumerate(self._progress_over(kept))])
        methods = self.config.score_columns()
        lds = linear_datamodeling_scores(
            {m: predicted_changes(_harm(table, m, list(targets)[1:]), kept) for m in methods},
            actual[:, 1:], seed=self.config.seed)
        set_level = {m: set_level_score(
            predicted_changes(_harm(table, m, [SET_TARGET]), kept)[:, 0], actual[:, 0],
            seed=self.config.seed) for m in methods}
        flips = self._flip_calibration(data) if self.config.flip_share > 0 else {}
        summary = {**data_summary(data), "lds_targets": len(targets) - 1,
                   "subset_pairs": len(kept[0])}
        if self.cache is not None:
            self.cache.flush()
            summary["frozen_layers"] = self.cache.summary()
        result = ValidationResult(self.config, lds, set_level, flips, summary, self.costs)
        write_json_atomic(self.output / VALIDATE_FILE, result.to_dict())
        return result

    # --- pieces ---------------------------------------------------------------------------

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` and add its wall seconds to ``costs.json`` (kept across resumes, so the
        costs are those of the whole validation, not of the last invocation)."""
        start = time.perf_counter()
        out = fn()
        key = f"{name}_seconds"
        self.costs[key] = self.costs.get(key, 0.0) + time.perf_counter() - start
        write_json_atomic(self.output / COSTS_FILE, self.costs)
        return out

    def _targets(self, validation: datasets.Dataset) -> dict[str, datasets.Dataset]:
        """The whole validation set, then up to ``lds_targets`` of its pairs (seeded)."""
        count = min(self.config.lds_targets, len(validation))
        rows = np.sort(np.random.default_rng(self.config.seed).choice(
            len(validation), size=count, replace=False))
        return {SET_TARGET: validation,
                **{f"v{k}": validation.select([int(r)]) for k, r in enumerate(rows)}}

    def _new_model(self) -> RewardModel:
        return RewardModel.create(self.config.model, seed=self.config.seed, cache=self.cache)

    def _train(self, pairs: datasets.Dataset) -> RewardModel:
        model = self._new_model()
        train_reward_model(model, pairs, self.config.train.replace(seed=self.config.seed),
                           progress=self.progress)
        return model

    def _full_model(self, train: datasets.Dataset) -> RewardModel:
        path = self.output / "models" / "full"
        if path.exists():
            return RewardModel.load(path, runtime=self.config.model,
                                    cache=self.cache,
                                    trust_remote_code=self.config.model.trust_remote_code)
        model = self._train(train)
        model.save(path, overwrite=True, seed=self.config.seed)
        return model

    def _scores(self, model: RewardModel, train: datasets.Dataset,
                targets: dict[str, datasets.Dataset]) -> pd.DataFrame:
        return self._score_table(self.output / "scores" / "full.parquet", model, train,
                                 targets).table

    def _score_table(self, path: Path, model: RewardModel, train: datasets.Dataset,
                     targets: Any) -> ScoreResult:
        if path.exists():
            return ScoreResult(pd.read_parquet(path), {})
        result = score_training_pairs(
            model, train, targets, self.config.influence.replace(seed=self.config.seed),
            ensemble=self.config.ensemble, model_config=self.config.model,
            train_config=self.config.train.replace(seed=self.config.seed), cache=self.cache,
            work_dir=path.with_name(path.name + ".work"), progress=self.progress)
        result.save(path)
        return result

    def _progress_over(self, kept: list[np.ndarray]) -> Any:
        with progress_bar("LDS subsets", len(kept), self.progress) as advance:
            for rows in kept:
                yield rows
                advance(1)

    def _subset_losses(self, j: int, rows: np.ndarray, train: datasets.Dataset,
                       targets: dict[str, datasets.Dataset]) -> np.ndarray:
        """Each target's loss under a model trained on subset ``j`` (saved as it finishes)."""
        path = self.output / "runs" / f"subset{j}.json"
        ids = [train["id"][int(r)] for r in rows]
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["kept"] == ids:
                return np.asarray(saved["losses"])
        losses = self._timed("subset_training", lambda: _target_losses(
            self._train(train.select(rows.tolist())), targets))
        write_json_atomic(path, {"kept": ids, "losses": losses.tolist()})
        return losses

    def _flip_calibration(self, data: PreparedData) -> dict[str, dict[str, float]]:
        """Detection quality of every score on a copy of the data with injected flips."""
        train = inject_flips(data.splits["train"], self.config.flip_share, self.config.seed)
        path = self.output / "flips" / "scores.parquet"
        if not path.exists():
            self._timed("flip_calibration", lambda: self._score_table(
                path, self._train(train), train, data.splits["validation"]))
        table = pd.read_parquet(path)
        truth = table["injected_flip"].astype(bool).to_numpy()
        out = {}
        for method in self.config.score_columns():
            report = detection_report(table[method].to_numpy(), truth, 0.1)
            top20 = detection_report(table[method].to_numpy(), truth, 0.2)
            out[method] = {"auroc": report["auroc"],
                           "average_precision": report["average_precision"],
                           "found_in_top_10%": report["found_in_top_10%"],
                           "found_in_top_20%": top20["found_in_top_20%"]}
        return out


def _target_losses(model: RewardModel, targets: dict[str, datasets.Dataset]) -> np.ndarray:
    """The mean loss of each target under ``model`` (the whole set first, then each pair)."""
    validation = targets[SET_TARGET]
    margins = torch.tensor(evaluate(model, validation, progress=False).margins)
    losses = bradley_terry_loss(margins).numpy()
    index = {pid: k for k, pid in enumerate(validation["id"])}
    per_pair = [losses[index[target["id"][0]]] for name, target in targets.items()
                if name != SET_TARGET]
    return np.array([float(losses.mean()), *per_pair])


def _harm(table: pd.DataFrame, method: str, targets: list[str]) -> np.ndarray:
    """The method's harm per pair and target (pairs, targets); a target-free score repeats."""
    score, suffix = (method[:-4], "_ens") if method.endswith("_ens") else (method, "")
    columns = [f"{score}{suffix}@{t}" for t in targets]
    if all(c in table.columns for c in columns):
        return table[columns].to_numpy(dtype=np.float64)
    return np.repeat(table[method].to_numpy(dtype=np.float64)[:, None], len(targets), axis=1)


def format_lds(entry: dict[str, Any], *, signed: bool = False) -> str:
    """``0.41 [0.35, 0.47]`` (``+0.12 [+0.03, +0.21]`` when ``signed``) for the terminal and
    the report."""
    spec = "+.2f" if signed else ".2f"
    if not entry.get("ci95"):
        return f"{entry['mean']:{spec}}"
    low, high = entry["ci95"]
    return f"{entry['mean']:{spec}} [{low:{spec}}, {high:{spec}}]"
