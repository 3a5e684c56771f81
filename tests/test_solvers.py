"""Tests for the inverse-Hessian-vector-product solvers.

CG and LiSSA are checked against the dense direct solve and, independently,
against numpy/scipy on matrices whose spectrum is set by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg
import torch

from prefprune.influence.solvers import (
    MatVec,
    NegativeCurvatureError,
    curvature_scale,
    dense_matrix,
    resolve_damping,
    solve_cg,
    solve_direct,
    solve_lissa,
)

RTOL = 1e-3


def spectral_matrix(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    """Symmetric matrix Q diag(eigenvalues) Qᵀ with a seeded random orthogonal Q."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    return (q * eigenvalues) @ q.T


def matvec_of(matrix: np.ndarray, dtype: torch.dtype) -> MatVec:
    tensor = torch.from_numpy(matrix).to(dtype)
    return lambda v: tensor @ v


def rhs_vector(dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(dim)).to(dtype)


def rel_err(x: torch.Tensor, ref: np.ndarray) -> float:
    x64 = x.detach().to(torch.float64).numpy()
    return float(np.linalg.norm(x64 - ref) / np.linalg.norm(ref))


def scipy_solution(matrix: np.ndarray, rhs: torch.Tensor, damping: float) -> np.ndarray:
    a = matrix + damping * np.eye(matrix.shape[0])
    return scipy.linalg.solve(a, rhs.to(torch.float64).numpy(), assume_a="pos")


# (dim, log10 condition number): spectra log-spaced over [1, 10^log_cond]
SPD_CASES = [(50, 1), (100, 2), (200, 3)]
# In exact arithmetic CG finishes within dim steps; float32 loses orthogonality
# on the κ = 1e3 case and needs a few steps more, so it gets twice the budget.
CG_BUDGET = {torch.float64: 1, torch.float32: 2}
DIRECT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-6}


