"""A TRL RewardTrainer output read as TRL trained it: the real trainer on tiny models, and
prefprune's tokens and margins for the training pairs equal TRL's own (docs/trl.md)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import run_cli
from peft import LoraConfig
from trl import RewardConfig, RewardTrainer

from prefprune.data import DataOptions
from prefprune.errors import ModelError
from prefprune.integrations.trl import TrlConfig, load_model, trl_reading
from prefprune.pipeline import prepare_data, rendering_of
from prefprune.scoring import score_pairs

QUESTIONS = ["what is the capital of france", "is seven a number", "say something kind",
             "what is a helpful answer", "yes or no", "name a city", "is this rude",
             "what comes after seven", "answer the question", "maybe later"]


def plain_rows(n: int = 12) -> list[dict]:
    """Plain-text pairs; prompts without a trailing space, responses with a leading one."""
    return [{"id": f"t{i}", "split": "train" if i < n - 4 else "validation",
             "prompt": f"{QUESTIONS[i % 10]} {i}?",
             "chosen": f" a helpful kind answer, number {i}",
             "rejected": f" no {i}"} for i in range(n)]


def conversational_rows(n: int = 12) -> list[dict]:
    """TRL's conversational format: message lists for the prompt and both responses."""
    return [{"id": r["id"], "split": r["split"],
             "prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
            for r in plain_rows(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_trl(backbone: Path, rows: list[dict], out: Path, *, callbacks: tuple = (),
              epochs: int = 2, save_steps: int = 2, resume: bool = False, lora: bool = True,
              **config) -> RewardTrainer:
    """The real RewardTrainer, LoRA on the attention projections (or every weight), a few CPU
    steps on the ``train`` rows; checkpoints every ``save_steps`` and the final model saved
    (``resume``: from the latest checkpoint in ``out``)."""
    train = datasets.Dataset.from_list([r for r in rows if r["split"] == "train"])
    targets = ["query", "value"] if "bert" in backbone.name else ["q_proj", "v_proj"]
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=4,
                        num_train_epochs=epochs, learning_rate=2e-2, save_steps=save_steps,
                        logging_steps=1, report_to=[], use_cpu=True, seed=0,
                        disable_tqdm=True, bf16=False, **config)
    peft = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets)
    trainer = RewardTrainer(model=str(backbone), args=args, train_dataset=train,
                            peft_config=peft if lora else None, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model()
    return trainer


def trl_margins(trainer: RewardTrainer) -> dict[str, float]:
    """TRL's own margins for its training pairs: its model, its tokens, its collator."""
    rows = trainer.train_dataset
    batch = trainer.data_collator([{"chosen_ids": r["chosen_ids"],
                                    "rejected_ids": r["rejected_ids"]} for r in rows])
    trainer.model.eval()
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    half = len(rows)
    return dict(zip(rows["id"], (rewards[:half] - rewards[half:]).tolist()))


def prefprune_view(out: Path, source: Path, trl: TrlConfig | None = None):
    """The data and model as ``prefprune score`` reads them for a TRL output."""
    rendering, config = trl_reading(out, source, DataOptions(), rendering_of(out),
                                    trl or TrlConfig())
    data = prepare_data(source, rendering=rendering)
    return data, load_model(out, trl=config)


@pytest.fixture(scope="module")
def bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT under a name that says so (LoRA targets are picked by it)."""
    link = tmp_path_factory.mktemp("trl") / "bert"
    link.symlink_to(tiny_bert)
    return link


CASES = {
    # eos == pad (no pad token): TRL reads the reward one token before the eos it appends
    "plain-chat-llama": ("chat", plain_rows, {}),
    "conversational-chat-llama": ("chat", conversational_rows, {}),
    # a pooled head, a WordPiece pair of [CLS]/[SEP] and no token types; TRL needs its eos
    "plain-bert": ("bert", plain_rows, {"eos_token": "[SEP]"}),
    # full weights: prefprune adds a zero LoRA, which leaves the function as TRL trained it
    "full-weights-plain-chat-llama": ("chat", plain_rows, {"lora": False}),
}


@pytest.mark.parametrize("case", CASES)
def test_tokens_and_margins_equal_trl(case, tiny_chat_llama, bert, tmp_path):
    kind, rows_of, config = CASES[case]
    backbone = tiny_chat_llama if kind == "chat" else bert
    rows = rows_of()
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    trainer = train_trl(backbone, rows, tmp_path / "run", **config)
    data, model = prefprune_view(tmp_path / "run", source)
    train = data.splits["train"]
    assert model.metadata["trl"]["data"] == ("conversational" if "conv" in case else "plain")

    trl_rows = {r["id"]: r for r in trainer.train_dataset}
    for pair in train:
        assert model.encoder.sequence(pair["prompt"], pair["chosen"]) == \
            trl_rows[pair["id"]]["chosen_ids"]
        assert model.encoder.sequence(pair["prompt"], pair["rejected"]) == \
            trl_rows[pair["id"]]["rejected_ids"]
    expected = trl_margins(trainer)
    ours = model.margins(model.encode_pairs(train["prompt"], train["chosen"],
                                            train["rejected"]))
    assert len(train) == len(expected) == 8
    np.testing.assert_allclose(ours.detach().numpy(), [expected[i] for i in train["id"]],
                               atol=1e-4, rtol=0)
    assert max(abs(v) for v in expected.values()) > 1e-3  # trained away from a zero head


def test_score_command_reads_the_run_as_trl_did_and_says_so(tiny_chat_llama, tmp_path):
    rows = conversational_rows()
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    trainer = train_trl(tiny_chat_llama, rows, tmp_path / "run")
    out = tmp_path / "scores.parquet"
    result = run_cli("score", str(source), "--model", str(tmp_path / "run"), "--output", str(out),
                 "--scores", "if,loss", "--quiet")
    assert result.exit_code == 0, result.output
    sidecar = json.loads(out.with_suffix(".json").read_text())
    recipe = sidecar["trl"]
    assert recipe["objective"] == "reward"
    assert (recipe["data"], recipe["data_from"]) == ("conversational", "the data's first record")
    assert (recipe["max_length"], recipe["max_length_from"]) == (1024, "the run's "
                                                                 "training_args.bin")
    assert recipe["eos_token"] == recipe["pad_token"] == "<|im_end|>"
    assert recipe["dropped_over_max_length"] == []
    import pandas as pd

    table = pd.read_parquet(out)
    expected = trl_margins(trainer)
    np.testing.assert_allclose(table["margin"], [expected[i] for i in table["id"]], atol=1e-4)


def test_evaluate_reads_the_run_as_trl_did(tiny_chat_llama, tmp_path):
    rows = conversational_rows()
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    expected = trl_margins(train_trl(tiny_chat_llama, rows, tmp_path / "run"))
    result = run_cli("evaluate", str(tmp_path / "run"), str(source), "--split", "train",
                     "--json", "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]["train"]
    assert metrics["pairs"] == len(expected)
    assert metrics["margin_mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-4)


def test_pairs_over_max_length_are_left_out_as_trl_left_them_out(tiny_chat_llama, tmp_path):
    rows = plain_rows()
    rows[0]["chosen"] += " and a much longer tail" * 8
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    trainer = train_trl(tiny_chat_llama, rows, tmp_path / "run", max_length=40)
    assert "t0" not in trainer.train_dataset["id"]
    data, model = prefprune_view(tmp_path / "run", source)  # max_length: training_args.bin
    outcome = score_pairs(data, model, progress=False)
    assert outcome.result.metadata["trl"]["max_length"] == 40
    assert outcome.result.metadata["trl"]["dropped_over_max_length"] == ["t0"]
    assert sorted(outcome.result.table["id"]) == sorted(trainer.train_dataset["id"])
    (tmp_path / "run" / "training_args.bin").unlink()  # gone: the flag says it
    model = load_model(tmp_path / "run", trl=TrlConfig(data="plain", max_length=40))
    assert model.metadata["trl"]["max_length_from"] == "the --trl-max-length setting"


def test_a_run_without_a_final_model_loads_its_latest_checkpoint(tiny_chat_llama, tmp_path):
    rows = plain_rows()
    trainer = train_trl(tiny_chat_llama, rows, tmp_path / "run", save_steps=3)
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        (tmp_path / "run" / name).unlink()
    model = load_model(tmp_path / "run", trl=TrlConfig(data="plain"))
    assert model.metadata["trl"]["model_folder"].endswith("checkpoint-4")
    assert trainer.state.global_step == 4


def test_what_the_folder_cannot_say_is_asked_for(tiny_chat_llama, tmp_path):
    train_trl(tiny_chat_llama, plain_rows(), tmp_path / "run", epochs=1, save_steps=10)
    with pytest.raises(ModelError, match="--trl-data plain or conversational"):
        load_model(tmp_path / "run")
    card = tmp_path / "run" / "README.md"
    card.write_text(card.read_text().replace("reward-trainer", "sft"))
    with pytest.raises(ModelError, match=r"another trainer.*sft.*RewardTrainer and DPOTrainer"):
        load_model(tmp_path / "run")
