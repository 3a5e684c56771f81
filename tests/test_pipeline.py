"""The pipeline steps behind the CLI: data preparation, train + evaluate + save, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefprune import pipeline
from prefprune.data import DataError, fingerprint, generate_synthetic
from prefprune.model import METADATA_FILE, RewardModel, RewardModelConfig
from prefprune.pipeline import (
    evaluate_saved,
    prepare_data,
    recorded_seed,
    train_and_evaluate,
)
from prefprune.training import TrainConfig

SMALL = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2, seed=3)
SOURCE_SPLIT = {"train": "train", "validation": "valid1", "test": "valid2"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("data") / "syn.jsonl", n_posts=24)


@pytest.fixture(scope="module")
def prepared(synthetic: Path) -> pipeline.PreparedData:
    return prepare_data(synthetic)


@pytest.fixture(scope="module")
def outcome(prepared, tiny_bert, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "model"
    return train_and_evaluate(prepared, RewardModelConfig(backbone=str(tiny_bert)), SMALL,
                              output=output, progress=False), output


def test_prepare_data_keeps_the_source_splits(prepared, synthetic):
    assert list(prepared.splits) == ["train", "validation", "test"]
    for name, source in SOURCE_SPLIT.items():
        assert len(prepared.splits[name]) > 0
        assert set(prepared.splits[name]["source_split"]) == {source}
    assert sum(prepared.sizes().values()) == prepared.report.kept == prepared.report.read
    assert prepared.fingerprint == fingerprint(prepared.splits["train"])
    assert prepared.source == str(synthetic)


def test_prepare_data_defaults_to_the_embedded_set(monkeypatch, synthetic):
    monkeypatch.setattr(pipeline, "default_dataset_path", lambda: synthetic)
    assert prepare_data().fingerprint == prepare_data(synthetic).fingerprint


def test_train_and_evaluate_saves_a_traceable_model(outcome, prepared):
    result, output = outcome
    assert set(result.metrics) == {"validation", "test"}
    assert result.metrics["test"].pairs == len(prepared.splits["test"])
    assert result.train.pairs == len(prepared.splits["train"]) and result.seconds > 0
    saved = RewardModel.load(output).metadata
    assert saved["data_fingerprint"] == prepared.fingerprint
    assert saved["source"] == prepared.source
    assert saved["train_config"] == SMALL.to_dict()
    assert saved["metrics"]["test"]["accuracy"] == result.metrics["test"].accuracy
    assert saved["train"]["steps"] == result.train.steps
    assert json.loads((output / METADATA_FILE).read_text())["config"]["backbone"]
    assert recorded_seed(output) == SMALL.seed


def test_evaluate_saved_reproduces_the_recorded_metrics(outcome, prepared):
    result, output = outcome
    again = evaluate_saved(output, prepared, "test", progress=False)
    assert again.accuracy == pytest.approx(result.metrics["test"].accuracy)
    assert again.loss == pytest.approx(result.metrics["test"].loss, abs=1e-6)
    on_dataset = evaluate_saved(output, prepared.splits["validation"], progress=False)
    assert on_dataset.loss == pytest.approx(result.metrics["validation"].loss, abs=1e-6)


def test_evaluate_saved_rejects_an_unknown_split(outcome, prepared):
    with pytest.raises(DataError, match="unknown split 'dev'"):
        evaluate_saved(outcome[1], prepared, "dev", progress=False)


def test_recorded_seed_of_a_foreign_directory_is_zero(tmp_path):
    assert recorded_seed(tmp_path) == 0

