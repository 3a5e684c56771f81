"""Random projection of per-pair gradients: the map itself, and scores computed through it."""

from __future__ import annotations

import pytest
import torch
from helpers import pairs, tiny_scoring_model
from safetensors.torch import load_file
from scipy.stats import spearmanr

from prefprune.errors import InfluenceError
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.influence.projection import RandomProjection


def test_projection_is_seeded_and_needs_no_stored_matrix():
    rows = torch.randn(5, 20000, generator=torch.Generator().manual_seed(1))
    kept = RandomProjection(20000, 64, seed=3, keep_bytes=1e12)
    regenerated = RandomProjection(20000, 64, seed=3, keep_bytes=0)
    assert regenerated._blocks is None and len(kept.bounds) == 3
    assert torch.equal(kept(rows), regenerated(rows))
    assert not torch.equal(kept(rows), RandomProjection(20000, 64, seed=4, keep_bytes=0)(rows))


def test_projection_preserves_inner_products():
    """Johnson–Lindenstrauss: errors relative to ‖a‖‖b‖ shrink like 1/√d."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 3000, generator=generator)
    exact = rows @ rows.T
    norms = rows.norm(dim=1)
    errors = {}
    for dim in (64, 1024):
        projected = RandomProjection(3000, dim, seed=0, keep_bytes=1e12)(rows)
        errors[dim] = float(((projected @ projected.T - exact) / torch.outer(norms, norms))
                            .abs().max())
    assert errors[1024] < 0.2 < errors[64] and errors[1024] < errors[64] / 2.5


@pytest.fixture(scope="module")
def setup(tiny_bert):
    return tiny_scoring_model(tiny_bert), pairs(24, 1, "t"), pairs(8, 2, "v")


def test_projected_scores_rank_like_unprojected(setup):
    """Measured on this case (seeds 0 and 1): Spearman 0.76–0.97 at d = 32, 0.97–0.997 at
    d = 1024 (the map is random, not orthogonal, so even d > P only approximates)."""
    model, train, validation = setup
    scores = ("if", "grad_dot", "grad_cos", "self_influence")
    exact = compute_scores(model, train, validation, InfluenceConfig(scores=scores),
                           progress=False)
    rho = {}
    for dim in (32, 1024):
        projected = compute_scores(model, train, validation,
                                   InfluenceConfig(scores=scores, projection_dim=dim),
                                   progress=False)
        meta = projected.metadata
        assert meta["projection"] == {"kind": "rademacher", "dim": dim,
                                      "from": model.num_trainable, "seed": 0}
        assert meta["n_parameters"] == dim and meta["gradient_cache"]["bytes"] == 24 * dim * 4
        rho[dim] = {s: spearmanr(projected.table[s], exact.table[s]).statistic for s in scores}
    for score in scores:
        assert rho[32][score] > 0.5 and rho[1024][score] > 0.95, rho
        assert rho[1024][score] > rho[32][score], rho


def test_projected_shards_are_a_separate_index(setup, tmp_path):
    """Projected gradients are stored in shards of their own run key: never mixed with
    unprojected ones, and reused by a rerun."""
    model, train, validation = setup
    runs = [compute_scores(model, train, validation,
                           InfluenceConfig(scores=("grad_dot",), projection_dim=dim, shard_size=8),
                           work_dir=tmp_path, progress=False)
            for dim in (None, 16, 16)]
    assert [r.metadata["pairs_through_gradient_passes"] for r in runs] == [24, 24, 0]
    widths = {load_file(str(path))["margin_grads"].shape[1]
              for path in tmp_path.glob("*/grads-00000.safetensors")}
    assert widths == {model.num_trainable, 16}


def test_projection_rejects_what_it_cannot_do(setup):
    model, train, validation = setup
    with pytest.raises(InfluenceError, match="Gauss–Newton"):
        InfluenceConfig(projection_dim=8, curvature="hessian")
    with pytest.raises(InfluenceError, match="projection_dim: must be >= 1"):
        InfluenceConfig(projection_dim=0)
    with pytest.raises(InfluenceError, match="lower projection_dim"):
        compute_scores(model, train, validation,
                       InfluenceConfig(projection_dim=8, memory_budget_mb=0.0), progress=False)
