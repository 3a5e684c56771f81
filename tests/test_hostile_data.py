"""A hostile but fair user's data: records too deep to parse, sources where no pair survives,
odd labels, huge cells and records, mistyped paths and splits.

Every case ends with a correct result, or a non-zero exit and one ``error:`` line, never a
traceback; inputs are hashed before and after and must be unchanged. The numbers in the test
names are those of issue 19.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest
from helpers import assert_one_error_line, run_cli

import prefprune.cli.commands as commands
from prefprune.data import (
    DEFAULT_SPLIT_FRACTIONS,
    DataError,
    DataOptions,
    load_preferences,
    split_preferences,
)
from prefprune.data.jsontext import MAX_DEPTH
from prefprune.data.pairwise import flip_label
from prefprune.data.report import REASONS, SkippedRow
from prefprune.data.writer import rewrite_source
from prefprune.errors import ConfigError
from prefprune.experiment import ExperimentConfig
from prefprune.model.encoding import PairEncoder
from prefprune.model.loading import load_tokenizer
from prefprune.pipeline import prepare_data

DATA_LAYER = Path(__file__).parents[1] / "prefprune" / "data"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generic(i: int, **extra: object) -> dict:
    return {"prompt": f"question {i}", "chosen": f"good answer {i}",
            "rejected": f"bad answer {i}", **extra}


def inspect_json(source: Path, backbone: Path, *args: object) -> dict:
    """``data inspect --json`` on ``source``, which must succeed and leave it unchanged."""
    before = digest(source)
    result = run_cli("data", "inspect", source, "--backbone", backbone, "--json", *args)
    assert result.exit_code == 0, result.output
    assert digest(source) == before
    return json.loads(result.stdout)


# --- 4: one record nested 10,000 levels deep ------------------------------------------------

DEEP = "[" * 10_000 + "]" * 10_000


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _deep_lines() -> list[str]:
    lines = [json.dumps(generic(i)) for i in range(4)]
    lines.insert(2, json.dumps(generic(9))[:-1] + ', "meta": ' + DEEP + "}")
    return lines


@pytest.mark.parametrize(("name", "text", "where"), [
    ("deep.jsonl", "\n".join(_deep_lines()) + "\n", 3),
    ("deep.json", "[" + ",\n".join(_deep_lines()) + "]", 2),
    ("wrapped.json", '{"source": "x", "data": [' + ", ".join(_deep_lines()) + "]}", 2),
    # parsed by json, but too deep for pyarrow and datasets
    ("parsed.jsonl", "\n".join([*_deep_lines()[:2], json.dumps(generic(7, meta=_nested(40))),
                                *_deep_lines()[3:]]) + "\n", 3),
])
def test_04_a_record_too_deep_is_skipped_alone(tmp_path, tiny_bert, name, text, where):
    source = tmp_path / name
    source.write_text(text)
    report = inspect_json(source, tiny_bert)["report"]
    assert (report["read"], report["kept"], report["by_reason"]) == (5, 4, {"too_deep": 1})
    (row,) = report["skipped"]
    assert (row["line"], row["field"]) == (where, "meta")
    assert f"nested more than {MAX_DEPTH} levels" in row["detail"]


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_04_a_rewrite_keeps_the_deep_record_byte_for_byte(tmp_path, name):
    source = tmp_path / name
    lines = _deep_lines()
    source.write_text("[" + ",\n".join(lines) + "]" if name.endswith(".json")
                      else "\n".join(lines) + "\n")
    before = digest(source)
    ids = load_preferences(source).dataset["id"]
    out = tmp_path / "out" / name
    rewrite_source(source, out, remove={ids[0]}, relabel={ids[-1]})
    text = out.read_text()
    assert digest(source) == before
    assert lines[2] in text and lines[0] not in text and lines[1] in text
    again = load_preferences(out)
    assert again.report.by_reason() == {"too_deep": 1}
    assert again.dataset["chosen"][-1] == "bad answer 3"


# --- 5: no pair survives ----------------------------------------------------------------------

@pytest.fixture()
def ab_file(tmp_path) -> Path:
    source = tmp_path / "ab.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"q {i}", "response_a": f"a {i}",
                                          "response_b": f"b {i}", "label": "AB"[i % 2]}) + "\n"
                              for i in range(6)))
    return source


def test_05_inspect_shows_why_no_pair_survived(tmp_path, tiny_bert, ab_file):
    shown = inspect_json(ab_file, tiny_bert, "--label-values=x,y")
    assert (shown["report"]["kept"], shown["report"]["by_reason"]) == (0, {"unknown_label": 6})
    assert shown["truncation"]["pairs"] == 0 and shown["examples"] == []
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"prompt": [1, 2], "chosen": [3, 4], "rejected": [5, 6]}).to_parquet(numbers)
    assert inspect_json(numbers, tiny_bert)["report"]["by_reason"] == {"wrong_type": 2}


def test_05_the_encoder_takes_an_empty_set(tiny_bert):
    cut = PairEncoder(load_tokenizer(str(tiny_bert), False), 32).truncation(
        {"prompt": [], "chosen": [], "rejected": []})
    assert (cut.pairs, cut.prompts_cut, cut.responses_cut) == (0, 0, 0)


def test_05_train_says_every_row_was_skipped_and_why(tmp_path, tiny_bert, ab_file):
    before = digest(ab_file)
    line = assert_one_error_line(run_cli(
        "train", ab_file, "--label-values=x,y", "--output", tmp_path / "m", "--backbone",
        tiny_bert, "--epochs", "1", "--lora-layers", "1", "--quiet"), 1)
    assert "all 6 rows were skipped (6 unknown_label)" in line
    assert "prefprune data inspect" in line
    assert digest(ab_file) == before and not (tmp_path / "m").exists()


def test_05_a_separate_validation_set_says_the_same(tmp_path, ab_file):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(generic(i)) + "\n" for i in range(8)))
    with pytest.raises(DataError, match=r"no usable pairs for the validation set: all 6 rows "
                                        r"were skipped \(6 unknown_label\)"):
        prepare_data(train, validation=ab_file,
                     validation_options=DataOptions(label_values=("x", "y")))


# --- 6: an HH transcript whose rejected side adds a turn after a NUL --------------------------

def test_06_hh_rows_that_differ_only_after_a_nul_are_reported(tmp_path, tiny_bert):
    prompt = "\n\nHuman: hi there\n\nAssistant:"
    rows = [{"chosen": f"{prompt} hello {i}", "rejected": f"{prompt} go away {i}"}
            for i in range(3)]
    rows.append({"chosen": f"{prompt} fine", "rejected": f"{prompt}\u0000\n\nAssistant: no"})
    source = tmp_path / "hh.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = inspect_json(source, tiny_bert)["report"]
    (row,) = report["skipped"]
    assert (report["kept"], row["line"], row["reason"], row["field"]) == (
        3, 4, "hh_prompt_mismatch", "rejected")
    assert f"first difference at character {len(prompt)}" in row["detail"]


# --- 7: a split the saved dataset does not have -----------------------------------------------

def test_07_an_unknown_split_lists_the_ones_there_are(tmp_path, tiny_bert):
    rows = [generic(i) for i in range(4)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(saved)
    line = assert_one_error_line(run_cli("data", "inspect", saved, "--hub-split", "nosuch",
                                         "--backbone", tiny_bert), 1)
    assert "no split 'nosuch'; its splits are train, test" in line
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(single)
    with pytest.raises(DataError, match="without splits has no split 'test'"):
        load_preferences(single, DataOptions(hub_split="test"))


# --- 11, 12, 13: label values -----------------------------------------------------------------

def test_11_equal_label_values_are_refused(tiny_bert, ab_file):
    for values in ("1,1", "1,1.0"):
        line = assert_one_error_line(run_cli("data", "inspect", ab_file, f"--label-values="
                                             f"{values}", "--backbone", tiny_bert), 2)
        assert "--label-values" in line and "must differ" in line
    with pytest.raises(ConfigError) as raised:
        DataOptions(label_values=("a", "a"))
    assert raised.value.field == "label_values"


def _ab_frame(labels: list) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"q {i}" for i in range(len(labels))],
                         "response_a": [f"a {i}" for i in range(len(labels))],
                         "response_b": [f"b {i}" for i in range(len(labels))],
                         "label": labels})


def test_12_csv_float_labels_read_as_json_ones_do(tmp_path):
    frame = _ab_frame([0.0, 1.0, 1.0, 0.0])
    frame.to_csv(tmp_path / "ab.csv", index=False)
    frame.to_json(tmp_path / "ab.jsonl", orient="records", lines=True)
    assert "1.0" in (tmp_path / "ab.csv").read_text()
    from_csv, from_json = (load_preferences(tmp_path / n) for n in ("ab.csv", "ab.jsonl"))
    assert from_csv.report.kept == 4
    assert from_csv.dataset["chosen"] == from_json.dataset["chosen"] == ["a 0", "b 1", "b 2",
                                                                          "a 3"]
    signed = _ab_frame(["-1.0", "1.0"])
    signed.to_csv(tmp_path / "signed.csv", index=False)
    assert load_preferences(tmp_path / "signed.csv", DataOptions(
        label_values=("-1", "1"))).dataset["chosen"] == ["a 0", "b 1"]
    first = from_csv.dataset["id"][0]
    rewrite_source(tmp_path / "ab.csv", tmp_path / "out" / "ab.csv", relabel={first})
    with (tmp_path / "out" / "ab.csv").open(newline="") as handle:
        assert [row["label"] for row in csv.DictReader(handle)] == ["1.0", "1.0", "1.0", "0.0"]


@pytest.mark.parametrize(("value", "flipped"), [
    ("3", "-3"), (3, -3), (2.5, -2.5), ("-0.5", "0.5"), ("+2", "-2"), (-1.0, 1.0)])
def test_13_a_signed_strength_keeps_its_type_and_format(value, flipped):
    result = flip_label(value, ("negative", "positive"))
    assert result == flipped and type(result) is type(flipped)


@pytest.mark.parametrize(("value", "values", "flipped"), [
    ("1.0", None, "0.0"), (1.0, None, 0.0), (0, None, 1), ("A", None, "B"),
    ("model_b", None, "model_a"), ("MODEL_A", None, "MODEL_B"), ("-1.0", ("-1", "1"), "1.0"),
    (-1, ("-1", "1"), 1)])
def test_12_a_flipped_label_keeps_its_own_spelling(value, values, flipped):
    result = flip_label(value, values)
    assert result == flipped and type(result) is type(flipped)


def test_13_prune_relabels_string_strengths_in_place(tmp_path):
    source = tmp_path / "graded.csv"
    _ab_frame(["3", "-0.5", "2"]).to_csv(source, index=False)
    options = DataOptions(label_values=("negative", "positive"))
    ids = load_preferences(source, options).dataset["id"]
    before = digest(source)
    rewrite_source(source, tmp_path / "out" / "graded.csv", options, relabel=set(ids[:2]))
    assert digest(source) == before
    with (tmp_path / "out" / "graded.csv").open(newline="") as handle:
        assert [row["label"] for row in csv.DictReader(handle)] == ["-3", "0.5", "2"]


# --- 15, 16: a huge cell, a huge record -------------------------------------------------------

def test_15_a_one_megabyte_csv_cell_reads_and_writes(tmp_path):
    limit = csv.field_size_limit()
    source = tmp_path / "big.csv"
    long = "word " * 200_000
    pd.DataFrame([generic(0, chosen=long), generic(1)]).to_csv(source, index=False)
    loaded = load_preferences(source)
    assert loaded.report.kept == 2 and loaded.dataset["chosen"][0] == long
    rewrite_source(source, tmp_path / "out" / "big.csv", remove={loaded.dataset["id"][1]})
    assert load_preferences(tmp_path / "out" / "big.csv").dataset["chosen"] == [long]
    assert csv.field_size_limit() == limit  # the csv module's global setting is put back


class _Counting:
    """A tokenizer that counts the characters it is asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.characters = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.characters += sum(len(t) for t in texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_16_token_counts_stop_once_a_text_cannot_fit(tiny_bert):
    tokenizer = load_tokenizer(str(tiny_bert), False)
    counting = _Counting(tokenizer)
    encoder = PairEncoder(counting, 32)
    cap = encoder._budget + 1
    texts = ["short one", "word " * 40, "x" * 3000, "long " * 1_000_000, "a b " * 5]
    counts = encoder._token_counts(texts)
    exact = [len(ids) for ids in tokenizer(texts[:3] + texts[4:], add_special_tokens=False,
                                           verbose=False).input_ids]
    assert counts == [min(n, cap) for n in exact[:3]] + [cap, min(exact[3], cap)]
    assert counting.characters < 20_000  # not the 5 MB text


def test_16_a_multi_megabyte_record_is_inspected_quickly(tmp_path, tiny_bert):
    prompt = "\n\nHuman: tell me\n\nAssistant:"
    source = tmp_path / "big.jsonl"
    source.write_text(json.dumps({"chosen": f"{prompt} {'yes ' * 500_000}",
                                  "rejected": f"{prompt} {'no ' * 500_000}"}) + "\n")
    cut = inspect_json(source, tiny_bert, "--examples", "0")["truncation"]
    assert (cut["pairs"], cut["responses_cut"]) == (1, 1)


# --- 17: a mistyped path is reported before the tokenizer loads -------------------------------

def test_17_a_missing_source_fails_before_the_tokenizer_loads(tmp_path, monkeypatch):
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded")

    monkeypatch.setattr(commands, "load_tokenizer", no_tokenizer)
    line = assert_one_error_line(run_cli("data", "inspect", tmp_path / "nosuch.jsonl"), 1)
    assert "nosuch.jsonl: file not found" in line
    (tmp_path / "notes.txt").write_text("mine")
    line = assert_one_error_line(run_cli("data", "inspect", tmp_path / "notes.txt"), 1)
    assert "unknown file type" in line


# --- 19, 20, 23: one source of truth ----------------------------------------------------------

def test_19_readers_and_the_writer_take_the_options_object(tmp_path):
    assert not hasattr(DataOptions, "kwargs")
    for function in (load_preferences, rewrite_source):
        names = set(inspect.signature(function).parameters)
        assert "options" in names and not names & {"columns", "label_values", "hub_split"}
    source = tmp_path / "mapped.csv"
    _ab_frame([-1, 1]).rename(columns={"prompt": "question"}).to_csv(source, index=False)
    options = DataOptions(columns={"prompt": "question"}, label_values=("-1", "1"))
    ids = load_preferences(source, options).dataset["id"]
    rewrite_source(source, tmp_path / "out" / "mapped.csv", options, relabel={ids[0]})
    assert load_preferences(tmp_path / "out" / "mapped.csv", options).dataset["chosen"] == [
        "b 0", "b 1"]


def test_20_split_fractions_are_declared_once():
    defaults = {inspect.signature(split_preferences).parameters["fractions"].default,
                inspect.signature(prepare_data).parameters["fractions"].default,
                ExperimentConfig.fields_help()["split_fractions"].default}
    assert defaults == {DEFAULT_SPLIT_FRACTIONS}


def test_23_skip_reasons_come_from_one_list():
    code = "\n".join(p.read_text() for p in DATA_LAYER.glob("*.py") if p.name != "report.py")
    used = set(re.findall(r'RowIssue\(\s*"(\w+)"', code))
    used |= set(re.findall(r'error_reason\s*[:=][^"\n]*"(\w+)"', code))
    assert used <= set(REASONS)
    assert {reason for reason in REASONS if f'"{reason}"' not in code} == set()
    with pytest.raises(ValueError, match="not one of the stable REASONS"):
        SkippedRow("f", 1, None, "made_up", "detail")
