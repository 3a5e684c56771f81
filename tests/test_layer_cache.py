"""The frozen-layer cache against the uncached model: same rewards, same per-pair gradients,
same scores, and the frozen layers really are skipped once a sequence is cached."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed_model

from prefprune.errors import ConfigError, ModelError
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.influence.gradients import MarginGradientComputer
from prefprune.model import RewardModel, RewardModelConfig
from prefprune.model.layer_cache import FrozenLayerCache, layer_stack
from prefprune.training import TrainConfig, train_reward_model

PROMPTS = ["hi", "what is the capital of france", " ".join(f"context{i}" for i in range(40))]
CHOSEN = ["yes", "paris is the capital city", "a short reply"]
REJECTED = ["a number like seven or eight", "lyon", "no"]


def make_model(backbone, seed: int = 1, **config) -> RewardModel:
    return perturbed_model(backbone, seed=seed, max_length=24, **config)


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def top_layer_model(request, tiny_backbones) -> RewardModel:
    model = make_model(tiny_backbones[request.param], lora_layers=1)
    model.model.eval()
    return model


def test_lora_layers_adapts_only_the_top_layers(top_layer_model):
    _, _, layers = layer_stack(top_layer_model.model)
    adapted = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    assert adapted == [False, True]


def test_cached_rewards_and_gradients_equal_uncached(top_layer_model):
    batch = top_layer_model.encode_pairs(PROMPTS, CHOSEN, REJECTED)
    computer = MarginGradientComputer(top_layer_model)
    expected_rewards = top_layer_model.rewards(batch).detach()
    expected = computer(batch)
    top_layer_model.use_layer_cache(FrozenLayerCache())
    try:
        for _ in range(2):  # the first call fills the cache, the second reads it
            assert torch.allclose(top_layer_model.rewards(batch), expected_rewards, atol=1e-6)
            actual = computer(batch)
            assert torch.allclose(actual.margin_grads, expected.margin_grads, atol=1e-6)
    finally:
        top_layer_model.use_layer_cache(None)


def test_warm_cache_skips_the_frozen_layers(top_layer_model):
    batch = top_layer_model.encode_pairs(PROMPTS, CHOSEN, REJECTED)
    cache = FrozenLayerCache()
    top_layer_model.use_layer_cache(cache)
    calls = []
    lowest = layer_stack(top_layer_model.model)[2][0]
    handle = lowest.register_forward_hook(lambda *_: calls.append(1))
    try:
        top_layer_model.rewards(batch)
        filled = len(calls)
        top_layer_model.rewards(batch)
    finally:
        handle.remove()
        top_layer_model.use_layer_cache(None)
    assert filled == 1 and len(calls) == 1  # one capture pass, then never again
    assert cache.stats.misses == 2 * len(PROMPTS) and cache.stats.hits == 2 * len(PROMPTS)


def test_full_budget_computes_through_and_stays_correct(top_layer_model):
    batch = top_layer_model.encode_pairs(PROMPTS, CHOSEN, REJECTED)
    expected = top_layer_model.rewards(batch).detach()
    cache = FrozenLayerCache(budget_mb=1e-4)  # about 100 bytes: nothing fits
    top_layer_model.use_layer_cache(cache)
    try:
        assert torch.allclose(top_layer_model.rewards(batch), expected, atol=1e-6)
    finally:
        top_layer_model.use_layer_cache(None)
    assert cache.stats.bytes == 0 and cache.stats.uncached == 2 * len(PROMPTS)


def test_cached_scores_equal_uncached(tiny_bert, toy_pairs):
    model = make_model(tiny_bert, lora_layers=1)
    train, validation = toy_pairs.select(range(8)), toy_pairs.select(range(8, 12))
    config = InfluenceConfig(scores=("if", "grad_cos", "loss"), solver="direct")
    expected = compute_scores(model, train, validation, config, progress=False).table
    model.use_layer_cache(FrozenLayerCache())
    actual = compute_scores(model, train, validation, config, progress=False).table
    for column in ("if", "grad_cos", "loss"):
        assert actual[column].to_numpy() == pytest.approx(expected[column].to_numpy(),
                                                          rel=1e-4, abs=1e-7)


def test_cached_training_equals_uncached_without_dropout(tiny_backbones, toy_pairs):
    backbone = tiny_backbones["llama"]  # Llama has no dropout
    config = RewardModelConfig(backbone=str(backbone), max_length=32, lora_layers=1)
    train_config = TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, seed=3)
    states = []
    for cache in (None, FrozenLayerCache()):
        model = RewardModel.create(config, seed=5)
        model.use_layer_cache(cache)
        train_reward_model(model, toy_pairs, train_config, progress=False)
        states.append(model.trainable_state())
    for name, value in states[0].items():
        assert torch.allclose(states[1][name], value, atol=1e-5), name


def test_one_cache_serves_every_seed_of_a_backbone(tiny_bert, tiny_backbones):
    cache = FrozenLayerCache()
    for seed in (0, 1):
        make_model(tiny_bert, seed=seed, lora_layers=1).use_layer_cache(cache)
    with pytest.raises(ModelError, match="holds activations"):
        make_model(tiny_backbones["gpt2"], lora_layers=1).use_layer_cache(cache)


def test_cache_needs_frozen_lower_layers(tiny_bert):
    with pytest.raises(ModelError, match="no layer is frozen"):
        make_model(tiny_bert).use_layer_cache(FrozenLayerCache())


def test_lora_layers_out_of_range(tiny_bert):
    with pytest.raises(ModelError, match="between 1 and 2"):
        make_model(tiny_bert, lora_layers=3)
    with pytest.raises(ConfigError, match="lora_layers: must be >= 0"):
        make_model(tiny_bert, lora_layers=-1)


def test_saved_top_layer_model_reloads_with_its_layers(tiny_bert, tmp_path):
    model = make_model(tiny_bert, lora_layers=1)
    loaded = RewardModel.load(model.save(tmp_path / "model"))
    assert loaded.config.lora_layers == 1
    assert [n for n, _ in loaded.trainable_parameters()] == \
        [n for n, _ in model.trainable_parameters()]
    loaded.use_layer_cache(FrozenLayerCache())  # the lower layer is frozen after reload too
