"""Linear solvers for inverse-Hessian-vector products ``s = (H + λI)⁻¹ g``.

The influence scores need one such solve per validation target, with ``H`` the
(possibly indefinite) Hessian of the Bradley–Terry loss, available only through
Hessian–vector products. Three solvers share one result type so that a run can
record method, damping, residuals and iteration count next to its scores:

- :func:`solve_cg` — conjugate gradient, the paper's method and the default;
- :func:`solve_lissa` — the Agarwal et al. stochastic-series recursion;
- :func:`solve_direct` — a dense float64 solve, the reference the others are
  tested against when the parameter count is small enough to form ``H``.

Every ``matvec`` passed in is the *undamped* curvature product ``v ↦ H v``;
the solvers add ``λ v`` themselves so that the damping actually used is the
one recorded in :class:`SolverResult`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InfluenceError, NegativeCurvatureError
from .config import InfluenceConfig

#: The solvers' stopping rules default to the settings' own (one declaration, in the config).
_DEFAULTS = InfluenceConfig()

MatVec = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, float], None]
NegativeCurvaturePolicy = Literal["raise", "stop", "gauss_newton"]


_POWER_ITERATIONS = 20
_POWER_SAFETY = 1.1
_LISSA_GROWTH_LIMIT = 2.0


@dataclass
class SolverResult:
    """Outcome of one solve, recorded next to the scores it produced.

    ``iterations`` counts curvature products (including LiSSA's power iteration
    and a CG step that stopped on negative curvature); ``residuals`` holds one
    relative residual ``‖b − (H+λI)x‖ / ‖b‖`` per solver step, so it may be
    shorter than ``iterations``.
    """

    solution: torch.Tensor
    iterations: int
    residuals: list[float]
    converged: bool
    method: str
    damping: float
    negative_curvature: bool = False
    message: str = ""


def resolve_damping(damping: float, *, relative: bool, scale: float) -> float:
    """Return the absolute damping λ: ``damping`` itself, or ``damping · scale``.

    Relative damping makes one setting portable across models whose losses and
    parameter counts put the curvature on very different scales. ``scale`` is a
    curvature scale, e.g. :func:`curvature_scale` (the mean eigenvalue ``trace(H)/dim``).

    The engine's default (``InfluenceConfig.damping``) is relative, with the scale taken as
    the mean non-zero Gauss–Newton eigenvalue; see :mod:`prefprune.influence.config`.
    """
    _check_damping(damping)
    if not relative:
        return float(damping)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"relative damping needs a positive finite curvature scale, got {scale!r}; "
            "the Hessian's mean eigenvalue is not positive here, so use absolute damping "
            "or Gauss–Newton curvature"
        )
    return float(damping) * float(scale)


def curvature_scale(
    matvec: MatVec,
    dim: int,
    *,
    probes: int = 8,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> float:
    """Hutchinson estimate of ``trace(H)/dim``, the mean eigenvalue of ``H``.

    Uses ``probes`` Rademacher vectors (``probes`` curvature products), drawn
    from ``generator`` or, when None, from a fresh one seeded with 0 so that
    repeated runs give the same damping. Probes are built in ``dtype`` on
    ``device`` because the curvature product usually runs in the model's
    precision; the average is taken in float64.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(probes):
        z = torch.randint(0, 2, (dim,), generator=gen).to(dtype=dtype, device=device) * 2 - 1
        total += _dot64(z, matvec(z))
    return total / (probes * dim)


