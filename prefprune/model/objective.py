"""The Bradley–Terry objective of a pair in its margin ``m = r(x, y_w) − r(x, y_l)``.

Everything that trains, differentiates or scores a reward model goes through these three
functions, so the loss and its derivatives are written once (docs/method.md, section 1):

* ``ℓ(m) = −log σ(m) = softplus(−m)``
* ``dℓ/dm = −σ(−m)``: turns a margin gradient into a loss gradient, ``∇ℓ = −σ(−m) ∇m``
* ``d²ℓ/dm² = σ(m)σ(−m)``: the Gauss–Newton weight, ``G = (1/n) Σ σ(m)σ(−m) ∇m∇mᵀ``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(margins: torch.Tensor) -> torch.Tensor:
    """Per-pair loss ``ℓ = −log σ(m) = softplus(−m)``, numerically stable."""
    return F.softplus(-margins)


def loss_slope(margins: torch.Tensor) -> torch.Tensor:
    """``dℓ/dm = −σ(−m)``: the factor that turns ``∇m`` into ``∇ℓ`` (always negative)."""
    return -torch.sigmoid(-margins)


def gauss_newton_weights(margins: torch.Tensor) -> torch.Tensor:
    """``d²ℓ/dm² = σ(m)σ(−m)``: the BT loss's curvature in the margin (in (0, 1/4])."""
    return torch.sigmoid(margins) * torch.sigmoid(-margins)
