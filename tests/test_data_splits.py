"""Splits grouped by prompt or taken from the source; fingerprints."""

from __future__ import annotations

import datasets
import pytest

from prefprune.data import DEFAULT_SPLIT_FRACTIONS, DataError, fingerprint, split_preferences


def _pairs(n: int, prompts: int, split: str | None = None) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "id": [f"r{i}" for i in range(n)],
        "prompt": [f"prompt {i % prompts}" for i in range(n)],
        "chosen": [f"good {i}" for i in range(n)],
        "rejected": [f"bad {i}" for i in range(n)],
        "source_split": [split] * n,
    })


def test_grouped_split_keeps_prompts_apart_and_sizes_close() -> None:
    parts = split_preferences(_pairs(400, 150), seed=3)
    prompts = {name: set(part["prompt"]) for name, part in parts.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    sizes = {name: len(part) for name, part in parts.items()}
    assert sum(sizes.values()) == 400
    for name, fraction in zip(("train", "validation", "test"), DEFAULT_SPLIT_FRACTIONS):
        assert abs(sizes[name] - 400 * fraction) <= 3


def test_grouped_split_is_seeded() -> None:
    ds = _pairs(200, 80)
    first, again = split_preferences(ds, seed=1), split_preferences(ds, seed=1)
    other = split_preferences(ds, seed=2)
    assert first["test"]["id"] == again["test"]["id"]
    assert first["test"]["id"] != other["test"]["id"]


def test_tldr_source_splits_are_respected() -> None:
    ds = datasets.concatenate_datasets(
        [_pairs(6, 6, "train"), _pairs(2, 2, "valid1"), _pairs(3, 3, "valid2")])
    parts = split_preferences(ds)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [6, 2, 3]
    assert set(parts["test"]["source_split"]) == {"valid2"}


def test_train_test_source_gets_validation_carved_from_train() -> None:
    ds = datasets.concatenate_datasets([_pairs(100, 40, "train"), _pairs(10, 10, "test")])
    parts = split_preferences(ds)
    assert len(parts["test"]) == 10
    assert len(parts["validation"]) > 0
    assert not set(parts["train"]["prompt"]) & set(parts["validation"]["prompt"])


def test_partial_source_splits_fall_back_to_grouping() -> None:
    ds = datasets.concatenate_datasets([_pairs(50, 20, "train"), _pairs(50, 20, None)])
    parts = split_preferences(ds)
    assert sum(len(p) for p in parts.values()) == 100
    assert not set(parts["train"]["prompt"]) & set(parts["test"]["prompt"])


def test_fractions_below_one_leave_a_seeded_sample_out() -> None:
    ds = _pairs(400, 200)
    parts = split_preferences(ds, fractions=(0.2, 0.1, 0.2), seed=4)
    sizes = [len(parts[k]) for k in ("train", "validation", "test")]
    assert [abs(n - target) <= 2 for n, target in zip(sizes, (80, 40, 80))] == [True] * 3
    used = set().union(*(parts[k]["id"] for k in parts))
    assert len(used) == sum(sizes)
    assert parts["test"]["id"] == split_preferences(ds, fractions=(0.2, 0.1, 0.2),
                                                    seed=4)["test"]["id"]


def test_prepare_data_counts_the_pairs_no_split_uses(tmp_path) -> None:
    from prefprune.pipeline import data_summary, prepare_data

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(
        f'{{"prompt": "p{i}", "chosen": "good {i}", "rejected": "bad {i}"}}\n'
        for i in range(100)))
    sample = prepare_data(path, fractions=(0.3, 0.1, 0.1))
    assert sample.left_out == {"outside the split fractions": 50}
    assert sum(sample.sizes().values()) + data_summary(sample)["left_out"] == 100
    assert prepare_data(path).left_out == {}
    trusted = tmp_path / "trusted.jsonl"
    trusted.write_text('{"prompt": "q", "chosen": "yes", "rejected": "no"}\n')
    replaced = prepare_data(path, validation=trusted)
    assert replaced.left_out == {f"in the source's validation split, replaced by {trusted}":
                                 round(DEFAULT_SPLIT_FRACTIONS[1] * 100)}


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (0.6, -0.1, 0.2)])
def test_bad_fractions(fractions: tuple[float, float, float]) -> None:
    with pytest.raises(DataError, match="fractions"):
        split_preferences(_pairs(10, 5), fractions=fractions)


def test_fingerprint_stable_and_order_sensitive() -> None:
    ds = _pairs(20, 7)
    value = fingerprint(ds)
    assert len(value) == 16 and value == fingerprint(_pairs(20, 7))
    assert fingerprint(ds.select(list(reversed(range(20))))) != value
    assert fingerprint(ds.remove_columns("source_split")) == value  # metadata does not count
    changed = ds.map(lambda row, i: {"chosen": row["chosen"] + ("!" if i == 5 else "")},
                     with_indices=True)
    assert fingerprint(changed) != value
