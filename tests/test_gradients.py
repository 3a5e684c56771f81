"""Per-pair margin gradients: the batched hook path and the loop path against plain autograd.

Ground truth: every pair's two rows are run *alone*, with their padding stripped, and
``torch.autograd.grad`` of ``r(x, y_w) − r(x, y_l)`` gives ``∇m``. The batch under test mixes
very short and very long rows (padding), a prompt cut from the left and a response longer than
``max_length`` (truncation). Parameters are moved away from initialisation first: LoRA B is
zero when created, which would make every LoRA A gradient zero and hide bugs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed_model

from prefprune.errors import GradientError
from prefprune.influence.gradients import MarginGradientComputer
from prefprune.model import PairBatch, RewardModel

MAX_LENGTH = 24
LONG_PROMPT = " ".join(f"context{i} word" for i in range(40))
LONG_RESPONSE = " ".join(f"answer{i}" for i in range(60))
PROMPTS = ["hi", LONG_PROMPT, "what is the capital of france", "name a colour please", "why"]
CHOSEN = ["yes", "a short reply", "paris is the capital city of the french republic", "blue",
          LONG_RESPONSE]
REJECTED = [LONG_RESPONSE, "no", "lyon", "a number like seven or eight or nine", "because"]
RTOL = 1e-5


def make_model(backbone: Path, seed: int = 1, **config) -> RewardModel:
    return perturbed_model(backbone, seed=seed, max_length=MAX_LENGTH, **config)


def row_alone(batch: PairBatch, row: int) -> dict[str, torch.Tensor]:
    """One row of the batch with its padding removed (right padding: mask is a prefix)."""
    keep = batch.inputs["attention_mask"][row].bool()
    return {k: v[row][keep][None] for k, v in batch.inputs.items()}


def reference(model: RewardModel, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """Margins, margin gradients and loss gradients, one pair at a time, no padding."""
    params = [p for _, p in model.trainable_parameters()]
    margins, margin_grads, loss_grads = [], [], []
    for i in range(batch.size):
        r_w = model.model(**row_alone(batch, i)).logits.reshape(())
        r_l = model.model(**row_alone(batch, batch.size + i)).logits.reshape(())
        m = r_w - r_l
        grads = torch.autograd.grad(m, params, retain_graph=True)
        margin_grads.append(torch.cat([g.reshape(-1) for g in grads]))
        grads = torch.autograd.grad(F.softplus(-m), params)
        loss_grads.append(torch.cat([g.reshape(-1) for g in grads]))
        margins.append(m.detach())
    return torch.stack(margins), torch.stack(margin_grads), torch.stack(loss_grads)


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = float((a - e).norm() / e.norm())
        assert err <= rtol, f"row {i}: relative error {err:.2e}"


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def model_and_batch(request, tiny_backbones):
    model = make_model(tiny_backbones[request.param])
    model.model.eval()
    batch = model.encode_pairs(PROMPTS, CHOSEN, REJECTED)
    return model, batch


def test_batch_has_padding_and_truncation(model_and_batch):
    model, batch = model_and_batch
    lengths = batch.inputs["attention_mask"].sum(dim=1)
    assert batch.inputs["input_ids"].shape == (2 * len(PROMPTS), MAX_LENGTH)
    assert int(lengths.max()) == MAX_LENGTH and int(lengths.min()) <= MAX_LENGTH // 3
    assert model.encoding_stats.prompts_truncated >= 1
    assert model.encoding_stats.responses_truncated >= 2


@pytest.mark.parametrize("mode", ["hooks", "loop"])
def test_margin_gradients_match_autograd_per_pair(model_and_batch, mode):
    model, batch = model_and_batch
    margins, margin_grads, loss_grads = reference(model, batch)
    # every weight moves the margin (the head's bias cancels between the two responses)
    is_bias = torch.cat([torch.full((p.numel(),), n.endswith("bias"))
                         for n, p in model.trainable_parameters()])
    assert margin_grads[:, ~is_bias].abs().sum(dim=0).ne(0).all()
    pairs = MarginGradientComputer(model, mode)(batch)
    # B pairs give B rows, not 2B (one per response)
    assert pairs.margins.shape == (batch.size,)
    assert pairs.margin_grads.shape == (batch.size, model.num_trainable)
    torch.testing.assert_close(pairs.margins, margins, rtol=1e-5, atol=1e-6)
    assert_rows_close(pairs.margin_grads, margin_grads)
    # ∇ℓ = −σ(−m)∇m equals autograd of the BT loss, and ℓ = softplus(−m)
    assert_rows_close(pairs.loss_grads(), loss_grads)
    torch.testing.assert_close(pairs.losses, F.softplus(-margins), rtol=1e-5, atol=1e-6)


def test_hooks_equal_loop_on_a_larger_shuffled_batch(tiny_bert):
    model = make_model(tiny_bert, seed=3, lora_r=4)
    order = [4, 0, 3, 1, 2, 2, 0]
    batch = model.encode_pairs([PROMPTS[i] for i in order], [CHOSEN[i] for i in order],
                               [REJECTED[i] for i in order])
    hooks = MarginGradientComputer(model, "hooks")(batch)
    loop = MarginGradientComputer(model, "loop")(batch)
    assert hooks.margin_grads.shape == (len(order), model.num_trainable)
    assert_rows_close(hooks.margin_grads, loop.margin_grads)
    # the same pair twice in one batch gets the same gradient
    assert_rows_close(hooks.margin_grads[[4, 1]], hooks.margin_grads[[5, 6]])


def test_parameters_outside_linear_layers_need_loop_mode(tiny_bert):
    model = make_model(tiny_bert)
    norm = next(m for n, m in model.model.named_modules() if n.endswith("embeddings.LayerNorm"))
    norm.weight.requires_grad_(True)
    with pytest.raises(GradientError, match="outside linear layers"):
        MarginGradientComputer(model, "hooks")
    batch = model.encode_pairs(PROMPTS[:3], CHOSEN[:3], REJECTED[:3])
    _, margin_grads, _ = reference(model, batch)
    pairs = MarginGradientComputer(model, "loop")(batch)
    assert pairs.margin_grads.shape == (3, model.num_trainable)
    assert_rows_close(pairs.margin_grads, margin_grads)


def test_unknown_mode_is_rejected(tiny_bert):
    with pytest.raises(ValueError, match="hooks"):
        MarginGradientComputer(make_model(tiny_bert), "vmap")
