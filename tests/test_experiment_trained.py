"""``prefprune experiment --model``: the scores are the given model's own (a real TRL
RewardTrainer run, read on the tokens TRL trained on), every retrain follows its recipe, and
what the experiment cannot repeat is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_error_line, run_cli
from safetensors.torch import load_file, save_file
from test_trl_dpo import train_dpo
from test_trl_reward import plain_rows, train_trl, trl_margins, write_jsonl


@pytest.fixture(scope="module")
def trl_run(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """A RewardTrainer LoRA run on 16 pairs, and separate validation and test files."""
    root = tmp_path_factory.mktemp("trained")
    rows = [{**r, "split": "train"} for r in plain_rows(24)]
    files = {name: write_jsonl(part, root / f"{name}.jsonl") for name, part in
             (("train", rows[:16]), ("validation", rows[16:20]), ("test", rows[20:]))}
    trainer = train_trl(tiny_chat_llama, rows[:16], root / "run", epochs=1)
    return root / "run", files, trl_margins(trainer)


def experiment(run: Path, files: dict[str, Path], output: Path, *extra: object):
    return run_cli("experiment", files["train"], "--model", run, "--validation",
                   files["validation"], "--test", files["test"], "--seeds", "0,1",
                   "--fractions", "0.25", "--scores", "if,random", "--no-helpful",
                   "--no-relabel", "--epochs", "1", "--batch-size", "4", "--output", output,
                   "--quiet", "--json", *extra)


def test_scores_are_the_given_models_and_retrains_follow_its_recipe(trl_run, tmp_path):
    original, files, margins = trl_run
    run = Path(shutil.copytree(original, tmp_path / "run"))  # its weights change below
    out = tmp_path / "exp"
    result = experiment(run, files, out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    trained = results["data"]["trained_model"]
    assert trained["path"] == str(run)
    assert trained["recipe"]["objective"] == "reward"
    assert trained["trl"]["data"] == "auto" and trained["test"]["pairs"] == 4
    tables = {s: pd.read_parquet(out / "scores" / f"seed{s}.parquet").set_index("id")
              for s in (0, 1)}
    # the scores are taken at the TRL model, on TRL's tokens: its own margins
    np.testing.assert_allclose(tables[0].loc[list(margins), "margin"], list(margins.values()),
                               atol=1e-4, rtol=0)
    np.testing.assert_array_equal(tables[0]["if"], tables[1]["if"])
    assert not np.array_equal(tables[0]["random"], tables[1]["random"])  # each its own control
    records = {f"{r['method'] or 'none'}{r['seed']}": r for r in results["runs"]}
    assert {k: r["train_pairs"] for k, r in records.items()} == {
        "none0": 16, "if0": 12, "random0": 12, "none1": 16, "if1": 12, "random1": 12}
    saved = json.loads((out / "models" / "seed0" / "prefprune.json").read_text())["config"]
    assert saved["backbone"] == trained["recipe"]["backbone"]  # retrained from the same base
    assert saved["lora_r"] == 4 and saved["target_modules"] == ["q_proj", "v_proj"]
    assert "Scores taken at the given model" in (out / "report.md").read_text()
    again = experiment(run, files, out)  # resumes: nothing is trained or scored again
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    weights = run / "adapter_model.safetensors"
    save_file({k: 2 * v for k, v in load_file(weights).items()}, weights)
    changed = experiment(run, files, out)  # the saved scores are the old weights': refused
    assert "another given model" in assert_one_error_line(changed, 1)


@pytest.mark.parametrize("extra, says", [
    (("--inject-flips", "0.2"), "inject"),
    (("--backbone", "gpt2"), "comes from trained_model"),
    (("--ensemble-kind", "checkpoints", "--ensemble-members", "2"), "ensemble"),
])
def test_what_the_model_fixes_cannot_be_set(trl_run, tmp_path, extra, says):
    run, files, _ = trl_run
    error = assert_one_error_line(experiment(run, files, tmp_path / "exp", *extra), 2)
    assert says in error
    assert not (tmp_path / "exp").exists()


def test_a_trained_model_needs_separate_held_out_sets(trl_run, tmp_path):
    run, files, _ = trl_run
    result = run_cli("experiment", files["train"], "--model", run, "--output", tmp_path / "x")
    assert "--validation" in assert_one_error_line(result, 2)
    result = run_cli("experiment", files["train"], "--checkpoints", run, "--output",
                     tmp_path / "x")
    assert "--model" in assert_one_error_line(result, 2)


def test_a_full_weight_run_is_refused(tiny_chat_llama, trl_run, tmp_path):
    _, files, _ = trl_run
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    train_trl(tiny_chat_llama, rows, tmp_path / "full", epochs=1, lora=False)
    error = assert_one_error_line(experiment(tmp_path / "full", files, tmp_path / "exp"), 1)
    assert "full-weight" in error and "prefprune score --model" in error


def test_a_dpo_run_and_its_checkpoints(tiny_lm, trl_run, tmp_path):
    _, files, _ = trl_run
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    train_dpo(tiny_lm, rows, tmp_path / "run", epochs=1, beta=0.3)  # checkpoints at steps 2, 4
    out = tmp_path / "exp"
    result = experiment(tmp_path / "run", files, out, "--checkpoints", tmp_path / "run")
    assert result.exit_code == 0, result.output
    trained = json.loads((out / "results.json").read_text())["data"]["trained_model"]
    assert (trained["recipe"]["objective"], trained["recipe"]["beta"]) == ("dpo", 0.3)
    saved = json.loads((out / "models" / "seed1" / "prefprune.json").read_text())["config"]
    assert (saved["objective"], saved["beta"]) == ("dpo", 0.3)
    sidecar = json.loads((out / "scores" / "seed0.json").read_text())
    assert [c["step"] for c in sidecar["checkpoints"]["members"]] == [2, 4]
    assert "if_ens" in pd.read_parquet(out / "scores" / "seed0.parquet")
