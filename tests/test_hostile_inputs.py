"""A hostile but fair user: bad inputs, bad options, crashes and hostile files.

Every case ends with a non-zero exit and one ``error:`` line (or a correct result), never a
traceback, and never with a user's file deleted or changed: inputs are hashed before and after.
The numbers in the test names follow the issue that collected these probes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import FIXTURES, assert_one_error_line, pairs, run_cli

from prefprune.data import DataOptions, generate_synthetic, load_preferences
from prefprune.document import Code, Section, render_markdown
from prefprune.errors import DataError

TINY = ("--max-length", "48", "--lora-layers", "1", "--epochs", "1", "--batch-size", "8")


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path``): the user's files, to compare."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def hh_lines(n: int, seed: int = 0, texts: tuple[str, ...] = ()) -> list[str]:
    """``n`` HH-RLHF transcripts (``texts`` are appended to the responses, cycling)."""
    data = pairs(n, seed, "h")
    lines = []
    for i, row in enumerate(data):
        extra = f" {texts[i % len(texts)]}" if texts else ""
        prompt = f"\n\nHuman: {row['prompt']}\n\nAssistant:"
        lines.append(json.dumps({"chosen": f"{prompt} {row['chosen']}{extra}",
                                 "rejected": f"{prompt} {row['rejected']} no"}))
    return lines


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert):
    """``hh.jsonl`` (40 pairs), a model ``m`` trained on it, and ``ref/scores.parquet``."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "hh.jsonl"
    data.write_text("\n".join(hh_lines(40)) + "\n")
    trained = run_cli("train", data, "--output", root / "m", "--backbone", tiny_bert, *TINY,
                      "--quiet")
    assert trained.exit_code == 0, trained.output
    scored = run_cli("score", data, "--model", root / "m", "--output",
                     root / "ref" / "scores.parquet", "--solver", "direct", "--quiet")
    assert scored.exit_code == 0, scored.output
    return root, data, tiny_bert


def test_01_train_never_writes_into_a_folder_it_did_not_create(world, tmp_path):
    _, data, backbone = world
    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.copy(data, victim / "hh.jsonl")
    (victim / "notes.txt").write_text("mine")
    before = digest(victim)
    line = assert_one_error_line(run_cli("train", victim / "hh.jsonl", "--output", victim,
                                         "--backbone", backbone, *TINY, "--quiet"), 1)
    assert "would overwrite the input" in line or "not written by prefprune" in line
    parent = assert_one_error_line(run_cli("train", victim / "hh.jsonl", "--output",
                                           victim / "sub" / "..", "--backbone", backbone,
                                           *TINY, "--quiet"), 1)
    assert "input" in parent
    (victim / "hh.jsonl").unlink()  # no input inside any more: the user's notes still protect it
    notes = assert_one_error_line(run_cli("train", data, "--output", victim, "--backbone",
                                          backbone, *TINY, "--quiet"), 1)
    assert "not written by prefprune" in notes
    assert (victim / "notes.txt").read_text() == "mine"
    assert before[str(victim / "notes.txt")] == digest(victim / "notes.txt")[
        str(victim / "notes.txt")]


def test_01_train_replaces_its_own_model_only_with_overwrite(world, tmp_path):
    _, data, backbone = world
    out = tmp_path / "model"
    first = run_cli("train", data, "--output", out, "--backbone", backbone, *TINY, "--quiet")
    assert first.exit_code == 0, first.output
    again = assert_one_error_line(run_cli("train", data, "--output", out, "--backbone",
                                          backbone, *TINY, "--quiet"), 1)
    assert "--overwrite" in again
    forced = run_cli("train", data, "--output", out, "--backbone", backbone, *TINY, "--quiet",
                     "--overwrite")
    assert forced.exit_code == 0, forced.output
    assert (out / "prefprune.json").is_file()


