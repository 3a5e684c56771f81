"""Checkpoint ensembles (TracIn-CP style): score the training pairs at several checkpoints of
one training run, from the gradients the run takes anyway.

For each of the last ``members`` epochs, every training step assembles its gradient from
per-pair margin gradients (one forward and one backward, as a plain step) and keeps them:
after the epoch, each pair's gradient was taken once, at the parameters of the step that
visited it. At the epoch's end (the checkpoint) the engine scores every pair from those
gradients (:func:`~prefprune.influence.compute_scores` with ``gradients=``): only the
validation gradients and the solve are new work, so an ensemble of checkpoints costs little
more than scoring one model. The members are the checkpoints; the combination and the
agreement are those of :mod:`prefprune.ensemble`.

The checkpoints a TRL run saved are members the same way (:func:`score_saved_checkpoints`):
each is loaded and scores every pair, from the gradients
:class:`~prefprune.integrations.PrefpruneCallback` recorded while it trained when it did, and
members are weighted by each checkpoint's learning rate, as TracIn-CP sums
``η_k ∇ℓ(w_k, z)·∇ℓ(w_k, z')`` over checkpoints (docs/trl.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from prefprune import distributed
from prefprune.errors import ConfigError, InfluenceError
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.influence.gradients import MarginGradientComputer, PairGradients
from prefprune.influence.results import ScoreResult, model_fingerprint
from prefprune.integrations.records import recorded_gradients
from prefprune.integrations.trl import TrlConfig, load_model
from prefprune.integrations.trl_checkpoints import SavedCheckpoint
from prefprune.model import PairBatch, RewardModel


class CheckpointCapture:
    """Collects per-pair gradients during the last ``members`` of ``epochs`` epochs and scores
    each checkpoint as its epoch ends; pass it to ``train_reward_model(capture=...)``.

    ``tables`` holds one score table per checkpoint, earliest first; with ``work_dir`` each is
    also saved (``checkpoint<k>.parquet``) so a resumed run need not train again.
    """

    def __init__(self, model: RewardModel, train: Any, targets: Any | Mapping[str, Any],
                 config: InfluenceConfig, *, members: int, epochs: int,
                 work_dir: str | Path | None = None, progress: bool = False) -> None:
        if members > epochs:
            raise ConfigError("members", f"a checkpoint ensemble of {members} needs at least "
                                         f"{members} training epochs (one checkpoint each); "
                                         f"training runs {epochs}")
        if distributed.world_size() > 1:
            raise InfluenceError("checkpoint ensembles run in a single process; use seed "
                                 "ensembles under torchrun")
        self.model, self.train, self.targets, self.config = model, train, targets, config
        self.first = epochs - members
        self.work = Path(work_dir) if work_dir is not None else None
        self.progress = progress
        self.computer = MarginGradientComputer(model, config.gradient_mode, train_mode=True)
        size = len(train) * self.computer.dim * 4
        if size > config.memory_budget_mb * 2**20:
            raise InfluenceError(f"a checkpoint keeps every pair's gradient ({size / 2**20:.0f} "
                                 f"MB), more than memory_budget_mb "
                                 f"({config.memory_budget_mb:g}); raise it or use seed ensembles")
        self.margins = torch.zeros(len(train))
        self.jacobian = torch.zeros(len(train), self.computer.dim)
        self.seen = torch.zeros(len(train), dtype=torch.bool)
        self.tables: list[pd.DataFrame] = []
        #: CPU seconds spent scoring checkpoints (the ensemble's cost beyond training).
        self.cpu_seconds = 0.0

    def captures(self, epoch: int) -> bool:
        return epoch >= self.first

    def pair_gradients(self, batch: PairBatch) -> PairGradients:
        return self.computer(batch)

    def record(self, rows: list[int], pairs: PairGradients) -> None:
        index = torch.tensor(rows, dtype=torch.long)
        self.margins[index] = pairs.margins.detach().float().cpu()
        self.jacobian[index] = pairs.margin_grads.detach().float().cpu()
        self.seen[index] = True

    def end_epoch(self, epoch: int) -> None:
        """Score every pair at this checkpoint, from the gradients its epoch took."""
        if not bool(self.seen.all()):
            raise InfluenceError("a checkpoint epoch did not visit every training pair")
        start = time.process_time()
        result = compute_scores(self.model, self.train, self.targets, self.config,
                                progress=self.progress,
                                gradients=PairGradients(self.margins, self.jacobian))
        k = epoch - self.first
        if self.work is not None:
            result.save(self.work / f"checkpoint{k}.parquet")
        self.tables.append(result.table)
        self.seen[:] = False
        self.cpu_seconds += time.process_time() - start


def saved_checkpoints(work_dir: str | Path | None, members: int) -> list[pd.DataFrame] | None:
    """The checkpoint tables a finished capture saved, or None when any is missing."""
    if work_dir is None:
        return None
    paths = [Path(work_dir) / f"checkpoint{k}.parquet" for k in range(members)]
    return [pd.read_parquet(p) for p in paths] if all(p.is_file() for p in paths) else None


@dataclass
class SavedMembers:
    """The score tables of a run's saved checkpoints, earliest first, their TracIn-CP weights
    (learning rates) and the sidecar's record of them."""

    tables: list[pd.DataFrame]
    weights: list[float]
    record: dict[str, Any]


