"""Training and evaluation: learning happens, runs repeat exactly, accumulation is a batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prefprune.model import RewardModel, RewardModelConfig
from prefprune.training import TrainConfig, epoch_order, evaluate, train_reward_model

FAST = TrainConfig(epochs=6, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0)


def trained(backbone: Path, pairs, config: TrainConfig) -> tuple[RewardModel, object]:
    model = RewardModel.create(RewardModelConfig(backbone=str(backbone)), seed=config.seed)
    return model, train_reward_model(model, pairs, config, progress=False)


def margins_of(model: RewardModel, pairs) -> torch.Tensor:
    with torch.no_grad():
        return model.margins(model.encode_pairs(pairs["prompt"], pairs["chosen"],
                                                pairs["rejected"])).double()


def test_training_lowers_the_loss_and_learns(tiny_bert, toy_pairs):
    model, result = trained(tiny_bert, toy_pairs, FAST)
    assert len(result.epoch_losses) == FAST.epochs
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.steps == FAST.epochs * 3 and result.pairs == len(toy_pairs)
    assert result.tokens > 0 and result.tokens_per_second > 0
    assert evaluate(model, toy_pairs, progress=False).accuracy > 0.75


def test_same_seed_gives_bit_identical_parameters(tiny_bert, toy_pairs):
    config = TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2)
    first, second = (trained(tiny_bert, toy_pairs, config)[0].trainable_state()
                     for _ in range(2))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_gradient_accumulation_matches_a_larger_batch(still_bert, toy_pairs):
    pairs = toy_pairs.select(range(8))
    big, big_result = trained(still_bert, pairs, TrainConfig(epochs=2, batch_size=8))
    small, small_result = trained(still_bert, pairs,
                                  TrainConfig(epochs=2, batch_size=4, grad_accum_steps=2))
    assert big_result.steps == small_result.steps == 2
    big_state, small_state = big.trainable_state(), small.trainable_state()
    # The head bias cancels in every margin: its true gradient is zero and Adam turns the
    # rounding noise left in it into arbitrary lr-sized steps, so only the other tensors compare.
    for name in (n for n in big_state if not n.endswith("modules_to_save.default.bias")):
        torch.testing.assert_close(small_state[name], big_state[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(margins_of(small, pairs), margins_of(big, pairs), rtol=0, atol=1e-5)


def test_evaluate_matches_a_hand_computation(tiny_bert, toy_pairs):
    model, _ = trained(tiny_bert, toy_pairs, TrainConfig(epochs=1, batch_size=4))
    margins = margins_of(model, toy_pairs)
    result = evaluate(model, toy_pairs, batch_size=5, progress=False)
    torch.testing.assert_close(torch.tensor(result.margins, dtype=torch.float64), margins,
                               rtol=0, atol=1e-5)
    assert result.pairs == len(toy_pairs)
    assert result.accuracy == pytest.approx(float((margins > 0).double().mean()))
    assert result.loss == pytest.approx(float(F.softplus(-margins).mean()), abs=1e-6)
    assert result.margin_mean == pytest.approx(float(margins.mean()), abs=1e-6)
    assert result.margin_median == pytest.approx(float(margins.median()), abs=1e-5)


def test_empty_dataset_raises(tiny_bert, toy_pairs):
    model = RewardModel.create(RewardModelConfig(backbone=str(tiny_bert)))
    empty = toy_pairs.select([])
    with pytest.raises(ValueError, match="empty"):
        train_reward_model(model, empty, FAST, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty, progress=False)


def test_epoch_order_depends_on_id_seed_and_epoch_only():
    ids = [f"pair-{i}" for i in range(60)]
    removed = {"pair-3", "pair-17", "pair-40", "pair-59"}
    kept = [pid for pid in ids if pid not in removed]
    for seed, epoch in [(0, 0), (0, 1), (7, 2)]:
        full = [ids[i] for i in epoch_order(ids, seed, epoch)]
        pruned = [kept[i] for i in epoch_order(kept, seed, epoch)]
        assert pruned == [pid for pid in full if pid not in removed]
        assert sorted(full) == sorted(ids)
    assert epoch_order(ids, 0, 0) != epoch_order(ids, 0, 1) != epoch_order(ids, 1, 0)


def test_a_retrain_sees_the_remaining_pairs_in_the_baselines_order(tiny_bert, toy_pairs):
    """End to end: the pairs each epoch's batches carry, with and without some pairs."""
    def seen(pairs) -> list[list[str]]:
        model = RewardModel.create(RewardModelConfig(backbone=str(tiny_bert)), seed=0)
        chosen_to_id = dict(zip(pairs["chosen"], pairs["id"]))
        order: list[str] = []
        encode = model.encode_pairs

        def record(prompts, chosen, rejected):
            order.extend(chosen_to_id[c] for c in chosen)
            return encode(prompts, chosen, rejected)

        model.encode_pairs = record
        train_reward_model(model, pairs, TrainConfig(epochs=2, batch_size=5), progress=False)
        return [order[:len(pairs)], order[len(pairs):]]

    removed = {"p2", "p5", "p11"}
    full = seen(toy_pairs)
    pruned = seen(toy_pairs.filter(lambda row: row["id"] not in removed))
    for before, after in zip(full, pruned):
        assert after == [pid for pid in before if pid not in removed]
