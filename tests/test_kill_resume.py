"""Crash safety: a scoring run killed with SIGKILL part-way resumes without redoing finished work.

The run is this file executed as a script in a subprocess. So that the kill lands part-way on
every machine instead of racing the run, the child blocks inside the save of the shard after
``FINISHED`` finished ones, once its temporary file is written: the SIGKILL then hits a real
half-finished save. The rerun must ignore that temporary file, reuse the finished shards (the
engine's work counter says how many pairs went through gradient passes again) and give the
scores of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import pairs, tiny_scoring_model

from prefprune.influence import InfluenceConfig, compute_scores, store

N_TRAIN, SHARD, FINISHED = 20, 4, 2
CASES = {  # which shards the kill interrupts, and the memory budget that makes them
    "gradient_pass": ("grads-", {"memory_budget_mb": 1e6}),
    "scoring_pass": ("proj-", {"memory_budget_mb": 0.0,
                               "scores": ("if", "flip", "grad_dot", "loss")}),
}


def config(case: str) -> InfluenceConfig:
    return InfluenceConfig(shard_size=SHARD, score_batch_size=4, **CASES[case][1])


def data():
    return pairs(N_TRAIN, 1, "t"), pairs(6, 2, "v")


def child(backbone: str, work_dir: str, case: str) -> None:
    """Score, hanging forever inside the save of shard ``FINISHED`` of the interrupted pass."""
    torch.set_num_threads(1)
    prefix = CASES[case][0]
    real_save, saved = store.save_file, []

    def save_then_hang(tensors, path: str) -> None:
        real_save(tensors, path)
        if Path(path).name.lstrip(".").startswith(prefix):
            saved.append(path)
            if len(saved) > FINISHED:  # the temporary file exists, the rename has not happened
                threading.Event().wait()

    store.save_file = save_then_hang
    compute_scores(tiny_scoring_model(backbone), *data(), config(case), work_dir=work_dir,
                   progress=False)


def kill_part_way(backbone: Path, work_dir: Path, case: str) -> None:
    prefix = CASES[case][0]
    process = subprocess.Popen([sys.executable, __file__, str(backbone), str(work_dir), case],
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # a guard against a hung child, not a measurement
    while not list(work_dir.glob(f"*/.{prefix}*.tmp-*")):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the interrupted save"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tiny_bert, tmp_path, case):
    prefix = CASES[case][0]
    kill_part_way(tiny_bert, tmp_path, case)
    finished = sorted(p.name for p in tmp_path.glob(f"*/{prefix}*.safetensors"))
    assert len(finished) == FINISHED
    assert len(list(tmp_path.glob(f"*/.{prefix}*.tmp-*"))) == 1  # the save the kill cut short

    model = tiny_scoring_model(tiny_bert)
    resumed = compute_scores(model, *data(), config(case), work_dir=tmp_path, progress=False)
    uninterrupted = compute_scores(model, *data(), config(case), progress=False)
    # only the unfinished shards of the interrupted pass went through the model again
    assert resumed.metadata["pairs_through_gradient_passes"] == N_TRAIN - FINISHED * SHARD
    for score in config(case).scores:
        np.testing.assert_allclose(resumed.table[score], uninterrupted.table[score],
                                   rtol=1e-6, atol=1e-12)
    shards = -(-N_TRAIN // SHARD)
    assert len(list(tmp_path.glob(f"*/{prefix}*.safetensors"))) == shards


if __name__ == "__main__":
    child(*sys.argv[1:4])
