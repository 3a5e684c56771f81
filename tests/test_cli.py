"""The command line: reports, one-line errors with the right exit codes, train/evaluate, help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from prefprune.cli import app, build_train_config, parse_columns
from prefprune.data import generate_synthetic

FIXTURES = Path(__file__).parent / "fixtures"
WIDE = {"COLUMNS": "200"}  # rich wraps and truncates at the default width of 80


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env=WIDE)


def assert_one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def test_inspect_accounts_for_every_row():
    result = run("data", "inspect", FIXTURES / "generic.csv", "--column", "prompt=question",
                 "--column", "chosen=good", "--column", "rejected=bad", "--examples", "2")
    assert result.exit_code == 0, result.output
    assert "read 6 = kept 3 + skipped 3" in result.stdout
    assert "identical_responses" in result.stdout and "Paris." in result.stdout


def test_inspect_json_is_parseable():
    result = run("data", "inspect", FIXTURES / "tldr_comparisons.jsonl", "--json",
                 "--examples", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["report"]["read"] == data["report"]["kept"] + data["report"]["skipped_count"]
    assert len(data["examples"]) == 1


def test_missing_file_is_one_error_line(tmp_path):
    line = assert_one_error_line(run("data", "inspect", tmp_path / "absent.jsonl"), 1)
    assert "absent.jsonl: file not found" in line


def test_unknown_column_is_a_data_error():
    line = assert_one_error_line(run("data", "inspect", FIXTURES / "generic.csv",
                                     "--column", "prompt=nope"), 1)
    assert "column 'nope'" in line


@pytest.mark.parametrize("args, expected", [
    (["--column", "prompt"], "CANONICAL=COLUMN"),
    (["--column", "answer=good"], "not a canonical column"),
    (["--format", "xml"], "not one of auto"),
])
def test_bad_data_flags_are_usage_errors(args, expected):
    line = assert_one_error_line(run("data", "inspect", FIXTURES / "generic.csv", *args), 2)
    assert expected in line


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "zero"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--device", "toaster"], "not a device"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_train_flags_are_usage_errors(tmp_path, args, expected):
    line = assert_one_error_line(run("train", "--output", tmp_path / "m", *args), 2)
    assert expected in line


def test_missing_model_is_one_error_line(tmp_path):
    line = assert_one_error_line(run("evaluate", tmp_path, FIXTURES / "tldr_comparisons.jsonl"),
                                 1)
    assert "not a reward model directory" in line


def test_train_then_evaluate(tmp_path, tiny_bert):
    data = generate_synthetic(tmp_path / "syn.jsonl", n_posts=20)
    model = tmp_path / "model"
    trained = run("train", data, "--output", model, "--backbone", tiny_bert, "--epochs", "1",
                  "--batch-size", "8", "--max-length", "64", "--quiet")
    assert trained.exit_code == 0, trained.output
    assert "accuracy" in trained.stdout and "fingerprint" in trained.stdout
    assert (model / "prefprune.json").is_file()
    evaluated = run("evaluate", model, data, "--quiet")
    assert evaluated.exit_code == 0, evaluated.output
    assert "accuracy" in evaluated.stdout and "test" in evaluated.stdout
    as_json = run("evaluate", model, data, "--split", "validation", "--json", "--quiet")
    metrics = json.loads(as_json.stdout)["metrics"]["validation"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["pairs"] > 0


def _commands(group, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands(get_command(app)))


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_mentions_every_option(path, command):
    result = run(*path, "--help")
    assert result.exit_code == 0, result.output
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, f"{param.name} has no help text"
            for flag in param.opts:
                assert flag in result.stdout, f"{flag} missing from '{' '.join(path)} --help'"


def test_parse_columns():
    assert parse_columns(["prompt=question", " chosen = good "]) == {
        "prompt": "question", "chosen": "good"}
    assert parse_columns(None) == {}
    with pytest.raises(typer.BadParameter, match="mapped twice"):
        parse_columns(["prompt=a", "prompt=b"])


def test_train_options_build_the_train_config():
    config = build_train_config(epochs=2, batch_size=4, learning_rate=0.1, warmup_ratio=0.0,
                                grad_accum=3, seed=7, device="cpu")
    assert (config.epochs, config.grad_accum_steps, config.seed, config.device) == \
        (2, 3, 7, "cpu")


def test_score_writes_table_and_sidecar_and_resumes(tmp_path, tiny_bert):
    import pandas as pd

    data = generate_synthetic(tmp_path / "syn.jsonl", n_posts=24)
    out = tmp_path / "scores.parquet"
    args = ("score", data, "--output", out, "--backbone", tiny_bert, "--epochs", "1",
            "--max-length", "64", "--scores", "if,grad_cos,loss,random", "--quiet")
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "most harmful pairs" in first.stdout and "converged" in first.stdout
    table = pd.read_parquet(out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert {"id", "if", "rank_if", "grad_cos", "loss", "random", "label_flipped"} <= set(table)
    assert sorted(table["rank_if"]) == list(range(1, len(table) + 1))
    assert sidecar["n_train"] == len(table) and sidecar["pairs_through_gradient_passes"] > 0
    again = run(*args, "--json")
    assert again.exit_code == 0, again.output
    # Same seed, same data: the model retrains identically and every shard is reused.
    assert json.loads(again.stdout)["metadata"]["pairs_through_gradient_passes"] == 0
    assert pd.read_parquet(out)["if"].tolist() == table["if"].tolist()


def test_score_rejects_unknown_score_names(tmp_path):
    result = run("score", "--output", tmp_path / "s.parquet", "--scores", "if,nonsense")
    assert result.exit_code == 2 and "nonsense" in result.stderr
