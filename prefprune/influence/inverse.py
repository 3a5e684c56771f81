"""The configured inverse-Hessian-vector product ``(H + λI)⁻¹ b``: which solver runs, how
negative curvature is handled, and the record kept next to the scores (method, damping,
iterations, residual history) so a user can see how far to trust a solve."""

from __future__ import annotations

from typing import Any

import torch

from prefprune.errors import InfluenceError
from prefprune.influence import solvers
from prefprune.influence.config import InfluenceConfig
from prefprune.influence.curvature import CachedGaussNewton
from prefprune.influence.dual import dual_solve
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
