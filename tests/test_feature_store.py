"""The frozen-layer feature store on disk: shared by commands and processes, equal to the
uncached model, atomic under kill -9, and self-healing when a shard is damaged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_backbone
from helpers import pairs, run_cli

from prefprune import RewardModel, RewardModelConfig
from prefprune.errors import PrefpruneWarning
from prefprune.model import FrozenLayerCache
from prefprune.model.encoding import encoded_batches

TINY = ("--max-length", "48", "--lora-layers", "1", "--epochs", "1", "--batch-size", "8")


def config(backbone: Path, root: Path, **extra) -> RewardModelConfig:
    return RewardModelConfig(**{"backbone": str(backbone), "max_length": 48, "lora_layers": 1,
                                "feature_cache": str(root), **extra})


def rewards(model: RewardModel, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.rewards(batch) for _, batch in
                          encoded_batches(model.encoder, data, 8)])


def shards(root: Path) -> list[Path]:
    return sorted(root.rglob("shard-*.safetensors"))


def test_features_read_back_from_disk_equal_the_uncached_model(tiny_backbones, tmp_path):
    tiny_llama = tiny_backbones["llama"]
    data = pairs(12, 0, "f")
    writer = RewardModel.create(config(tiny_llama, tmp_path), seed=1)
    first = rewards(writer, data)
    writer.layer_cache.flush()
    assert writer.layer_cache.stats.misses == 24 and len(shards(tmp_path)) == 1
    reader = RewardModel.create(config(tiny_llama, tmp_path), seed=1)  # a new process's view
    second = rewards(reader, data)
    assert reader.layer_cache.stats.misses == 0 and reader.layer_cache.stats.disk_hits == 24
    plain = RewardModel.create(config(tiny_llama, tmp_path, layer_cache_mb=0,
                                      feature_cache=None), seed=1)
    assert plain.layer_cache is None
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(rewards(plain, data), first, rtol=1e-5, atol=1e-6)


def test_another_frozen_part_uses_another_folder(tiny_backbones, still_bert, tmp_path):
    """Other frozen weights (another backbone, or the same architecture with other values)
    never read each other's features; the same weights under another name (the tiny BERT
    without dropout) do."""
    data = pairs(4, 0, "g")
    reseeded = build_tiny_backbone("bert", tmp_path / "bert-seed1", seed=1)
    for backbone in (tiny_backbones["bert"], tiny_backbones["gpt2"], reseeded):
        model = RewardModel.create(config(backbone, tmp_path), seed=0)
        rewards(model, data)
        model.layer_cache.flush()
        assert model.layer_cache.stats.disk_hits == 0
    assert len({p.parent for p in shards(tmp_path)}) == 3
    same = RewardModel.create(config(still_bert, tmp_path), seed=0)
    rewards(same, data)
    assert same.layer_cache.stats.disk_hits == 8


def test_a_damaged_shard_is_recomputed_with_a_warning(tiny_bert, tmp_path):
    data = pairs(6, 0, "d")
    model = RewardModel.create(config(tiny_bert, tmp_path), seed=0)
    expected = rewards(model, data)
    model.layer_cache.flush()
    (shard,) = shards(tmp_path)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.warns(PrefpruneWarning, match="damaged or stale"):
        again = RewardModel.create(config(tiny_bert, tmp_path), seed=0)
    got = rewards(again, data)
    assert again.layer_cache.stats.misses == 12
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    again.layer_cache.flush()
    assert len(shards(tmp_path)) == 1  # the damaged one is gone, a new one written


def test_the_disk_budget_and_the_off_switch(tiny_bert, tmp_path):
    data = pairs(6, 0, "b")
    tight = RewardModel.create(config(tiny_bert, tmp_path / "tight", feature_cache_mb=1e-4),
                               seed=0)
    rewards(tight, data)
    tight.layer_cache.flush()
    assert shards(tmp_path / "tight") == []
    assert tight.layer_cache.summary()["feature_store"]["refused_over_budget"] == 12
    off = RewardModel.create(config(tiny_bert, tmp_path / "off", feature_cache=None), seed=0)
    rewards(off, data)
    assert off.layer_cache.store is None and not (tmp_path / "off").exists()


def test_score_after_train_runs_no_frozen_layer(tiny_bert, tmp_path):
    """The CLI way: train, then score the same data; score reads every feature from disk
    and says so, in its output and its sidecar."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                            + "\n" for r in pairs(30, 2, "c")))
    store = ("--feature-cache", tmp_path / "features")
    trained = run_cli("train", data, "--output", tmp_path / "m", "--backbone", tiny_bert,
                      *TINY, *store, "--quiet")
    assert trained.exit_code == 0, trained.output
    assert "sequences computed" in trained.stdout
    scored = run_cli("score", data, "--model", tmp_path / "m", "--output",
                     tmp_path / "s.parquet", "--scores", "if,loss", *store, "--quiet")
    assert scored.exit_code == 0, scored.output
    frozen = json.loads((tmp_path / "s.json").read_text())["frozen_layers"]
    assert frozen["misses"] == 0 and frozen["disk_hits"] > 0
    assert "frozen layers: 0 sequences computed" in scored.stdout
    off = run_cli("score", data, "--model", tmp_path / "m", "--output", tmp_path / "o.parquet",
                  "--scores", "loss", "--no-feature-cache", "--quiet")
    assert off.exit_code == 0, off.output
    assert json.loads((tmp_path / "o.json").read_text())["frozen_layers"]["misses"] > 0


WRITER = """
import sys, torch
from prefprune import RewardModel, RewardModelConfig
from prefprune.model.encoding import encoded_batches
import prefprune.model.feature_store as fs
fs.SHARD_BYTES = 1  # a shard per batch
sys.path.insert(0, sys.argv[3])
from helpers import pairs
model = RewardModel.create(RewardModelConfig(backbone=sys.argv[1], max_length=48, lora_layers=1,
                                             feature_cache=sys.argv[2]), seed=0)
print("ready", flush=True)
with torch.no_grad():
    for _ in range(1000):
        for _, batch in encoded_batches(model.encoder, pairs(400, 3, "k"), 2):
            model.rewards(batch)
"""


def test_killed_writers_leave_only_complete_shards(tiny_bert, tmp_path):
    root = tmp_path / "features"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_bert), str(root),
                                str(Path(__file__).parent)], stdout=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.stdout.readline().strip() == b"ready"
    deadline = time.time() + 60
    while len(shards(root)) < 5 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = shards(root)
    assert len(written) >= 5
    cache = FrozenLayerCache(0, features=(root, 1000.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrefpruneWarning)  # no shard may read as damaged
        model = RewardModel.create(config(tiny_bert, root, layer_cache_mb=0), seed=0,
                                   cache=cache)
        rewards(model, pairs(400, 3, "k"))
    assert cache.stats.disk_hits >= len(written)
    assert not list(root.rglob(".shard-*"))  # a killed writer's temporary file is cleaned up
