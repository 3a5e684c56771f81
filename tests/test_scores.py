"""The scoring engine against dense ground truth built independently of the library.

Ground truth: ``torch.func.functional_call`` over a flat θ gives the Jacobian of all training
margins J (so ``g_i = −σ(−m_i) J_i``, ``G = Jᵀ diag(σ(m)σ(−m)) J / n``), the exact Hessian of
the mean training loss, and ``g_val`` as the autograd gradient of the mean validation loss.
Every score is then a dense float64 formula from docs/method.md, section 2 (sign: larger =
more harmful). The model is a tiny BERT with rank-1 LoRA on the query projections (161
parameters), moved far from initialisation so that margins, and the Hessian's negative
eigenvalues, are real.
"""

from __future__ import annotations

import json
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import pairs, tiny_scoring_model
from torch.func import functional_call

from prefprune.errors import InfluenceError, NegativeCurvatureError
from prefprune.influence import InfluenceConfig, ScoreResult, compute_scores
from prefprune.influence.config import DEFAULT_DAMPING, ENGINE_SCORES
from prefprune.influence.curvature import CachedGaussNewton
from prefprune.influence.dual import dual_quadratic, dual_solve
from prefprune.model import RewardModel, RewardModelConfig, gauss_newton_weights

N_TRAIN, N_VAL = 16, 8
TARGET_SCORES = ("if", "flip", "grad_dot", "grad_cos")


class Truth:
    """Dense float64 ground truth for one model, training set and validation set."""

    def __init__(self, model: RewardModel, train: datasets.Dataset,
                 validation: datasets.Dataset) -> None:
        named = model.trainable_parameters()
        self.model = model
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.n, self.dim = len(train), self.theta.numel()
        train_batch = model.encode_pairs(train["prompt"], train["chosen"], train["rejected"])
        val_batch = model.encode_pairs(validation["prompt"], validation["chosen"],
                                       validation["rejected"])
        self.margins = self._margins(self.theta, train_batch).detach().double()
        self.jacobian = torch.autograd.functional.jacobian(
            lambda t: self._margins(t, train_batch), self.theta, vectorize=True).double()
        theta = self.theta.clone().requires_grad_(True)
        val_loss = F.softplus(-self._margins(theta, val_batch)).mean()
        self.g_val = torch.autograd.grad(val_loss, theta)[0].double()
        self.val_loss = float(val_loss.detach())
        self.g = -torch.sigmoid(-self.margins)[:, None] * self.jacobian  # ∇ℓ_i
        self.g_flipped = torch.sigmoid(self.margins)[:, None] * self.jacobian  # ∇softplus(m_i)
        weights = gauss_newton_weights(self.margins)
        self.ggn = self.jacobian.T @ (weights[:, None] * self.jacobian) / self.n
        self._train_batch = train_batch
        self._hessian: torch.Tensor | None = None

    def _margins(self, theta: torch.Tensor, batch) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            params[name] = theta[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
        rewards = functional_call(self.model.model, params, kwargs=batch.inputs).logits[:, 0]
        return rewards[: batch.size] - rewards[batch.size:]

    @property
    def hessian(self) -> torch.Tensor:
        if self._hessian is None:
            self._hessian = torch.autograd.functional.hessian(
                lambda t: F.softplus(-self._margins(t, self._train_batch)).mean(), self.theta,
                vectorize=True).double()
        return self._hessian

    def relative_damping(self, factor: float) -> float:
        return factor * float(self.ggn.trace()) / min(N_TRAIN, self.dim)  # trace / rank

    def validation_gradient(self, validation: datasets.Dataset) -> torch.Tensor:
        batch = self.model.encode_pairs(validation["prompt"], validation["chosen"],
                                        validation["rejected"])
        theta = self.theta.clone().requires_grad_(True)
        loss = F.softplus(-self._margins(theta, batch)).mean()
        return torch.autograd.grad(loss, theta)[0].double()

    def scores(self, damping: float, curvature: torch.Tensor | None = None,
               g_val: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, Any]]:
        """Each score's exact value and the scale its float32 rounding error is measured in.

        Inner products ``aᵀb`` are computed by the engine in float32, so their error is bounded
        by ``‖a‖‖b‖`` times the precision, not by ``|aᵀb|`` (which can cancel to near zero):
        they are compared in those units (for ``grad_cos``: an absolute error in the cosine).
        Positive quantities (self-influence, loss) are compared relative to their size.
        """
        g_val = self.g_val if g_val is None else g_val
        eye = torch.eye(self.dim, dtype=torch.float64)
        matrix = (self.ggn if curvature is None else curvature) + damping * eye
        s = torch.linalg.solve(matrix, g_val)
        g_damped_ggn = torch.linalg.solve(self.ggn + damping * eye, self.g.T)
        dots = self.g @ g_val
        jn, gn = self.jacobian.norm(dim=1), self.g.norm(dim=1)
        return {
            "if": (-(self.g @ s) / self.n, gn * s.norm() / self.n),
            "flip": (-((self.g - self.g_flipped) @ s) / self.n, jn * s.norm() / self.n),
            "grad_dot": (-dots, gn * g_val.norm()),
            "grad_cos": (-dots / (gn * g_val.norm()), torch.ones(self.n)),
            "self_influence": ((self.g * g_damped_ggn.T).sum(dim=1), None),
            "loss": (F.softplus(-self.margins), None),
        }


