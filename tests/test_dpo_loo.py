"""DPO influence against real leave-one-out retraining, on a case where refitting reaches the
optimum (issue 21, check c).

The policy is the tiny SmolLM2-shaped Llama whose only trainable parameter is the B vector of
a rank-1 LoRA on its LM head (A frozen): the logits are ``z_t + c·s_t·B`` with ``z_t = W h_t``
and ``s_t = A h_t`` fixed, so each log-probability is a concave function of B and the DPO
objective ``(1/n) Σ −log σ(m_i(B)) + (λ/2)‖B‖²`` is smooth, with a unique optimum that
Newton's method (float64, exact Hessian) reaches from the full-data optimum for every
leave-one-out and subset refit. The engine's damped exact Hessian ``H + λI`` at absolute
damping λ is this objective's Hessian, so ``−if`` must predict the actual change of the
validation DPO loss.
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
from prefprune.model import DPOPolicy, RewardModel, RewardModelConfig

BETA = 0.5
DAMPING = 2e-3
N_TRAIN, N_VAL = 40, 16
WORDS = ["bread", "river", "kind", "stone", "honest", "cloud", "quick", "paper", "calm",
         "music", "rude", "garden", "window", "vague", "orange", "silver"]


def make_pairs(n: int, seed: int, prefix: str) -> datasets.Dataset:
    rng = np.random.default_rng(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))

    return datasets.Dataset.from_dict({
        "id": [f"{prefix}{i}" for i in range(n)],
        "prompt": [text(2, 6) + ":" for _ in range(n)],
        "chosen": [" " + text(1, 5) for _ in range(n)],
        "rejected": [" " + text(1, 5) for _ in range(n)]})


def head_only_policy(backbone) -> tuple[DPOPolicy, torch.nn.Module, torch.Tensor]:
    """The policy, its LoRA module on the LM head, and the scale c of its B vector."""
    model = RewardModel.create(RewardModelConfig(
        backbone=str(backbone), objective="dpo", beta=BETA, max_length=64, lora_layers=0,
        lora_r=1, lora_alpha=1, target_modules=("lm_head",), feature_cache=None), seed=0)
    model.model.double()
    lora = next(m for n, m in model.model.named_modules() if n.endswith("lm_head"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(torch.randn(lora.lora_A["default"].weight.shape,
                                                        generator=generator))
    lora.lora_A["default"].weight.requires_grad_(False)
    (name, _), = model.trainable_parameters()
    assert name.endswith("lora_B.default.weight")
    return model, lora, torch.tensor(lora.scaling["default"], dtype=torch.float64)


@torch.no_grad()
def token_features(model: DPOPolicy, lora, data: datasets.Dataset):
    """Per response token: its row, the frozen logits ``z`` and ``s = A h`` (what the LM head
    sees does not depend on B), and the token."""
    batch = model.encoder(data["prompt"], data["chosen"], data["rejected"])
    lm = model.model.get_base_model()
    hidden = getattr(lm, lm.base_model_prefix)(**batch.inputs).last_hidden_state
    rows, positions = batch.completion_mask[:, 1:].nonzero(as_tuple=True)
    h = hidden[rows, positions]
    z = h @ lora.base_layer.weight.T
    s = h @ lora.lora_A["default"].weight[0]
    return rows, z, s, batch.inputs["input_ids"][rows, positions + 1], 2 * len(data)


def row_terms(features, b: torch.Tensor, scale: torch.Tensor):
    """Per row ``log π(y|x) − log π_ref(y|x)`` at B = ``b``, its gradient in B, and what the
    Hessian needs per token (the softmax and the weight ``c²s²``)."""
    rows, z, s, targets, n_rows = features
    logits = z + scale * s[:, None] * b[None, :]
    probs = torch.softmax(logits, dim=1)
    token = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=1)
    reference = z.gather(1, targets[:, None])[:, 0] - torch.logsumexp(z, dim=1)
    ratio = torch.zeros(n_rows, dtype=b.dtype).index_add(0, rows, token - reference)
    onehot = F.one_hot(targets, b.numel()).to(b.dtype)
    grads = torch.zeros(n_rows, b.numel(), dtype=b.dtype).index_add(
        0, rows, scale * s[:, None] * (onehot - probs))
    return ratio, grads, probs, (scale * s) ** 2


def margins(features, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DPO margins of every pair at B = ``b`` (reference: B = 0)."""
    ratio = row_terms(features, b, scale)[0]
    half = len(ratio) // 2
    return BETA * (ratio[:half] - ratio[half:])


def derivatives(features, b, scale, weights):
    """Objective ``(1/n) Σ w_i softplus(−m_i) + (λ/2)‖b‖²``, its gradient and exact Hessian:
    ``∇²ℓ_i = σ(m)σ(−m)∇m∇mᵀ − σ(−m)∇²m``, with ``∇²log π = −Σ_t c²s_t²(diag p_t − p_t p_tᵀ)``."""
    ratio, grads, probs, weight = row_terms(features, b, scale)
    half = len(ratio) // 2
    m = BETA * (ratio[:half] - ratio[half:])
    dm = BETA * (grads[:half] - grads[half:])
    slope = -torch.sigmoid(-m) * weights / N_TRAIN  # dJ/dm_i
    value = (weights * F.softplus(-m)).sum() / N_TRAIN + DAMPING / 2 * b.dot(b)
    gradient = dm.T @ slope + DAMPING * b
    curvature = torch.sigmoid(m) * torch.sigmoid(-m) * weights / N_TRAIN
    hessian = dm.T @ (curvature[:, None] * dm)
    rows = features[0]
    side = torch.where(rows < half, 1.0, -1.0).to(b.dtype)
    a = -slope[rows % half] * BETA * side * weight  # the −σ(−m)∇²m term, per token
    hessian += torch.diag(probs.T @ a) - probs.T @ (a[:, None] * probs)
    return value, gradient, hessian + DAMPING * torch.eye(b.numel(), dtype=b.dtype)