def test_02_prune_into_the_inputs_folder_is_refused(world, tmp_path):
    root, data, _ = world
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(data, folder / "hh.jsonl")
    before = digest(folder)
    line = assert_one_error_line(run_cli("prune", root / "ref" / "scores.parquet",
                                         folder / "hh.jsonl", "--output", folder), 1)
    assert "input" in line
    assert digest(folder) == before and not (folder / "removed.jsonl").exists()


def test_03_score_output_over_the_data_is_refused(world, tmp_path):
    root, data, _ = world
    table = tmp_path / "gen.parquet"
    pd.DataFrame([json.loads(line) for line in data.read_text().splitlines()]).to_parquet(table)
    before = digest(table)
    line = assert_one_error_line(run_cli("score", table, "--model", root / "m", "--output",
                                         table, "--quiet"), 1)
    assert "would overwrite the input" in line and digest(table) == before


def test_04_score_sidecar_over_the_data_is_refused(world, tmp_path):
    root, data, _ = world
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps([json.loads(line) for line in data.read_text().splitlines()]))
    before = digest(as_json)
    line = assert_one_error_line(run_cli("score", as_json, "--model", root / "m", "--output",
                                         tmp_path / "pairs.parquet", "--quiet"), 1)
    assert "pairs.json" in line and digest(as_json) == before
    assert not (tmp_path / "pairs.parquet").exists()


def test_05_prune_twice_into_one_folder_needs_overwrite(world, tmp_path):
    root, data, _ = world
    args = ("prune", root / "ref" / "scores.parquet", data, "--output", tmp_path / "out")
    assert run_cli(*args).exit_code == 0
    evidence = digest(tmp_path / "out")
    assert "--overwrite" in assert_one_error_line(run_cli(*args, "--fraction", "0.2"), 1)
    assert digest(tmp_path / "out") == evidence
    again = run_cli(*args, "--fraction", "0.2", "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "out" / "prune.json").read_text())["fraction"] == 0.2


@pytest.fixture(scope="module")
def small_experiment(tmp_path_factory, tiny_bert):
    """A one-seed experiment on data whose texts try to inject Markdown and HTML."""
    root = tmp_path_factory.mktemp("experiment")
    hostile = ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
               "[x](javascript:alert(1))")
    data = root / "hh.jsonl"
    data.write_text("\n".join(hh_lines(36, seed=3, texts=hostile)) + "\n")
    args = ("experiment", data, "--output", root / "exp", "--backbone", tiny_bert, *TINY,
            "--seeds", "0", "--fractions", "0.2", "--scores", "loss,random", "--no-helpful",
            "--no-relabel", "--quiet")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return root, data, args


def test_06_experiment_refuses_to_resume_on_changed_data(small_experiment):
    _, data, args = small_experiment
    original = data.read_text()
    lines = original.splitlines()
    swapped = []
    for line in lines:  # swap every label: the test split's accuracy would flip
        record = json.loads(line)
        swapped.append(json.dumps({"chosen": record["rejected"], "rejected": record["chosen"]}))
    data.write_text("\n".join(swapped) + "\n")
    try:
        line = assert_one_error_line(run_cli(*args), 1)
    finally:
        data.write_text(original)
    assert "started on other data" in line and "--overwrite" in line
    resumed = run_cli(*args, "--json")
    assert resumed.exit_code == 0, resumed.output


def test_07_prune_refuses_scores_of_other_data(world, tmp_path):
    root, data, _ = world
    fewer = tmp_path / "hh.jsonl"
    fewer.write_text("\n".join(data.read_text().splitlines()[:-1]) + "\n")
    line = assert_one_error_line(run_cli("prune", root / "ref" / "scores.parquet", fewer,
                                         "--output", tmp_path / "out"), 1)
    assert "computed on other data" in line and not (tmp_path / "out").exists()
    more = tmp_path / "more.jsonl"
    more.write_text(data.read_text() + hh_lines(1, seed=9)[0] + "\n")
    assert "other data" in assert_one_error_line(
        run_cli("prune", root / "ref" / "scores.parquet", more, "--output", tmp_path / "o2"), 1)


