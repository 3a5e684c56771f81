"""Data-parallel training and scoring: two gloo processes under ``torchrun`` equal one process.

One ``torchrun --standalone --nproc-per-node 2`` launch (a free port is picked by the c10d
rendezvous) runs this file as a script: every process scores the same tiny model under several
configurations (cached Gauss–Newton with CG and every score, the streaming path, the exact dual
solve), scores a DPO policy, reruns one from its work directory, and trains a reward model and
a DPO policy. Each process writes what it got; the tests compare them with the same work done
in this single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import pairs, perturbed_model, tiny_scoring_model

from prefprune import distributed
from prefprune.influence import InfluenceConfig, compute_scores
from prefprune.influence.config import ENGINE_SCORES
from prefprune.model import RewardModel, RewardModelConfig
from prefprune.training import TrainConfig, evaluate, train_reward_model

WORLD = 2
N_TRAIN = 16  # shards of 5: ranks get 10 and 6 pairs
# CG to 1e-7, below the 1e-5 agreement asked of the processes: a solve stopped at 1e-5 differs
# from another by about that much for any perturbation of its products, distributed or not.
SCORE_CONFIGS = {
    "cached": {"score_batch_size": 3, "shard_size": 5, "tol": 1e-7},
    "streaming": {"scores": ("if", "flip", "grad_dot", "grad_cos", "loss"), "score_batch_size": 3,
                  "shard_size": 5, "memory_budget_mb": 0.0, "tol": 1e-7},
    "direct": {"solver": "direct", "shard_size": 5, "damping": 3e-2},
}
TRAIN = TrainConfig(epochs=2, batch_size=5, learning_rate=1e-2, warmup_ratio=0.0,
                    grad_accum_steps=2)
#: The trainings compared: a reward model, and a DPO policy (issue 21) on the tiny Llama.
TRAINED = {"train": ("still", {}), "train-dpo": ("llama", {"objective": "dpo"})}


def score_data():
    return pairs(N_TRAIN, 1, "t"), pairs(8, 2, "v")


def train_data():
    return pairs(12, 3, "x")


def dpo_policy(backbone: str) -> RewardModel:
    """A small DPO policy with a non-zero adapter (it differs from its reference)."""
    return perturbed_model(backbone, seed=5, scale=0.3, objective="dpo", max_length=32,
                           lora_r=1, feature_cache=None)


def train_model(backbone: str, **config) -> tuple[RewardModel, object]:
    """Trained in float64, so that what the comparison sees is the data-parallel arithmetic,
    not float32 summation order amplified by Adam on near-zero gradients."""
    model = RewardModel.create(RewardModelConfig(backbone=backbone, feature_cache=None,
                                                 **config), seed=TRAIN.seed)
    model.model.double()
    return model, train_reward_model(model, train_data(), TRAIN, progress=False)


def worker(backbone: str, still: str, llama: str, out: Path) -> None:
    """One process of the launch: everything it computes goes to ``out/*-rank{r}``."""
    torch.set_num_threads(1)
    model = tiny_scoring_model(backbone)
    train, validation = score_data()
    distributed.setup()
    rank = distributed.rank()
    runs = [(name, model, config) for name, config in SCORE_CONFIGS.items()]
    runs.append(("dpo", dpo_policy(llama), SCORE_CONFIGS["cached"]))
    for name, scored, config in runs:
        result = compute_scores(scored, train, validation, InfluenceConfig(**config),
                                work_dir=out / "work" / name, progress=False)
        result.table.to_parquet(out / f"{name}-rank{rank}.parquet")
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(result.metadata, default=str))
    again = compute_scores(model, train, validation, InfluenceConfig(**SCORE_CONFIGS["cached"]),
                           work_dir=out / "work" / "cached", progress=False)
    (out / f"rerun-rank{rank}.json").write_text(json.dumps(again.metadata, default=str))
    for name, (path, config) in TRAINED.items():
        trained, result = train_model({"still": still, "llama": llama}[path], **config)
        torch.save({"state": trained.trainable_state(), "result": result.to_dict(),
                    "eval": evaluate(trained, train_data(), progress=False).to_dict()},
                   out / f"{name}-rank{rank}.pt")


@pytest.fixture(scope="module")
def launch(tiny_bert: Path, still_bert: Path, tiny_backbones: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--standalone", f"--nproc-per-node={WORLD}", __file__,
         str(tiny_bert), str(still_bert), str(tiny_backbones["llama"]), str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def model(tiny_bert):
    return tiny_scoring_model(tiny_bert)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("name", [*SCORE_CONFIGS, "dpo"])
def test_two_processes_score_like_one(launch, model, tiny_backbones, name):
    if name == "dpo":
        model = dpo_policy(str(tiny_backbones["llama"]))
    config = InfluenceConfig(**SCORE_CONFIGS.get(name, SCORE_CONFIGS["cached"]))
    single = compute_scores(model, *score_data(), config, progress=False)
    tables = [pd.read_parquet(launch / f"{name}-rank{r}.parquet") for r in range(WORLD)]
    pd.testing.assert_frame_equal(tables[1], tables[0])  # every process returns the same table
    table = tables[0]
    assert table["id"].tolist() == single.table["id"].tolist()
    for score in (s for s in config.scores if s != "random"):
        assert relative_error(table[score], single.table[score]) <= 1e-5, score
    if "random" in config.scores:
        np.testing.assert_array_equal(table["random"], single.table["random"])
    meta = json.loads((launch / f"{name}-rank0.json").read_text())
    assert meta["world_size"] == WORLD
    assert meta["pairs_through_gradient_passes"] == \
        single.metadata["pairs_through_gradient_passes"]  # the pairs were split, not repeated
    assert meta["damping"] == pytest.approx(single.metadata["damping"], rel=1e-6)


def test_every_score_covered(launch):
    assert set(pd.read_parquet(launch / "cached-rank0.parquet").columns) >= set(ENGINE_SCORES)


def test_rerun_reuses_every_shard_of_both_processes(launch):
    shards = sorted(p.name for p in (launch / "work" / "cached").glob("*/grads-*.safetensors"))
    assert shards == [f"grads-{k:05d}.safetensors" for k in range(4)]
    meta = json.loads((launch / "rerun-rank0.json").read_text())
    assert meta["pairs_through_gradient_passes"] == 0
    assert not list((launch / "work").rglob("*.tmp-*"))


@pytest.mark.parametrize("name", list(TRAINED))
def test_two_processes_train_like_one(launch, still_bert, tiny_backbones, name):
    path, config = TRAINED[name]
    model, result = train_model(str(still_bert if path == "still" else tiny_backbones[path]),
                                **config)
    expected = model.trainable_state()
    runs = [torch.load(launch / f"{name}-rank{r}.pt") for r in range(WORLD)]
    for name, value in runs[0]["state"].items():
        assert torch.equal(runs[1]["state"][name], value)  # the processes never drift apart
        if not name.endswith("modules_to_save.default.bias"):  # frozen, see test_training
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5)
    got = runs[0]["result"]
    assert got["steps"] == result.steps and got["tokens"] == result.tokens
    assert got["epoch_losses"] == pytest.approx(result.epoch_losses, rel=1e-5)
    single_eval = evaluate(model, train_data(), progress=False)
    assert runs[0]["eval"]["margin_mean"] == pytest.approx(single_eval.margin_mean, abs=1e-5)
    assert runs[0]["eval"]["pairs"] == single_eval.pairs


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
