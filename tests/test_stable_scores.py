"""Trusted targets, ensembles and the out-of-fold baseline (docs/method.md, section 5)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_one_error_line, pairs, run_cli

from prefprune.checkpoints import CheckpointCapture
from prefprune.crossfit import folds_by_prompt, out_of_fold_loss
from prefprune.data import expert_validation, generate_synthetic, load_preferences
from prefprune.ensemble import EnsembleConfig, combine, member_agreement, spearman
from prefprune.errors import ConfigError, DataError
from prefprune.experiment import Experiment, ExperimentConfig
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.model import RewardModel, RewardModelConfig, bradley_terry_loss
from prefprune.pipeline import prepare_data
from prefprune.scoring import score_training_pairs
from prefprune.training import TrainConfig, evaluate, train_reward_model

SMALL = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2)


# --- trusted targets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    source = generate_synthetic(root / "syn.jsonl", n_posts=40, seed=4)
    return source, expert_validation(source, root / "expert.jsonl")


def test_expert_validation_relabels_the_validation_pairs_by_truth(synthetic):
    source, expert = synthetic
    noisy = prepare_data(source).splits["validation"]
    gold = load_preferences(expert).dataset
    assert len(gold) == len(noisy) and not any(gold["label_flipped"])
    truth = {(p, c, r) if not f else (p, r, c) for p, c, r, f in
             zip(noisy["prompt"], noisy["chosen"], noisy["rejected"], noisy["label_flipped"])}
    assert {(p, c, r) for p, c, r in zip(gold["prompt"], gold["chosen"], gold["rejected"])} \
        == truth


def test_a_separate_validation_source_becomes_the_target(synthetic):
    source, expert = synthetic
    data = prepare_data(source, validation=expert)
    assert data.origins["validation"] == str(expert)
    assert data.splits["validation"]["id"] == load_preferences(expert).dataset["id"]
    assert data.origins["test"].startswith("the test split of")


def test_held_out_sources_that_repeat_training_pairs_are_refused(synthetic, tmp_path):
    source, _ = synthetic
    train = prepare_data(source).splits["train"]
    leaked = tmp_path / "leak.jsonl"
    leaked.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": c}) + "\n"
                              for p, c, r in zip(train["prompt"][:3], train["chosen"][:3],
                                                 train["rejected"][:3])))
    with pytest.raises(DataError, match="3 of its 3 pairs are also training pairs"):
        prepare_data(source, validation=leaked)
    assert len(prepare_data(source, test=leaked, allow_overlap=True).splits["test"]) == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DataError, match="no usable pairs for the validation set"):
        prepare_data(source, validation=empty)


def test_score_records_its_target(synthetic, tmp_path, tiny_bert):
    source, expert = synthetic
    out = tmp_path / "scores.parquet"
    result = run_cli("score", source, "--validation", expert, "--output", out, "--backbone",
                     tiny_bert, "--max-length", "48", "--epochs", "1", "--scores", "if,loss",
                     "--solver", "direct", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text())["influence_target"] == str(expert)


# --- ensembles --------------------------------------------------------------------------------


def _table(values: list[float], ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "if": values, "random": values})


def test_combine_standardises_members_and_keeps_their_spread():
    ids = ["a", "b", "c", "d"]
    members = [_table([1.0, 2.0, 3.0, 4.0], ids), _table([10.0, 20.0, 30.0, 40.0], ids),
               _table([4.0, 3.0, 2.0, 1.0], ids)]
    columns, agreement = combine(members, ["if", "random"], "zscore")
    z = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.std([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(columns["if_ens"], (z + z - z) / 3)
    np.testing.assert_allclose(columns["if_ens_sd"], np.std(np.stack([z, z, -z]), axis=0,
                                                            ddof=1))
    assert "random_ens" not in columns  # the control stays a control
    assert agreement["if"]["spearman"] == pytest.approx((1 - 1 - 1) / 3)
    ranked, _ = combine(members, ["if"], "rank")
    assert list(np.argsort(-ranked["if_ens"], kind="stable")) == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="same pairs"):
        combine([members[0], _table([1.0] * 4, ["a", "b", "d", "c"])], ["if"])


def test_agreement_is_one_for_identical_members_and_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    same = member_agreement(np.stack([a, a, a]))
    assert same["spearman"] == pytest.approx(1.0) and same["top10_overlap"] == 1.0


def test_an_ensemble_of_one_is_refused():
    with pytest.raises(ConfigError, match="members: must be >= 2"):
        EnsembleConfig(members=1)


@pytest.fixture(scope="module")
def scored(tiny_bert, tmp_path_factory):
    """Scores of a trained tiny model with a 3-member seed ensemble and 3-fold OOF."""
    root = tmp_path_factory.mktemp("scored")
    train, validation = pairs(24, 1, "t"), pairs(8, 2, "v")
    config = RewardModelConfig(backbone=str(tiny_bert), max_length=32)
    model = RewardModel.create(config, seed=0)
    train_reward_model(model, train, SMALL, progress=False)
    influence = InfluenceConfig(scores=("if", "grad_cos", "loss", "random", "oof"),
                                solver="direct", oof_folds=3)
    result = score_training_pairs(model, train, validation, influence,
                                  ensemble=EnsembleConfig(members=3), model_config=config,
                                  train_config=SMALL, work_dir=root / "work", progress=False)
    return result, train, validation, config, influence, root


def test_ensemble_members_are_seeded_models_scored_like_the_base(scored):
    result, train, _, config, _, root = scored
    table = result.table
    for column in ("if_ens", "grad_cos_ens", "loss_ens", "oof"):
        assert sorted(table[f"rank_{column}"]) == list(range(1, len(train) + 1))
    assert "rank_if_ens_sd" not in table and (table["if_ens_sd"] >= 0).all()
    meta = result.metadata["ensemble"]
    assert meta["seeds"] == [0, 1000, 2000] and set(meta["agreement"]) == {"if", "grad_cos",
                                                                         "loss"}
    member = RewardModel.create(config, seed=2000)  # member 2, rebuilt by hand
    train_reward_model(member, train, SMALL.replace(seed=2000), progress=False)
    member_loss = bradley_terry_loss(
        torch.tensor(evaluate(member, train, progress=False).margins)).numpy()
    saved = pd.read_parquet(root / "work" / "member2.parquet")
    np.testing.assert_allclose(saved["loss"], member_loss, rtol=1e-5)


def test_resumed_scoring_trains_no_member_again(scored, monkeypatch):
    result, train, validation, config, influence, root = scored
    import prefprune.crossfit
    import prefprune.scoring

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(prefprune.scoring, "train_reward_model", no_training)
    monkeypatch.setattr(prefprune.crossfit, "train_reward_model", no_training)
    model = RewardModel.create(config, seed=0)
    train_reward_model(model, train, SMALL, progress=False)
    again = score_training_pairs(model, train, validation, influence,
                                 ensemble=EnsembleConfig(members=3), model_config=config,
                                 train_config=SMALL, work_dir=root / "work", progress=False)
    pd.testing.assert_frame_equal(again.table, result.table)


# --- out of fold ------------------------------------------------------------------------------


def test_folds_group_prompts_and_cover_every_pair_once():
    prompts = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "f"]
    folds = folds_by_prompt(prompts, 3, seed=1)
    assert sorted(i for fold in folds for i in fold) == list(range(len(prompts)))
    for fold in folds:
        inside = {prompts[i] for i in fold}
        assert not any(prompts[j] in inside for other in folds if other is not fold
                       for j in other)
    with pytest.raises(ConfigError, match="distinct prompts"):
        folds_by_prompt(["a", "a", "b"], 3, seed=0)


def test_out_of_fold_loss_is_the_loss_under_the_model_that_held_the_pair_out(scored):
    result, train, _, config, _, _ = scored
    fold = folds_by_prompt(list(train["prompt"]), 3, seed=0)[1]
    model = RewardModel.create(config, seed=0)
    rest = sorted(set(range(len(train))) - set(fold))
    train_reward_model(model, train.select(rest), SMALL, progress=False)
    held = np.asarray(evaluate(model, train.select(fold), progress=False).margins)
    np.testing.assert_allclose(result.table["oof"].to_numpy()[fold],
                               bradley_terry_loss(torch.from_numpy(held)).numpy(),
                               rtol=1e-5)
    loss, record = out_of_fold_loss(train, config, SMALL, folds=3, progress=False)
    np.testing.assert_allclose(loss, result.table["oof"], rtol=1e-6)
    assert sum(record["fold_sizes"]) == len(train)


# --- in an experiment -------------------------------------------------------------------------


def test_experiment_prunes_by_ensemble_and_oof_columns(synthetic, tiny_bert, tmp_path):
    source, expert = synthetic
    config = ExperimentConfig(
        data=str(source), validation=str(expert), fractions=(0.2,), seeds=(0,),
        helpful=False, relabel=False, inject_flips=0.2,
        model=RewardModelConfig(backbone=str(tiny_bert), max_length=48, lora_layers=1),
        train=SMALL, influence=InfluenceConfig(scores=("if", "loss", "oof", "random"),
                                               solver="direct", oof_folds=2),
        ensemble=EnsembleConfig(members=2), prune_by=("if_ens", "oof", "random"))
    result = Experiment(config, tmp_path / "exp", progress=False).run()
    assert [r.arm.method for r in result.runs] == [None, "if_ens", "oof", "random"]
    assert {"if_ens", "oof"} <= set(result.summary["detection"])
    assert result.data["origins"]["validation"] == str(expert)
    report = (tmp_path / "exp" / "results.json").read_text()
    assert "agreement" in report


def test_cli_rejects_pruning_by_a_score_that_is_not_computed(tmp_path):
    line = assert_one_error_line(run_cli("experiment", "--output", tmp_path / "x",
                                         "--prune-by", "if_ens"), 2)
    assert "--prune-by" in line and "would not be computed" in line


# --- checkpoint ensembles ---------------------------------------------------------------------


def test_a_captured_step_is_the_plain_step(still_bert):
    """Assembling each step's gradient from per-pair gradients trains the same model."""
    train, validation = pairs(20, 3, "t"), pairs(6, 4, "v")
    model_config = RewardModelConfig(backbone=str(still_bert), max_length=32)
    states = []
    for capture in (False, True):
        model = RewardModel.create(model_config, seed=0)
        model.model.double()
        taken = CheckpointCapture(model, train, validation, InfluenceConfig(solver="direct"),
                                  members=2, epochs=2) if capture else None
        train_reward_model(model, train, TrainConfig(epochs=2, batch_size=6), progress=False,
                           capture=taken)
        states.append(model.trainable_state())
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=1e-4, atol=1e-6)
    assert len(taken.tables) == 2


