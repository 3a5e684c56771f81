"""How to score: which scores, which curvature and solver, damping, memory and sharding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prefprune.config import Settings, setting
from prefprune.errors import InfluenceConfigError

#: Every score the engine computes from one model; each is a harm (larger = more harmful).
ENGINE_SCORES = ("if", "flip", "grad_dot", "grad_cos", "self_influence", "loss", "random")
#: Scores that retrain: the out-of-fold loss (prefprune.crossfit).
CROSSFIT_SCORES = ("oof",)
ALL_SCORES = ENGINE_SCORES + CROSSFIT_SCORES
#: Computed unless told otherwise; the out-of-fold loss costs K trainings, so it is opt-in.
DEFAULT_SCORES = ENGINE_SCORES
#: Scores that need an inverse-Hessian solve.
CURVATURE_SCORES = frozenset({"if", "flip"})
#: Scores that depend on the validation target (one column per target).
TARGET_SCORES = frozenset({"if", "flip", "grad_dot", "grad_cos"})
#: The exact dual solve behind ``self_influence`` factorises an n × n matrix.
MAX_DUAL_PAIRS = 20000
DEFAULT_DAMPING = 10.0


@dataclass(frozen=True)
class InfluenceConfig(Settings):
    """How to score. Defaults: every score, Gauss–Newton curvature, CG,
    λ = 10 × trace(G)/min(pairs, P) (docs/method.md, section 3; docs/defaults.md says why).

    ``damping_relative`` makes ``damping`` a multiple of the mean non-zero Gauss–Newton
    eigenvalue ``trace(G)/min(pairs, P)`` (G's rank is at most that), computed exactly from the
    gradient pass at no extra cost. ``memory_budget_mb`` bounds the per-pair gradient cache
    (per process in a distributed run); past it the engine streams and holds nothing of size
    pairs × parameters. ``projection_dim`` stores randomly projected gradients instead
    (docs/scaling.md).
    """

    section: ClassVar[str] = "influence"
    error: ClassVar[type[InfluenceConfigError]] = InfluenceConfigError

    scores: tuple[str, ...] = setting(
        DEFAULT_SCORES, metavar="NAMES",
        help=f"Comma-separated scores to compute, from {', '.join(ALL_SCORES)}.")
    curvature: str = setting(
        "gauss_newton", choices=("gauss_newton", "hessian"),
        help="gauss_newton (positive semi-definite) or hessian (exact products by double "
             "backward; may be indefinite).")
    solver: str = setting(
        "cg", choices=("cg", "lissa", "direct"),
        help="cg, lissa, or direct (exact: the Gauss–Newton system in its n-dimensional dual, "
             "or a dense solve of a small exact Hessian).")
    damping: float = setting(
        DEFAULT_DAMPING, min=0.0,
        help="λ added to the curvature; relative to the mean non-zero Gauss–Newton "
             "eigenvalue unless --no-damping-relative.")
    damping_relative: bool = setting(
        True, help="Read --damping as a multiple of the mean non-zero Gauss–Newton "
                   "eigenvalue (--no-damping-relative: an absolute λ).")
    tol: float = setting(1e-5, above=0.0, help="Relative residual at which CG/LiSSA stop.")
    max_iter: int = setting(200, min=1, help="CG iteration cap.")
    lissa_depth: int = setting(2000, min=1, help="LiSSA recursion steps cap.")
    lissa_scale: float | None = setting(
        None, above=0.0, help="LiSSA scale (>= the largest eigenvalue of H + λI). Default: "
                              "estimated by power iteration.")
    negative_curvature: str = setting(
        "gauss_newton", choices=("gauss_newton", "raise", "stop"),
        help="When CG meets negative curvature on the exact Hessian: re-solve with "
             "gauss_newton, raise an error, or stop with the last iterate.")
    curvature_samples: int | None = setting(
        None, min=1, help="Define the curvature on a seeded subsample of this many pairs.")
    score_batch_size: int = setting(32, min=1, help="Pairs per gradient batch when scoring.")
    shard_size: int = setting(256, min=1, help="Pairs per saved shard (the unit of resuming).")
    memory_budget_mb: float = setting(
        2048.0, min=0.0, identity=False,
        help="RAM for cached per-pair gradients (per process); past it scoring streams.")
    seed: int = setting(0, help="Seeds the random score, subsampling and projection.")
    oof_folds: int = setting(5, min=2, help="Folds of the out-of-fold loss score (oof): K "
                                            "models, each trained on K-1 folds.")
    gradient_mode: str = setting(
        "hooks", choices=("hooks", "loop"),
        help="hooks (one backward per batch) or loop (one backward per pair: slow, for models "
             "with trainable parameters outside linear layers).")
    projection_dim: int | None = setting(
        None, min=1, help="Randomly project per-pair gradients to this many dimensions (a "
                          "small gradient index; scores become approximations).")

    def validate(self) -> None:
        unknown = sorted(set(self.scores) - set(ALL_SCORES))
        if unknown or not self.scores:
            raise InfluenceConfigError("scores", f"unknown scores {unknown}; choose from "
                                                 f"{', '.join(ALL_SCORES)}")
        if self.projection_dim is not None and self.curvature != "gauss_newton":
            raise InfluenceConfigError("projection_dim", "supports Gauss–Newton curvature "
                                       "only: the exact Hessian has no per-pair form to project")

    def needs_solve(self) -> bool:
        return bool(CURVATURE_SCORES & set(self.scores))
