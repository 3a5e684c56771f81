"""Readers: every row kept or reported, exact positions, strict mode, errors, hub branch."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefprune.data import DataError, DataOptions, load_preferences
from prefprune.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
TLDR = FIXTURES / "tldr_comparisons.jsonl"
HH = FIXTURES / "hh.jsonl.gz"
CSV_MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad", "id": "uid"}


def _assert_accounted(result) -> None:
    report = result.report
    assert report.read == report.kept + len(report.skipped) == report.kept + sum(
        report.by_reason().values()
    )
    assert report.kept == len(result.dataset)


def test_tldr_counts_reasons_and_positions() -> None:
    result = load_preferences(TLDR)
    _assert_accounted(result)
    assert result.report.format == "tldr"
    assert result.report.by_reason() == {
        "bad_choice": 2, "malformed_json": 1, "missing_field": 1, "identical_responses": 1,
        "wrong_type": 1, "duplicate_id": 1,
    }
    assert [(s.line, s.reason) for s in result.report.skipped][:2] == [
        (3, "malformed_json"), (4, "missing_field")]
    ds = result.dataset
    assert ds["source_row"] == [1, 2, 10]  # 1-based lines; the blank line is not a record
    assert ds["source_split"] == ["train", "valid1", "valid2"]
    assert ds["source_format"] == ["tldr"] * 3


def test_tldr_prompts_responses_and_metadata() -> None:
    rows = load_preferences(TLDR).dataset.to_list()
    reddit, cnn, flipped = rows
    assert reddit["prompt"] == ("SUBREDDIT: r/tifu\n\nTITLE: Title t3_a\n\nPOST: Post t3_a: my cat "
                                "knocked over the plant.\n\nTL;DR:")
    assert (reddit["chosen"], reddit["rejected"]) == ("Cat broke plant.", "My cat did a thing.")
    assert reddit["id"].startswith("t3_a/") and len(reddit["id"]) == len("t3_a/") + 12
    assert (reddit["worker"], reddit["batch"], reddit["confidence"]) == ("w1", "batch3", 7)
    assert (reddit["policy_chosen"], reddit["note_rejected"]) == ("sup1", "too long")
    assert cnn["prompt"] == "ARTICLE: The mayor opened a new bridge on Monday.\n\nTL;DR:"
    assert (cnn["chosen"], cnn["site"], cnn["confidence"]) == ("A bridge exists.", "cnn", None)
    assert (flipped["chosen"], flipped["true_choice"]) == ("Other summary.", 1)
    assert reddit["true_choice"] is None


def test_hh_split_at_last_assistant_turn() -> None:
    result = load_preferences(HH)
    _assert_accounted(result)
    assert result.report.format == "hh"
    assert result.report.by_reason() == {
        "hh_prompt_mismatch": 1, "identical_responses": 1, "malformed_json": 1, "empty_field": 1}
    second = result.dataset[1]
    assert second["prompt"].endswith("tell me a joke\n\nAssistant:")
    assert second["rejected"] == " No."
    original = json.loads(gzip.decompress(HH.read_bytes()).splitlines()[1])
    assert second["prompt"] + second["chosen"] == original["chosen"]


def test_report_text_and_dict_name_file_and_line() -> None:
    report = load_preferences(HH).report
    text = report.render()
    assert "read 6 = kept 2 + skipped 4" in text
    assert f"{HH}:3: hh_prompt_mismatch" in text
    assert f"{HH}:5: malformed_json" in text
    assert json.loads(json.dumps(report.to_dict()))["by_reason"]["empty_field"] == 1


def test_strict_raises_on_first_bad_row() -> None:
    with pytest.raises(DataError, match=r"tldr_comparisons\.jsonl:3: malformed_json"):
        load_preferences(TLDR, DataOptions(strict=True))
    expected = r"hh\.jsonl\.gz:3: hh_prompt_mismatch \(field 'rejected'\)"
    with pytest.raises(DataError, match=expected):
        load_preferences(HH, DataOptions(strict=True))


def test_generic_csv_with_mapping() -> None:
    result = load_preferences(FIXTURES / "generic.csv", DataOptions(columns=CSV_MAPPING))
    _assert_accounted(result)
    assert result.report.by_reason() == {
        "empty_field": 1, "identical_responses": 1, "malformed_row": 1, "duplicate_id": 1}
    ds = result.dataset
    assert ds["id"] == ["u1", "u2"]
    assert ds["source_row"] == [0, 1]  # 0-based record index (row 1 spans two lines)
    assert ds["prompt"][1] == "Write a haiku\nabout rain"
    assert ds["topic"] == ["geo", "poetry"]
    assert "generic.csv[row 4]: malformed_row" in result.report.render()


def test_generic_json_data_key_and_hashed_ids() -> None:
    result = load_preferences(FIXTURES / "generic.json")
    _assert_accounted(result)
    assert result.report.format == "generic"
    assert result.report.by_reason() == {"wrong_type": 2, "missing_field": 1}
    assert result.dataset["lang"] == ["en", "de"]
    assert all(len(i) == 16 for i in result.dataset["id"])


def test_mapping_errors_name_column_and_available_ones() -> None:
    with pytest.raises(DataError, match=r"column 'query' \(mapped to 'prompt'\) not found; "
                                        r"available columns: uid, question, good, bad, topic"):
        load_preferences(FIXTURES / "generic.csv",
                         DataOptions(columns={**CSV_MAPPING, "prompt": "query"}))
    with pytest.raises(ConfigError, match="'answer' is not a canonical column"):
        DataOptions(columns={"answer": "good"})


def test_parquet_and_saved_dataset(tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b", "id": "x1"},
            {"prompt": "p2", "chosen": "c", "rejected": "c", "id": "x2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    result = load_preferences(tmp_path / "pairs.parquet")
    assert (result.report.container, result.dataset["id"]) == ("parquet", ["x1"])
    assert result.report.by_reason() == {"identical_responses": 1}
    saved = tmp_path / "saved"
    other = {**rows[0], "id": "x3"}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list([other])}).save_to_disk(saved)
    result = load_preferences(saved, DataOptions(strict=True))
    assert result.report.container == "hf_disk"
    assert result.dataset["source_split"] == ["train", "test"]
    assert result.dataset["source_row"] == [0, 0]  # index within its split
    assert load_preferences(saved, DataOptions(hub_split="test")).dataset["id"] == ["x3"]


def test_hub_branch_uses_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    record = json.loads(TLDR.read_text().splitlines()[0])
    calls = []

    def fake_load_dataset(name, config=None, *, split=None, data_dir=None):
        calls.append((name, config, split, data_dir))
        return datasets.Dataset.from_list([record])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_preferences("openai/summarize_from_feedback",
                              DataOptions(hub_config="comparisons", hub_split="train"))
    assert calls == [("openai/summarize_from_feedback", "comparisons", "train", None)]
    assert (result.report.format, result.report.container) == ("tldr", "hub")
    assert result.dataset["chosen"] == ["Cat broke plant."]
    assert result.dataset["source_row"] == [0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "file not found"),
        ("empty.jsonl", b"", "empty file"),
        ("fake.jsonl.gz", b"plain text", "cannot read file"),
        ("fake.parquet", b"not parquet", "not a readable Parquet file"),
        ("data.txt", b"hello", "unknown file type"),
        ("broken.json", b"[{\"a\": 1},", "not valid JSON"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_preferences(path)


def test_auto_detection_and_unknown_layout(tmp_path: Path) -> None:
    assert load_preferences(TLDR).report.format == "tldr"
    assert load_preferences(HH).report.format == "hh"
    assert load_preferences(FIXTURES / "generic.json").report.format == "generic"
    path = tmp_path / "other.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match="cannot detect the format"):
        load_preferences(path)
    with pytest.raises(ConfigError, match="format: must be one of auto, tldr"):
        DataOptions(format="csv")


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "batch3.json"
    path.write_text(TLDR.read_text().splitlines()[0] + "\n")
    result = load_preferences(path)
    assert (result.report.container, result.dataset["source_row"]) == ("json_lines", [1])
