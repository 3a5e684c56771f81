"""RewardModel: LoRA targets, the pair encoder's truncation rules, seeding, save/load formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefprune.errors import ModelError
from prefprune.model import METADATA_FILE, RewardModel, RewardModelConfig

EXPECTED_TARGETS = {"bert": {"query", "value"}, "gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}}
PROMPTS = ["what is the capital of france", "name a colour please"]
CHOSEN = ["paris is the capital", "blue"]
REJECTED = ["lyon", "a number like seven"]


def make(backbone: Path, seed: int = 0, **config) -> RewardModel:
    return RewardModel.create(RewardModelConfig(backbone=str(backbone), **config), seed=seed)


def perturb(model: RewardModel, seed: int = 1) -> RewardModel:
    """Give every trainable tensor random values, so that LoRA B (zero at creation) matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def pair_margins(model: RewardModel) -> torch.Tensor:
    with torch.no_grad():
        return model.margins(model.encode_pairs(PROMPTS, CHOSEN, REJECTED))


def tokens(model: RewardModel, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind", sorted(EXPECTED_TARGETS))
def test_targets_detected_and_only_lora_and_head_train(tiny_backbones, kind):
    model = make(tiny_backbones[kind])
    assert set(model.model.peft_config["default"].target_modules) == EXPECTED_TARGETS[kind]
    names = [name for name, _ in model.trainable_parameters()]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("modules_to_save" in n for n in names)
    assert all("lora_" in n or "modules_to_save" in n for n in names)
    frozen = [p for n, p in model.model.named_parameters() if n not in set(names)]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_response_kept_whole_and_prompt_cut_from_the_left(tiny_bert):
    model = make(tiny_bert, max_length=16)
    prompt = " ".join(f"word{i}" for i in range(40))
    response = "the answer is short"
    row = model.encode_pairs([prompt], [response], ["no"]).inputs["input_ids"][0].tolist()
    tok = model.tokenizer
    assert len(row) == 16
    response_ids, prompt_ids = tokens(model, response), tokens(model, prompt)
    assert row[-len(response_ids) - 1 : -1] == response_ids
    assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
    kept_prompt = row[1 : -len(response_ids) - 2]
    assert kept_prompt == prompt_ids[-len(kept_prompt) :]  # the end of the prompt survives
    assert model.encoding_stats.prompts_truncated == 2  # both rows carry the long prompt
    assert model.encoding_stats.responses_truncated == 0


def test_response_longer_than_max_length_is_cut_and_counted(tiny_bert):
    model = make(tiny_bert, max_length=12)
    long_response = " ".join(f"token{i}" for i in range(30))
    batch = model.encode_pairs(["a prompt"], [long_response], ["short"])
    row = batch.inputs["input_ids"][0].tolist()
    assert len(row) == 12
    assert row[1:-1] == tokens(model, long_response)[:10]  # the response's start, no prompt
    assert model.encoding_stats.responses_truncated == 1


def test_rows_are_chosen_then_rejected(tiny_bert):
    model = make(tiny_bert)
    batch = model.encode_pairs(PROMPTS, CHOSEN, REJECTED)
    decoded = model.tokenizer.batch_decode(batch.inputs["input_ids"], skip_special_tokens=True)
    assert batch.size == 2 and len(decoded) == 4
    for i, text in enumerate(CHOSEN + REJECTED):
        assert decoded[i].endswith(text)


def test_margins_are_chosen_minus_rejected_rewards(tiny_bert):
    model = perturb(make(tiny_bert))
    batch = model.encode_pairs(PROMPTS, CHOSEN, REJECTED)
    with torch.no_grad():
        rewards, margins = model.rewards(batch), model.margins(batch)
    assert rewards.shape == (4,) and margins.shape == (2,)
    torch.testing.assert_close(margins, rewards[:2] - rewards[2:])


def test_create_is_seeded(tiny_bert):
    first, again, other = (make(tiny_bert, seed=s).trainable_state() for s in (0, 0, 1))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_save_load_round_trip(tiny_backbones, tmp_path, kind):
    model = perturb(make(tiny_backbones[kind], max_length=32))
    model.save(tmp_path / "rm", run="abc", numbers=[1, 2])
    loaded = RewardModel.load(tmp_path / "rm")
    torch.testing.assert_close(pair_margins(loaded), pair_margins(model), rtol=0, atol=1e-6)
    assert loaded.metadata == {"run": "abc", "numbers": [1, 2]}
    assert loaded.config.max_length == 32
    assert [n for n, _ in loaded.trainable_parameters()] == \
        [n for n, _ in model.trainable_parameters()]


def test_only_safetensors_are_written(tiny_bert, tmp_path):
    make(tiny_bert).save(tmp_path / "rm")
    files = [p.name for p in (tmp_path / "rm").rglob("*") if p.is_file()]
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert METADATA_FILE in files


def test_load_adapter_saved_by_peft(tiny_bert, tmp_path):
    model = perturb(make(tiny_bert))
    model.model.save_pretrained(str(tmp_path / "adapter"))
    loaded = RewardModel.load(tmp_path / "adapter")
    torch.testing.assert_close(pair_margins(loaded), pair_margins(model), rtol=0, atol=1e-6)


def test_load_full_checkpoint_matches_plain_model(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    loaded = RewardModel.load(tiny_bert)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert,
                                                               attn_implementation="eager")
    batch = loaded.encode_pairs(PROMPTS, CHOSEN, REJECTED)
    with torch.no_grad():
        logits = plain.eval()(**batch.inputs).logits.squeeze(-1)
    torch.testing.assert_close(pair_margins(loaded), logits[:2] - logits[2:], rtol=0, atol=1e-6)
    assert loaded.num_trainable > 0


def test_load_empty_directory_raises(tmp_path):
    with pytest.raises(ModelError, match="not a reward model directory"):
        RewardModel.load(tmp_path)


def test_adapter_without_trained_head_raises(tiny_bert, tmp_path):
    make(tiny_bert).model.save_pretrained(str(tmp_path / "adapter"))
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "modules_to_save": None}))
    with pytest.raises(ModelError, match="modules_to_save"):
        RewardModel.load(tmp_path / "adapter")