def close(actual, expected, rtol: float, scale=None) -> None:
    """``max_i |a_i − e_i| / scale_i ≤ rtol``; without a scale, ``‖a − e‖ / ‖e‖ ≤ rtol``."""
    actual = torch.tensor(np.asarray(actual, dtype=np.float64))
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if scale is None:
        err = float((actual - expected).norm() / expected.norm())
    else:
        err = float(((actual - expected).abs() / scale).max())
    assert err <= rtol, f"error {err:.2e} > {rtol:g}"


def close_score(actual, truth: tuple[torch.Tensor, Any], rtol: float) -> None:
    close(actual, truth[0], rtol, truth[1])


@pytest.fixture(scope="module")
def data():
    return pairs(N_TRAIN, 1, "t"), pairs(N_VAL, 2, "v")


@pytest.fixture(scope="module")
def model(tiny_bert):
    return tiny_scoring_model(tiny_bert)


@pytest.fixture(scope="module")
def truth(model, data):
    return Truth(model, *data)


def run(model, data, progress: bool = False, **config) -> ScoreResult:
    train, validation = data
    return compute_scores(model, train, validation, InfluenceConfig(**config), progress=progress)


@pytest.fixture(scope="module")
def default_run(model, data) -> ScoreResult:
    return run(model, data, score_batch_size=5)


# --- table and sidecar ----------------------------------------------------------------------


def test_table_layout(default_run, data):
    train, _ = data
    table = default_run.table
    assert len(table) == N_TRAIN
    assert table["id"].tolist() == train["id"]
    for score in ENGINE_SCORES:
        values = table[score].to_numpy()
        assert np.isfinite(values).all()
        ranks = table[f"rank_{score}"].to_numpy()
        assert sorted(ranks) == list(range(1, N_TRAIN + 1))
        assert ranks[np.argmax(values)] == 1 and ranks[np.argmin(values)] == N_TRAIN
        assert (np.diff(values[np.argsort(ranks)]) <= 0).all()  # rank order = harm order
    assert table["worker"].tolist() == train["worker"]
    assert table["confidence"].tolist() == train["confidence"]
    assert not {"prompt", "chosen", "rejected"} & set(table.columns)


