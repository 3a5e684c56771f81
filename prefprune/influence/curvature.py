"""Curvature–vector products of the training objective L(θ) = (1/n) Σ ℓ(z_i) at the trained θ.

Two curvatures (docs/method.md, section 1):

* **Gauss–Newton** ``G = (1/n) Σ σ(m_i)σ(−m_i) ∇m_i ∇m_iᵀ``: positive semi-definite, so CG
  always converges once damped. From cached margin gradients ``J`` (n × P) a product is two
  matrix–vector products; without the cache each product streams one gradient pass.
* **Exact Hessian** by double backward: ``Hv = ∇(∇L · v)``. It adds ``−σ(−m) ∇²m`` and may be
  indefinite. Needs eager attention on CPU, which :class:`RewardModelConfig` defaults to.

Both can use a seeded subsample of the training pairs; every operator reports ``trace/dim``
so relative damping has a scale. In a data-parallel run (``sharded=True``) each process holds
only its share of the pairs; every product is a local partial sum, all-reduced over the process
group, so all processes see the same product and run the solver in lockstep.
"""

from __future__ import annotations

import torch

from prefprune import distributed
from prefprune.influence.gradients import MarginGradientComputer, flatten
from prefprune.model import PairBatch, RewardModel, bradley_terry_loss, gauss_newton_weights


class CachedGaussNewton:
    """GGN products from margins and margin gradients held in memory.

    With ``sharded=True`` the rows are this process's share of the pairs (rank order, as
    :func:`prefprune.distributed.split` assigns them) and products are summed over processes.
    """

    def __init__(self, margins: torch.Tensor, margin_grads: torch.Tensor, *,
                 sharded: bool = False) -> None:
        self.jacobian = margin_grads
        self.weights = gauss_newton_weights(margins.to(margin_grads.dtype))
        self.dim = margin_grads.shape[1]
        self.sharded = sharded
        rows = torch.tensor([margin_grads.shape[0]])
        self.sizes = (distributed.gather_rows(rows) if sharded else rows).tolist()
        self.count = sum(self.sizes)
        self.offset = sum(self.sizes[: distributed.rank()]) if sharded else 0
        self.products = 0

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(tensor) if self.sharded else tensor

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        j = self.jacobian
        return self._reduce(j.T @ (self.weights * (j @ v.to(j.dtype)))) / self.count

    def scale(self) -> float:
        """Exact ``trace(G)/P`` from the cached rows."""
        norms = (self.jacobian.double() ** 2).sum(dim=1)
        total = self._reduce((self.weights.double() * norms).sum())
        return float(total / (self.count * self.dim))

    def rows_times(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` for every pair (all processes' rows, in order), (n,)."""
        local = self.jacobian.double() @ v.double()
        return distributed.gather_rows(local) if self.sharded else local

    def transpose_times(self, y: torch.Tensor) -> torch.Tensor:
        """``Jᵀ y`` for a vector ``y`` over every pair, (P,)."""
        mine = y[self.offset:self.offset + self.jacobian.shape[0]].double()
        return self._reduce(self.jacobian.double().T @ mine)


class StreamingCurvature:
    """GGN or exact-Hessian products over encoded batches, without per-pair storage.

    Each product costs one pass over ``batches`` (a forward and one or two backwards per
    batch); the batches are encoded once and reused by every product. With ``sharded=True``
    ``batches`` are this process's share and the products are summed over processes.
    """

    def __init__(self, model: RewardModel, batches: list[PairBatch], kind: str, *,
                 sharded: bool = False) -> None:
        if kind not in ("gauss_newton", "hessian"):
            raise ValueError(f"curvature must be 'gauss_newton' or 'hessian', not {kind!r}")
        self.model = model
        self.batches = batches
        self.kind = kind
        self.params = [p for _, p in model.trainable_parameters()]
        self.dim = sum(p.numel() for p in self.params)
        self.sharded = sharded
        count = torch.tensor([sum(b.size for b in batches)])
        self.count = int(distributed.all_reduce_sum(count) if sharded else count)
        self.products = 0
        self._grads = MarginGradientComputer(model) if kind == "gauss_newton" else None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        self.model.model.eval()
        total = torch.zeros(self.dim, dtype=torch.float32, device=v.device)
        for batch in self.batches:
            total += self._batch_product(batch.to(self.model.device), v)
        if self.sharded:
            distributed.all_reduce_sum(total)
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

