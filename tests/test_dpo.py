"""The DPO objective against its references: TRL's DPOTrainer on the same tokens, one-pair
autograd, and the commands end to end (docs/method.md, section 1b)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_error_line, pairs, perturbed_model, run_cli

from prefprune import RewardModel
from prefprune.influence.gradients import MarginGradientComputer
from prefprune.model import DPOPolicy
from prefprune.model.encoding import encoded_batches

BETA = 0.1
TINY = ("--max-length", "48", "--epochs", "1", "--batch-size", "4", "--objective", "dpo")


def policy(backbone: Path | str, **config) -> DPOPolicy:
    """A tiny policy whose adapter is non-zero, so that it differs from its reference."""
    config.setdefault("max_length", 48)
    model = perturbed_model(backbone, seed=3, scale=0.3, objective="dpo", beta=BETA,
                            feature_cache=None, **config)
    assert isinstance(model, DPOPolicy)
    return model


def conversations() -> datasets.Dataset:
    """Plain-text pairs whose prompts and responses differ in length."""
    rows = pairs(6, 4, "d")
    return datasets.Dataset.from_dict({"prompt": rows["prompt"], "chosen": rows["chosen"],
                                       "rejected": rows["rejected"]})


@pytest.mark.parametrize("kind", ["chat_llama", "gpt2"])
def test_log_probs_and_loss_equal_trl_dpo_trainer(kind, tiny_backbones, tiny_chat_llama,
                                                  tmp_path):
    """(a) TRL's own DPOTrainer (its tokenization, collator, fused log-prob head, reference
    through the disabled adapter and sigmoid loss) and prefprune on the same token rows: a
    Llama with SmolLM2's byte-level tokenizer, and a GPT-2."""
    from trl import DPOConfig, DPOTrainer

    model = policy(tiny_chat_llama if kind == "chat_llama" else tiny_backbones[kind],
                   max_length=512)  # TRL's max_length=None: nothing is cut
    if model.tokenizer.eos_token is None:  # the tiny GPT-2 borrows a WordPiece tokenizer
        model.tokenizer.eos_token = "[SEP]"
    model.model.double()  # TRL's fused head rounds to float32; prefprune's side is exact
    data = conversations()
    trainer = DPOTrainer(model=model.model, processing_class=model.tokenizer,
                         train_dataset=data,
                         args=DPOConfig(output_dir=str(tmp_path), beta=BETA, report_to=[],
                                        max_length=None, per_device_train_batch_size=6,
                                        use_cpu=True, bf16=False))  # TRL's default: bf16
    # Given a PEFT model, TRL keeps a copy of its adapter ("ref") as the reference; for an
    # adapter TRL creates itself, and for prefprune, the reference is the base model (the
    # adapter disabled). Without the copy TRL takes that path.
    trainer.model.delete_adapter("ref")
    tokenized = trainer.train_dataset
    inputs = trainer.data_collator([tokenized[i] for i in range(len(tokenized))])
    ours = model.encoder(data["prompt"], data["chosen"], data["rejected"])
    torch.testing.assert_close(ours.inputs["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(ours.completion_mask, inputs["completion_mask"])
    model.model.eval()
    with torch.no_grad():
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        trl_logps = trainer.model(input_ids=inputs["input_ids"],
                                  attention_mask=inputs["attention_mask"], labels=labels,
                                  fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
        trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, inputs))
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        logps = model.policy_logps(ours)
        reference = model.reference_logps(ours)
        loss = F.softplus(-model.margins(ours)).mean()
    # to 1e-5: sums of ~100 log-probs (about -250) in TRL's float32 round at ~3e-5 absolute
    torch.testing.assert_close(logps, trl_logps.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, trl_ref.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, trl_loss.double(), rtol=1e-5, atol=1e-5)
    assert (logps - reference.float()).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("layers", [0, 1])
def test_margin_gradients_equal_one_pair_autograd(tiny_backbones, layers):
    """(b) The batched per-pair gradients of the DPO margin (one backward per batch, hooks) equal
    one backward per pair, with and without the frozen-layer cache."""
    model = policy(tiny_backbones["llama"], lora_layers=layers)
    (_, batch), = encoded_batches(model.encoder, pairs(6, 5, "g"), 6)
    assert batch.completion_mask.sum(dim=1).min() > 0
    assert (batch.inputs["attention_mask"] == 0).any()
    hooks = MarginGradientComputer(model, "hooks")(batch)
    loop = MarginGradientComputer(model, "loop")(batch)
    torch.testing.assert_close(hooks.margins, loop.margins, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooks.margin_grads, loop.margin_grads, rtol=1e-4, atol=1e-6)
    assert loop.margin_grads.abs().max() > 1e-3


def test_reference_is_the_model_without_its_adapter_and_computed_once(tiny_backbones):
    model = policy(tiny_backbones["llama"])
    (_, batch), = encoded_batches(model.encoder, pairs(4, 6, "r"), 4)
    first = model.reference_logps(batch)
    assert model.reference.computed == 8
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.add_(1.0)  # training moves θ; the reference must not move
    torch.testing.assert_close(model.reference_logps(batch), first)
    assert model.reference.computed == 8
    fresh = RewardModel.create(model.config, seed=0)  # adapter B = 0: policy = reference
    torch.testing.assert_close(fresh.policy_logps(batch).double(), first, rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh.margins(batch), torch.zeros(4), rtol=0, atol=1e-6)


def test_dpo_commands_end_to_end(tiny_backbones, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                            + "\n" for r in pairs(30, 7, "e")))
    backbone = ("--backbone", tiny_backbones["llama"])
    trained = run_cli("train", data, "--output", tmp_path / "m", *backbone, *TINY,
                      "--learning-rate", "0.05", "--json", "--quiet")
    assert trained.exit_code == 0, trained.output
    metrics = json.loads(trained.stdout)["metrics"]["test"]
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0
    assert json.loads((tmp_path / "m" / "prefprune.json").read_text())["config"]["objective"] \
        == "dpo"
    evaluated = run_cli("evaluate", tmp_path / "m", data, "--json", "--quiet")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["metrics"]["test"]["accuracy"] == metrics["accuracy"]
    scored = run_cli("score", data, "--model", tmp_path / "m", "--output",
                     tmp_path / "s.parquet", "--scores", "if,grad_cos,loss", "--quiet")
    assert scored.exit_code == 0, scored.output
    pruned = run_cli("prune", tmp_path / "s.parquet", data, "--output", tmp_path / "p",
                     "--fraction", "0.2")
    assert pruned.exit_code == 0, pruned.output
    assert len((tmp_path / "p" / "pairs.jsonl").read_text().splitlines()) == 30 - 4
    bad = run_cli("train", data, "--output", tmp_path / "x", *backbone, *TINY, "--beta", "0")
    assert "--beta" in assert_one_error_line(bad, 2)
