"""The synthetic TL;DR-layout set: deterministic, readable, with the promised noise."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from prefprune.data import (
    GENERATOR_VERSION,
    DataOptions,
    default_dataset_path,
    generate_synthetic,
    load_preferences,
    split_preferences,
)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "default.jsonl")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic(tmp_path: Path, default_set: Path) -> None:
    again = generate_synthetic(tmp_path / "again.jsonl")
    assert again.read_bytes() == default_set.read_bytes()
    other = generate_synthetic(tmp_path / "other.jsonl", seed=1)
    assert other.read_bytes() != default_set.read_bytes()


def test_default_sizes_and_noise(default_set: Path) -> None:
    records = _records(default_set)
    sizes = Counter(r["split"] for r in records)
    assert 700 <= sizes["train"] <= 900
    assert 150 <= sizes["valid1"] <= 250
    assert 250 <= sizes["valid2"] <= 350
    train = [r for r in records if r["split"] == "train"]
    flip_share = sum(r["extra"]["label_flipped"] for r in train) / len(train)
    assert 0.15 <= flip_share <= 0.25
    assert {r["extra"]["worker_kind"] for r in train} == {"reliable", "random", "length_biased"}
    valid2 = [r for r in records if r["split"] == "valid2"]
    assert not any(r["extra"]["label_flipped"] for r in valid2)
    for r in records:
        assert r["extra"]["label_flipped"] == (r["choice"] != r["extra"]["true_choice"])
        confidence = r["extra"]["confidence"]
        assert confidence is None or 1 <= confidence <= 9


def test_quality_tracks_policies(default_set: Path) -> None:
    by_policy: dict[str, list[float]] = {}
    for r in _records(default_set):
        for summary, quality in zip(r["summaries"], r["extra"]["quality"]):
            by_policy.setdefault(summary["policy"], []).append(quality)
    mean = {p: sum(q) / len(q) for p, q in by_policy.items()}
    assert mean["sup_good"] > mean["verbose"] > mean["hallucinating"]
    assert mean["sup_good"] > mean["sup_bad"] > mean["hallucinating"]


def test_readable_by_the_tldr_reader(default_set: Path) -> None:
    result = load_preferences(default_set, DataOptions(strict=True))
    assert result.report.format == "tldr"
    assert result.report.kept == result.report.read
    ds = result.dataset
    assert {"true_choice", "label_flipped", "worker_kind", "quality", "confidence"} <= set(
        ds.column_names)
    parts = split_preferences(ds)
    assert len(parts["test"]) == sum(1 for s in ds["source_split"] if s == "valid2")
    assert not any(parts["test"]["label_flipped"])


def test_default_dataset_path_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     default_set: Path) -> None:
    monkeypatch.setenv("PREFPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    path = default_dataset_path()
    assert path.parent == tmp_path / "cache"
    assert f"v{GENERATOR_VERSION}" in path.name
    assert path.read_bytes() == default_set.read_bytes()
    stamp = path.stat().st_mtime_ns
    assert default_dataset_path() == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary leftovers
