"""The scoring engine: score every training pair against one or more validation targets.

It runs a scoring run in data-flow order and shares every pass between the scores asked for:
the gradient passes over validation and training pairs (:mod:`prefprune.influence.passes`),
then ``s = (H+λI)⁻¹ g_val`` once per target (:mod:`prefprune.influence.inverse`), then the
scores from those statistics (:mod:`prefprune.influence.formulas`). Every shard and solve is
saved in ``work_dir`` as it finishes, so a rerun after a crash resumes.

Under ``torchrun`` (see :mod:`prefprune.distributed`) every process returns the same table,
equal to a single-process run up to float rounding; only the main process should save it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from prefprune import distributed
from prefprune.data import fingerprint
from prefprune.errors import InfluenceError
from prefprune.influence import formulas
from prefprune.influence.config import MAX_DUAL_PAIRS, InfluenceConfig
from prefprune.influence.gradients import PairGradients
from prefprune.influence.inverse import InverseSolves
from prefprune.influence.passes import GradientPasses
from prefprune.influence.results import SCORES_KIND, ScoreResult, digest, model_fingerprint
from prefprune.influence.store import ShardStore
from prefprune.model import RewardModel

#: The exact Hessian is formed densely for a direct solve only up to this many parameters.
MAX_DIRECT_PARAMS = 6000


def compute_scores(model: RewardModel, train: Any, validation: Any | Mapping[str, Any],
                   config: InfluenceConfig | None = None, *, work_dir: str | Path | None = None,
                   progress: bool = True,
                   gradients: PairGradients | None = None) -> ScoreResult:
    """Score every pair of ``train`` (a canonical ``datasets.Dataset``) against ``validation``.

    ``validation`` is one dataset, or a mapping name → dataset for several targets at once
    (e.g. one per subreddit): target-dependent scores then get one column per target,
    ``"{score}@{target}"``. ``gradients`` are the training pairs' margins and margin gradients
    when they were already taken (a training checkpoint's, see :mod:`prefprune.checkpoints`):
    the gradient pass then reads them instead of running the model over ``train``.

    Under ``torchrun`` every process must call this with the same arguments; it joins the
    process group itself, splits the work, and every process gets the same result.
    """
    distributed.setup()
    engine = _Engine(model, train, _targets(validation), config or InfluenceConfig(),
                     work_dir, progress, gradients)
    return engine.run()


def _targets(validation: Any | Mapping[str, Any]) -> dict[str, Any]:
    targets = dict(validation) if isinstance(validation, Mapping) else {"validation": validation}
    for name, data in targets.items():
        if len(data) == 0:
            raise InfluenceError(f"validation target {name!r} is empty")
    return targets


class _Engine:
    """One scoring run: the passes, the solves and the table, with timings."""

    def __init__(self, model: RewardModel, train: Any, targets: dict[str, Any],
                 config: InfluenceConfig, work_dir: str | Path | None, progress: bool,
                 given: PairGradients | None = None) -> None:
        if len(train) == 0:
            raise InfluenceError("the training set is empty")
        self.model, self.train, self.targets, self.config = model, train, targets, config
        self.n = len(train)
        self.progress = progress and distributed.is_main_process()
        self.timings: dict[str, float] = {}
        self.meta: dict[str, Any] = {"world_size": distributed.world_size()}
        given = _check_given(given, self.n, config)
        self.passes = GradientPasses(model, train, targets, config, self.meta,
                                     progress=self.progress, given=given)
        # given gradients are not the model's own pass: never mix them into its saved shards
        if work_dir is not None and given is None:
            self.passes.store = ShardStore(Path(work_dir), self._run_key())
        else:
            self._run_key()
        self._check_feasible()

    def _check_feasible(self) -> None:
        """Refuse, before any gradient pass, a request the engine already knows it cannot
        finish (every check here would otherwise fail only after the expensive passes)."""
        cfg, cache, dim = self.config, self.passes.cache, self.passes.dim
        if "self_influence" in cfg.scores:
            if not cache:
                raise InfluenceError(
                    "self_influence needs the per-pair gradient cache "
                    f"({self.meta['gradient_cache']['bytes'] / 2**20:.0f} MB); raise "
                    "memory_budget_mb or drop self_influence from the scores")
            if self.n > MAX_DUAL_PAIRS:
                raise InfluenceError(f"self_influence is limited to {MAX_DUAL_PAIRS} pairs "
                                     f"(this set has {self.n}); drop it from the scores")
        dense = cfg.solver == "direct" and (cfg.curvature == "hessian" or not cache)
        if cfg.needs_solve() and dense and dim > MAX_DIRECT_PARAMS:
            raise InfluenceError(
                f"a direct solve without the gradient cache needs a dense {dim}² matrix; "
                f"it is allowed up to {MAX_DIRECT_PARAMS} parameters. Use solver='cg', or the "
                "Gauss–Newton curvature with the gradient cache (solved exactly in the dual)")

    def _run_key(self) -> str:
        """Identity of the pass-1 shards: the model, the data and the shard layout."""
        self.meta["model_fingerprint"] = model_fingerprint(self.model)
        self.meta["data_fingerprint"] = fingerprint(self.train)
        self.meta["validation_fingerprints"] = {n: fingerprint(d) for n, d in self.targets.items()}
        projection = () if self.config.projection_dim is None else \
            ("projection", self.config.projection_dim, self.config.seed)
        return digest({k: self.meta[k] for k in
                        ("model_fingerprint", "data_fingerprint", "validation_fingerprints")},
                       self.config.shard_size, *projection)

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        return out

    def run(self) -> ScoreResult:
        cfg, passes = self.config, self.passes
        g_val = self._timed("validation_gradients", passes.validation_gradients)
        stats = self._timed("gradient_pass", lambda: passes.gradient_pass(g_val))
        names = list(self.targets)
        columns: dict[str, np.ndarray] = {}
        inverse = InverseSolves(passes, stats, cfg, self.meta) \
            if cfg.needs_solve() or "self_influence" in cfg.scores else None
        if cfg.needs_solve():
            solutions = self._timed("solve", lambda: inverse.solve(g_val, self.progress))
            projections = self._timed("scoring_pass",
                                      lambda: passes.project(solutions, inverse.key))
            columns.update(formulas.influence_columns(projections, stats["margins"], names,
                                                      cfg.scores, self._column))
        columns.update(formulas.similarity_columns(g_val, stats["margins"], stats["norms2"],
                                                   stats["dots"], names, cfg.scores,
                                                   self._column))
        if "self_influence" in cfg.scores:
            columns["self_influence"] = self._timed("self_influence", lambda: (
                formulas.self_influence(passes.local["margins"], passes.local["margin_grads"],
                                        stats["margins"], inverse.damping,
                                        sharded=inverse.sharded)))
        if "loss" in cfg.scores:
            columns["loss"] = formulas.loss_column(stats["margins"])
        if "random" in cfg.scores:
            columns["random"] = formulas.random_column(self.n, cfg.seed)
        return ScoreResult(self._table(columns, stats), self._metadata())

    def _column(self, score: str, target: str) -> str:
        return score if len(self.targets) == 1 else f"{score}@{target}"

    # --- output ----------------------------------------------------------------------------

    def _table(self, columns: dict[str, np.ndarray],
               stats: dict[str, torch.Tensor]) -> pd.DataFrame:
        """One frame built at once (hundreds of per-target columns stay one block)."""
        data: dict[str, Any] = {"id": list(self.train["id"]), **columns}
        data.update({f"rank_{name}": formulas.ranks(values) for name, values in columns.items()})
        data["margin"] = stats["margins"].double().numpy()
        text = {"id", "prompt", "chosen", "rejected"}
        for name in self.train.column_names:
            if name not in text and name not in data:
                data[name] = list(self.train[name])
        return pd.DataFrame(data)

    def _metadata(self) -> dict[str, Any]:
        self.meta["pairs_through_gradient_passes"] = self.passes.total_work()
        return {
            "method": {"scores": list(self.config.scores), "curvature": self.config.curvature,
                       "solver": self.config.solver},
            "config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "n_train": self.n,
            "n_parameters": self.passes.dim,
            "targets": {n: len(d) for n, d in self.targets.items()},
            "timings_seconds": self.timings,
            "kind": SCORES_KIND,
            "sign_convention": "every score is a harm: larger = more harmful; rank 1 = most",
            **self.meta,
        }


def _check_given(given: PairGradients | None, n: int,
                 config: InfluenceConfig) -> PairGradients | None:
    """Gradients taken elsewhere (one process, Gauss–Newton, unprojected) for every pair."""
    if given is None:
        return None
    if given.margin_grads.shape[0] != n or given.margins.shape[0] != n:
        raise InfluenceError(f"given gradients cover {given.margin_grads.shape[0]} pairs, the "
                             f"training set has {n}")
    if distributed.world_size() > 1:
        raise InfluenceError("scores from given gradients run in a single process")
    if config.curvature != "gauss_newton" or config.projection_dim is not None:
        raise InfluenceError("scores from given gradients need Gauss–Newton curvature and no "
                             "projection: the exact Hessian has no per-pair form")
    return PairGradients(given.margins.detach().float().cpu(),
                         given.margin_grads.detach().float().cpu())