def test_a_checkpoint_scores_like_the_model_at_that_checkpoint(still_bert):
    """With a learning rate too small to move θ, the gradients taken in the epoch are the
    checkpoint's own, so its table is the engine's table of the checkpoint model."""
    train, validation = pairs(16, 5, "t"), pairs(6, 6, "v")
    config = InfluenceConfig(scores=("if", "grad_cos", "loss"), solver="direct")
    model = RewardModel.create(RewardModelConfig(backbone=str(still_bert), max_length=32),
                               seed=1)
    taken = CheckpointCapture(model, train, validation, config, members=1, epochs=1)
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.add_(0.2 * torch.randn_like(param))
    train_reward_model(model, train, TrainConfig(epochs=1, batch_size=5, learning_rate=1e-30),
                       progress=False, capture=taken)
    expected = compute_scores(model, train, validation, config, progress=False).table
    for column in ("if", "grad_cos", "loss"):
        np.testing.assert_allclose(taken.tables[0][column], expected[column], rtol=2e-3,
                                   atol=1e-7)


def test_checkpoint_ensembles_need_an_epoch_per_member(tiny_bert):
    model = RewardModel.create(RewardModelConfig(backbone=str(tiny_bert), max_length=32))
    with pytest.raises(ConfigError, match="needs at least 3 training epochs"):
        CheckpointCapture(model, pairs(4, 0), pairs(2, 1), InfluenceConfig(), members=3,
                          epochs=2)


