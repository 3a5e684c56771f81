"""Causal-LM reward models on a tiny SmolLM2-shaped Llama (grouped-query attention, rotary
positions, ChatML tokens, pad = ``<|im_end|>``): a reward is read at each row's last real
token, so it does not depend on the batch a row is in or on the side it is padded on, and
the frozen-layer cache gives the uncached rewards and gradients."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import perturbed_model, run_cli

from prefprune.data.messages import ChatTemplateRendering, render_pair
from prefprune.influence.gradients import MarginGradientComputer
from prefprune.model import PairBatch, RewardModel
from prefprune.model.layer_cache import FrozenLayerCache

QUESTIONS = ["hi", "what is the capital of france", "name a colour " + "please " * 12,
             "seven or eight"]
GOOD = ["hello, how can I help", "paris", "blue", "eight is larger than seven by one"]
BAD = ["no", "lyon is the capital city of france, I think", "a number", "maybe"]


def chat_pairs(tokenizer) -> tuple[list[str], list[str], list[str]]:
    """Prompts and responses rendered with the chat template, of mixed lengths: each
    response ends with ``<|im_end|>\\n``, the pad token one token before its end."""
    rendering = ChatTemplateRendering(tokenizer)
    prompts, chosen, rejected = [], [], []
    for question, good, bad in zip(QUESTIONS, GOOD, BAD):
        prompt = [{"role": "user", "content": question}]
        text, first = render_pair(rendering, prompt, [{"role": "assistant", "content": good}])
        _, second = render_pair(rendering, prompt, [{"role": "assistant", "content": bad}])
        prompts.append(text)
        chosen.append(first)
        rejected.append(second)
    return prompts, chosen, rejected


def alone(batch: PairBatch, row: int) -> PairBatch:
    """Row ``row`` of ``batch`` on its own, without padding."""
    mask = batch.inputs["attention_mask"][row].bool()
    return PairBatch({k: v[row : row + 1, mask] for k, v in batch.inputs.items()}, 1)


def encode(model: RewardModel, side: str, pairs: tuple[list[str], ...]) -> PairBatch:
    model.tokenizer.padding_side = side
    try:
        return model.encode_pairs(*pairs)
    finally:
        model.tokenizer.padding_side = "right"


@pytest.fixture(scope="module")
def chat_model(tiny_chat_llama) -> RewardModel:
    return perturbed_model(tiny_chat_llama, max_length=96)


def test_a_pad_less_tokenizer_pads_with_its_end_of_sequence_token(chat_model):
    tokenizer = chat_model.tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert chat_model.model.get_base_model().config.pad_token_id == tokenizer.pad_token_id


@pytest.fixture(scope="module")
def gpt2_model(tiny_backbones) -> RewardModel:
    """GPT-2's absolute position embeddings make left padding visible in the rewards."""
    return perturbed_model(tiny_backbones["gpt2"], max_length=96)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["chat_model", "gpt2_model"])
def test_batch_rewards_equal_each_row_and_each_pair_alone(request, kind, side):
    model = request.getfixturevalue(kind)
    pairs = chat_pairs(model.tokenizer) if kind == "chat_model" else (QUESTIONS, GOOD, BAD)
    batch = encode(model, side, pairs)
    mask = batch.inputs["attention_mask"]
    padded = mask[:, 0] == 0 if side == "left" else mask[:, -1] == 0
    assert padded.any()  # the rows really differ in length
    with torch.no_grad():
        rewards = model.rewards(batch)
        rows = torch.cat([model.rewards(alone(batch, i)) for i in range(mask.shape[0])])
        margins = torch.cat([model.margins(encode(model, side, tuple(
            [column[i]] for column in pairs))) for i in range(len(QUESTIONS))])
    assert torch.allclose(rewards, rows, atol=1e-5)
    assert torch.allclose(model.margins(batch).detach(), margins, atol=1e-5)


def test_reward_is_read_at_the_last_real_token_even_when_it_is_the_pad_token(chat_model):
    """A text ending in ``<|im_end|>`` (= pad) is read there, not one token early as
    transformers' "rightmost token that is not the pad id" would."""
    tokenizer = chat_model.tokenizer
    batch = chat_model.encode_pairs(["question "], ["an answer<|im_end|>"],
                                    ["a much longer answer that pads the other row"])
    ids = alone(batch, 0).inputs["input_ids"]
    assert ids[0, -1] == tokenizer.pad_token_id
    classifier = chat_model.model.get_base_model()
    with torch.no_grad():
        hidden = classifier.model(input_ids=ids).last_hidden_state
        per_token = classifier.score(hidden)[0, :, 0]
        reward = chat_model.rewards(batch)[0]
    assert reward == pytest.approx(per_token[-1].item(), abs=1e-5)
    assert abs(per_token[-1] - per_token[-2]) > 1e-3  # the test tells the two positions apart


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lora_layers", [1, 2])
def test_cached_top_layers_equal_the_whole_model(tiny_chat_llama, side, lora_layers):
    model = perturbed_model(tiny_chat_llama, max_length=96, lora_layers=lora_layers,
                            layer_cache_mb=0)
    batch = encode(model, side, chat_pairs(model.tokenizer))
    computer = MarginGradientComputer(model)
    expected_rewards = model.rewards(batch).detach()
    expected = computer(batch)
    model.use_layer_cache(FrozenLayerCache())
    for _ in range(2):  # the first call fills the cache, the second reads it
        assert torch.allclose(model.rewards(batch), expected_rewards, atol=1e-5)
        actual = computer(batch)
        assert torch.allclose(actual.margin_grads, expected.margin_grads, atol=1e-5)
    assert model.layer_cache.stats.misses == batch.inputs["input_ids"].shape[0]  # filled once


def test_train_and_score_a_causal_lm_on_conversations(tiny_chat_llama, tmp_path):
    """The whole path on message lists: rendered with the chat template, trained with the
    top layer cached, scored from the saved model."""
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": f"a helpful kind answer {i}"}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(24)]
    source = tmp_path / "conversations.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    shown = run_cli("data", "inspect", source, "--backbone", tiny_chat_llama, "--json")
    assert shown.exit_code == 0, shown.output
    example = json.loads(shown.stdout)["examples"][0]
    assert example["prompt"].endswith("<|im_start|>user\nquestion 0<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    assert example["chosen"] == "a helpful kind answer 0<|im_end|>\n"
    trained = run_cli("train", source, "--backbone", tiny_chat_llama, "--output",
                      tmp_path / "m", "--max-length", "64", "--epochs", "1", "--quiet")
    assert trained.exit_code == 0, trained.output
    scored = run_cli("score", source, "--model", tmp_path / "m", "--output",
                     tmp_path / "scores.parquet", "--solver", "direct", "--quiet")
    assert scored.exit_code == 0, scored.output