def fit(features, scale, start: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Newton's method with pair ``i`` weighted by ``weights[i]`` (0: left out), to a gradient
    norm below 1e-11; where the Hessian is not positive definite (far from the optimum, the
    objective need not be convex) it is shifted until it is, and steps backtrack."""
    b = start.clone()
    eye = torch.eye(b.numel(), dtype=b.dtype)
    for _ in range(100):
        value, grad, hess = derivatives(features, b, scale, weights)
        if float(grad.norm()) < 1e-11:
            return b
        lowest = float(torch.linalg.eigvalsh(hess)[0])
        step = torch.linalg.solve(hess + max(0.0, 1e-3 - lowest) * eye, grad)
        rate = 1.0
        while derivatives(features, b - rate * step, scale, weights)[0] > value and rate > 1e-6:
            rate /= 2
        b = b - rate * step
    raise AssertionError(f"Newton did not converge (gradient norm {float(grad.norm()):.2e})")


def val_losses(features, b, scale) -> torch.Tensor:
    return F.softplus(-margins(features, b, scale))


class Case:
    def __init__(self, backbone) -> None:
        self.train, self.validation = make_pairs(N_TRAIN, 0, "t"), make_pairs(N_VAL, 1, "v")
        self.model, lora, self.scale = head_only_policy(backbone)
        self.x_train = token_features(self.model, lora, self.train)
        self.x_val = token_features(self.model, lora, self.validation)
        ones = torch.ones(N_TRAIN, dtype=torch.float64)
        self.b = fit(self.x_train, self.scale, torch.zeros(lora.base_layer.out_features,
                                                           dtype=torch.float64), ones)
        with torch.no_grad():
            lora.lora_B["default"].weight.copy_(self.b[:, None])
        self.base = val_losses(self.x_val, self.b, self.scale)
        self.actual = np.array([
            float(val_losses(self.x_val, fit(self.x_train, self.scale, self.b,
                                             ones.index_fill(0, torch.tensor([i]), 0.0)),
                             self.scale).mean() - self.base.mean())
            for i in range(N_TRAIN)])


@pytest.fixture(scope="module")
def case(tiny_chat_llama) -> Case:
    return Case(tiny_chat_llama)


def test_influence_predicts_leave_one_out_of_the_dpo_loss(case):
    config = InfluenceConfig(scores=("if",), curvature="hessian", solver="cg", tol=1e-8,
                             max_iter=1000, damping=DAMPING, damping_relative=False,
                             score_batch_size=64)
    result = compute_scores(case.model, case.train, case.validation, config, progress=False)
    np.testing.assert_allclose(result.table["margin"],
                               margins(case.x_train, case.b, case.scale).numpy(),
                               rtol=1e-6, atol=1e-8)
    assert (case.actual > 0).sum() >= 5 and (case.actual < 0).sum() >= 5
    predicted = -result.table["if"].to_numpy()
    pearson = stats.pearsonr(predicted, case.actual).statistic
    print(f"\nDPO leave-one-out: Pearson {pearson:.4f}, Spearman "
          f"{stats.spearmanr(predicted, case.actual).statistic:.4f}")
    assert pearson >= 0.9


def test_the_linear_datamodeling_score_of_dpo_influence_beats_random(case):
    """``validate``'s LDS: refit on 20 random halves and correlate each validation pair's
    actual loss change with IF's prediction, here with IF's default Gauss–Newton curvature
    (solved exactly in the dual), as a user would run it."""
    targets = {f"v{k}": case.validation.select([k]) for k in range(N_VAL)}
    config = InfluenceConfig(scores=("if", "random"), solver="direct", damping=DAMPING,
                             damping_relative=False, score_batch_size=64)
    table = compute_scores(case.model, case.train, targets, config, progress=False).table
    kept = lds_subsets(N_TRAIN, 20, 0.5, seed=0)
    actual = []
    for rows in kept:
        weights = torch.zeros(N_TRAIN, dtype=torch.float64).index_fill(
            0, torch.as_tensor(rows), 1.0)
        refit = fit(case.x_train, case.scale, case.b, weights)
        actual.append((val_losses(case.x_val, refit, case.scale) - case.base).numpy())
    lds = linear_datamodeling_scores({
        "if": predicted_changes(table[[f"if@v{k}" for k in range(N_VAL)]].to_numpy(), kept),
        "random": predicted_changes(np.repeat(table["random"].to_numpy()[:, None], N_VAL,
                                              axis=1), kept)}, np.array(actual))
    print(f"\nDPO LDS: IF {lds['if']['mean']:.3f} {lds['if']['ci95']}, random "
          f"{lds['random']['mean']:.3f} {lds['random']['ci95']}")
    assert lds["if"]["ci95"][0] > lds["random"]["ci95"][1]
