"""Selection by score, in-memory pruning/relabelling/flip injection, and writing a source back
in its own container and layout (every other row unchanged, skipped rows included)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from prefprune.data import DataOptions, load_preferences
from prefprune.data.writer import rewrite_source
from prefprune.errors import DataError, SelectionError, StaleDataWarning
from prefprune.pruning import (
    PruneConfig,
    inject_flips,
    prune_source,
    relabel_pairs,
    remove_pairs,
    select,
    selection_size,
)

FIXTURES = Path(__file__).parent / "fixtures"
TLDR = FIXTURES / "tldr_comparisons.jsonl"
HH = FIXTURES / "hh.jsonl.gz"
CSV = FIXTURES / "generic.csv"
JSON = FIXTURES / "generic.json"
CSV_MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad", "id": "uid"}


def table(harm: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"p{i}" for i in range(len(harm))], "if": harm,
                         "rank_if": pd.Series(harm).rank(ascending=False).astype(int)})


def test_select_harmful_and_helpful_in_rank_order():
    scores = table([0.5, -2.0, 3.0, 0.0, 1.0, -1.0, 2.0, 0.1, 0.2, -0.5])
    assert select(scores, PruneConfig(by="if", fraction=0.3)).ids == ("p2", "p6", "p4")
    assert select(scores, PruneConfig(by="if", fraction=0.2, direction="helpful")).ids == \
        ("p1", "p5")


def test_ties_break_by_table_order():
    assert select(table([1.0, 1.0, 1.0, 0.0]), PruneConfig(fraction=0.5)).ids == ("p0", "p1")


@pytest.mark.parametrize(("total", "fraction", "size"), [(100, 0.1, 10), (7, 0.1, 1),
                                                         (1382, 0.05, 69), (3, 0.5, 2)])
def test_selection_size(total, fraction, size):
    assert selection_size(total, fraction) == size


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"by": "nope"}, "no column 'nope'; rank by one of its scores: if"),
    ({"by": "rank_if"}, "no score column 'rank_if'"),
    ({"fraction": 1.0}, "fraction: must be < 1"),
    ({"fraction": 0.0}, "fraction: must be > 0"),
    ({"fraction": float("nan")}, "fraction: is not a number"),
    ({"direction": "sideways"}, "direction: must be one of harmful, helpful"),
])
def test_selection_errors(kwargs, message):
    with pytest.raises(SelectionError, match=message):
        select(table([1.0, 2.0]), PruneConfig(**{"by": "if", "fraction": 0.5, **kwargs}))


def pairs(n: int = 10) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "id": [f"p{i}" for i in range(n)], "prompt": [f"q{i}" for i in range(n)],
        "chosen": [f"good{i}" for i in range(n)], "rejected": [f"bad{i}" for i in range(n)],
        "label_flipped": [i == 3 for i in range(n)]})


def test_remove_and_relabel_touch_only_the_named_pairs():
    data = pairs()
    kept = remove_pairs(data, ["p1", "p4"])
    assert kept["id"] == [f"p{i}" for i in range(10) if i not in (1, 4)]
    flipped = relabel_pairs(data, ["p3", "p5"])
    assert flipped.column_names == data.column_names
    assert (flipped[3]["chosen"], flipped[3]["rejected"]) == ("bad3", "good3")
    assert flipped["label_flipped"] == [i == 5 for i in range(10)]  # p3's wrong label fixed
    assert [flipped[i] for i in (0, 1, 2, 4, 6, 7, 8, 9)] == \
        [data[i] for i in (0, 1, 2, 4, 6, 7, 8, 9)]


def test_inject_flips_is_seeded_and_keeps_the_truth():
    data = pairs(100)
    once, again = inject_flips(data, 0.2, seed=4), inject_flips(data, 0.2, seed=4)
    assert once["injected_flip"] == again["injected_flip"]
    assert sum(once["injected_flip"]) == 20
    assert once["injected_flip"] != inject_flips(data, 0.2, seed=5)["injected_flip"]
    for before, after in zip(data, once):
        swapped = after["injected_flip"]
        assert (after["chosen"] == before["rejected"]) == swapped
        assert after["label_flipped"] == (before["label_flipped"] != swapped)


def reload(path: Path, options: DataOptions | None = None) -> dict[str, dict]:
    return {row["id"]: row for row in load_preferences(path, options).dataset.to_list()}


def test_jsonl_rewrite_keeps_every_other_line_byte_for_byte(tmp_path):
    original = reload(TLDR)
    first, second, third = original
    out = tmp_path / TLDR.name
    report = rewrite_source(TLDR, out, remove={first}, relabel={third})
    assert (report.removed, report.relabelled) == ([first], [third])
    assert report.duplicate_rows == 1  # the fixture repeats the first pair on a later line
    before = TLDR.read_bytes().splitlines()
    after = out.read_bytes().splitlines()
    # line 1 (the removed pair) and line 8 (its duplicate) are gone; line 10 is relabelled;
    # every other line, the malformed ones and the blank one included, is byte-identical
    assert after[:6] == before[1:7]
    assert after[6] == before[8] == b""
    assert json.loads(after[7]) == {**json.loads(before[9]),
                                    "choice": 1 - json.loads(before[9])["choice"]}
    assert after[8:] == before[10:]
    rows = load_preferences(out).dataset.to_list()
    assert rows[0]["id"] == second
    flipped = rows[1]
    assert (flipped["chosen"], flipped["rejected"]) == (original[third]["rejected"],
                                                        original[third]["chosen"])
    reasons = load_preferences(TLDR).report.by_reason()
    reasons.pop("duplicate_id")  # it went with its pair
    assert load_preferences(out).report.by_reason() == reasons


def test_gzip_hh_relabel_swaps_transcripts(tmp_path):
    original = reload(HH)
    target = next(iter(original))
    out = tmp_path / HH.name
    rewrite_source(HH, out, relabel={target})
    gzip.decompress(out.read_bytes())  # still gzip
    rows = load_preferences(out).dataset.to_list()
    assert len(rows) == len(original)
    changed = [r for r in rows if r["prompt"] == original[target]["prompt"]
               and r["chosen"] == original[target]["rejected"]]
    assert len(changed) == 1


def test_csv_and_json_keep_layout_and_bad_rows(tmp_path):
    original = reload(CSV, DataOptions(columns=CSV_MAPPING))
    out = tmp_path / CSV.name
    rewrite_source(CSV, out, DataOptions(columns=CSV_MAPPING), remove={"u1"})
    assert out.read_text().splitlines()[0] == CSV.read_text().splitlines()[0]
    result = load_preferences(out, DataOptions(columns=CSV_MAPPING))
    assert set(r["id"] for r in result.dataset.to_list()) == set(original) - {"u1"}
    # the malformed rows are still there, reported as before; u1's duplicate went with it
    reasons = load_preferences(CSV, DataOptions(columns=CSV_MAPPING)).report.by_reason()
    reasons.pop("duplicate_id")
    assert result.report.by_reason() == reasons
    json_ids = list(reload(JSON))
    out_json = tmp_path / JSON.name
    rewrite_source(JSON, out_json, relabel={json_ids[0]})
    value = json.loads(out_json.read_text())
    assert type(value) is type(json.loads(JSON.read_text()))


def test_parquet_and_saved_dataset_round_trip(tmp_path):
    data = load_preferences(TLDR).dataset
    frame = pd.DataFrame({"prompt": data["prompt"], "chosen": data["chosen"],
                          "rejected": data["rejected"], "score": [1.5, 2.5, 3.5]})
    parquet = tmp_path / "pairs.parquet"
    frame.to_parquet(parquet)
    ids = list(reload(parquet))
    rewrite_source(parquet, tmp_path / "out.parquet", remove={ids[1]}, relabel={ids[2]})
    after = pd.read_parquet(tmp_path / "out.parquet")
    assert after["score"].tolist() == [1.5, 3.5]
    assert after.loc[1, "chosen"] == frame.loc[2, "rejected"]
    saved = tmp_path / "saved"
    datasets.Dataset.from_pandas(frame).save_to_disk(str(saved))
    rewrite_source(saved, tmp_path / "saved_out", remove={ids[0]})
    assert datasets.load_from_disk(str(tmp_path / "saved_out"))["score"] == [2.5, 3.5]


def test_unknown_ids_are_an_error(tmp_path):
    with pytest.raises(DataError, match="not in this source"):
        rewrite_source(TLDR, tmp_path / "x.jsonl", remove={"nope"})


def test_prune_source_writes_data_evidence_and_summary(tmp_path):
    source = tmp_path / "pairs.jsonl"
    shutil.copy(TLDR, source)
    data = load_preferences(source).dataset
    scores = pd.DataFrame({"id": data["id"], "if": [0.1, 0.9, -0.3], "loss": [1.0, 2.0, 3.0],
                           "worker": data["worker"]})
    scores["rank_if"] = scores["if"].rank(ascending=False).astype(int)
    scores.to_parquet(tmp_path / "scores.parquet")
    with pytest.warns(StaleDataWarning, match="no sidecar"):
        result = prune_source(tmp_path / "scores.parquet", source, tmp_path / "out",
                              PruneConfig(fraction=0.34))
    assert result.selection.ids == (data["id"][1],)
    assert [r["id"] for r in load_preferences(tmp_path / "out" / "pairs.jsonl").dataset] == \
        [data["id"][0], data["id"][2]]
    evidence = [json.loads(line) for line in result.removed_file.read_text().splitlines()]
    assert len(evidence) == 1
    assert evidence[0]["if"] == pytest.approx(0.9) and evidence[0]["rank_if"] == 1
    assert evidence[0]["action"] == "remove" and evidence[0]["chosen"] == data["chosen"][1]
    assert evidence[0]["source_row"] == data["source_row"][1]
    summary = json.loads(result.summary_file.read_text())
    assert (summary["pairs"], summary["rows_in"] - summary["rows_out"]) == (1, 1)
    assert np.isclose(summary["fraction"], 0.34)