def test_sidecar_records_the_run(default_run, truth):
    meta = default_run.metadata
    assert meta["damping"] == pytest.approx(truth.relative_damping(DEFAULT_DAMPING), rel=1e-5)
    solve = meta["solves"]["validation"]
    assert solve["method"] == "cg" and solve["converged"] and solve["curvature"] == "gauss_newton"
    assert solve["iterations"] >= 1 and len(solve["residuals"]) == solve["iterations"]
    assert solve["final_residual"] <= 1e-5
    assert len(meta["model_fingerprint"]) == 16 and meta["data_fingerprint"]
    assert set(meta["validation_fingerprints"]) == {"validation"}
    assert {"validation_gradients", "gradient_pass", "solve", "scoring_pass",
            "self_influence"} <= set(meta["timings_seconds"])
    assert meta["n_train"] == N_TRAIN and meta["n_parameters"] == truth.dim
    assert meta["validation_loss"]["validation"] == pytest.approx(truth.val_loss, rel=1e-5)
    json.dumps(meta, default=str)


def test_default_run_equals_dense_ground_truth(default_run, truth):
    expected = truth.scores(default_run.metadata["damping"])
    for name, value in expected.items():
        # CG stops at a 1e-5 residual: the solve-dependent scores carry that error
        close_score(default_run.table[name], value, 1e-3 if name in ("if", "flip") else 1e-5)


def test_direct_dual_solve_equals_dense_ground_truth(model, data, truth):
    result = run(model, data, solver="direct", damping=3e-2)
    expected = truth.scores(truth.relative_damping(3e-2))
    for name, value in expected.items():
        close_score(result.table[name], value, 1e-5)
    assert result.metadata["solves"]["validation"]["method"] == "direct"


def test_solvers_agree(model, data, truth):
    # λ = the mean GGN eigenvalue keeps λ_max/λ small enough for LiSSA's series to converge
    # within its depth; 1e-6 is about the float32 floor of its residual
    results = {solver: run(model, data, solver=solver, scores=("if", "flip"), damping=1.0,
                           tol=1e-6, lissa_depth=3000)
               for solver in ("cg", "lissa", "direct")}
    for solver, result in results.items():
        solve = result.metadata["solves"]["validation"]
        assert solve["method"] == solver and solve["converged"], solve["message"]
    expected = truth.scores(truth.relative_damping(1.0))
    for result in results.values():
        for name in ("if", "flip"):
            close_score(result.table[name], expected[name], 1e-4)
    for solver in ("cg", "lissa"):
        close(results[solver].table["if"], results["direct"].table["if"], 1e-3)


def test_dual_solve_and_quadratic_equal_dense_solves(truth):
    damping = truth.relative_damping(1e-2)
    operator = CachedGaussNewton(truth.margins.float(), truth.jacobian.float())
    dense = truth.ggn + damping * torch.eye(truth.dim, dtype=torch.float64)
    result = dual_solve(operator, truth.g_val.float(), damping)
    close(result.solution, torch.linalg.solve(dense, truth.g_val), 1e-5)
    # the recorded residual is measured with a float32 product: ~‖G‖‖x‖·eps, not 0
    assert result.residuals[0] < 1e-4
    quad = dual_quadratic(gauss_newton_weights(truth.margins.float()), truth.jacobian.float(),
                           damping)
    expected = (truth.jacobian * torch.linalg.solve(dense, truth.jacobian.T).T).sum(dim=1)
    close(quad, expected, 1e-5)


def test_gradient_similarity_from_loop_gradients(model, data, truth):
    result = run(model, data, scores=("grad_dot", "grad_cos", "loss"), gradient_mode="loop")
    expected = truth.scores(1.0)
    for name in ("grad_dot", "grad_cos", "loss"):
        close_score(result.table[name], expected[name], 1e-5)
    assert "solves" not in result.metadata and "if" not in result.table


