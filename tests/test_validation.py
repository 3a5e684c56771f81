"""``prefprune validate`` end to end on a tiny model: the LDS and flip-calibration tables, the
saved numbers, resuming without retraining, and the checks that run before any training.
(The LDS itself is checked against exact retraining in tests/test_loo.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_error_line, run_cli

from prefprune.data import generate_synthetic
from prefprune.errors import ConfigError
from prefprune.experiment import ValidateConfig
from prefprune.experiment.validation import (
    column_spearman,
    lds_subsets,
    linear_datamodeling_scores,
    predicted_changes,
)


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("validate")
    data = generate_synthetic(root / "syn.jsonl", n_posts=30, seed=3)
    args = ("validate", data, "--output", root / "out", "--backbone", tiny_bert,
            "--max-length", "48", "--epochs", "1", "--subsets", "4", "--lds-targets", "5",
            "--flip-share", "0.3", "--solver", "direct", "--scores", "if,grad_cos,loss,random")
    result = run_cli(*args)
    return root, args, result


def test_validate_prints_both_tables_and_saves_every_number(validated):
    root, _, result = validated
    assert result.exit_code == 0, result.output
    assert "linear datamodeling score" in result.stdout and "flip calibration" in result.stdout
    saved = json.loads((root / "out" / "validate.json").read_text())
    assert set(saved["lds"]) == {"if", "grad_cos", "loss", "random"}
    for entry in saved["lds"].values():
        assert -1 <= entry["mean"] <= 1 and len(entry["per_target"]) == 5
    assert set(saved["flip_calibration"]["loss"]) == {"auroc", "average_precision",
                                                      "found_in_top_10%", "found_in_top_20%"}
    assert len(list((root / "out" / "runs").glob("subset*.json"))) == 4


def test_validate_resumes_without_training(validated, monkeypatch):
    root, args, _ = validated
    import prefprune.experiment.validation as validation

    def no_training(*_, **__):
        raise AssertionError("trained again")

    monkeypatch.setattr(validation, "train_reward_model", no_training)
    again = run_cli(*args, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["lds"] == json.loads(
        (root / "out" / "validate.json").read_text())["lds"]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--subsets", "1", "--subsets"), ("--subset-fraction", "1.0", "--subset-fraction"),
    ("--subset-fraction", "0", "--subset-fraction"),
])
def test_bad_settings_fail_before_training(tmp_path, flag, value, message):
    line = assert_one_error_line(run_cli("validate", "--output", tmp_path / "v", flag, value), 2)
    assert message in line and not (tmp_path / "v").exists()


def test_a_score_that_cannot_be_computed_fails_before_the_subsets(tmp_path, tiny_bert):
    data = generate_synthetic(tmp_path / "syn.jsonl", n_posts=20, seed=1)
    line = assert_one_error_line(run_cli(
        "validate", data, "--output", tmp_path / "v", "--backbone", tiny_bert,
        "--max-length", "48", "--epochs", "1", "--scores", "self_influence",
        "--memory-budget-mb", "0", "--quiet"), 1)
    assert "self_influence needs the per-pair gradient cache" in line
    assert not (tmp_path / "v" / "runs").exists()


def test_lds_pieces():
    kept = lds_subsets(10, 3, 0.5, seed=1)
    assert all(len(rows) == 5 and len(set(rows)) == 5 for rows in kept)
    harm = np.arange(10, dtype=float)[:, None]
    assert predicted_changes(harm, kept)[0, 0] == -(45 - harm[kept[0]].sum())
    perfect = linear_datamodeling_scores({"exact": np.arange(12.0).reshape(6, 2)},
                                         np.arange(12.0).reshape(6, 2) * 3)["exact"]
    assert perfect["mean"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="subsets: must be >= 2"):
        ValidateConfig(subsets=1)


def test_column_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, (20, 7)).astype(float), rng.normal(size=(20, 7))
    expected = [spearmanr(x[:, c], y[:, c])[0] for c in range(7)]
    assert column_spearman(x, y) == pytest.approx(expected)


def test_the_lds_interval_of_a_useless_score_covers_zero():
    """A target-free score with no information, against targets that share the subsets'
    luck: the true LDS is 0, and a 95% interval must cover it about 95% of the time (an
    interval over targets alone covers it in under a fifth of these draws)."""
    covered = 0
    for draw in range(40):
        rng = np.random.default_rng(1000 + draw)
        predicted = np.repeat(rng.normal(size=(20, 1)), 30, axis=1)
        actual = rng.normal(size=(20, 1)) + 0.3 * rng.normal(size=(20, 30))
        low, high = linear_datamodeling_scores({"useless": predicted}, actual, seed=draw,
                                               resamples=200)["useless"]["ci95"]
        covered += low <= 0 <= high
    assert covered >= 34


def test_a_validation_beside_an_experiment_joins_its_report(validated, tiny_bert):
    import shutil

    root, _, _ = validated
    experiment = root / "exp"
    args = ("experiment", root / "syn.jsonl", "--output", experiment, "--backbone", tiny_bert,
            "--max-length", "48", "--epochs", "1", "--seeds", "0", "--fractions", "0.2",
            "--scores", "loss,random", "--no-helpful", "--no-relabel", "--quiet")
    assert run_cli(*args).exit_code == 0
    assert "Which score to trust" not in (experiment / "report.md").read_text()
    shutil.copytree(root / "out", experiment / "validate")  # as `validate --output exp/validate`
    result = run_cli(*args)  # resumes: nothing trains, the report is written again
    assert result.exit_code == 0, result.output
    report = (experiment / "report.md").read_text()
    assert "Which score to trust here: linear datamodeling score" in report
    assert "Which score to trust here: flip calibration" in report
