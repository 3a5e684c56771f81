"""A hostile but fair user, second round: outputs, settings and their single source of truth.

Like ``test_hostile_inputs.py``, every case ends with a correct result or a non-zero exit and
one ``error:`` line, never a traceback, and no user file is changed or deleted. The numbers in
the test names follow the issue that collected these probes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from helpers import assert_one_error_line, pairs, run_cli

import prefprune
from prefprune import RewardModel, load_preferences

TINY = ("--max-length", "48", "--lora-layers", "1", "--epochs", "1", "--batch-size", "8")


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``: the user's files, to compare before and after."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` generic prompt/chosen/rejected pairs as JSONL."""
    rows = pairs(n, seed, "o")
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                            + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("outputs") / "pairs.jsonl", 40)


def user_files(folder: Path) -> dict[str, str]:
    """Put a user's notes and a copy of their data into ``folder``; return their digests."""
    (folder / "notes.txt").write_text("mine")
    (folder / "my_data").mkdir()
    (folder / "my_data" / "pairs.jsonl").write_text("{}\n")
    return {**digest(folder / "notes.txt"), **digest(folder / "my_data")}


def test_01_train_overwrite_replaces_only_the_model(data, tiny_bert, tmp_path):
    out = tmp_path / "m"
    first = run_cli("train", data, "--output", out, "--backbone", tiny_bert, *TINY, "--quiet")
    assert first.exit_code == 0, first.output
    mine = user_files(out)
    again = run_cli("train", data, "--output", out, "--backbone", tiny_bert, *TINY,
                    "--learning-rate", "0.001", "--overwrite", "--quiet")
    assert again.exit_code == 0, again.output
    assert {**digest(out / "notes.txt"), **digest(out / "my_data")} == mine
    model = RewardModel.load(out)
    assert model.metadata["train_config"]["learning_rate"] == 0.001
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_02_experiment_overwrite_replaces_only_its_own_files(data, tiny_bert, tmp_path):
    out = tmp_path / "exp"
    args = ("experiment", data, "--output", out, "--backbone", tiny_bert, *TINY, "--seeds",
            "0", "--fractions", "0.2", "--scores", "loss,random", "--no-helpful",
            "--no-relabel", "--quiet")
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    mine = {**user_files(out / "models" / "seed0"), **user_files(out / "runs")}
    (out / "figures" / "my_plot.svg").write_text("<svg/>")
    mine.update(digest(out / "figures" / "my_plot.svg"))
    again = run_cli(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    kept = {**digest(out / "models" / "seed0" / "notes.txt"),
            **digest(out / "models" / "seed0" / "my_data"),
            **digest(out / "runs" / "notes.txt"), **digest(out / "runs" / "my_data"),
            **digest(out / "figures" / "my_plot.svg")}
    assert kept == mine
    assert (out / "models" / "seed0" / "prefprune.json").is_file()
    assert (out / "results.json").is_file()


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 40 kB tmpfs: room for a folder and a marker, not for a model or a score table."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0 or os.path.ismount(mount) is False:
        pytest.skip("cannot mount a small tmpfs here (needs root): " + done.stderr.decode())
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_03_a_full_disk_is_one_error_line(data, tiny_bert, tiny_disk, tmp_path):
    model = assert_one_error_line(run_cli("train", data, "--output", tiny_disk / "m",
                                          "--backbone", tiny_bert, *TINY, "--quiet"), 1)
    assert "No space left on device" in model and "cannot write" in model
    trained = run_cli("train", data, "--output", tmp_path / "m", "--backbone", tiny_bert,
                      *TINY, "--quiet")
    assert trained.exit_code == 0, trained.output
    scores = assert_one_error_line(run_cli(
        "score", data, "--model", tmp_path / "m", "--output", tiny_disk / "s.parquet",
        "--scores", "loss,grad_dot", "--quiet"), 1)
    assert "No space left on device" in scores
    assert not [p for p in tiny_disk.rglob("*.tmp-*")]  # no partial file left behind


@pytest.mark.parametrize("args", [
    ("prune", "scores.parquet", "pairs.jsonl", "--output", "out", "--fraction", "nan"),
    ("score", "pairs.jsonl", "--output", "s.parquet", "--damping", "nan"),
    ("validate", "pairs.jsonl", "--output", "v", "--subset-fraction", "nan"),
])
def test_10_nan_is_not_a_number(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_error_line(run_cli(*args), 2)
    assert "is not a number" in line and "nan" in line


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--fraction", "1", "must be < 1.0"), ("--fraction", "0", "must be > 0.0"),
    ("--direction", "sideways", "must be one of harmful, helpful"),
])
def test_18_prune_flags_are_prune_config_fields(flag, value, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_error_line(run_cli("prune", "s.parquet", "p.jsonl", "--output", "o", flag,
                                         value), 2)
    assert message in line and flag in line


@pytest.mark.parametrize("section", ["train", "influence"])
def test_21_a_run_refuses_the_seeds_it_sets_itself(section, data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"{section}:\n  seed: 7\n")
    for command in ("experiment", "validate"):
        line = assert_one_error_line(run_cli(command, data, "--config", config, "--output",
                                             tmp_path / command), 1)
        assert f"{section}.seed" in line and "remove it" in line
    assert not (tmp_path / "experiment").exists() and not (tmp_path / "validate").exists()



def test_18_prune_strict_stops_at_a_bad_row_before_writing(data, tmp_path):
    """--strict was offered by prune and then ignored; now it refuses data with a bad row,
    naming it, and writes nothing. Without it the row is skipped and written back as is."""
    source = tmp_path / "pairs.jsonl"
    source.write_text(data.read_text() + json.dumps({"prompt": "p", "chosen": "same",
                                                     "rejected": "same"}) + "\n")
    scores = tmp_path / "scores.parquet"
    table = load_preferences(source).dataset
    pd.DataFrame({"id": table["id"], "loss": range(len(table))}).to_parquet(scores)
    line = assert_one_error_line(run_cli("prune", scores, source, "--output", tmp_path / "o",
                                         "--by", "loss", "--strict"), 1)
    assert "pairs.jsonl" in line and ":41" in line
    assert not (tmp_path / "o").exists()
    lenient = run_cli("prune", scores, source, "--output", tmp_path / "o", "--by", "loss")
    assert lenient.exit_code == 0, lenient.output
    assert len((tmp_path / "o" / "pairs.jsonl").read_text().splitlines()) == 41 - 4


def test_23_the_package_example_uses_only_what_it_imports():
    """The example at the top of ``prefprune/__init__.py`` once used an undefined name: every
    name it calls is imported on its own import line, and prefprune exports it."""
    lines = [line.split(">>> ", 1)[1].split("#")[0] for line in prefprune.__doc__.splitlines()
             if line.startswith(">>> ")]
    imported = {alias.name for alias in ast.parse(lines[0]).body[0].names}
    called = {node.func.id for line in lines[1:] for node in ast.walk(ast.parse(line.strip()))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert called <= imported
    assert imported <= set(prefprune.__all__)
