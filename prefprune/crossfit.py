"""The out-of-fold margin baseline: each pair's loss under a model that never trained on it.

The label-noise literature's standard filter (confident learning, reward-margin filtering):
split the training pairs into K folds grouped by prompt, train K models each on K−1 folds, and
score every pair by the Bradley–Terry loss ``ℓ = softplus(−m)`` of its margin under the model
that held it out. A wrong label makes the held-out margin negative, so the loss is large; the
training loss of the full model, by contrast, shrinks as the model memorises the bad pair.
Influence scores have to beat this baseline to earn their extra cost (docs/method.md,
section 5).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from prefprune.errors import ConfigError
from prefprune.files import write_json_atomic
from prefprune.model import FrozenLayerCache, RewardModel, RewardModelConfig, bradley_terry_loss
from prefprune.training import TrainConfig, evaluate, train_reward_model


def folds_by_prompt(prompts: list[str], folds: int, seed: int) -> list[list[int]]:
    """Row indices of ``folds`` folds: whole prompt groups, seeded, balanced by size, so that no
    prompt is both in a model's training folds and in the fold it scores."""
    if folds < 2:
        raise ConfigError("oof_folds", f"must be >= 2, got {folds}")
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    if len(groups) < folds:
        raise ConfigError("oof_folds", f"{folds} folds need at least {folds} distinct prompts "
                                       f"among the training pairs, found {len(groups)}")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    out: list[list[int]] = [[] for _ in range(folds)]
    for group in order:
        min(out, key=len).extend(group)
    return [sorted(fold) for fold in out]


def out_of_fold_loss(train: datasets.Dataset, model_config: RewardModelConfig,
                     train_config: TrainConfig, *, folds: int = 5, seed: int = 0,
                     cache: FrozenLayerCache | None = None, work_dir: Path | None = None,
                     progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """``softplus(−m_i)`` of every pair under the fold model that held it out, and a record.

    Each fold's held-out margins are saved in ``work_dir`` as they finish, so an interrupted
    run retrains only the folds it had not finished.
    """
    ids = [str(i) for i in train["id"]]
    margins = np.full(len(train), np.nan)
    record: dict[str, Any] = {"folds": folds, "seed": seed, "fold_sizes": []}
    for k, held in enumerate(folds_by_prompt(list(train["prompt"]), folds, seed)):
        saved = _load_fold(work_dir, k, [ids[i] for i in held])
        if saved is None:
            fit_rows = sorted(set(range(len(train))) - set(held))
            model = RewardModel.create(model_config, seed=seed, cache=cache)
            train_reward_model(model, train.select(fit_rows), train_config.replace(seed=seed),
                               progress=progress)
            saved = evaluate(model, train.select(held), progress=False).margins
            if work_dir is not None:
                write_json_atomic(Path(work_dir) / f"fold{k}.json",
                                  {"ids": [ids[i] for i in held], "margins": saved})
        margins[held] = saved
        record["fold_sizes"].append(len(held))
    loss = bradley_terry_loss(torch.from_numpy(margins)).numpy()
    record["oof_accuracy"] = float((margins > 0).mean())
    return loss, record


def _load_fold(work_dir: Path | None, k: int, ids: list[str]) -> list[float] | None:
    """A finished fold's margins, if saved for exactly these pairs."""
    path = None if work_dir is None else Path(work_dir) / f"fold{k}.json"
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["margins"] if saved.get("ids") == ids else None