def dense_matrix(
    matvec: MatVec,
    dim: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build ``H`` column by column from ``dim`` products, symmetrised.

    Symmetrising removes the round-off asymmetry of autograd products so the
    reference solve works on the symmetric matrix the iterative solvers assume.
    Basis vectors are built in ``dtype`` on ``device``; only for small ``dim``.
    """
    eye = torch.eye(dim, dtype=dtype, device=device)
    columns = [matvec(eye[j]).to(dtype=dtype) for j in range(dim)]
    matrix = torch.stack(columns, dim=1)
    return (matrix + matrix.T) / 2


def solve_direct(matrix: torch.Tensor, rhs: torch.Tensor, *, damping: float) -> SolverResult:
    """Solve ``(H + λI) x = b`` densely in float64: the reference for CG and LiSSA.

    ``matrix`` is symmetrised first. A Cholesky check flags ``H + λI`` that is
    not positive definite (the solve still runs, but influence scores from an
    indefinite system are not the minimiser the theory assumes).
    """
    _check_rhs(rhs)
    _check_damping(damping)
    dim = rhs.numel()
    if matrix.shape != (dim, dim):
        raise ValueError(f"matrix shape {tuple(matrix.shape)} does not match rhs of size {dim}")
    b = rhs.to(torch.float64)
    a = matrix.to(device=rhs.device, dtype=torch.float64)
    a = (a + a.T) / 2 + damping * torch.eye(dim, dtype=torch.float64, device=rhs.device)
    try:
        x = torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError as err:
        raise InfluenceError(f"H + λI is singular at damping {damping:g}; increase --damping"
                             ) from err
    residual = _relative(b - a @ x, b)
    not_pd = bool(torch.linalg.cholesky_ex(a).info.item() != 0)
    message = "dense float64 solve"
    if not_pd:
        message += "; H + λI is not positive definite: increase damping or use Gauss–Newton"
    return SolverResult(
        solution=x.to(rhs.dtype),
        iterations=0,
        residuals=[residual],
        converged=math.isfinite(residual),
        method="direct",
        damping=float(damping),
        negative_curvature=not_pd,
        message=message,
    )


def solve_cg(
    matvec: MatVec,
    rhs: torch.Tensor,
    *,
    damping: float,
    tol: float = _DEFAULTS.tol,
    max_iter: int = _DEFAULTS.max_iter,
    on_negative_curvature: NegativeCurvaturePolicy = "stop",
    callback: Callback | None = None,
) -> SolverResult:
    """Conjugate gradient on ``(H + λI) x = b`` from ``x0 = 0``.

    Vectors stay in ``rhs``'s dtype (memory is O(parameters)); dot products and
    step sizes are computed in float64 so float32 models do not lose the
    recurrence early. ``residuals`` are the recursively updated residuals (free;
    in float32 they can fall below the true residual once it stagnates near
    ``κ·eps``). ``callback(iteration, relative_residual)`` runs after each step.

    Negative curvature (``pᵀ(H+λI)p <= 0``, possible with the exact Hessian of
    a non-convex loss) means CG's quadratic is unbounded below:

    - ``"raise"``: raise :class:`NegativeCurvatureError`;
    - ``"stop"``: return the last iterate, ``negative_curvature=True``,
      ``converged=False`` and a message with the damping needed;
    - ``"gauss_newton"``: the same return, with a message that the caller
      should retry with Gauss–Newton curvature. The fallback itself is the
      caller's job: only the engine owns the GGN operator.
    """
    _check_rhs(rhs)
    _check_damping(damping)
    if on_negative_curvature not in ("raise", "stop", "gauss_newton"):
        raise ValueError(f"unknown on_negative_curvature {on_negative_curvature!r}")
    b_norm = _norm64(rhs)
    if b_norm == 0:
        return _zero_result(rhs, "cg", damping)
    apply = _damped(matvec, damping)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = b_norm**2
    residuals: list[float] = []
    for k in range(1, max_iter + 1):
        ap = apply(p)
        p_ap = _dot64(p, ap)
        if not math.isfinite(p_ap):
            raise FloatingPointError(f"CG iteration {k}: curvature product is not finite")
        if p_ap <= 0:
            return _negative_curvature(
                x, residuals, k, p_ap / _dot64(p, p), damping, on_negative_curvature
            )
        alpha = rr / p_ap
        x.add_(p, alpha=alpha)
        r.add_(ap, alpha=-alpha)
        rr_new = _dot64(r, r)
        rel = math.sqrt(rr_new) / b_norm
        residuals.append(rel)
        if callback is not None:
            callback(k, rel)
        if rel <= tol:
            return _result("cg", x, residuals, len(residuals), damping, True,
                           f"converged in {k} iterations")
        p = r + (rr_new / rr) * p
        rr = rr_new
    return _result(
        "cg",
        x,
        residuals,
        len(residuals),
        damping,
        False,
        f"not converged after max_iter={max_iter} (relative residual {residuals[-1]:.3g} > "
        f"tol {tol:g}); raise max_iter or damping",
    )


def solve_lissa(
    matvec: MatVec,
    rhs: torch.Tensor,
    *,
    damping: float,
    scale: float | None = None,
    depth: int = _DEFAULTS.lissa_depth,
    tol: float = _DEFAULTS.tol,
    callback: Callback | None = None,
) -> SolverResult:
    """LiSSA: ``x_{t+1} = b + (I − A/scale) x_t`` with ``A = H + λI``; solution ``x/scale``.

    The series converges iff every eigenvalue of ``A`` lies in ``(0, 2·scale)``;
    ``scale >= λ_max(A)`` also makes the residual fall monotonically, which is
    what the divergence check relies on. With ``scale=None`` it is estimated by
    20 power-iteration products (counted in ``iterations``) times 1.1.

    Since ``x_{t+1} − x_t = b − A x_t/scale``, the exact residual of the current
    solution costs no extra product, so it is measured every step. The solve
    stops as converged when it is ``<= tol``, and as diverged when it turns
    non-finite or grows past twice its best value (too small ``scale``, or an
    indefinite ``A``). ``callback(step, relative_residual)`` runs each step.
    """
    _check_rhs(rhs)
    _check_damping(damping)
    b_norm = _norm64(rhs)
    if b_norm == 0:
        return _zero_result(rhs, "lissa", damping)
    apply = _damped(matvec, damping)
    products = 0
    if scale is None:
        scale, products = _POWER_SAFETY * _power_iteration(apply, rhs), _POWER_ITERATIONS
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"LiSSA scale must be positive and finite, got {scale!r}")
    x = rhs.clone()
    residuals: list[float] = []
    for step in range(1, depth + 1):
        r = rhs - apply(x) / scale
        rel = _norm64(r) / b_norm
        residuals.append(rel)
        if callback is not None:
            callback(step, rel)
        if rel <= tol:
            msg = f"converged in {step} steps (scale {scale:.4g})"
            return _result("lissa", x / scale, residuals, products + step, damping, True, msg)
        if not math.isfinite(rel) or rel > _LISSA_GROWTH_LIMIT * min(residuals):
            msg = (
                f"diverged at step {step} (relative residual {rel:.3g}): scale {scale:.4g} is "
                "below the largest eigenvalue of H + λI; increase scale (or damping, if H + λI "
                "is indefinite)"
            )
            return _result("lissa", x / scale, residuals, products + step, damping, False, msg)
        x = x + r
    msg = (
        f"not converged after depth={depth} (relative residual {residuals[-1]:.3g} > tol "
        f"{tol:g}); raise depth or damping"
    )
    return _result("lissa", x / scale, residuals, products + depth, damping, False, msg)


def _power_iteration(apply: MatVec, like: torch.Tensor) -> float:
    """Estimate the spectral radius of ``apply`` by ``‖Av‖/‖v‖`` from a seeded start."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(like.numel(), generator=gen, dtype=torch.float64)
    v = v.to(dtype=like.dtype, device=like.device)
    estimate = 0.0
    for _ in range(_POWER_ITERATIONS):
        v = v / _norm64(v)
        av = apply(v)
        estimate = _norm64(av)
        v = av
    return estimate


def _negative_curvature(
    x: torch.Tensor,
    residuals: list[float],
    iteration: int,
    rayleigh: float,
    damping: float,
    policy: NegativeCurvaturePolicy,
) -> SolverResult:
    """Raise or report CG's negative curvature, naming the damping that would be needed."""
    text = (
        f"CG iteration {iteration}: negative curvature pᵀ(H+λI)p/‖p‖² = {rayleigh:.4g} <= 0 at "
        f"damping {damping:g}; H has an eigenvalue <= {rayleigh - damping:.4g}, so raise damping "
        f"above {damping - rayleigh:.4g} or use Gauss–Newton curvature"
    )
    if policy == "raise":
        raise NegativeCurvatureError(text, iteration=iteration, curvature=rayleigh)
    if policy == "gauss_newton":
        text += "; caller should retry with Gauss–Newton curvature"
    else:
        text += "; returning the last iterate"
    return SolverResult(
        solution=x,
        iterations=iteration,
        residuals=residuals,
        converged=False,
        method="cg",
        damping=float(damping),
        negative_curvature=True,
        message=text,
    )


def _result(method: str, x: torch.Tensor, residuals: list[float], products: int,
            damping: float, converged: bool, message: str) -> SolverResult:
    """An iterative solver's outcome (products = curvature products spent)."""
    return SolverResult(solution=x, iterations=products, residuals=residuals,
                        converged=converged, method=method, damping=float(damping),
                        message=message)


def _zero_result(rhs: torch.Tensor, method: str, damping: float) -> SolverResult:
    """A zero right-hand side has the zero solution; no products are spent on it."""
    return SolverResult(
        solution=torch.zeros_like(rhs),
        iterations=0,
        residuals=[],
        converged=True,
        method=method,
        damping=float(damping),
        message="rhs is zero; solution is zero",
    )


def _damped(matvec: MatVec, damping: float) -> MatVec:
    """Wrap the undamped product as ``v ↦ H v + λ v``, checking its shape once per call."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        hv = matvec(v)
        if hv.shape != v.shape:
            raise ValueError(f"matvec returned shape {tuple(hv.shape)} for {tuple(v.shape)}")
        return hv.to(dtype=v.dtype) + damping * v

    return apply


def _check_rhs(rhs: torch.Tensor) -> None:
    if rhs.dim() != 1 or not rhs.is_floating_point():
        raise ValueError(f"rhs must be a flat floating tensor, got {rhs.dtype} {tuple(rhs.shape)}")


def _check_damping(damping: float) -> None:
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be finite and >= 0, got {damping!r}")


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dot product accumulated in float64, whatever the vectors' dtype."""
    return float(torch.dot(a.to(torch.float64), b.to(torch.float64)))


def _norm64(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v, dtype=torch.float64))


def _relative(residual: torch.Tensor, b: torch.Tensor) -> float:
    return _norm64(residual) / _norm64(b)
