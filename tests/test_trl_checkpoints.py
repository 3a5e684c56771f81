"""A TRL run's checkpoints as a checkpoint ensemble, and the callback that records during
training what scoring them needs (docs/trl.md): the real RewardTrainer on a tiny Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_one_error_line, run_cli
from test_trl_reward import plain_rows, train_trl, write_jsonl

from prefprune.errors import InfluenceError, ModelError
from prefprune.influence.gradients import MarginGradientComputer
from prefprune.integrations import PrefpruneCallback
from prefprune.integrations.records import read_record
from prefprune.integrations.trl import TrlConfig, load_model
from prefprune.integrations.trl_checkpoints import saved_checkpoints
from prefprune.integrations.trl_encoding import pair_key


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return plain_rows()


@pytest.fixture(scope="module")
def source(rows, tmp_path_factory) -> Path:
    return write_jsonl(rows, tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="module")
def recorded_run(tiny_chat_llama, rows, tmp_path_factory) -> Path:
    """Two epochs of one optimiser step each over the 8 training pairs (two micro-batches of
    4, accumulated), a checkpoint after every step, recorded by the callback."""
    out = tmp_path_factory.mktemp("trl") / "run"
    train_trl(tiny_chat_llama, rows, out, callbacks=(PrefpruneCallback(),), save_steps=1,
              gradient_accumulation_steps=2)
    return out


def test_every_pair_is_recorded_as_trl_saw_it_at_the_step_that_visited_it(recorded_run, source):
    """checkpoint-2's record was taken in step 2, at checkpoint-1's parameters: it equals the
    margin gradients prefprune takes afresh with checkpoint-1."""
    assert_recorded_as_fresh(recorded_run, source)


def assert_recorded_as_fresh(run: Path, source: Path) -> None:
    """checkpoint-2's record (8 pairs, step 2) equals the margins and margin gradients that
    prefprune takes afresh with checkpoint-1, the parameters that step saw."""
    record = read_record(run / "checkpoint-2")
    assert record is not None and record.steps.tolist() == [2] * 8
    before = load_model(run / "checkpoint-1", trl=TrlConfig(data="plain"))
    pairs = [json.loads(line) for line in source.read_text().splitlines()][:8]
    batch = before.encode_pairs(*([p[k] for p in pairs] for k in ("prompt", "chosen",
                                                                   "rejected")))
    fresh = MarginGradientComputer(before)(batch)
    keys = [before.encoder.pair_key(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    order = [record.keys.tolist().index(k) for k in keys]
    np.testing.assert_allclose(record.margins[order], fresh.margins, atol=1e-5)
    np.testing.assert_allclose(record.margin_grads[order], fresh.margin_grads, atol=1e-5,
                               rtol=1e-4)
    assert record.parameters == [n for n, _ in before.trainable_parameters()]


def test_checkpoints_are_listed_with_their_learning_rates(recorded_run):
    found = saved_checkpoints(str(recorded_run))
    assert [c.step for c in found] == [1, 2]
    assert [c.rate_from for c in found] == ["logged", "logged"]
    assert found[0].learning_rate > found[1].learning_rate > 0  # TRL's linear decay
    assert [c.folder.name for c in saved_checkpoints(str(recorded_run / "checkpoint-*"))] == \
        ["checkpoint-1", "checkpoint-2"]


def test_score_checkpoints_combines_recorded_members_by_learning_rate(recorded_run, source,
                                                                      tmp_path):
    out = tmp_path / "scores.parquet"
    result = run_cli("score", str(source), "--checkpoints", str(recorded_run), "--output",
                     str(out), "--scores", "if,grad_cos,loss", "--quiet")
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    members = meta["checkpoints"]["members"]
    # the last checkpoint is the final model: scored once, with fresh gradients
    assert [m["same_as_scored_model"] for m in members] == [False, True]
    assert [m["gradients"]["recorded"] for m in members] == [8, 0]
    assert meta["pairs_through_gradient_passes"] == 0  # ... and not again as the model
    assert meta["ensemble"]["kind"] == "checkpoints" and meta["ensemble"]["members"] == 2
    assert set(meta["ensemble"]["agreement"]) == {"if", "grad_cos", "loss"}
    tables = assert_learning_rate_weighted(out, members, tmp_path / "scores.parquet.work")
    np.testing.assert_allclose(pd.read_parquet(out)["if"], tables[1]["if"], rtol=1e-6)


def assert_learning_rate_weighted(out: Path, members: list[dict], work: Path) -> list:
    """``if_ens`` is the TracIn-CP combination of the two checkpoints' z-scored IF, weighted
    by each checkpoint's learning rate; returns the checkpoints' tables."""
    weights = np.array([m["learning_rate"] for m in members])
    tables = [pd.read_parquet(work / "checkpoints" / f"checkpoint-{k}.parquet") for k in (1, 2)]
    z = np.stack([(t["if"] - t["if"].mean()) / t["if"].std(ddof=0) for t in tables])
    np.testing.assert_allclose(pd.read_parquet(out)["if_ens"], weights @ z / weights.sum(),
                               atol=1e-9)
    return tables


def test_a_checkpoint_without_a_record_is_scored_afresh_and_equals_scoring_it_alone(
        recorded_run, source, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    for k in (1, 2):
        shutil.rmtree(run / f"checkpoint-{k}" / "prefprune")
    both = tmp_path / "both.parquet"
    assert run_cli("score", str(source), "--checkpoints", str(run), "--output", str(both),
                   "--scores", "if,loss", "--quiet").exit_code == 0
    alone = tmp_path / "alone.parquet"
    assert run_cli("score", str(source), "--model", str(run / "checkpoint-1"),
                   "--trl-data", "plain", "--output", str(alone), "--scores", "if,loss",
                   "--quiet").exit_code == 0
    member = pd.read_parquet(tmp_path / "both.parquet.work" / "checkpoints" /
                             "checkpoint-1.parquet")
    np.testing.assert_allclose(member["if"], pd.read_parquet(alone)["if"], rtol=1e-5)
    meta = json.loads(both.with_suffix(".json").read_text())
    assert meta["checkpoints"]["members"][0]["gradients"] == {"recorded": 0, "computed": 8}


@pytest.mark.parametrize("remove, message", [
    ("adapter_model.safetensors", "checkpoint-2: no adapter or weights"),
    ("trainer_state.json", "checkpoint-2: no trainer_state.json"),
])
def test_a_broken_checkpoint_is_one_error_line_naming_it(recorded_run, source, tmp_path,
                                                         remove, message):
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    (run / "checkpoint-2" / remove).unlink()
    result = run_cli("score", str(source), "--checkpoints", str(run), "--output",
                     str(tmp_path / "s.parquet"), "--quiet")
    assert message in assert_one_error_line(result, 1)


def test_a_resumed_run_resumes_its_record(tiny_chat_llama, rows, recorded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded_run / "checkpoint-1", run / "checkpoint-1")
    train_trl(tiny_chat_llama, rows, run, callbacks=(PrefpruneCallback(),), save_steps=1,
              gradient_accumulation_steps=2, resume=True)
    resumed, straight = read_record(run / "checkpoint-2"), read_record(recorded_run /
                                                                       "checkpoint-2")
    assert resumed.keys.tolist() == straight.keys.tolist()
    torch.testing.assert_close(resumed.margin_grads, straight.margin_grads)


def test_the_callback_refuses_what_it_cannot_record(tiny_chat_llama, rows, tmp_path):
    with pytest.raises(InfluenceError, match="more than memory_budget_mb"):
        train_trl(tiny_chat_llama, rows, tmp_path / "a",
                  callbacks=(PrefpruneCallback(memory_budget_mb=0.01),))
    with pytest.raises(ModelError, match="no checkpoint-N folders"):
        saved_checkpoints(str(tmp_path / "nowhere"))


def test_pair_keys_tell_pairs_and_sides_apart():
    assert pair_key([1, 2], [3]) != pair_key([1], [2, 3]) != pair_key([3], [1, 2])
    assert pair_key([1, 2], [3]) == pair_key((1, 2), (3,)) >= 0
