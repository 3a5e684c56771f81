"""Seeded random projection of per-pair gradients (Johnson–Lindenstrauss), as in TRAK/LoGra.

Why: a stored gradient index of n pairs costs n × P × 4 bytes unprojected (0.3 MB per pair for
LoRA r=8 on MiniLM). Projected to d dimensions it costs n × d × 4 bytes, and inner products are
preserved in expectation: ``E[(Ra)ᵀ(Rb)] = aᵀb`` for ``R`` with i.i.d. ±1/√d entries, with a
relative error that shrinks like 1/√d. Scores computed in the projected space (Gauss–Newton
curvature ``R G Rᵀ``) are an approximation; docs/scaling.md reports their measured rank
agreement with unprojected scores.

``R`` (d × P) is generated block by block from the seed, so a run can regenerate it instead of
holding it when d × P does not fit the memory budget; every process of a data-parallel run
builds the same ``R`` from the same seed.
"""

from __future__ import annotations

import math

import torch

from prefprune.influence.gradients import MarginGradientComputer, PairGradients
from prefprune.model import PairBatch

_BLOCK_COLUMNS = 8192


class RandomProjection:
    """The map ``x ↦ R x`` with ``R`` (``dim_out`` × ``dim_in``) Rademacher ±1/√dim_out."""

    def __init__(self, dim_in: int, dim_out: int, seed: int, *, keep_bytes: float) -> None:
        if dim_out < 1:
            raise ValueError(f"projection dimension must be >= 1, got {dim_out}")
        self.dim_in, self.dim_out, self.seed = dim_in, dim_out, seed
        self.bounds = [(a, min(a + _BLOCK_COLUMNS, dim_in))
                       for a in range(0, dim_in, _BLOCK_COLUMNS)]
        fits = dim_in * dim_out * 4 <= keep_bytes
        self._blocks = [self._block(k) for k in range(len(self.bounds))] if fits else None

    def _block(self, k: int) -> torch.Tensor:
        """Columns ``bounds[k]`` of R, from a generator seeded by (seed, k) alone."""
        start, stop = self.bounds[k]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        signs = torch.randint(0, 2, (self.dim_out, stop - start), generator=generator)
        return (signs.float() * 2 - 1) / math.sqrt(self.dim_out)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Project each row of ``rows`` (B × dim_in) to (B × dim_out)."""
        out = torch.zeros(rows.shape[0], self.dim_out, dtype=torch.float32, device=rows.device)
        for k, (start, stop) in enumerate(self.bounds):
            block = self._blocks[k] if self._blocks is not None else self._block(k)
            out += rows[:, start:stop].float() @ block.to(rows.device).T
        return out


class ProjectedGradients:
    """A :class:`MarginGradientComputer` whose margin gradients come out projected.

    Loss gradients are ``−σ(−m) ∇m``, linear in ``∇m``, so validation gradients computed from
    the projected rows are the projected validation gradients.
    """

    def __init__(self, grads: MarginGradientComputer, projection: RandomProjection) -> None:
        self.inner = grads
        self.projection = projection
        self.dim = projection.dim_out

    def __call__(self, batch: PairBatch) -> PairGradients:
        pairs = self.inner(batch)
        return PairGradients(pairs.margins, self.projection(pairs.margin_grads))