def test_cached_and_streaming_agree(model, data, truth, default_run):
    scores = ("if", "flip", "grad_dot", "grad_cos", "loss", "random")
    cached = run(model, data, scores=scores, score_batch_size=5, memory_budget_mb=1e6, tol=1e-7)
    streamed = run(model, data, scores=scores, score_batch_size=5, memory_budget_mb=0, tol=1e-7)
    assert cached.metadata["gradient_cache"]["fits"]
    assert not streamed.metadata["gradient_cache"]["fits"]
    assert streamed.metadata["damping"] == pytest.approx(cached.metadata["damping"], rel=1e-6)
    expected = truth.scores(cached.metadata["damping"])
    for name in scores:
        scale = expected[name][1] if name in expected else None
        close(streamed.table[name], cached.table[name], 1e-5, scale)
    np.testing.assert_array_equal(cached.table["random"], default_run.table["random"])


def test_several_validation_targets(model, data, truth):
    train, validation = data
    targets = {"first": validation.select(range(4)), "second": validation.select(range(4, 8))}
    config = InfluenceConfig(scores=("if", "flip", "grad_dot", "grad_cos", "loss"),
                             solver="direct")
    both = compute_scores(model, train, targets, config, progress=False)
    for name, target in targets.items():
        alone = compute_scores(model, train, target, config, progress=False)
        expected = truth.scores(both.metadata["damping"],
                                g_val=truth.validation_gradient(target))
        for score in TARGET_SCORES:
            column = f"{score}@{name}"
            close(both.table[column], alone.table[score], 1e-6, expected[score][1])
            close_score(both.table[column], expected[score], 1e-5)
            ranks = both.table[f"rank_{column}"].to_numpy()
            assert ranks[np.argmax(both.table[column].to_numpy())] == 1
    assert "loss" in both.table and "loss@first" not in both.table
    assert set(both.metadata["solves"]) == set(targets)
    assert set(both.metadata["validation_loss"]) == set(targets)


# --- exact Hessian ----------------------------------------------------------------------


def test_hessian_is_indefinite_here(truth):
    eigenvalues = torch.linalg.eigvalsh(truth.hessian)
    assert eigenvalues[0] < 0 < eigenvalues[-1]
    assert float((truth.hessian - truth.ggn).norm() / truth.hessian.norm()) > 0.05


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_exact_hessian_solve_equals_dense_solve(model, data, truth, solver):
    lowest = float(torch.linalg.eigvalsh(truth.hessian)[0])
    damping = -2 * lowest + truth.relative_damping(1e-2)  # H + λI positive definite
    result = run(model, data, scores=("if", "flip"), curvature="hessian", solver=solver,
                 damping=damping, damping_relative=False, tol=1e-7)
    expected = truth.scores(damping, curvature=truth.hessian)
    for name in ("if", "flip"):
        close_score(result.table[name], expected[name], 1e-4)
    solve = result.metadata["solves"]["validation"]
    assert solve["curvature"] == "hessian" and not solve["negative_curvature"]
    # the Hessian answer really differs from the Gauss–Newton one
    ggn = truth.scores(damping)["if"][0]
    assert float((ggn - expected["if"][0]).norm() / expected["if"][0].norm()) > 1e-2


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_negative_curvature_falls_back_to_gauss_newton(model, data, truth, solver):
    lowest = float(torch.linalg.eigvalsh(truth.hessian)[0])
    damping = -0.1 * lowest  # H + λI keeps negative eigenvalues
    result = run(model, data, scores=("if",), curvature="hessian", solver=solver,
                 damping=damping, damping_relative=False, tol=1e-7)
    solve = result.metadata["solves"]["validation"]
    assert solve["curvature"] == "gauss_newton (fallback)"
    assert "negative curvature" in solve["message"]
    close_score(result.table["if"], truth.scores(damping)["if"], 1e-4)


def test_negative_curvature_can_raise(model, data, truth):
    damping = -0.1 * float(torch.linalg.eigvalsh(truth.hessian)[0])
    with pytest.raises(NegativeCurvatureError, match="negative curvature"):
        run(model, data, scores=("if",), curvature="hessian", solver="cg", damping=damping,
            damping_relative=False, negative_curvature="raise")


