"""Curvature–vector products of the training objective L(θ) = (1/n) Σ ℓ(z_i) at the trained θ.

Two curvatures (SPEC §1):

* **Gauss–Newton** ``G = (1/n) Σ σ(m_i)σ(−m_i) ∇m_i ∇m_iᵀ``: positive semi-definite, so CG
  always converges once damped. From cached margin gradients ``J`` (n × P) a product is two
  matrix–vector products; without the cache each product streams one gradient pass.
* **Exact Hessian** by double backward: ``Hv = ∇(∇L · v)``. It adds ``−σ(−m) ∇²m`` and may be
  indefinite. Needs eager attention on CPU (SPEC §6), which :class:`RewardModelConfig` defaults to.

Both can use a seeded subsample of the training pairs; every operator reports ``trace/dim``
so relative damping has a scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..reward_model import PairBatch, RewardModel, bradley_terry_loss
from .gradients import MarginGradientComputer, flatten

MatVec = Callable[[torch.Tensor], torch.Tensor]


def gauss_newton_weights(margins: torch.Tensor) -> torch.Tensor:
    """``σ(m)σ(−m)``: the BT loss's second derivative in the margin."""
    return torch.sigmoid(margins) * torch.sigmoid(-margins)


class CachedGaussNewton:
    """GGN products from margins and margin gradients held in memory."""

    def __init__(self, margins: torch.Tensor, margin_grads: torch.Tensor) -> None:
        self.jacobian = margin_grads
        self.weights = gauss_newton_weights(margins.to(margin_grads.dtype))
        self.dim = margin_grads.shape[1]
        self.products = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        j = self.jacobian
        return j.T @ (self.weights * (j @ v.to(j.dtype))) / j.shape[0]

    def scale(self) -> float:
        """Exact ``trace(G)/P`` from the cached rows."""
        norms = (self.jacobian.double() ** 2).sum(dim=1)
        return float((self.weights.double() * norms).sum() / (self.jacobian.shape[0] * self.dim))


class StreamingCurvature:
    """GGN or exact-Hessian products over encoded batches, without per-pair storage.

    Each product costs one pass over ``batches`` (a forward and one or two backwards per
    batch); the batches are encoded once and reused by every product.
    """

    def __init__(self, model: RewardModel, batches: list[PairBatch], kind: str) -> None:
        if kind not in ("gauss_newton", "hessian"):
            raise ValueError(f"curvature must be 'gauss_newton' or 'hessian', not {kind!r}")
        self.model = model
        self.batches = batches
        self.kind = kind
        self.params = [p for _, p in model.trainable_parameters()]
        self.dim = sum(p.numel() for p in self.params)
        self.count = sum(b.size for b in batches)
        self.products = 0
        self._grads = MarginGradientComputer(model) if kind == "gauss_newton" else None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        self.model.model.eval()
        total = torch.zeros(self.dim, dtype=torch.float32, device=v.device)
        for batch in self.batches:
            total += self._batch_product(batch.to(self.model.device), v)
        return (total / self.count).to(v.dtype)

    def _batch_product(self, batch: PairBatch, v: torch.Tensor) -> torch.Tensor:
        if self._grads is not None:
            pairs = self._grads(batch)
            j = pairs.margin_grads
            return j.T @ (gauss_newton_weights(pairs.margins) * (j @ v.float()))
        loss = bradley_terry_loss(self.model.margins(batch)).sum()
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        dot = (flatten(list(grads)) * v.to(grads[0].dtype)).sum()
        return flatten(list(torch.autograd.grad(dot, self.params))).float()