def score_saved_checkpoints(checkpoints: list[SavedCheckpoint], train: Any,
                            targets: Mapping[str, Any], config: InfluenceConfig, *,
                            trl: TrlConfig, work_dir: str | Path | None = None,
                            model: RewardModel | None = None, model_work: Path | None = None,
                            progress: bool = False) -> SavedMembers:
    """Score every pair of ``train`` with each of ``checkpoints`` (read as ``trl`` says).

    A checkpoint that holds the callback's record skips the gradient pass over ``train``
    (only pairs the run had not visited yet are computed); the others take it. A checkpoint
    with the weights of ``model`` (the one being scored: a run's last checkpoint is its final
    model) is scored with fresh gradients into ``model_work``, where scoring ``model`` itself
    then finds its passes done. Each member's table is saved in ``work_dir`` as it finishes,
    so a resumed run scores only the rest.
    """
    if len(checkpoints) < 2:
        raise InfluenceError(f"{checkpoints[0].folder}: a checkpoint ensemble needs two or "
                             "more checkpoints; score a single one with --model")
    work = Path(work_dir) if work_dir is not None else None
    scored = (model, model_fingerprint(model), model_work) if model is not None else None
    members = [_saved_member(saved, train, targets, config, trl, work, scored, progress)
               for saved in checkpoints]
    record = {"members": [{**saved.to_dict(), **info} for saved, (_, info) in
                          zip(checkpoints, members)],
              "weighting": "learning rate (TracIn-CP)"}
    return SavedMembers([table for table, _ in members],
                        [saved.learning_rate for saved in checkpoints], record)


def _saved_member(saved: SavedCheckpoint, train: Any, targets: Mapping[str, Any],
                  config: InfluenceConfig, trl: TrlConfig, work: Path | None,
                  scored: tuple[RewardModel, str, Path | None] | None,
                  progress: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One checkpoint's table and how its gradients were had, from ``work`` when saved."""
    path = work / f"{saved.folder.name}.parquet" if work is not None else None
    if path is not None and path.is_file():
        meta = json.loads(path.with_suffix(".json").read_text())
        return pd.read_parquet(path), meta["checkpoint"]
    start = time.perf_counter()
    model = load_model(saved.folder, trl=trl)
    shared = scored is not None and model_fingerprint(model) == scored[1]
    usable = config.curvature == "gauss_newton" and config.projection_dim is None
    given = recorded_gradients(saved.folder, model, train) if usable and not shared else None
    own_work = None if given or work is None else work / saved.folder.name
    result = compute_scores(scored[0] if shared else model, train, targets, config,
                            progress=progress, gradients=given[0] if given else None,
                            work_dir=scored[2] if shared else own_work)
    info = {"gradients": given[1] if given else {"recorded": 0, "computed": len(train)},
            "same_as_scored_model": shared, "seconds": round(time.perf_counter() - start, 2)}
    if path is not None:
        ScoreResult(result.table, {**result.metadata, "checkpoint": info}).save(path)
    return result.table, info