@pytest.mark.parametrize(("dim", "log_cond"), SPD_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cg_matches_direct_and_scipy(dim, log_cond, dtype):
    matrix = spectral_matrix(np.logspace(0, log_cond, dim), seed=dim)
    b = rhs_vector(dim, seed=1, dtype=dtype)
    ref = scipy_solution(matrix, b, 0.0)
    direct = solve_direct(torch.from_numpy(matrix), b, damping=0.0)
    max_iter = CG_BUDGET[dtype] * dim
    cg = solve_cg(matvec_of(matrix, dtype), b, damping=0.0, tol=1e-6, max_iter=max_iter)
    assert cg.converged, cg.message
    assert cg.method == "cg" and cg.solution.dtype == direct.solution.dtype == dtype
    assert cg.iterations == len(cg.residuals) <= max_iter
    assert cg.residuals[-1] <= 1e-6
    assert cg.residuals[-1] < 1e-3 * cg.residuals[0]
    assert rel_err(cg.solution, ref) < RTOL
    assert rel_err(direct.solution, ref) < DIRECT_RTOL[dtype]
    assert rel_err(cg.solution, direct.solution.to(torch.float64).numpy()) < RTOL


def test_cg_psd_with_damping_and_callback():
    dim, damping = 120, 0.1
    eig = np.concatenate([np.zeros(dim // 2), np.linspace(0.5, 20, dim - dim // 2)])
    matrix = spectral_matrix(eig, seed=7)
    b = rhs_vector(dim, seed=2, dtype=torch.float64)
    seen: list[tuple[int, float]] = []
    cg = solve_cg(
        matvec_of(matrix, torch.float64),
        b,
        damping=damping,
        max_iter=dim,
        callback=lambda k, r: seen.append((k, r)),
    )
    assert cg.converged and cg.damping == damping
    assert [k for k, _ in seen] == list(range(1, cg.iterations + 1))
    assert [r for _, r in seen] == cg.residuals
    assert rel_err(cg.solution, np.linalg.solve(matrix + damping * np.eye(dim), b.numpy())) < RTOL


def test_cg_zero_rhs():
    b = torch.zeros(10, dtype=torch.float32)
    result = solve_cg(lambda v: v, b, damping=0.0)
    assert result.converged and result.iterations == 0
    assert torch.equal(result.solution, b) and result.solution.dtype == torch.float32


def test_cg_max_iter_reports_not_converged():
    matrix = spectral_matrix(np.logspace(0, 4, 100), seed=3)
    result = solve_cg(
        matvec_of(matrix, torch.float64), rhs_vector(100, 0, torch.float64), damping=0.0, max_iter=5
    )
    assert not result.converged and result.iterations == 5
    assert "max_iter" in result.message


INDEFINITE_EIG = np.concatenate([np.linspace(-2.0, -0.5, 20), np.linspace(0.1, 10.0, 60)])


def indefinite_problem() -> tuple[np.ndarray, torch.Tensor]:
    return spectral_matrix(INDEFINITE_EIG, seed=11), rhs_vector(80, seed=4, dtype=torch.float64)


def test_cg_negative_curvature_stop():
    matrix, b = indefinite_problem()
    result = solve_cg(
        matvec_of(matrix, torch.float64), b, damping=0.1, on_negative_curvature="stop"
    )
    assert result.negative_curvature and not result.converged
    assert result.iterations == len(result.residuals) + 1
    assert "damping" in result.message and "Gauss–Newton" in result.message
    assert torch.isfinite(result.solution).all()


def test_cg_negative_curvature_gauss_newton_defers_to_caller():
    matrix, b = indefinite_problem()
    result = solve_cg(
        matvec_of(matrix, torch.float64), b, damping=0.1, on_negative_curvature="gauss_newton"
    )
    assert result.negative_curvature and not result.converged
    assert "caller should retry with Gauss–Newton curvature" in result.message


def test_cg_negative_curvature_raise():
    matrix, b = indefinite_problem()
    with pytest.raises(NegativeCurvatureError, match="damping") as info:
        solve_cg(matvec_of(matrix, torch.float64), b, damping=0.1, on_negative_curvature="raise")
    assert "Gauss–Newton" in str(info.value) and "iteration" in str(info.value)
    assert info.value.curvature <= 0 and info.value.iteration >= 1


def test_cg_indefinite_succeeds_with_enough_damping():
    matrix, b = indefinite_problem()
    damping = 2.5  # > |λ_min| = 2
    result = solve_cg(
        matvec_of(matrix, torch.float64),
        b,
        damping=damping,
        on_negative_curvature="raise",
        max_iter=80,
    )
    assert result.converged and not result.negative_curvature
    assert rel_err(result.solution, scipy_solution(matrix, b, damping)) < RTOL


def test_direct_flags_indefinite_system():
    matrix, b = indefinite_problem()
    result = solve_direct(torch.from_numpy(matrix), b, damping=0.1)
    assert result.negative_curvature and result.iterations == 0
    assert result.residuals[0] < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lissa_matches_direct_given_scale(dtype):
    dim, damping = 100, 0.5
    eig = np.concatenate([np.zeros(20), np.linspace(0.5, 10, dim - 20)])
    matrix = spectral_matrix(eig, seed=5)
    b = rhs_vector(dim, seed=6, dtype=dtype)
    result = solve_lissa(matvec_of(matrix, dtype), b, damping=damping, scale=12.0, tol=1e-5)
    assert result.converged, result.message
    assert result.solution.dtype == dtype and result.iterations == len(result.residuals)
    assert result.residuals[-1] <= 1e-5
    assert all(
        later <= earlier * (1 + 1e-6)
        for earlier, later in zip(result.residuals, result.residuals[1:])
    )
    direct = solve_direct(torch.from_numpy(matrix), b, damping=damping)
    assert rel_err(result.solution, direct.solution.to(torch.float64).numpy()) < RTOL
    assert rel_err(result.solution, scipy_solution(matrix, b, damping)) < RTOL


def test_lissa_estimates_scale_and_converges():
    dim = 80
    matrix = spectral_matrix(np.logspace(0, 1.5, dim), seed=8)
    b = rhs_vector(dim, seed=9, dtype=torch.float64)
    result = solve_lissa(matvec_of(matrix, torch.float64), b, damping=0.0, depth=2000)
    assert result.converged, result.message
    assert result.iterations == 20 + len(result.residuals)
    assert rel_err(result.solution, scipy_solution(matrix, b, 0.0)) < RTOL


def test_lissa_too_small_scale_diverges():
    dim = 60
    matrix = spectral_matrix(np.linspace(1, 30, dim), seed=10)
    b = rhs_vector(dim, seed=0, dtype=torch.float32)
    result = solve_lissa(matvec_of(matrix, torch.float32), b, damping=0.0, scale=5.0)
    assert not result.converged
    assert "scale" in result.message and "diverged" in result.message
    assert len(result.residuals) < 100


def test_lissa_zero_rhs():
    result = solve_lissa(lambda v: v, torch.zeros(5), damping=0.1)
    assert result.converged and result.iterations == 0 and not result.solution.any()


def test_dense_matrix_reproduces_and_symmetrises():
    matrix = spectral_matrix(np.linspace(-1, 3, 30), seed=12)
    built = dense_matrix(matvec_of(matrix, torch.float64), 30)
    assert built.dtype == torch.float64
    np.testing.assert_allclose(built.numpy(), matrix, atol=1e-12)
    skew = np.triu(np.ones((30, 30)), 1)
    built = dense_matrix(matvec_of(matrix + skew, torch.float64), 30)
    np.testing.assert_allclose(built.numpy(), matrix + (skew + skew.T) / 2, atol=1e-12)


def test_curvature_scale_estimates_mean_eigenvalue():
    dim = 100
    eig = np.linspace(0.5, 8, dim)
    matvec = matvec_of(spectral_matrix(eig, seed=13), torch.float32)
    estimate = curvature_scale(matvec, dim, probes=64)
    assert abs(estimate - eig.mean()) < 0.2 * eig.mean()
    again = curvature_scale(matvec, dim, probes=64)
    seeded = curvature_scale(matvec, dim, probes=64, generator=torch.Generator().manual_seed(0))
    assert estimate == again == seeded


def test_resolve_damping():
    assert resolve_damping(0.01, relative=False, scale=123.0) == 0.01
    assert resolve_damping(1e-2, relative=True, scale=4.0) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="curvature scale"):
        resolve_damping(1e-2, relative=True, scale=-1.0)
    with pytest.raises(ValueError, match="damping"):
        resolve_damping(-1.0, relative=False, scale=1.0)


def tiny_reward_loss(
    n_pairs: int = 32, features: int = 4, hidden: int = 3
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """Bradley–Terry loss of a tiny tanh reward model, as a function of flat parameters."""
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(n_pairs, features, generator=gen, dtype=torch.float64)
    rejected = torch.randn(n_pairs, features, generator=gen, dtype=torch.float64)
    sizes = [features * hidden, hidden, hidden, 1]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = torch.split(theta, sizes)
        w1 = w1.view(features, hidden)

        def reward(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ w1 + b1) @ w2 + b2

        margin = reward(chosen.to(theta.dtype)) - reward(rejected.to(theta.dtype))
        return torch.nn.functional.softplus(-margin).mean()

    theta = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    return loss, theta


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cg_with_autograd_hvp_matches_explicit_hessian(dtype):
    loss, theta64 = tiny_reward_loss()
    theta = theta64.to(dtype).requires_grad_(True)
    grad = torch.autograd.grad(loss(theta), theta, create_graph=True)[0]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(grad, theta, grad_outputs=v, retain_graph=True)[0]

    hessian = torch.autograd.functional.hessian(loss, theta64)
    damping = max(0.0, -float(torch.linalg.eigvalsh(hessian)[0])) + 0.05
    b = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1), dtype=dtype)
    direct = solve_direct(hessian, b, damping=damping)
    cg = solve_cg(hvp, b, damping=damping, max_iter=200, on_negative_curvature="raise")
    assert cg.converged, cg.message
    assert rel_err(cg.solution, direct.solution.to(torch.float64).numpy()) < RTOL
    from_products = solve_direct(dense_matrix(hvp, theta.numel(), dtype=dtype), b, damping=damping)
    assert rel_err(from_products.solution, direct.solution.to(torch.float64).numpy()) < RTOL
