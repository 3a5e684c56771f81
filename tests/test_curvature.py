"""Curvature products against matrices built independently of the library.

Ground truth comes from ``torch.func.functional_call`` over a flat parameter vector θ:
the Jacobian of all margins (→ the explicit Gauss–Newton matrix
``(1/n) Σ σ(m)σ(−m) ∇m∇mᵀ``) and the full Hessian of the mean Bradley–Terry loss, both with
``torch.autograd.functional``. The model is a tiny BERT (eager attention) with rank-1 LoRA on
the query projections, moved far from initialisation so the Hessian is indefinite and differs
from the Gauss–Newton matrix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import pairs, tiny_scoring_model
from torch.func import functional_call

from prefprune.influence import solvers
from prefprune.influence.curvature import (
    CachedGaussNewton,
    StreamingCurvature,
    gauss_newton_weights,
)
from prefprune.influence.gradients import MarginGradientComputer


class Setup:
    """A perturbed tiny model, its pairs in two uneven batches, and explicit G and H."""

    def __init__(self, backbone, n: int = 10) -> None:
        self.model = tiny_scoring_model(backbone)
        data = pairs(n, seed=11)
        prompts, chosen, rejected = data["prompt"], data["chosen"], data["rejected"]
        self.n = n
        self.dim = self.model.num_trainable
        cut = 6
        self.batches = [self.model.encode_pairs(prompts[:cut], chosen[:cut], rejected[:cut]),
                        self.model.encode_pairs(prompts[cut:], chosen[cut:], rejected[cut:])]
        self.whole = self.model.encode_pairs(prompts, chosen, rejected)
        named = self.model.trainable_parameters()
        self.names = [name for name, _ in named]
        self.shapes = [param.shape for _, param in named]
        self.theta = torch.cat([param.detach().reshape(-1) for _, param in named])
        jacobian = torch.autograd.functional.jacobian(self.margins, self.theta, vectorize=True)
        self.margin_values = self.margins(self.theta).detach().double()
        self.jacobian = jacobian.double()
        weights = gauss_newton_weights(self.margin_values)
        self.ggn = self.jacobian.T @ (weights[:, None] * self.jacobian) / n
        self.hessian = torch.autograd.functional.hessian(
            lambda t: F.softplus(-self.margins(t)).mean(), self.theta, vectorize=True).double()

    def margins(self, theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = shape.numel()
            params[name] = theta[offset:offset + size].view(shape)
            offset += size
        rewards = functional_call(self.model.model, params, kwargs=self.whole.inputs)
        rewards = rewards.logits.squeeze(-1)
        return rewards[: self.n] - rewards[self.n:]


@pytest.fixture(scope="module")
def setup(tiny_bert) -> Setup:
    return Setup(tiny_bert)


def probes(dim: int, count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(dim, generator=generator) for _ in range(count)]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def test_ground_truth_is_not_degenerate(setup):
    # the exact Hessian is indefinite here and differs from Gauss–Newton: the tests below
    # can tell the two curvatures apart
    assert torch.allclose(setup.hessian, setup.hessian.T, atol=1e-7)
    eigenvalues = torch.linalg.eigvalsh(setup.hessian)
    assert eigenvalues[0] < -1e-3 * eigenvalues[-1]
    assert relative(setup.ggn, setup.hessian) > 0.05


def test_cached_gauss_newton_is_the_explicit_ggn(setup):
    pairs = MarginGradientComputer(setup.model)(setup.whole)
    operator = CachedGaussNewton(pairs.margins, pairs.margin_grads)
    dense = solvers.dense_matrix(operator, setup.dim)
    assert relative(dense, setup.ggn) < 1e-5
    assert operator.products == setup.dim
    assert operator.scale() == pytest.approx(float(setup.ggn.trace()) / setup.dim, rel=1e-5)


def test_gauss_newton_is_positive_semidefinite(setup):
    pairs = MarginGradientComputer(setup.model)(setup.whole)
    dense = solvers.dense_matrix(CachedGaussNewton(pairs.margins, pairs.margin_grads),
                                 setup.dim)
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert eigenvalues[0] >= -1e-6 * eigenvalues[-1]
    # rank ≤ n: one outer product per pair
    assert int((eigenvalues > 1e-6 * eigenvalues[-1]).sum()) <= setup.n


def test_streaming_gauss_newton_products(setup):
    operator = StreamingCurvature(setup.model, setup.batches, "gauss_newton")
    assert operator.count == setup.n and operator.dim == setup.dim
    for v in probes(setup.dim):
        assert relative(operator(v), setup.ggn @ v.double()) < 1e-5
    assert operator.products == 3


def test_streaming_hessian_products(setup):
    operator = StreamingCurvature(setup.model, setup.batches, "hessian")
    for v in probes(setup.dim):
        assert relative(operator(v), setup.hessian @ v.double()) < 1e-5


def test_streaming_hessian_on_basis_vectors(setup):
    operator = StreamingCurvature(setup.model, setup.batches, "hessian")
    eye = torch.eye(setup.dim)
    for j in (0, setup.dim // 2, setup.dim - 2):  # LoRA A, LoRA B and the head's weight
        assert relative(operator(eye[j]), setup.hessian[:, j]) < 1e-5
    if setup.names[-1].endswith("bias"):
        # a trainable head bias cancels in every margin: its row and column are zero
        assert setup.hessian[:, -1].abs().max() < 1e-9
        assert operator(eye[-1]).abs().max() < 1e-9
    else:
        assert relative(operator(eye[-1]), setup.hessian[:, -1]) < 1e-5


def test_unknown_curvature_is_rejected(setup):
    with pytest.raises(ValueError, match="gauss_newton"):
        StreamingCurvature(setup.model, setup.batches, "fisher")
