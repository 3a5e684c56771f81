"""The score formulas, from per-pair statistics (docs/method.md, section 2).

Every score is a **harm**: larger = more harmful, rank 1 = the most harmful pair. With
``∇ℓ_i = −σ(−m_i) ∇m_i`` (the loss slope times the margin gradient) and ``s = (H+λI)⁻¹ g_val``:

* ``if``: ``−Δ_i = −(1/n) g_valᵀ (H+λI)⁻¹ ∇ℓ_i``, the predicted drop of validation loss when
  pair i is removed;
* ``flip``: ``(1/n) sᵀ∇m_i``, the predicted drop when its label is flipped instead
  (flipping changes the pair's loss gradient by ``−∇m_i``);
* ``grad_dot`` / ``grad_cos``: ``−g_valᵀ∇ℓ_i`` and ``−cos(g_val, ∇ℓ_i)``; no curvature;
* ``self_influence``: ``∇ℓ_iᵀ (G+λI)⁻¹ ∇ℓ_i`` with the Gauss–Newton curvature G;
* ``loss``: ``ℓ(z_i)``; ``random``: a seeded uniform control.

The engine computes the statistics in shared gradient passes; these functions only combine
them, so each formula is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from prefprune.influence.dual import dual_quadratic
from prefprune.model.objective import bradley_terry_loss, gauss_newton_weights, loss_slope

#: ``column(score, target)``: the table column of a target-dependent score.
Column = Callable[[str, str], str]


def influence_columns(projections: torch.Tensor, margins: torch.Tensor, targets: Sequence[str],
                      scores: Sequence[str], column: Column) -> dict[str, np.ndarray]:
    """``if`` and ``flip`` from ``projections[i, t] = ∇m_iᵀ s_t`` (n × T)."""
    n = len(margins)
    slope = loss_slope(margins.double())
    out = {}
    for t, name in enumerate(targets):
        proj = projections[:, t].double()
        if "if" in scores:
            out[column("if", name)] = (-(slope * proj) / n).numpy()
        if "flip" in scores:
            out[column("flip", name)] = (proj / n).numpy()
    return out


def similarity_columns(g_val: torch.Tensor, margins: torch.Tensor, norms2: torch.Tensor,
                       dots: torch.Tensor, targets: Sequence[str], scores: Sequence[str],
                       column: Column) -> dict[str, np.ndarray]:
    """``grad_dot`` and ``grad_cos`` from ``‖∇m_i‖²`` (n,) and ``dots[i, t] = ∇m_iᵀ g_val_t``."""
    slope = loss_slope(margins.double())
    grad_norms = slope.abs() * norms2.double().sqrt()
    out = {}
    for t, name in enumerate(targets):
        dot = slope * dots[:, t].double()  # g_valᵀ ∇ℓ_i
        if "grad_dot" in scores:
            out[column("grad_dot", name)] = (-dot).numpy()
        if "grad_cos" in scores:
            denom = grad_norms * g_val[t].double().norm()
            cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300), 0.0)
            out[column("grad_cos", name)] = (-cos).numpy()
    return out


def self_influence(local_margins: torch.Tensor, local_grads: torch.Tensor,
                   margins: torch.Tensor, damping: float, *, sharded: bool = False) -> np.ndarray:
    """``∇ℓ_iᵀ (G+λI)⁻¹ ∇ℓ_i`` for every pair, exactly, in the dual. Needs the cached margin
    gradients: ``local_*`` are this process's rows, ``margins`` every pair's (shard order)."""
    quad = dual_quadratic(gauss_newton_weights(local_margins), local_grads, damping,
                          sharded=sharded)
    return (loss_slope(margins.double())**2 * quad).numpy()


def loss_column(margins: torch.Tensor) -> np.ndarray:
    """The training loss ``ℓ(z_i)`` of every pair."""
    return bradley_terry_loss(margins).numpy()


def random_column(n: int, seed: int) -> np.ndarray:
    """The seeded control every experiment reports."""
    return np.random.default_rng(seed).random(n)


def ranks(values: np.ndarray) -> np.ndarray:
    """Rank 1 = largest harm; ties broken by position so ranks are a permutation."""
    order = np.argsort(-values, kind="stable")
    out = np.empty(len(values), dtype=np.int64)
    out[order] = np.arange(1, len(values) + 1)
    return out