def test_07_scoring_a_model_on_other_data_warns(world, tmp_path):
    root, _, _ = world
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(hh_lines(30, seed=5)) + "\n")
    result = run_cli("score", other, "--model", root / "m", "--output", tmp_path / "s.parquet",
                     "--solver", "direct", "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning: the model was trained on other pairs" in result.stderr


@pytest.mark.parametrize("by", ["rank_if", "source_row", "id", "margin"])
def test_08_prune_ranks_by_scores_only(world, tmp_path, by):
    root, data, _ = world
    line = assert_one_error_line(run_cli("prune", root / "ref" / "scores.parquet", data,
                                         "--output", tmp_path / "out", "--by", by), 2)
    assert "rank by one of its scores" in line and not (tmp_path / "out").exists()


def test_09_a_row_with_an_unknown_split_is_reported_not_a_reason_to_reshuffle(tmp_path):
    source = generate_synthetic(tmp_path / "tldr.jsonl", n_posts=12)
    lines = source.read_text().splitlines()
    odd = json.loads(lines[0])
    odd["split"] = "valid3"
    lines[0] = json.dumps(odd)
    source.write_text("\n".join(lines) + "\n")
    loaded = load_preferences(source)
    assert loaded.report.read == loaded.report.kept + len(loaded.report.skipped)
    (skipped,) = loaded.report.skipped
    assert (skipped.reason, skipped.line, skipped.field) == ("unknown_split", 1, "split")
    assert set(loaded.dataset["source_split"]) == {"train", "valid1", "valid2"}
    result = run_cli("data", "inspect", source)
    assert "unknown_split" in result.stdout
    with pytest.raises(DataError, match="unknown_split"):
        load_preferences(source, DataOptions(strict=True))


def test_10_jsonl_with_a_byte_order_mark_keeps_its_first_row(world, tmp_path):
    _, data, _ = world
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    loaded = load_preferences(bom)
    assert loaded.report.kept == 40 and not loaded.report.skipped


def test_11_crlf_csv_comes_back_byte_for_byte(tmp_path):
    rows = pairs(12, 4)
    body = "".join(f'{r["id"]},"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\r\n'
                   for r in rows)
    source = tmp_path / "pairs.csv"
    source.write_bytes(("id,prompt,chosen,rejected\r\n" + body).encode())
    scores = pd.DataFrame({"id": rows["id"], "loss": [float(i) for i in range(12)]})
    scores.to_parquet(tmp_path / "scores.parquet")
    result = run_cli("prune", tmp_path / "scores.parquet", source, "--output", tmp_path / "out",
                     "--by", "loss", "--fraction", "0.25")
    assert result.exit_code == 0, result.output
    written = (tmp_path / "out" / "pairs.csv").read_bytes()
    kept = [line for line in source.read_bytes().split(b"\r\n")
            if not any(line.startswith(f"{pid},".encode()) for pid in ("p11", "p10", "p9"))]
    assert written == b"\r\n".join(kept)
    assert written.count(b"\r\n") == 10 and b"\n" not in written.replace(b"\r\n", b"")


def test_12_truncation_is_shown(world, tmp_path):
    _, data, backbone = world
    inspected = run_cli("data", "inspect", data, "--backbone", backbone, "--max-length", "12")
    assert inspected.exit_code == 0, inspected.output
    assert "had their prompt cut" in inspected.stdout
    as_json = json.loads(run_cli("data", "inspect", data, "--backbone", backbone,
                                 "--max-length", "12", "--json").stdout)
    assert as_json["truncation"]["prompts_cut"] > 0
    trained = run_cli("train", data, "--output", tmp_path / "m", "--backbone", backbone,
                      "--max-length", "12", "--lora-layers", "1", "--epochs", "1", "--quiet")
    assert trained.exit_code == 0, trained.output
    assert "had their prompt cut" in trained.stdout


def test_12_truncation_is_in_the_report(small_experiment):
    root, _, _ = small_experiment
    report = (root / "exp" / "report.md").read_text()
    results = json.loads((root / "exp" / "results.json").read_text())
    assert set(results["data"]["truncation"]) == {"train", "validation", "test"}
    if any(c["prompts_cut"] or c["responses_cut"] for c in results["data"]["truncation"].values()):
        assert "Truncation (" in report


def _remote_code_backbone(tiny_bert: Path, where: Path) -> tuple[Path, Path]:
    """A copy of the tiny backbone whose config points at custom code that leaves a mark."""
    backbone = where / "custom-backbone"
    shutil.copytree(tiny_bert, backbone)
    marker = where / "custom-code-ran"
    (backbone / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class CustomConfig(BertConfig):\n    pass\n"
        "class CustomModel(BertForSequenceClassification):\n    config_class = CustomConfig\n")
    config = json.loads((backbone / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                          "AutoModelForSequenceClassification": "custom.CustomModel"}
    (backbone / "config.json").write_text(json.dumps(config))
    return backbone, marker


def test_13_a_file_never_switches_on_remote_code(world, tmp_path):
    root, data, tiny_bert = world
    backbone, marker = _remote_code_backbone(Path(tiny_bert), tmp_path)
    model = tmp_path / "m"
    shutil.copytree(root / "m", model)
    meta = json.loads((model / "prefprune.json").read_text())
    meta["config"]["trust_remote_code"] = True
    meta["config"]["backbone"] = str(backbone)
    (model / "prefprune.json").write_text(json.dumps(meta))
    run_cli("evaluate", model, data, "--quiet")
    assert not marker.exists(), "a model folder switched on remote code"
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"model": {"trust_remote_code": True,
                                                "backbone": str(backbone)}}))
    line = assert_one_error_line(run_cli("experiment", data, "--config", config, "--output",
                                         tmp_path / "exp", "--quiet"), 1)
    assert "trust_remote_code: cannot be set from a file" in line
    assert not marker.exists() and not (tmp_path / "exp").exists()
    trusted = run_cli("evaluate", model, data, "--quiet", "--trust-remote-code")
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists(), "the user's own flag must still allow it (the test can fail)"


