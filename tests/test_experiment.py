"""The experiment protocol end to end on a tiny model, its resume, its statistics against
SciPy, its config round trip, and the report it renders."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
from helpers import pairs
from scipy import stats

from prefprune.data import generate_synthetic
from prefprune.errors import ExperimentError
from prefprune.experiment import (
    Arm,
    Experiment,
    ExperimentConfig,
    RunRecord,
    arms_of,
    headline,
    mean_interval,
    summarise,
    t_quantile_975,
)
from prefprune.influence import InfluenceConfig
from prefprune.model import RewardModelConfig
from prefprune.report import roc_curve, write_report
from prefprune.training import TrainConfig


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9, 10, 12, 30, 100])
def test_t_quantile_matches_scipy(df):
    assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_mean_interval_matches_scipy():
    values = [0.61, 0.64, 0.58, 0.66]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4,
                                 scale=stats.sem(values))
    result = mean_interval(values)
    assert result["mean"] == pytest.approx(sum(values) / 4)
    assert result["ci95"] == pytest.approx((high - low) / 2, rel=1e-3)
    assert mean_interval([0.5])["ci95"] is None


def run(seed, method, acc, fraction=0.1, direction="harmful", action="remove"):
    arm = Arm(seed, method, fraction if method else 0.0, direction, action)
    return RunRecord(arm, 100, 10, None, acc, 1 - acc, 0.5, 1.0)


def test_summary_pairs_differences_by_seed():
    runs = [run(0, None, 0.60), run(1, None, 0.70),
            run(0, "if", 0.63), run(1, "if", 0.72),
            run(0, "random", 0.59), run(1, "random", 0.71)]
    summary = summarise(runs, {})
    by_method = {a["method"]: a for a in summary["arms"]}
    assert by_method["if"]["vs_baseline"]["mean"] == pytest.approx(0.025)
    assert by_method["if"]["vs_random"]["mean"] == pytest.approx(0.025)
    # paired: the differences are 0.03 and 0.02, so the interval is narrow although the
    # accuracies themselves differ by 0.1 between seeds
    assert by_method["if"]["vs_baseline"]["ci95"] == pytest.approx(
        stats.t.ppf(0.975, 1) * stats.sem([0.03, 0.02]), rel=1e-3)
    assert "vs_random" not in by_method["random"]


def test_arms_cover_the_grid():
    config = ExperimentConfig(influence=InfluenceConfig(scores=("if", "random")),
                              fractions=(0.1, 0.2))
    arms = arms_of(config, seed=7)
    assert len(arms) == 2 * 2 * 3
    assert {a.group for a in arms} == {"remove harmful", "remove helpful", "relabel harmful"}
    assert len({a.key for a in arms}) == len(arms)


def test_each_arm_can_compare_its_own_scores():
    config = ExperimentConfig(influence=InfluenceConfig(scores=("if", "loss", "random")),
                              fractions=(0.1,), helpful_by=("if", "random"),
                              relabel_by=("loss", "random"))
    by_group: dict[str, set[str]] = {}
    for arm in arms_of(config, seed=0):
        by_group.setdefault(arm.group, set()).add(arm.method)
    assert by_group == {"remove harmful": {"if", "loss", "random"},
                        "remove helpful": {"if", "random"},
                        "relabel harmful": {"loss", "random"}}
    with pytest.raises(ExperimentError, match=r"relabel_by: .'flip'. would not be computed"):
        ExperimentConfig(influence=InfluenceConfig(scores=("if", "random")), relabel_by=("flip",))


def test_config_round_trips_through_yaml(tmp_path):
    config = ExperimentConfig(data="x.jsonl", data_options={"format": "hh"}, seeds=(1, 2),
                              model=RewardModelConfig(lora_layers=1, target_modules=("query",)),
                              train=TrainConfig(epochs=2), influence=InfluenceConfig(damping=0.3),
                              inject_flips=0.2)
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert ExperimentConfig.from_yaml(path) == config


@pytest.mark.parametrize(("text", "message"), [
    ("influence: {scores: [if, nope]}\n", "influence.scores: unknown scores"),
    ("fractions: [1.5]\n", "fractions\\[0\\]: must be < 1"),
    ("split_fractions: [0.6, 0.3, 0.3]\n", "split_fractions: must sum to at most 1"),
    ("colour: red\n", "unknown setting.s. colour"),
    ("train: {epochz: 3}\n", "train: unknown setting.s. epochz"),
    ("- a\n- b\n", "expected a mapping"),
    ("seeds: abc\n", "seeds: must be a list of integers, got 'abc'"),
    ("train: {epochs: one}\n", "train.epochs: must be an integer, got 'one'"),
    ("train: {epochs: -3}\n", "train.epochs: must be >= 1, got -3"),
    ("influence: {solver: magic}\n", "influence.solver: must be one of cg, lissa, direct"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError, match=message):
        ExperimentConfig.from_yaml(path)


def test_roc_curve_ends_at_one_and_orders_by_score():
    fpr, tpr = roc_curve([0.9, 0.1, 0.8, 0.3], [True, False, True, False])
    assert list(tpr) == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert list(fpr) == [0.0, 0.0, 0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def tiny_experiment(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    data = generate_synthetic(root / "pairs.jsonl", n_posts=30, seed=2)
    config = ExperimentConfig(
        data=str(data), fractions=(0.25,), seeds=(0, 1),
        inject_flips=0.2,
        model=RewardModelConfig(backbone=str(tiny_bert), max_length=48, lora_layers=1),
        train=TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2),
        influence=InfluenceConfig(scores=("if", "loss", "random"), solver="direct"))
    fitted: list[RunRecord] = []
    result = Experiment(config, root / "out", progress=False, on_run=fitted.append).run()
    return config, root / "out", result, fitted


def test_experiment_runs_every_arm_and_records_it(tiny_experiment):
    config, out, result, fitted = tiny_experiment
    n_train = result.data["sizes"]["train"]
    assert len(fitted) == len(result.runs) == 2 * (1 + 3 * 3)
    removed = round(0.25 * n_train)
    for record in result.runs:
        if record.arm.method is None:
            assert record.train_pairs == n_train
        elif record.arm.action == "remove":
            assert record.train_pairs == n_train - removed
            assert record.pairs_affected == removed
        else:
            assert record.train_pairs == n_train
        assert 0.0 <= record.test_accuracy <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result.summary))
    assert ExperimentConfig.from_yaml(out / "config.yaml") == config
    # injected flips are known, so every score gets detection metrics per seed
    assert set(result.detection) == {"0", "1"}
    assert set(result.summary["detection"]) == {"if", "loss", "random"}
    assert [row["method"] for row in headline(result)] == ["no pruning", "if", "loss", "random"]


def test_rerun_resumes_without_training(tiny_experiment):
    config, out, result, _ = tiny_experiment
    (out / "runs" / "seed1-loss-harmful-relabel-0.25.json").unlink()
    fitted: list[RunRecord] = []
    again = Experiment(config, out, progress=False, on_run=fitted.append).run()
    assert [r.arm.key for r in fitted] == ["seed1-loss-harmful-relabel-0.25"]
    assert again.summary["baseline"] == result.summary["baseline"]


def test_another_config_cannot_reuse_the_directory(tiny_experiment):
    config, out, _, _ = tiny_experiment
    other = ExperimentConfig.from_dict({**config.to_dict(), "train": {"epochs": 2}})
    with pytest.raises(ExperimentError, match=r"holds a different experiment .* differs in train"):
        Experiment(other, out, progress=False).run()


def test_a_new_plan_resumes_from_the_saved_runs(tiny_experiment, tmp_path):
    """Fewer seeds, methods or arms reuse every saved model, score table and run."""
    config, out, result, _ = tiny_experiment
    shutil.copytree(out, tmp_path / "out")
    smaller = config.replace(seeds=(1,), prune_by=("if", "random"), helpful=False,
                             relabel=False)
    fitted: list[RunRecord] = []
    again = Experiment(smaller, tmp_path / "out", progress=False, on_run=fitted.append).run()
    assert fitted == []
    assert [r.arm.key for r in again.runs] == ["seed1-base", "seed1-if-harmful-remove-0.25",
                                               "seed1-random-harmful-remove-0.25"]
    before = {r.arm.key: r.test_accuracy for r in result.runs}
    assert all(before[r.arm.key] == r.test_accuracy for r in again.runs)
    assert ExperimentConfig.from_yaml(tmp_path / "out" / "config.yaml") == smaller


def test_report_has_tables_figures_and_evidence(tiny_experiment):
    _, out, result, _ = tiny_experiment
    paths = write_report(result, out)
    markdown = paths["markdown"].read_text()
    for heading in ("Test accuracy: remove harmful", "Test accuracy: remove helpful",
                    "Test accuracy: relabel harmful", "Finding the flipped labels",
                    "Harm by worker", "most harmful training pairs"):
        assert heading in markdown
    assert "prefprune experiment --config" in markdown
    for figure in re.findall(r"\(figures/(\w+)\.png\)", markdown):
        assert (out / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4
    assert all(base64.b64decode(image)[:4] == b"\x89PNG" for image in images)
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # self-contained


def test_report_renders_in_headless_chromium(tiny_experiment, tmp_path):
    """The figures are visible in a real browser: the screenshot has the plot colours."""
    import os
    import shutil
    import subprocess

    import numpy as np
    from matplotlib.image import imread

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        reason = ("chromium is not installed, so the report was not rendered in a real browser "
                  "(.ci/run installs Debian's chromium package and requires this test)")
        if os.environ.get("PREFPRUNE_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    _, out, result, _ = tiny_experiment
    page = write_report(result, out)["html"]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1300,9000",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    pixels = (imread(shot)[:, :, :3] * 255).round().astype(int)
    blue = np.all(np.abs(pixels - [31, 119, 180]) <= 6, axis=-1)  # matplotlib's first colour
    orange = np.all(np.abs(pixels - [255, 127, 14]) <= 6, axis=-1)
    assert blue.sum() > 2000 and orange.sum() > 500
    rows_with_plot = np.flatnonzero(blue.any(axis=1))
    assert rows_with_plot.max() - rows_with_plot.min() > 1000  # several figures down the page


def test_split_per_seed_gives_each_replicate_its_own_split(tiny_bert, tmp_path):
    """With split_per_seed every replicate trains and tests on a split of its own (the
    intervals then include split variance); a new seed resumes, adding its split."""
    data = tmp_path / "pairs.jsonl"
    rows = pairs(60, 4, "s").remove_columns(["id", "worker", "confidence"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = ExperimentConfig(
        data=str(data), fractions=(0.2,), seeds=(0, 1), split_per_seed=True, helpful=False,
        relabel=False, model=RewardModelConfig(backbone=str(tiny_bert), max_length=48),
        train=TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2),
        influence=InfluenceConfig(scores=("loss", "random")))
    out = tmp_path / "out"
    result = Experiment(config, out, progress=False).run()
    trained_on = {r.arm.seed: r.train_fingerprint for r in result.runs if r.arm.method is None}
    assert trained_on[0] != trained_on[1]
    assert set(result.data["sizes_per_seed"]) == {"0", "1"}
    state = json.loads((out / "state.json").read_text())["fingerprints"]
    assert {"seed0/train", "seed1/test", "source"} <= set(state)
    fitted: list[RunRecord] = []
    Experiment(config.replace(seeds=(0, 1, 2)), out, progress=False,
               on_run=fitted.append).run()
    assert {r.arm.seed for r in fitted} == {2}
    assert "seed2/train" in json.loads((out / "state.json").read_text())["fingerprints"]
    own_splits = generate_synthetic(tmp_path / "syn.jsonl", n_posts=16)
    with pytest.raises(ExperimentError, match="has its own train/validation/test splits"):
        Experiment(config.replace(data=str(own_splits)), tmp_path / "x", progress=False).run()
