"""The command line: reports, one-line errors with the right exit codes, train/evaluate, help."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer
from helpers import FIXTURES, WIDE, assert_one_error_line, run_cli
from typer.main import get_command

from prefprune import (
    DataOptions,
    EnsembleConfig,
    ExperimentConfig,
    InfluenceConfig,
    PruneConfig,
    RewardModelConfig,
    TrainConfig,
    ValidateConfig,
    demo_config,
)
from prefprune.cli import app
from prefprune.cli.commands import DATA, TRAIN
from prefprune.cli.options import _shown
from prefprune.data import generate_synthetic

run = run_cli


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
    (["--format", "xml"], "must be one of auto"),
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


def test_every_setting_flag_is_generated_with_the_library_default():
    """A flag named like a setting is generated from that setting's field (help, limits and
    the default the library uses for this command), never written again by hand."""
    classes = (DataOptions, RewardModelConfig, TrainConfig, InfluenceConfig, EnsembleConfig,
               ExperimentConfig, ValidateConfig, PruneConfig)
    runs = {"experiment": ExperimentConfig(), "validate": ValidateConfig(),
            "demo": demo_config()}
    # evaluate's --seed picks the split; its default is the seed the saved model records
    own_flags = {("evaluate", "seed")}

    def library_default(command, cls, name):
        run = runs.get(command)
        nested = [run] + [getattr(run, f.name) for f in dataclasses.fields(run)] if run else []
        for value in nested:
            if isinstance(value, cls):
                return getattr(value, name)
        return getattr(cls(), name)

    checked = 0
    for path, click_command in COMMANDS:
        command = " ".join(path)
        for param in click_command.params:
            if not type(param).__name__.endswith("Option"):
                continue
            name = param.name.removeprefix("validation_").removeprefix("test_") \
                .removeprefix("ensemble_")
            name = "columns" if name == "column" else name
            owners = [cls for cls in classes if name in cls.fields_help()
                      and (param.help or "").startswith(cls.fields_help()[name].metadata["help"])]
            if not owners:
                named_like = [cls.__name__ for cls in classes if name in cls.fields_help()
                              and cls.fields_help()[name].metadata["cli"]]
                assert not named_like or (command, param.name) in own_flags, \
                    f"{command} --{param.name} repeats a field of {named_like} by hand"
                continue
            assert param.default is None, f"{command} --{param.name}"
            expected = _shown(library_default(command, owners[0], name))
            assert param.show_default == expected, (command, param.name)
            checked += 1
    assert checked > 100


def test_column_flags_build_the_mapping():
    typed = DATA.typed({"column": ["prompt=question", " chosen = good "]})
    assert typed["columns"] == {"prompt": "question", "chosen": "good"}
    assert DATA.build({}).columns == {}
    with pytest.raises(typer.BadParameter, match="mapped twice"):
        DATA.typed({"column": ["prompt=a", "prompt=b"]})


def test_train_options_build_the_train_config():
    config = TRAIN.build({"epochs": 2, "batch_size": 4, "learning_rate": 0.1,
                          "warmup_ratio": 0.0, "grad_accum_steps": 3, "seed": 7,
                          "device": "cpu"})
    assert (config.epochs, config.grad_accum_steps, config.seed, config.device) == \
        (2, 3, 7, "cpu")
    assert TRAIN.build({"epochs": None}).epochs == TRAIN.base.epochs  # untyped: the default


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
    refused = run(*args)
    assert "already exists" in assert_one_error_line(refused, 1)
    again = run(*args, "--json", "--overwrite")
    assert again.exit_code == 0, again.output
    # Same seed, same data: the model retrains identically and every shard is reused.
    assert json.loads(again.stdout)["metadata"]["pairs_through_gradient_passes"] == 0
    assert pd.read_parquet(out)["if"].tolist() == table["if"].tolist()


def test_score_rejects_unknown_score_names(tmp_path):
    result = run("score", "--output", tmp_path / "s.parquet", "--scores", "if,nonsense")
    assert result.exit_code == 2 and "nonsense" in result.stderr


def test_prune_writes_the_source_layout_and_evidence(tmp_path):
    import pandas as pd

    from prefprune.data import load_preferences

    data = generate_synthetic(tmp_path / "syn.jsonl", n_posts=12)
    ids = load_preferences(data).dataset["id"][:10]
    scores = pd.DataFrame({"id": ids, "if": [float(i) for i in range(10)]})
    scores.to_parquet(tmp_path / "scores.parquet")
    result = run("prune", tmp_path / "scores.parquet", data, "--output", tmp_path / "out",
                 "--fraction", "0.2", "--relabel")
    assert result.exit_code == 0, result.output
    assert "relabelled 2 of 10 scored pairs" in result.stdout
    assert (tmp_path / "out" / "syn.jsonl").is_file()
    evidence = (tmp_path / "out" / "removed.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in evidence] == [ids[9], ids[8]]
    bad = run("prune", tmp_path / "scores.parquet", data, "--output", tmp_path / "o2",
              "--by", "nope")
    assert "no column 'nope'" in assert_one_error_line(bad, 2)


def test_experiment_reads_yaml_and_typed_flags_win(tmp_path, tiny_bert):
    import yaml

    data = generate_synthetic(tmp_path / "syn.jsonl", n_posts=16)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({
        "fractions": [0.25], "seeds": [0], "helpful": False, "relabel": False,
        "influence": {"scores": ["loss", "random"]},
        "model": {"backbone": str(tiny_bert), "max_length": 48},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.01}}))
    out = tmp_path / "exp"
    result = run("experiment", data, "--config", config, "--output", out, "--epochs", "1",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert "no pruning" in result.stdout and "report.html" in result.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1  # typed
    assert saved["train"]["learning_rate"] == 0.01  # from the file, not the flag default
    assert saved["influence"]["scores"] == ["loss", "random"] and saved["data"] == str(data)
    again = run("experiment", "--config", out / "config.yaml", "--output", out, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["summary"]["baseline"]["seeds"] == [0]
    clash = run("experiment", data, "--config", config, "--output", out, "--quiet")
    assert "holds a different experiment" in assert_one_error_line(clash, 1)


def test_demo_prints_the_headline_table(monkeypatch, tmp_path, tiny_bert):
    from prefprune import pipeline
    from prefprune.cli import runs
    from prefprune.data import expert_validation
    from prefprune.experiment import config, demo_config
    from prefprune.model import RewardModelConfig
    from prefprune.training import TrainConfig

    data = generate_synthetic(tmp_path / "syn.jsonl", n_posts=16)
    expert = expert_validation(data, tmp_path / "expert.jsonl")
    monkeypatch.setattr(pipeline, "default_dataset_path", lambda: data)
    monkeypatch.setattr(config, "default_expert_validation_path", lambda: expert)
    monkeypatch.setattr(runs, "demo_config", lambda seeds=(0, 1, 2): demo_config(
        seeds, RewardModelConfig(backbone=str(tiny_bert), max_length=48, lora_layers=1),
        TrainConfig(epochs=1, batch_size=8, learning_rate=0.01)))
    result = run("demo", "--output", tmp_path / "demo", "--quiet", "--seeds", "0,1")
    assert result.exit_code == 0, result.output
    for method in ("no pruning", "if", "grad_cos", "loss", "random"):
        assert method in result.stdout
    assert "flip AUROC" in result.stdout and "Writing" not in result.output
    assert (tmp_path / "demo" / "report.html").is_file()
    saved = (tmp_path / "demo" / "config.yaml").read_text()
    assert f"validation: {expert}" in saved


def test_score_under_torchrun_equals_one_process(tmp_path, tiny_bert):
    """`torchrun --nproc-per-node 2 prefprune score` (gloo): one table, equal to one process."""
    import os
    import subprocess
    import sys

    import numpy as np
    import pandas as pd

    data = generate_synthetic(tmp_path / "syn.jsonl", n_posts=24)
    model = tmp_path / "model"
    trained = run("train", data, "--output", model, "--backbone", tiny_bert, "--epochs", "1",
                  "--max-length", "48", "--quiet")
    assert trained.exit_code == 0, trained.output
    common = ("score", data, "--model", model, "--scores", "if,grad_cos,loss",
              "--solver", "direct", "--shard-size", "8", "--quiet")
    single = run(*common, "--output", tmp_path / "one.parquet")
    assert single.exit_code == 0, single.output
    bin_dir = Path(sys.executable).parent
    launched = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
         str(bin_dir / "prefprune"), *map(str, common), "--output", tmp_path / "two.parquet"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **WIDE})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("pairs scored over") == 1  # rank 0 prints, rank 1 does not
    one, two = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    assert one["id"].tolist() == two["id"].tolist()
    for column in ("if", "grad_cos", "loss"):
        assert np.allclose(two[column], one[column], rtol=1e-5, atol=1e-9), column
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.json", "two.parquet",
                                                            "two.parquet.work"]


def test_headline_rows_fit_80_columns(monkeypatch):
    """Five seeds of realistic figures: every row, intervals included, on one 80-column line."""
    import io

    from rich.console import Console

    from prefprune.cli import render
    from prefprune.experiment import Arm, ExperimentConfig, ExperimentResult, RunRecord
    from prefprune.experiment.stats import summarise

    runs = [RunRecord(Arm(s, m, 0.1 if m else 0.0), 725, 81, 0.4, 0.88 + 0.01 * s + d, 0.3,
                      0.4, 30.0) for s in range(5)
            for m, d in ((None, 0.0), ("if", 0.012), ("grad_cos_ens", -0.003), ("loss", 0.02),
                         ("random", -0.01))]
    detection = {str(s): {m: {"auroc": 0.9 - 0.01 * s, "found_in_top_10%": 0.45}
                           for m in ("if", "grad_cos_ens", "loss", "random")} for s in range(5)}
    result = ExperimentResult(ExperimentConfig(seeds=tuple(range(5)), fractions=(0.1,)), runs,
                              detection, summarise(runs, detection), {}, seconds=480.0)
    buffer = io.StringIO()
    monkeypatch.setattr(render, "stdout", Console(file=buffer, width=80))
    render.print_headline(result)
    rows = [line for line in buffer.getvalue().splitlines()
            if line.split() and line.split()[0] in ("if", "grad_cos_ens", "loss")]
    assert len(rows) == 3 and all(row.count("±") == 5 and len(row) <= 80 for row in rows)