def test_14_pickled_adapter_weights_are_refused(world, tmp_path):
    from safetensors.torch import load_file

    root, data, _ = world
    model = tmp_path / "m"
    shutil.copytree(root / "m", model)
    weights = model / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), model / "adapter" / "adapter_model.bin")
    weights.unlink()
    line = assert_one_error_line(run_cli("evaluate", model, data, "--quiet"), 1)
    assert "adapter_model.bin: pickled adapter weights are refused" in line


def test_15_report_markdown_escapes_user_text(small_experiment):
    root, _, _ = small_experiment
    report = (root / "exp" / "report.md").read_text()
    for raw in ("<script", "<img"):
        assert raw not in report
    assert not re.search(r"(?<!\\)\]\(javascript:", report)  # only an escaped \] precedes it
    assert "&lt;script&gt;" in report or "&lt;img" in report  # shown, not run
    section = Section("t <b>", text=[("see ", Code("a`b<i>"), " [x](javascript:y)")],
                      header=["h|"], rows=[["<script>x</script> | *y*\nz"]])
    markdown = render_markdown([section])
    assert "<b>" not in markdown and "<script>" not in markdown
    assert not re.search(r"(?<!\\)\]\(javascript", markdown)
    assert "``a`b<i>``" in markdown and "\\|" in markdown and "\\*y\\*" in markdown


