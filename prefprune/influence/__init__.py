"""Influence engine: per-pair gradients, curvature products, solvers and scores.

``compute_scores`` runs it; ``InfluenceConfig`` says how. The pieces, in data-flow order:
:mod:`gradients` (per-pair margin gradients), :mod:`curvature` (Gauss–Newton and exact Hessian
products), :mod:`solvers` and :mod:`dual` (inverse-Hessian-vector products), :mod:`formulas`
(the scores from those statistics), :mod:`store` (resumable shards) and :mod:`engine`.
"""

from prefprune.influence.config import ALL_SCORES, DEFAULT_SCORES, InfluenceConfig
from prefprune.influence.engine import compute_scores
from prefprune.influence.results import ScoreResult, model_fingerprint

__all__ = [
    "ALL_SCORES",
    "DEFAULT_SCORES",
    "InfluenceConfig",
    "ScoreResult",
    "compute_scores",
    "model_fingerprint",
]
