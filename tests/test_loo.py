"""Influence against real leave-one-out retraining, in a convex case where LOO is exact.

The tiny BERT reward model with its LoRA matrices frozen trains only the scalar head
(weight + bias over frozen pooled features φ), so the reward is linear in θ and the
Bradley–Terry loss is convex. θ* minimises ``(1/n) Σ ℓ_i + (λ/2)‖θ‖²`` (Newton's method, float64),
so the engine's damped Hessian ``H + λI`` at absolute damping λ is exactly this objective's
Hessian. For every training pair we refit with that pair removed from the sum (the ε = −1/n
perturbation the influence function linearises) and measure the true change of validation
loss; ``−if`` must predict it.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from prefprune.experiment.validation import (
    lds_subsets,
    linear_datamodeling_scores,
    predicted_changes,
)
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.model import RewardModel, RewardModelConfig

DAMPING = 1e-3  # about 0.4 × the mean eigenvalue of the data term's Hessian here
LORA_SCALE = 1.0
N_TRAIN, N_VAL = 60, 24
GOOD = ["clear", "accurate", "helpful", "kind", "precise", "honest", "useful", "calm"]
BAD = ["wrong", "rude", "vague", "false", "noisy", "lazy", "broken", "angry"]
NEUTRAL = ["apple", "river", "stone", "cloud", "table", "paper", "ocean", "music", "garden",
           "window", "seven", "later", "number", "silver", "orange", "mountain"]


def make_pairs(n: int, seed: int, prefix: str, flip_share: float) -> datasets.Dataset:
    """Random-word pairs; the chosen response leans on GOOD words, the rejected on BAD ones,
    with random lengths and mixes. A seeded share of labels is flipped (chosen ↔ rejected)."""
    rng = np.random.default_rng(seed)

    def response(lean: list[str]) -> str:
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(1, 6))))
        words += list(rng.choice(lean, size=int(rng.integers(0, 4))))
        words += list(rng.choice(GOOD + BAD, size=int(rng.integers(0, 2))))
        rng.shuffle(words)
        return " ".join(words)

    rows = {"id": [], "prompt": [], "chosen": [], "rejected": [], "flipped": []}
    for i in range(n):
        good, bad = response(GOOD), response(BAD)
        flipped = bool(rng.random() < flip_share)
        rows["id"].append(f"{prefix}{i}")
        rows["prompt"].append(" ".join(rng.choice(NEUTRAL, size=int(rng.integers(2, 12)))))
        rows["chosen"].append(bad if flipped else good)
        rows["rejected"].append(good if flipped else bad)
        rows["flipped"].append(flipped)
    return datasets.Dataset.from_dict(rows)


def head_only_model(backbone) -> tuple[RewardModel, torch.nn.Linear]:
    """The tiny BERT reward model with random (as if fine-tuned) LoRA weights, then frozen.

    At creation LoRA B is zero and the random tiny BERT's pooled features hardly depend on
    the text (feature differences ~1e-3); non-zero LoRA value/query updates make the pooled
    features a real function of the words, as after fine-tuning.
    """
    model = RewardModel.create(RewardModelConfig(backbone=str(backbone), max_length=32,
                                                 lora_layers=0), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.trainable_parameters():
            if "lora_" in name:
                param.copy_(LORA_SCALE * torch.randn(param.shape, generator=generator))
                param.requires_grad_(False)
    names = [name for name, _ in model.trainable_parameters()]
    assert names[0].endswith("modules_to_save.default.weight")
    assert all("modules_to_save" in n for n in names) and len(names) <= 2  # ± the head bias
    head = next(m for n, m in model.model.named_modules()
                if n.endswith("classifier.modules_to_save.default"))
    return model, head


@torch.no_grad()
def margin_features(model: RewardModel, head: torch.nn.Linear,
                    data: datasets.Dataset) -> torch.Tensor:
    """Rows ``φ(x, y_w) − φ(x, y_l)`` (plus a zero column when the head's bias is trainable:
    it cancels in the margin), in θ's order, so that the margin is ``θ · row``."""
    captured = []
    handle = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        batch = model.encode_pairs(data["prompt"], data["chosen"], data["rejected"])
        model.model.eval()
        rewards = model.rewards(batch)
    finally:
        handle.remove()
    (phi,) = captured
    phi = phi.double()
    # the hooked input really is what the head scores
    torch.testing.assert_close(phi @ head.weight.double()[0] + head.bias.double(),
                               rewards.double(), rtol=1e-5, atol=1e-5)
    diff = phi[: len(data)] - phi[len(data):]
    if head.bias is not None and head.bias.requires_grad:
        diff = torch.cat([diff, torch.zeros(len(data), 1, dtype=torch.float64)], dim=1)
    return diff


