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
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from prefprune import distributed
from prefprune.errors import ConfigError, InfluenceError
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.influence.gradients import MarginGradientComputer, PairGradients
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
