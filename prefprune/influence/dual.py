"""Exact damped Gauss–Newton solves in the n-dimensional dual (Woodbury).

With the per-pair margin gradients ``J`` (n × P) cached and weights ``w = σ(m)σ(−m)``, the
Gauss–Newton curvature is ``G = UᵀU`` with ``U = diag(√(w/n)) J``, and

    ``(UᵀU + λI)⁻¹ = (I − Uᵀ(λI + UUᵀ)⁻¹U) / λ``.

With fewer pairs than LoRA parameters (the usual case) the damped system is solved exactly at
the cost of one n × n Cholesky factorisation: the reference the iterative solvers are measured
against, and the only affordable way to get every pair's self-influence. Under ``torchrun`` only
the Gram matrix ``J Jᵀ`` crosses processes, never the rows themselves.
"""

from __future__ import annotations

import torch

from prefprune import distributed
from prefprune.errors import InfluenceError
from prefprune.influence import solvers
from prefprune.influence.curvature import CachedGaussNewton


def dual_factor(weights: torch.Tensor, jacobian: torch.Tensor, damping: float, *,
                sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a = √(w/n)``, the Gram matrix ``K = J Jᵀ`` and the Cholesky factor of ``λI + UUᵀ``
    (all n × n, over every process's rows when ``sharded``)."""
    if damping <= 0:
        raise InfluenceError("the dual Gauss–Newton solve needs damping > 0")
    if sharded:
        weights = distributed.gather_rows(weights)
        sizes = distributed.gather_rows(torch.tensor([jacobian.shape[0]])).tolist()
        gram = distributed.gram(jacobian, sizes)
    else:
        gram = jacobian.double() @ jacobian.double().T
    a = (weights.double() / weights.shape[0]).sqrt()
    system = a[:, None] * gram * a[None, :]
    system.diagonal().add_(damping)
    return a, gram, torch.linalg.cholesky(system)


def dual_solve(operator: CachedGaussNewton, rhs: torch.Tensor,
               damping: float) -> solvers.SolverResult:
    """``(G + λI)⁻¹ rhs`` exactly, with its measured relative residual."""
    a, _, chol = dual_factor(operator.weights, operator.jacobian, damping,
                             sharded=operator.sharded)
    b = rhs.double()
    inner = torch.cholesky_solve((a * operator.rows_times(b))[:, None], chol)[:, 0]
    x = (b - operator.transpose_times(a * inner)) / damping
    residual = float((operator(x.float()).double() + damping * x - b).norm() / b.norm())
    return solvers.SolverResult(x.to(rhs.dtype), 0, [residual], True, "direct", damping,
                                message="exact Gauss–Newton solve in the n-dimensional dual")


def dual_quadratic(weights: torch.Tensor, jacobian: torch.Tensor, damping: float, *,
                   sharded: bool = False) -> torch.Tensor:
    """``∇m_iᵀ (G+λI)⁻¹ ∇m_i`` for every pair at once (all processes' pairs), via the dual."""
    a, gram, chol = dual_factor(weights, jacobian, damping, sharded=sharded)
    cross = a[:, None] * gram  # (n, n): column i is U ∇m_i
    z = torch.linalg.solve_triangular(chol, cross, upper=False)
    return (gram.diagonal() - (z**2).sum(dim=0)) / damping