def fit(features: torch.Tensor, n: int, start: torch.Tensor) -> torch.Tensor:
    """Newton's method on ``(1/n) Σ_rows softplus(−θ·row) + (λ/2)‖θ‖²`` (rows may be n−1)."""
    theta = start.clone()
    eye = torch.eye(features.shape[1], dtype=torch.float64)
    for _ in range(50):
        m = features @ theta
        grad = -(torch.sigmoid(-m)[:, None] * features).sum(0) / n + DAMPING * theta
        weights = torch.sigmoid(m) * torch.sigmoid(-m)
        hess = features.T @ (weights[:, None] * features) / n + DAMPING * eye
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.norm()) < 1e-13:
            break
    m = features @ theta
    grad = -(torch.sigmoid(-m)[:, None] * features).sum(0) / n + DAMPING * theta
    assert float(grad.norm()) < 1e-12
    return theta


def val_loss(features: torch.Tensor, theta: torch.Tensor) -> float:
    return float(F.softplus(-(features @ theta)).mean())


class Experiment:
    def __init__(self, backbone) -> None:
        self.train = make_pairs(N_TRAIN, 0, "t", flip_share=0.2)
        self.validation = make_pairs(N_VAL, 1, "v", flip_share=0.0)
        self.model, head = head_only_model(backbone)
        # φ is the head's input: it does not depend on θ, so one read serves every refit
        self.x_train = margin_features(self.model, head, self.train)
        self.x_val = margin_features(self.model, head, self.validation)
        self.theta = fit(self.x_train, N_TRAIN, torch.zeros(self.x_train.shape[1],
                                                            dtype=torch.float64))
        with torch.no_grad():
            head.weight.copy_(self.theta[: head.in_features][None].float())
            if self.theta.numel() > head.in_features:
                head.bias.copy_(self.theta[head.in_features:].float())
        base = val_loss(self.x_val, self.theta)
        keep = torch.ones(N_TRAIN, dtype=torch.bool)
        self.actual = np.empty(N_TRAIN)
        for i in range(N_TRAIN):
            keep[i] = False
            theta_i = fit(self.x_train[keep], N_TRAIN, self.theta)
            keep[i] = True
            self.actual[i] = val_loss(self.x_val, theta_i) - base
        self.margins = (self.x_train @ self.theta).numpy()
        self.results = {solver: self._scores(solver) for solver in ("direct", "cg")}

    def _scores(self, solver: str):
        config = InfluenceConfig(scores=("if", "loss"), curvature="hessian", solver=solver,
                                 damping=DAMPING, damping_relative=False, tol=1e-7,
                                 score_batch_size=64)
        return compute_scores(self.model, self.train, self.validation, config, progress=False)


@pytest.fixture(scope="module")
def experiment(tiny_bert) -> Experiment:
    return Experiment(tiny_bert)


