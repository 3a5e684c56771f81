"""The sign convention end to end: on synthetic TL;DR-layout data with known label flips, a
briefly trained reward model's harm scores are larger for the flipped pairs than the clean ones.

Nothing here is a fixture made to pass: the generator's flips come from its annotator model
(random workers, Bradley–Terry noise), the reward model is the tiny BERT trained by the normal
training loop, and the scores come from the normal engine. Measured on this setup: mean `if`
harm 0.0048 (flipped, 25 pairs) vs −0.0017 (clean, 119), AUROC 0.68; mean `loss` 0.693 vs
0.662 (AUROC 0.51); training loss 0.693 → 0.673 in 8 epochs. The tiny model learns little,
so only group means are asserted. The setup is pinned (LoRA on every layer, damping 0.1, the
noisy validation split as the target) so that changing a default does not change this test.
"""

from __future__ import annotations

import pytest

from prefprune.data import generate_synthetic, load_preferences, split_preferences
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.model import RewardModel, RewardModelConfig
from prefprune.training import TrainConfig, train_reward_model


@pytest.fixture(scope="module")
def scored(tiny_bert, tmp_path_factory):
    path = generate_synthetic(tmp_path_factory.mktemp("synthetic") / "comparisons.jsonl",
                              n_posts=150, seed=0)
    splits = split_preferences(load_preferences(path).dataset)
    model = RewardModel.create(RewardModelConfig(backbone=str(tiny_bert), max_length=64,
                                                 lora_layers=0), seed=0)
    result = train_reward_model(model, splits["train"],
                                TrainConfig(epochs=8, learning_rate=3e-2, batch_size=16),
                                progress=False)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    scores = compute_scores(model, splits["train"], splits["validation"],
                            InfluenceConfig(scores=("if", "loss"), damping=0.1), progress=False)
    return scores.table


def test_flipped_labels_are_more_harmful(scored):
    flipped = scored["label_flipped"].astype(bool).to_numpy()
    assert 5 <= flipped.sum() < len(flipped) - 5
    for score in ("if", "loss"):
        values = scored[score].to_numpy()
        assert values[flipped].mean() > values[~flipped].mean(), score
    # rank 1 = most harmful: flipped pairs sit higher in the `if` ranking on average
    ranks = scored["rank_if"].to_numpy()
    assert ranks[flipped].mean() < ranks[~flipped].mean()