@pytest.mark.parametrize(("settings", "message"), [
    ({"seeds": "abc"}, "seeds: must be a list of integers"),
    ({"train": {"epochs": "one"}}, "train.epochs: must be an integer"),
    ({"influence": {"solver": "magic"}}, "influence.solver: must be one of"),
    ({"train": {"epochs": -3}}, "train.epochs: must be >= 1"),
])
def test_16_bad_config_files_fail_before_writing_anything(world, tmp_path, settings, message):
    _, data, _ = world
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(settings))
    line = assert_one_error_line(run_cli("experiment", data, "--config", config, "--output",
                                         tmp_path / "out", "--quiet"), 1)
    assert "settings.yaml" in line and message in line
    assert not (tmp_path / "out").exists()


def test_17_empty_seed_list_is_a_usage_error(world, tmp_path):
    _, data, _ = world
    line = assert_one_error_line(run_cli("experiment", data, "--seeds", "", "--output",
                                         tmp_path / "out"), 2)
    assert "--seeds" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.drop(columns="id"), "no 'id' column"),
    (lambda t: pd.concat([t, t.iloc[:2]]), "duplicated id"),
])
def test_17_broken_score_tables_are_reported(world, tmp_path, change, message):
    root, data, _ = world
    broken = tmp_path / "scores.parquet"
    change(pd.read_parquet(root / "ref" / "scores.parquet")).to_parquet(broken)
    line = assert_one_error_line(run_cli("prune", broken, data, "--output", tmp_path / "out"), 1)
    assert message in line


def test_18_truncated_adapter_is_named(world, tmp_path):
    root, data, _ = world
    model = tmp_path / "m"
    shutil.copytree(root / "m", model)
    weights = model / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = assert_one_error_line(run_cli("evaluate", model, data, "--quiet"), 1)
    assert "adapter_model.safetensors: damaged or truncated" in line
    weights.write_bytes(b"")
    assert "damaged or truncated" in assert_one_error_line(
        run_cli("evaluate", model, data, "--quiet"), 1)


def test_18_a_truncated_shard_is_recomputed(world, tmp_path):
    root, data, _ = world
    out = tmp_path / "scores.parquet"
    args = ("score", data, "--model", root / "m", "--output", out, "--solver", "direct",
            "--shard-size", "16", "--quiet")
    assert run_cli(*args).exit_code == 0
    first = pd.read_parquet(out)
    shard = sorted(tmp_path.glob("scores.parquet.work/**/grads-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:50])
    again = run_cli(*args, "--overwrite", "--json")
    assert again.exit_code == 0, again.output
    assert "is damaged" in again.stderr and "computing that piece again" in again.stderr
    recomputed = json.loads(again.stdout)["metadata"]["pairs_through_gradient_passes"]
    assert recomputed == min(16, len(first) - 16)  # that one shard, nothing else
    pd.testing.assert_frame_equal(pd.read_parquet(out), first)


def test_19_unusable_device_is_a_usage_error(world):
    root, data, _ = world
    line = assert_one_error_line(run_cli("evaluate", root / "m", data, "--device", "cuda:7"), 2)
    assert "--device" in line


def test_19_invalid_model_description_names_the_file(world, tmp_path):
    root, data, _ = world
    model = tmp_path / "m"
    shutil.copytree(root / "m", model)
    (model / "prefprune.json").write_text("{not json")
    line = assert_one_error_line(run_cli("evaluate", model, data, "--quiet"), 1)
    assert str(model / "prefprune.json") in line


def test_19_a_bare_name_that_is_no_file_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("went to the hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    for name in ("hh60", "hh60.jsonl", "data/hh60"):
        (tmp_path / "data").mkdir(exist_ok=True)
        line = assert_one_error_line(run_cli("data", "inspect", name), 1)
        assert f"{name}: file not found" in line


def test_fixtures_stay_untouched():
    """The repository's own fixtures are inputs too: nothing above wrote to them."""
    with gzip.open(FIXTURES / "hh.jsonl.gz", "rt") as handle:
        assert len(handle.read().splitlines()) == 6