def test_score_with_a_checkpoint_ensemble(synthetic, tiny_bert, tmp_path):
    source, expert = synthetic
    out = tmp_path / "scores.parquet"
    args = ("score", source, "--validation", expert, "--backbone", tiny_bert,
            "--max-length", "48", "--lora-layers", "1", "--epochs", "3", "--scores",
            "if,grad_cos,random", "--solver", "direct", "--ensemble-members", "3",
            "--ensemble-kind", "checkpoints", "--quiet")
    result = run_cli(*args, "--output", out)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert {"if_ens", "grad_cos_ens", "rank_if_ens"} <= set(table.columns)
    meta = json.loads(out.with_suffix(".json").read_text())["ensemble"]
    assert meta["kind"] == "checkpoints" and meta["agreement"]["if"]["members"] == 3
    trained = tmp_path / "m"
    assert run_cli("train", source, "--output", trained, "--backbone", tiny_bert,
                   "--max-length", "48", "--epochs", "1", "--quiet").exit_code == 0
    line = assert_one_error_line(run_cli("score", source, "--model", trained, "--output",
                                         tmp_path / "s2.parquet", "--ensemble-members", "2",
                                         "--ensemble-kind", "checkpoints", "--quiet"), 1)
    assert "captured while the model trains" in line