# --- resume and saving ----------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1e6, 0.0])
def test_resume_recomputes_only_missing_shards(model, data, tmp_path, budget):
    train, validation = data
    scores = ("if", "flip", "grad_dot", "loss") if budget == 0 else ENGINE_SCORES
    config = InfluenceConfig(scores=scores, shard_size=5, score_batch_size=3,
                             memory_budget_mb=budget)
    first = compute_scores(model, train, validation, config, work_dir=tmp_path, progress=False)
    passes = 1 if budget else 2  # streaming adds a scoring pass
    assert first.metadata["pairs_through_gradient_passes"] == passes * N_TRAIN
    (shard,) = tmp_path.glob("*/grads-00001.safetensors")
    shard.unlink()
    again = compute_scores(model, train, validation, config, work_dir=tmp_path, progress=False)
    assert again.metadata["pairs_through_gradient_passes"] == 5
    for score in scores:
        np.testing.assert_allclose(again.table[score], first.table[score], rtol=1e-6)
    third = compute_scores(model, train, validation, config, work_dir=tmp_path, progress=False)
    assert third.metadata.get("pairs_through_gradient_passes", 0) == 0
    pd.testing.assert_frame_equal(third.table, again.table)


def test_save_round_trips(default_run, tmp_path):
    parquet, sidecar = default_run.save(tmp_path / "out" / "scores.parquet")
    assert parquet.is_file() and sidecar == tmp_path / "out" / "scores.json"
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), default_run.table)
    assert json.loads(sidecar.read_text()) == json.loads(
        json.dumps(default_run.metadata, default=str))


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scores": ("if", "shapley")}, "unknown scores"),
    ({"scores": ()}, "unknown scores"),
    ({"curvature": "fisher"}, "curvature: must be one of"),
    ({"solver": "gmres"}, "solver: must be one of"),
    ({"negative_curvature": "ignore"}, "negative_curvature: must be one of"),
    ({"damping": -1.0}, "damping: must be >= 0"),
    ({"score_batch_size": 0}, "score_batch_size: must be >= 1"),
    ({"shard_size": 0}, "shard_size: must be >= 1"),
    ({"tol": 0.0}, "tol: must be > 0"),
    ({"max_iter": "many"}, "max_iter: must be an integer"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(InfluenceError, match=message):
        InfluenceConfig(**kwargs)


def test_bad_inputs_raise(model, data, tiny_bert):
    train, validation = data
    with pytest.raises(InfluenceError, match="empty"):
        compute_scores(model, train, validation.select([]), progress=False)
    with pytest.raises(InfluenceError, match="training set is empty"):
        compute_scores(model, train.select([]), validation, progress=False)
    with pytest.raises(InfluenceError, match="memory_budget_mb"):
        run(model, data, scores=("self_influence",), memory_budget_mb=0)
    big = RewardModel.create(RewardModelConfig(backbone=str(tiny_bert), max_length=16,
                                               lora_r=32, lora_layers=0))
    assert big.num_trainable > 6000
    with pytest.raises(InfluenceError, match="solver='cg'"):
        compute_scores(big, train.select(range(2)), validation.select(range(2)),
                       InfluenceConfig(scores=("if",), curvature="hessian", solver="direct"),
                       progress=False)


def test_bad_gradient_mode_raises_influence_error():
    with pytest.raises(InfluenceError, match="gradient_mode"):
        InfluenceConfig(gradient_mode="vmap")


def test_negative_curvature_raise_also_stops_the_direct_solver(model, data, truth):
    damping = -0.1 * float(torch.linalg.eigvalsh(truth.hessian)[0])
    with pytest.raises((InfluenceError, NegativeCurvatureError), match="positive definite"):
        run(model, data, scores=("if",), curvature="hessian", solver="direct", damping=damping,
            damping_relative=False, negative_curvature="raise")
