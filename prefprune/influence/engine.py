"""The scoring engine: score every training pair against one or more validation targets.

The score formulas are in :mod:`prefprune.influence.formulas`; this module runs the passes
that feed them, shares them between scores, and makes them resumable. Pass 1 over the
training pairs yields, per shard, margins, ``‖∇m‖²`` and ``g_valᵀ∇m``; the margin gradients
themselves are kept only when they fit the memory budget. Then ``s = (H+λI)⁻¹ g_val`` is
solved once per target, and the influence scores need ``sᵀ∇m_i``: a product with the cache, or
a second streaming pass. Each shard and the solve are saved in ``work_dir`` as they finish, so
a rerun after a crash resumes.

Under ``torchrun`` (see :mod:`prefprune.distributed`) each process takes a contiguous block of
shards and of the validation pairs. Validation gradients and curvature products are summed with
``all_reduce``; per-pair gradients stay on the process that computed them (the cache is
sharded, never gathered), and only per-pair statistics (margins, norms, projections: O(pairs))
are gathered in shard order. Every process therefore returns the same table, equal to a
single-process run up to float rounding; only the main process should save it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from prefprune import distributed
from prefprune.data import fingerprint
from prefprune.errors import ConvergenceWarning, InfluenceError
from prefprune.influence import formulas, solvers
from prefprune.influence.config import MAX_DUAL_PAIRS, InfluenceConfig
from prefprune.influence.curvature import CachedGaussNewton, StreamingCurvature
from prefprune.influence.gradients import MarginGradientComputer, PairGradients
from prefprune.influence.inverse import solve, solver_record
from prefprune.influence.projection import ProjectedGradients, RandomProjection
from prefprune.influence.results import SCORES_KIND, ScoreResult, digest, model_fingerprint
from prefprune.influence.store import ShardStore
from prefprune.model import RewardModel, encoded_batches, gauss_newton_weights
from prefprune.progress import progress_bar

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
    """One scoring run: the passes, the solve and the table, with timings."""

    def __init__(self, model: RewardModel, train: Any, targets: dict[str, Any],
                 config: InfluenceConfig, work_dir: str | Path | None, progress: bool,
                 given: PairGradients | None = None) -> None:
        if len(train) == 0:
            raise InfluenceError("the training set is empty")
        self.model, self.train, self.targets, self.config = model, train, targets, config
        self.given = _check_given(given, len(train), config)
        self.sharded = distributed.world_size() > 1
        self.progress = progress and distributed.is_main_process()
        self.n = len(train)
        self.timings: dict[str, float] = {}
        self._operators: dict[str, Any] = {}
        self.meta: dict[str, Any] = {"pairs_through_gradient_passes": 0,
                                     "world_size": distributed.world_size()}
        self.grads = self._gradient_computer()
        self.dim = self.grads.dim
        key = self._run_key()
        # given gradients are not the model's own pass: never mix them into its saved shards
        self.store = ShardStore(Path(work_dir), key) \
            if work_dir is not None and self.given is None else None
        self.my_shards = [(k, self._shards()[k])
                          for k in distributed.my_share(len(self._shards()))]
        self.rows = range(self.my_shards[0][1].start, self.my_shards[-1][1].stop) \
            if self.my_shards else range(0)
        self.cache = self._cache_fits() or self.given is not None  # given: already in memory
        self._check_feasible()
        self.local: dict[str, torch.Tensor] = {}  # this process's margins and gradient cache

    def _gradient_computer(self) -> MarginGradientComputer | ProjectedGradients:
        grads = MarginGradientComputer(self.model, self.config.gradient_mode)
        dim = self.config.projection_dim
        if dim is None:
            return grads
        projection = RandomProjection(grads.dim, dim, self.config.seed,
                                      keep_bytes=self.config.memory_budget_mb * 2**20 / 4)
        self.meta["projection"] = {"kind": "rademacher", "dim": dim, "from": grads.dim,
                                   "seed": self.config.seed}
        return ProjectedGradients(grads, projection)

    def _cache_fits(self) -> bool:
        """Whether every process's share of the per-pair gradients fits the budget.

        Decided from the shard layout alone, so all processes decide the same.
        """
        shards = self._shards()
        largest = max(sum(len(shards[k]) for k in share)
                      for share in distributed.split(len(shards)))
        cache_bytes = largest * self.dim * 4
        fits = cache_bytes <= self.config.memory_budget_mb * 2**20
        self.meta["gradient_cache"] = {"fits": fits, "bytes": cache_bytes,
                                       "budget_mb": self.config.memory_budget_mb}
        if self.config.projection_dim is not None and not fits:
            raise InfluenceError(
                f"projected gradients ({cache_bytes / 2**20:.0f} MB per process) exceed "
                "memory_budget_mb; lower projection_dim or raise the budget")
        return fits

    def _check_feasible(self) -> None:
        """Refuse, before any gradient pass, a request the engine already knows it cannot
        finish (every check here would otherwise fail only after the expensive passes)."""
        cfg = self.config
        if "self_influence" in cfg.scores:
            if not self.cache:
                raise InfluenceError(
                    "self_influence needs the per-pair gradient cache "
                    f"({self.meta['gradient_cache']['bytes'] / 2**20:.0f} MB); raise "
                    "memory_budget_mb or drop self_influence from the scores")
            if self.n > MAX_DUAL_PAIRS:
                raise InfluenceError(f"self_influence is limited to {MAX_DUAL_PAIRS} pairs "
                                     f"(this set has {self.n}); drop it from the scores")
        dense = cfg.solver == "direct" and (cfg.curvature == "hessian" or not self.cache)
        if cfg.needs_solve() and dense and self.dim > MAX_DIRECT_PARAMS:
            raise InfluenceError(
                f"a direct solve without the gradient cache needs a dense {self.dim}² matrix; "
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

    def _solve_key(self) -> str:
        """Identity of a solve (and of the projections that use it) within one run."""
        cfg = self.config
        return "solve-" + digest(cfg.curvature, cfg.solver, cfg.damping, cfg.damping_relative,
                                  cfg.tol, cfg.max_iter, cfg.lissa_depth, cfg.lissa_scale,
                                  cfg.negative_curvature, cfg.curvature_samples, cfg.seed)

    def _batches(self, records: Any) -> Any:
        return encoded_batches(self.model.encoder, records, self.config.score_batch_size)

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        return out

    # --- passes ---------------------------------------------------------------------------

    def run(self) -> ScoreResult:
        g_val = self._timed("validation_gradients", self._validation_gradients)
        stats = self._timed("gradient_pass", lambda: self._gradient_pass(g_val))
        columns: dict[str, np.ndarray] = {}
        if self.config.needs_solve():
            solutions = self._timed("solve", lambda: self._solve(g_val, stats))
            projections = self._timed("scoring_pass",
                                      lambda: self._project(solutions, stats))
            columns.update(self._influence_columns(projections, stats))
        columns.update(self._similarity_columns(g_val, stats))
        if "self_influence" in self.config.scores:
            columns["self_influence"] = self._timed("self_influence",
                                                    lambda: self._self_influence(stats))
        if "loss" in self.config.scores:
            columns["loss"] = formulas.loss_column(stats["margins"])
        if "random" in self.config.scores:
            columns["random"] = formulas.random_column(self.n, self.config.seed)
        return ScoreResult(self._table(columns, stats), self._metadata())

    def _validation_gradients(self) -> torch.Tensor:
        """Mean loss gradient per target, (T, P); saved, so a resumed run skips the pass.

        Each process sums the gradients of its share of the validation pairs; the sums are
        all-reduced.
        """
        saved = self._load_shared("validation")
        if saved is not None:
            self.meta["validation_loss"] = dict(zip(self.targets, saved["losses"].tolist()))
            return saved["gradients"]
        rows, losses = [], {}
        for name, data in self.targets.items():
            total = torch.zeros(self.dim + 1, dtype=torch.float64)  # gradient sum, loss sum
            mine = data.select(distributed.my_share(len(data), self.config.score_batch_size))
            with progress_bar(f"validation gradients ({name})", len(mine),
                              self.progress) as advance:
                for idx, batch in self._batches(mine):
                    pairs = self.grads(batch.to(self.model.device))
                    total[:-1] += pairs.loss_grads().sum(dim=0).cpu().double()
                    total[-1] += float(pairs.losses.sum())
                    advance(len(idx))
            distributed.all_reduce_sum(total)
            rows.append((total[:-1] / len(data)).float())
            losses[name] = float(total[-1]) / len(data)
        self.meta["validation_loss"] = losses
        gradients = torch.stack(rows)
        self._save_shared("validation", {"gradients": gradients,
                                         "losses": torch.tensor(list(losses.values()))})
        return gradients

    def _load_shared(self, name: str) -> dict[str, torch.Tensor] | None:
        """A saved item every process needs, used only when every process can load it."""
        saved = self.store.load(name) if self.store else None
        return saved if distributed.all_agree(saved is not None) else None

    def _save_shared(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.store and distributed.is_main_process():
            self.store.save(name, tensors)

    def _shards(self) -> list[range]:
        size = self.config.shard_size
        return [range(s, min(s + size, self.n)) for s in range(0, self.n, size)]

    def _gradient_pass(self, g_val: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pass 1 over this process's shards: margins, ‖∇m‖², g_valᵀ∇m, gathered over processes
        in shard order, and ∇m itself kept in ``self.local`` when cached."""
        parts: list[dict[str, torch.Tensor]] = []
        cache = torch.empty(len(self.rows), self.dim) if self.cache else None
        with progress_bar("gradient pass", len(self.rows), self.progress) as advance:
            for k, shard in self.my_shards:
                part = self._load_or_compute_shard(k, shard, g_val)
                grads = part.pop("margin_grads", None)
                if cache is not None:  # filled in place: no second copy of the cache
                    cache[shard.start - self.rows.start:shard.stop - self.rows.start] = grads
                parts.append(part)
                advance(len(shard))
        local = {"margins": _cat([p["margins"] for p in parts], (0,)),
                 "norms2": _cat([p["norms2"] for p in parts], (0,), torch.float64),
                 "dots": _cat([p["dots"] for p in parts], (0, len(self.targets)))}
        self.local = {"margins": local["margins"]}
        if cache is not None:
            self.local["margin_grads"] = cache
        return {key: distributed.gather_rows(value) for key, value in local.items()}

    def _load_or_compute_shard(self, k: int, shard: range,
                               g_val: torch.Tensor) -> dict[str, torch.Tensor]:
        part = self.store.load(f"grads-{k:05d}") if self.store else None
        if part is None or (self.cache and "margin_grads" not in part):
            part = self._gradient_shard(shard, g_val)
            if self.store:
                self.store.save(f"grads-{k:05d}", part)
        return part

    def _gradient_shard(self, shard: range, g_val: torch.Tensor) -> dict[str, torch.Tensor]:
        margins, norms, dots, cached = [], [], [], []
        for pairs in self._shard_gradients(shard):
            j = pairs.margin_grads.cpu()
            margins.append(pairs.margins.cpu())
            norms.append((j.double() ** 2).sum(dim=1))
            dots.append(j @ g_val.T)
            if self.cache:
                cached.append(j)
        self._count_work(len(shard))
        part = {"margins": torch.cat(margins), "norms2": torch.cat(norms),
                "dots": torch.cat(dots)}
        if self.cache:
            part["margin_grads"] = torch.cat(cached)
        return part

    def _shard_gradients(self, shard: range) -> Any:
        """The shard's per-pair gradients: given ones sliced, or computed batch by batch."""
        if self.given is not None:
            yield PairGradients(self.given.margins[shard.start:shard.stop],
                                self.given.margin_grads[shard.start:shard.stop])
            return
        for _, batch in self._batches(self.train.select(shard)):
            yield self.grads(batch.to(self.model.device))

    def _count_work(self, pairs: int) -> None:
        self.meta["pairs_through_gradient_passes"] += pairs

    # --- curvature and solve ---------------------------------------------------------------

    def _damping(self, stats: dict[str, torch.Tensor]) -> float:
        """λ, relative to the mean non-zero Gauss–Newton eigenvalue ``trace(G)/rank``.

        G has rank at most min(pairs, P): with far fewer pairs than LoRA parameters the plain
        mean eigenvalue trace/P is dominated by zeros, and a λ relative to it leaves CG an
        ill-conditioned system (on HH with MiniLM it had not converged after 500 iterations;
        relative to trace/rank it converges in ~125). Resolved once per run (λ = 0 included).
        """
        if "damping" in self.meta:
            return self.meta["damping"]
        weights = gauss_newton_weights(stats["margins"].double())
        trace = float((weights * stats["norms2"]).sum() / self.n)
        scale = trace / min(len(self._curvature_rows()), self.dim)
        try:
            damping = solvers.resolve_damping(self.config.damping,
                                              relative=self.config.damping_relative,
                                              scale=scale)
        except ValueError as exc:
            raise InfluenceError(str(exc)) from exc
        self.meta["curvature_scale"] = scale
        self.meta["damping"] = damping
        return damping

    def _curvature_rows(self) -> list[int]:
        samples = self.config.curvature_samples
        if samples is None or samples >= self.n:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.config.seed)
        return sorted(torch.randperm(self.n, generator=generator)[:samples].tolist())

    def _operator(self, kind: str, stats: dict[str, torch.Tensor]):
        """The curvature operator of ``kind``, built once per run and shared by all targets
        (a view of the cache when every pair defines H, never a copy of it)."""
        if kind not in self._operators:
            self._operators[kind] = self._build_operator(kind, stats)
        return self._operators[kind]

    def _build_operator(self, kind: str, stats: dict[str, torch.Tensor]):
        """Over this process's share of the curvature rows; products are summed over
        processes. Cached: the rows whose gradients this process holds. Streaming: whole
        batches of the single-process order, so each batch rounds exactly as it would there."""
        rows = self._curvature_rows()
        if kind == "gauss_newton" and self.cache:
            rows = [r for r in rows if r in self.rows]
            margins, grads = self.local["margins"], self.local["margin_grads"]
            if len(rows) < len(self.rows):
                index = torch.tensor(rows, dtype=torch.long) - self.rows.start
                margins, grads = margins[index], grads[index]
            return CachedGaussNewton(margins, grads, sharded=self.sharded)
        share = distributed.my_share(len(rows), self.config.score_batch_size)
        rows = rows[share.start:share.stop]
        data = self.train.select(rows)
        batches = [b for _, b in self._batches(data)]
        return StreamingCurvature(self.model, batches, kind, sharded=self.sharded)

    def _solve(self, g_val: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``s_t = (H+λI)⁻¹ g_val_t`` for every target, (T, P); saved for resume."""
        damping = self._damping(stats)
        key = self._solve_key()
        saved = self._load_shared(key)
        records = self.store.load_json(key) if saved is not None else None
        if distributed.all_agree(records is not None):
            self.meta["solves"] = records
            self._warn_unconverged()
            return saved["solutions"]
        records, solutions = {}, []
        for name, rhs in zip(self.targets, g_val):
            result, curvature = self._solve_one(rhs, damping, stats, name)
            solutions.append(result.solution)
            records[name] = {**solver_record(result), "curvature": curvature}
        self.meta["solves"] = records
        self._warn_unconverged()
        out = torch.stack(solutions)
        self._save_shared(key, {"solutions": out})
        if self.store and distributed.is_main_process():
            self.store.save_json(key, records)
        return out

    def _warn_unconverged(self) -> None:
        """Scores from an unconverged solve are recorded, and the user is told (once)."""
        if not distributed.is_main_process():
            return
        for target, record in self.meta["solves"].items():
            if not record["converged"]:
                warnings.warn(f"the inverse-HVP solve for target {target!r} did not converge: "
                              f"{record['message']}; its if/flip scores are approximate",
                              ConvergenceWarning, stacklevel=2)

    def _run_solver(self, operator: Any, rhs: torch.Tensor, damping: float,
                    name: str) -> solvers.SolverResult:
        return solve(operator, rhs, damping, self.config, dim=self.dim, label=name,
                     progress=self.progress)

    def _solve_one(self, rhs: torch.Tensor, damping: float, stats: dict[str, torch.Tensor],
                   name: str) -> tuple[solvers.SolverResult, str]:
        kind = self.config.curvature
        result = self._run_solver(self._operator(kind, stats), rhs, damping, name)
        if result.negative_curvature and self.config.negative_curvature == "gauss_newton" \
                and kind == "hessian":
            retry = self._run_solver(self._operator("gauss_newton", stats), rhs, damping, name)
            retry.message = (f"exact Hessian met negative curvature ({result.message}); "
                             f"re-solved with Gauss–Newton curvature. {retry.message}").strip()
            return retry, "gauss_newton (fallback)"
        return result, kind

    # --- scoring ---------------------------------------------------------------------------

    def _project(self, solutions: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``∇m_iᵀ s_t`` for every pair and target, (n, T): from this process's cache or a
        second pass over its shards, gathered over processes in shard order."""
        if self.cache:
            grads = self.local["margin_grads"]
            return distributed.gather_rows(grads @ solutions.T.to(grads.dtype))
        parts = []
        with progress_bar("scoring pass", len(self.rows), self.progress) as advance:
            for k, shard in self.my_shards:
                name = f"proj-{self._solve_key()}-{k:05d}"
                part = self.store.load(name) if self.store else None
                if part is None:
                    part = {"proj": self._project_shard(shard, solutions)}
                    if self.store:
                        self.store.save(name, part)
                parts.append(part["proj"])
                advance(len(shard))
        return distributed.gather_rows(_cat(parts, (0, len(solutions))))

    def _project_shard(self, shard: range, solutions: torch.Tensor) -> torch.Tensor:
        rows = self.train.select(shard)
        out = [self.grads(batch.to(self.model.device)).margin_grads.cpu() @ solutions.T
               for _, batch in self._batches(rows)]
        self._count_work(len(shard))
        return torch.cat(out)

    def _influence_columns(self, projections: torch.Tensor,
                           stats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return formulas.influence_columns(projections, stats["margins"], list(self.targets),
                                          self.config.scores, self._column)

    def _similarity_columns(self, g_val: torch.Tensor,
                            stats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return formulas.similarity_columns(g_val, stats["margins"], stats["norms2"],
                                           stats["dots"], list(self.targets),
                                           self.config.scores, self._column)

    def _self_influence(self, stats: dict[str, torch.Tensor]) -> np.ndarray:
        damping = self._damping(stats)
        return formulas.self_influence(self.local["margins"], self.local["margin_grads"],
                                       stats["margins"], damping, sharded=self.sharded)

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
        work = torch.tensor([self.meta["pairs_through_gradient_passes"]])
        self.meta["pairs_through_gradient_passes"] = int(distributed.all_reduce_sum(work))
        return {
            "method": {"scores": list(self.config.scores), "curvature": self.config.curvature,
                       "solver": self.config.solver},
            "config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "n_train": self.n,
            "n_parameters": self.dim,
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


def _cat(parts: list[torch.Tensor], empty: tuple[int, ...],
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Concatenate rows; a process with no shards (more processes than shards) has none."""
    return torch.cat(parts) if parts else torch.zeros(empty, dtype=dtype)