def test_data_is_varied(experiment):
    # influences can only be told apart if margins and LOO effects differ across pairs
    assert np.std(experiment.margins) > 0.1 * np.abs(experiment.margins).mean()
    assert (experiment.actual > 0).sum() >= 5 and (experiment.actual < 0).sum() >= 5
    assert sum(experiment.train["flipped"]) >= 5


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_influence_predicts_leave_one_out(experiment, solver):
    result = experiment.results[solver]
    solve = result.metadata["solves"]["validation"]
    assert solve["curvature"] == "hessian" and solve["converged"]
    assert result.metadata["damping"] == DAMPING
    predicted = -result.table["if"].to_numpy()  # Δ_i = −harm_i
    pearson = stats.pearsonr(predicted, experiment.actual).statistic
    spearman = stats.spearmanr(predicted, experiment.actual).statistic
    print(f"\n{solver}: LOO Pearson {pearson:.4f}, Spearman {spearman:.4f}, "
          f"|actual| mean {np.abs(experiment.actual).mean():.3g}")
    assert pearson >= 0.95
    assert spearman >= 0.9
    np.testing.assert_allclose(result.table["margin"], experiment.margins, rtol=1e-4, atol=1e-5)
    # and it is the closed form on the features: −(1/n) g_valᵀ (H + λI)⁻¹ g_i
    x, m = experiment.x_train, experiment.x_train @ experiment.theta
    g = -torch.sigmoid(-m)[:, None] * x
    m_val = experiment.x_val @ experiment.theta
    g_val = (-torch.sigmoid(-m_val)[:, None] * experiment.x_val).mean(0)
    hessian = x.T @ ((torch.sigmoid(m) * torch.sigmoid(-m))[:, None] * x) / N_TRAIN
    s = torch.linalg.solve(hessian + DAMPING * torch.eye(x.shape[1], dtype=x.dtype), g_val)
    exact = (-(g @ s) / N_TRAIN).numpy()
    assert np.abs(result.table["if"].to_numpy() - exact).max() <= 1e-4 * np.abs(exact).max()


def test_pairs_whose_removal_helps_most_are_ranked_harmful(experiment):
    table = experiment.results["direct"].table
    harm = table["if"].to_numpy()
    best = np.argsort(experiment.actual)[:5]  # removal lowers validation loss the most
    assert (experiment.actual[best] < 0).all()
    assert (harm[best] > 0).all()
    assert table["rank_if"].to_numpy()[best].max() <= 10
    assert table["rank_if"].to_numpy()[best[0]] <= 3
    # the sign is right wherever the effect is not negligible
    clear = np.abs(experiment.actual) > 0.1 * np.abs(experiment.actual).max()
    assert (np.sign(harm[clear]) == -np.sign(experiment.actual[clear])).all()
    # group effects agree too: the flipped pairs' mean predicted change has the same sign as
    # their mean actual change (whether flips hurt here is up to these random features)
    flipped = np.array(experiment.train["flipped"])
    assert np.sign(-harm[flipped].mean()) == np.sign(experiment.actual[flipped].mean())
    assert np.sign(-harm[~flipped].mean()) == np.sign(experiment.actual[~flipped].mean())


def test_linear_datamodeling_score_is_high_for_influence_and_flat_for_random(experiment):
    """The LDS of ``prefprune validate`` on the convex case, with exact retraining: remove
    half of the pairs (30 seeded subsets), refit, and correlate each validation pair's actual
    loss change with IF's prediction (the sum of the removed pairs' −harm)."""
    targets = {f"v{k}": experiment.validation.select([k]) for k in range(N_VAL)}
    config = InfluenceConfig(scores=("if", "random"), curvature="hessian", solver="direct",
                             damping=DAMPING, damping_relative=False, score_batch_size=64)
    table = compute_scores(experiment.model, experiment.train, targets, config,
                           progress=False).table
    kept = lds_subsets(N_TRAIN, 30, 0.5, seed=0)
    base = [val_loss(experiment.x_val[[k]], experiment.theta) for k in range(N_VAL)]
    actual = np.array([[val_loss(experiment.x_val[[k]], theta) - base[k] for k in range(N_VAL)]
                       for theta in (fit(experiment.x_train[rows], N_TRAIN, experiment.theta)
                                     for rows in kept)])
    lds = linear_datamodeling_scores({
        "if": predicted_changes(table[[f"if@v{k}" for k in range(N_VAL)]].to_numpy(), kept),
        "random": predicted_changes(np.repeat(table["random"].to_numpy()[:, None], N_VAL,
                                              axis=1), kept)}, actual)
    influence, random = lds["if"], lds["random"]
    print(f"\nLDS: IF {influence['mean']:.3f} {influence['ci95']}, random "
          f"{random['mean']:.3f} {random['ci95']}")
    assert influence["mean"] >= 0.9 and influence["ci95"][0] >= 0.85
    assert abs(random["mean"]) <= 0.2 and random["ci95"][0] <= 0 <= random["ci95"][1]
    assert influence["vs_random"]["ci95"][0] > 0
