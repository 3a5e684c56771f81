"""The configured inverse-Hessian-vector products ``(H + λI)⁻¹ b`` of a scoring run: the
damping, which curvature and solver run, how negative curvature is handled, and the record
kept next to the scores (method, damping, iterations, residual history) so a user can see how
far to trust a solve."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from prefprune import distributed
from prefprune.errors import ConvergenceWarning, InfluenceError
from prefprune.influence import solvers
from prefprune.influence.config import InfluenceConfig
from prefprune.influence.curvature import CachedGaussNewton, StreamingCurvature
from prefprune.influence.dual import dual_solve
from prefprune.influence.passes import GradientPasses
from prefprune.influence.results import digest
from prefprune.model import gauss_newton_weights
from prefprune.progress import progress_bar


def solve(operator: Any, rhs: torch.Tensor, damping: float, config: InfluenceConfig, *,
          dim: int, label: str, progress: bool) -> solvers.SolverResult:
    """Run ``config.solver`` on ``(operator + λI) x = rhs``, with a progress bar per solve."""
    if config.solver == "direct":
        result = _direct(operator, rhs, damping, dim)
        if result.negative_curvature and config.negative_curvature == "raise":
            raise InfluenceError(
                f"the damped curvature H + λI (λ = {damping:.3g}) is not positive "
                "definite; raise the damping or use Gauss–Newton curvature")
        return result
    with progress_bar(f"{config.solver} solve ({label})", None, progress) as advance:
        def callback(_: int, __: float) -> None:
            advance(1)

        if config.solver == "cg":
            on_negative = "raise" if config.negative_curvature == "raise" else "stop"
            return solvers.solve_cg(operator, rhs, damping=damping, tol=config.tol,
                                    max_iter=config.max_iter, callback=callback,
                                    on_negative_curvature=on_negative)
        return solvers.solve_lissa(operator, rhs, damping=damping, scale=config.lissa_scale,
                                   depth=config.lissa_depth, tol=config.tol, callback=callback)


def _direct(operator: Any, rhs: torch.Tensor, damping: float,
            dim: int) -> solvers.SolverResult:
    """Exact: in the dual for cached Gauss–Newton, densely otherwise (small models only)."""
    if isinstance(operator, CachedGaussNewton):
        return dual_solve(operator, rhs, damping)
    matrix = solvers.dense_matrix(operator, dim, dtype=torch.float32)
    return solvers.solve_direct(matrix, rhs, damping=damping)


def solver_record(result: solvers.SolverResult) -> dict[str, Any]:
    """What the sidecar keeps of a solve."""
    return {"method": result.method, "iterations": result.iterations,
            "residuals": result.residuals, "final_residual":
            result.residuals[-1] if result.residuals else None,
            "converged": result.converged, "damping": result.damping,
            "negative_curvature": result.negative_curvature, "message": result.message}


class InverseSolves:
    """``s_t = (H+λI)⁻¹ g_val_t`` for every target of one scoring run: damping resolved once,
    the curvature operators built once and shared by every target, the solves saved for
    resume (keyed by every setting that changes them) and recorded in ``meta``."""

    def __init__(self, passes: GradientPasses, stats: dict[str, torch.Tensor],
                 config: InfluenceConfig, meta: dict[str, Any]) -> None:
        self.passes, self.stats, self.config, self.meta = passes, stats, config, meta
        self.sharded = distributed.world_size() > 1
        self._operators: dict[str, Any] = {}
        self.damping = self._resolve_damping()

    @property
    def key(self) -> str:
        """Identity of a solve (and of the projections that use it) within one run."""
        cfg = self.config
        return "solve-" + digest(cfg.curvature, cfg.solver, cfg.damping, cfg.damping_relative,
                                  cfg.tol, cfg.max_iter, cfg.lissa_depth, cfg.lissa_scale,
                                  cfg.negative_curvature, cfg.curvature_samples, cfg.seed)

    def _resolve_damping(self) -> float:
        """λ, relative to the mean non-zero Gauss–Newton eigenvalue ``trace(G)/rank``.

        G has rank at most min(pairs, P): with far fewer pairs than LoRA parameters the plain
        mean eigenvalue trace/P is dominated by zeros, and a λ relative to it leaves CG an
        ill-conditioned system (on HH with MiniLM it had not converged after 500 iterations;
        relative to trace/rank it converges in ~125).
        """
        weights = gauss_newton_weights(self.stats["margins"].double())
        trace = float((weights * self.stats["norms2"]).sum() / self.passes.n)
        scale = trace / min(len(self.curvature_rows()), self.passes.dim)
        try:
            damping = solvers.resolve_damping(self.config.damping,
                                              relative=self.config.damping_relative,
                                              scale=scale)
        except ValueError as exc:
            raise InfluenceError(str(exc)) from exc
        self.meta["curvature_scale"] = scale
        self.meta["damping"] = damping
        return damping

    def curvature_rows(self) -> list[int]:
        """The pairs that define H: all, or a seeded subsample (``curvature_samples``)."""
        n, samples = self.passes.n, self.config.curvature_samples
        if samples is None or samples >= n:
            return list(range(n))
        generator = torch.Generator().manual_seed(self.config.seed)
        return sorted(torch.randperm(n, generator=generator)[:samples].tolist())

    def operator(self, kind: str) -> Any:
        """The curvature operator of ``kind``, built once per run and shared by all targets
        (a view of the cache when every pair defines H, never a copy of it)."""
        if kind not in self._operators:
            self._operators[kind] = self._build_operator(kind)
        return self._operators[kind]

    def _build_operator(self, kind: str) -> Any:
        """Over this process's share of the curvature rows; products are summed over
        processes. Cached: the rows whose gradients this process holds. Streaming: whole
        batches of the single-process order, so each batch rounds exactly as it would there."""
        passes, rows = self.passes, self.curvature_rows()
        if kind == "gauss_newton" and passes.cache:
            rows = [r for r in rows if r in passes.rows]
            margins, grads = passes.local["margins"], passes.local["margin_grads"]
            if len(rows) < len(passes.rows):
                index = torch.tensor(rows, dtype=torch.long) - passes.rows.start
                margins, grads = margins[index], grads[index]
            return CachedGaussNewton(margins, grads, sharded=self.sharded)
        share = distributed.my_share(len(rows), self.config.score_batch_size)
        data = passes.train.select(rows[share.start:share.stop])
        batches = [b for _, b in passes.batches(data)]
        return StreamingCurvature(passes.model, batches, kind, sharded=self.sharded)

    def solve(self, g_val: torch.Tensor, progress: bool) -> torch.Tensor:
        """``s_t`` for every target, (T, P); loaded when a finished run saved it."""
        saved = self.passes.load_shared(self.key)
        store = self.passes.store
        records = store.load_json(self.key) if saved is not None and store else None
        if distributed.all_agree(records is not None):
            self.meta["solves"] = records
            self._warn_unconverged()
            return saved["solutions"]
        records, solutions = {}, []
        for name, rhs in zip(self.passes.targets, g_val):
            result, curvature = self._solve_one(rhs, name, progress)
            solutions.append(result.solution)
            records[name] = {**solver_record(result), "curvature": curvature}
        self.meta["solves"] = records
        self._warn_unconverged()
        out = torch.stack(solutions)
        self.passes.save_shared(self.key, {"solutions": out}, records)
        return out

    def _solve_one(self, rhs: torch.Tensor, name: str,
                   progress: bool) -> tuple[solvers.SolverResult, str]:
        """One target; when CG meets negative curvature on the exact Hessian, it can re-solve
        with Gauss–Newton curvature (``negative_curvature``), and the record says so."""
        kind = self.config.curvature
        result = self._run(kind, rhs, name, progress)
        if result.negative_curvature and self.config.negative_curvature == "gauss_newton" \
                and kind == "hessian":
            retry = self._run("gauss_newton", rhs, name, progress)
            retry.message = (f"exact Hessian met negative curvature ({result.message}); "
                             f"re-solved with Gauss–Newton curvature. {retry.message}").strip()
            return retry, "gauss_newton (fallback)"
        return result, kind

    def _run(self, kind: str, rhs: torch.Tensor, name: str,
             progress: bool) -> solvers.SolverResult:
        return solve(self.operator(kind), rhs, self.damping, self.config, dim=self.passes.dim,
                     label=name, progress=progress)

    def _warn_unconverged(self) -> None:
        """Scores from an unconverged solve are recorded, and the user is told (once)."""
        if not distributed.is_main_process():
            return
        for target, record in self.meta["solves"].items():
            if not record["converged"]:
                warnings.warn(f"the inverse-HVP solve for target {target!r} did not converge: "
                              f"{record['message']}; its if/flip scores are approximate",
                              ConvergenceWarning, stacklevel=3)
