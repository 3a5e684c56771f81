"""A TRL DPOTrainer output read as TRL trained it: the real trainer on a tiny causal LM, and
prefprune's rows, log-probabilities and implicit-reward margins for the training pairs equal
TRL's own (docs/trl.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_one_error_line, run_cli
from peft import LoraConfig, get_peft_model
from test_trl_checkpoints import assert_learning_rate_weighted, assert_recorded_as_fresh
from test_trl_reward import conversational_rows, plain_rows, write_jsonl
from trl import DPOConfig, DPOTrainer

from prefprune.data import DataOptions
from prefprune.errors import InfluenceError, ModelError, PrefpruneWarning
from prefprune.integrations import PrefpruneCallback
from prefprune.integrations.trl import TrlConfig, load_model, trl_reading
from prefprune.integrations.trl_args import saved_training_args
from prefprune.model import DPOPolicy
from prefprune.pipeline import prepare_data, rendering_of
from prefprune.scoring import score_pairs

LORA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def train_dpo(backbone: Path, rows: list[dict], out: Path, *, adapter: str | None = "new",
              callbacks: tuple = (), epochs: int = 2, save_steps: int = 2,
              **config) -> DPOTrainer:
    """The real DPOTrainer, a few CPU steps on the ``train`` rows, checkpoints every
    ``save_steps`` and the final model saved. ``adapter``: ``new`` (TRL creates a LoRA
    adapter), ``peft`` (TRL is given a PEFT model whose adapter is already trained, and
    trains it against a frozen copy) or None (full weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = datasets.Dataset.from_list([r for r in rows if r["split"] == "train"])
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=4,
                     num_train_epochs=epochs, learning_rate=5e-2, save_steps=save_steps,
                     logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                     bf16=False, **config)
    model: object = str(backbone)
    if adapter == "peft":
        torch.manual_seed(1)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(backbone),
                               LoraConfig(**LORA, init_lora_weights=False))
    trainer = DPOTrainer(model=model, args=args, train_dataset=train,
                         processing_class=AutoTokenizer.from_pretrained(backbone),
                         peft_config=LoraConfig(**LORA) if adapter == "new" else None,
                         callbacks=list(callbacks))
    trainer.train()
    trainer.save_model()
    return trainer


def trl_values(trainer: DPOTrainer) -> dict[str, tuple[float, float, float, float, float]]:
    """TRL's own values for each training pair (by id): the policy's and the reference's
    log-probabilities of chosen and rejected, and the implicit-reward margin; from its rows,
    its collator, its fused log-prob head and its reference."""
    rows = trainer.train_dataset
    batch = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                   for r in rows])
    model = trainer.model
    model.eval()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logps = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
        reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model or model, batch))
    half = len(rows)
    margins = trainer.beta * ((logps[:half] - reference[:half])
                              - (logps[half:] - reference[half:]))
    return {i: (logps[j].item(), logps[j + half].item(), reference[j].item(),
                reference[j + half].item(), margins[j].item()) for j, i in enumerate(rows["id"])}


def prefprune_view(out: Path, source: Path, trl: TrlConfig | None = None):
    """The data and model as ``prefprune score`` reads them for a TRL output."""
    rendering, config = trl_reading(out, source, DataOptions(), rendering_of(out),
                                    trl or TrlConfig())
    return prepare_data(source, rendering=rendering), load_model(out, trl=config)


CASES = {
    "plain-new-adapter": (plain_rows, "new", {}),
    "conversational-new-adapter": (conversational_rows, "new", {}),
    # TRL's frozen "ref" copy of the adapter it was given is the reference (saved in ref/)
    "plain-given-adapter": (plain_rows, "peft", {}),
    # full weights: the reference is the model the run started from, named by the flag
    "conversational-full-weights": (conversational_rows, None, {"beta": 0.5}),
}


@pytest.mark.parametrize("case", CASES)
def test_rows_log_probs_and_margins_equal_trl(case, tiny_lm, tmp_path):
    rows_of, adapter, config = CASES[case]
    rows = rows_of()
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    trainer = train_dpo(tiny_lm, rows, tmp_path / "run", adapter=adapter, **config)
    settings = TrlConfig(reference=str(tiny_lm) if adapter is None else None)
    data, model = prefprune_view(tmp_path / "run", source, settings)
    assert isinstance(model, DPOPolicy)
    recipe = model.metadata["trl"]
    assert (recipe["objective"], recipe["beta"]) == ("dpo", trainer.beta)
    assert recipe["beta_from"] == "the run's training_args.bin"
    assert recipe["data"] == ("conversational" if "conv" in case else "plain")
    assert recipe["reference"] == {"new": "the base model (the adapter disabled)",
                                   "peft": str(tmp_path / "run" / "ref"),
                                   None: str(tiny_lm)}[adapter]

    train = data.splits["train"]
    trl_rows = {r["id"]: r for r in trainer.train_dataset}
    for pair in train:
        (chosen, rejected), masks = model.encoder.rows(pair["prompt"], pair["chosen"],
                                                       pair["rejected"])
        row = trl_rows[pair["id"]]
        assert chosen == row["prompt_ids"] + row["chosen_ids"]
        assert rejected == row["prompt_ids"] + row["rejected_ids"]
        assert masks[0].count(0) == masks[1].count(0) == len(row["prompt_ids"])
    expected = trl_values(trainer)
    batch = model.encode_pairs(train["prompt"], train["chosen"], train["rejected"])
    with torch.no_grad():
        logps = model.policy_logps(batch).view(2, -1).T
        reference = model.reference_logps(batch).view(2, -1).T
        margins = model.margins(batch)
    ours = torch.cat([logps.double(), reference, margins.double()[:, None]], dim=1)
    assert len(train) == len(expected) == 8
    np.testing.assert_allclose(ours, [expected[i] for i in train["id"]], atol=1e-4, rtol=0)
    assert max(abs(v[-1]) for v in expected.values()) > 1e-2  # trained: θ ≠ reference


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_and_dropping_are_trls(mode, tiny_lm, tmp_path):
    """max_length (read from the run) cuts prompt + response as TRL's collator does, at the end
    or at the start, and a pair whose prompt alone fills it is left out exactly when TRL left
    it out (keep_start)."""
    rows = plain_rows()
    rows[0]["prompt"] += " context" * 40
    rows[1]["chosen"] += " and a much longer tail" * 8
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    trainer = train_dpo(tiny_lm, rows, tmp_path / "run", max_length=40, truncation_mode=mode)
    data, model = prefprune_view(tmp_path / "run", source)
    outcome = score_pairs(data, model, progress=False)
    recipe = outcome.result.metadata["trl"]
    assert (recipe["max_length"], recipe["truncation_mode"]) == (40, mode)
    assert recipe["dropped_over_max_length"] == (["t0"] if mode == "keep_start" else [])
    table = outcome.result.table.set_index("id")
    expected = trl_values(trainer)
    assert sorted(table.index) == sorted(expected)
    np.testing.assert_allclose(table.loc[list(expected), "margin"],
                               [v[-1] for v in expected.values()], atol=1e-4, rtol=0)
    trl_rows = {r["id"]: r for r in trainer.train_dataset}
    for i in ("t1",) if mode == "keep_start" else ("t0", "t1"):
        pair = rows[int(i[1:])]
        (chosen, _), (mask, _) = model.encoder.rows(pair["prompt"], pair["chosen"],
                                                    pair["rejected"])
        full = trl_rows[i]["prompt_ids"] + trl_rows[i]["chosen_ids"]
        assert chosen == (full[:40] if mode == "keep_start" else full[-40:])
        assert len(chosen) == len(mask) == 40


def test_score_and_evaluate_commands_read_the_run_as_trl_did(tiny_lm, tmp_path):
    rows = conversational_rows()
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    expected = trl_values(train_dpo(tiny_lm, rows, tmp_path / "run", beta=0.3))
    out = tmp_path / "scores.parquet"
    scored = run_cli("score", source, "--model", tmp_path / "run", "--output", out,
                     "--scores", "if,loss", "--quiet")
    assert scored.exit_code == 0, scored.output
    recipe = json.loads(out.with_suffix(".json").read_text())["trl"]
    assert (recipe["objective"], recipe["beta"], recipe["data"]) == ("dpo", 0.3, "conversational")
    assert recipe["beta_from"] == "the run's training_args.bin"
    assert recipe["reference"] == "the base model (the adapter disabled)"
    assert recipe["truncation"].startswith("keep_start")
    table = pd.read_parquet(out).set_index("id")
    np.testing.assert_allclose(table.loc[list(expected), "margin"],
                               [v[-1] for v in expected.values()], atol=1e-4, rtol=0)
    (tmp_path / "run" / "training_args.bin").unlink()  # gone: β is the flag's
    evaluated = run_cli("evaluate", tmp_path / "run", source, "--split", "train",
                        "--trl-beta", "0.3", "--json", "--quiet")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)["metrics"]["train"]
    assert metrics["pairs"] == len(expected)
    assert metrics["margin_mean"] == pytest.approx(np.mean([v[-1] for v in expected.values()]),
                                                   abs=1e-4)


def test_what_the_folder_cannot_say_is_asked_for(tiny_lm, tmp_path):
    rows = plain_rows()
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    train_dpo(tiny_lm, rows, tmp_path / "run", adapter=None, epochs=1, save_steps=10)
    result = run_cli("evaluate", tmp_path / "run", source, "--quiet")
    assert "--trl-reference" in assert_one_error_line(result, 1)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot be the reference of a full-weight run"):
        load_model(tmp_path / "run", trl=TrlConfig(data="plain",
                                                         reference=str(tmp_path / "adapter")))
    torch.save(DPOConfig(output_dir=str(tmp_path), loss_type=["ipo"], report_to=[],
                         use_cpu=True, bf16=False),
               tmp_path / "run" / "training_args.bin")
    with pytest.warns(PrefpruneWarning, match=r"loss_type \['ipo'\].*sigmoid"):
        load_model(tmp_path / "run", trl=TrlConfig(data="plain", reference=str(tiny_lm)))


class _Payload:
    """What a hostile pickle holds: loading it for real would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_training_args_are_read_as_values_and_never_run(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), beta=0.2, max_length=77, report_to=[],
                     use_cpu=True, bf16=False)
    args.payload = _Payload(tmp_path / "ran")
    torch.save(args, tmp_path / "training_args.bin")
    saved = saved_training_args(tmp_path)
    assert not (tmp_path / "ran").exists()
    assert (saved["beta"], saved["max_length"], saved["loss_type"]) == (0.2, 77, ["sigmoid"])
    assert "payload" not in saved and "eval_strategy" not in saved  # not plain values
    (tmp_path / "training_args.bin").write_bytes(b"not a zip")
    assert saved_training_args(tmp_path) == {}


@pytest.fixture(scope="module")
def recorded_dpo(tiny_lm, tmp_path_factory) -> tuple[Path, Path]:
    """A DPOTrainer LoRA run recorded by the callback, and its data: two epochs of one
    optimiser step each (two micro-batches of 4, accumulated), a checkpoint after every
    step."""
    root = tmp_path_factory.mktemp("dpo")
    rows = plain_rows()
    train_dpo(tiny_lm, rows, root / "run", callbacks=(PrefpruneCallback(),), save_steps=1,
              gradient_accumulation_steps=2)
    return root / "run", write_jsonl(rows, root / "pairs.jsonl")


def test_the_callback_records_each_pair_as_trl_took_it(recorded_dpo):
    """checkpoint-2's record comes from TRL's backward in step 2, at checkpoint-1's
    parameters: it equals the margins and margin gradients taken afresh at checkpoint-1."""
    assert_recorded_as_fresh(*recorded_dpo)


def test_score_checkpoints_of_a_dpo_run(recorded_dpo, tmp_path):
    run, source = recorded_dpo
    out = tmp_path / "scores.parquet"
    result = run_cli("score", source, "--checkpoints", run, "--output", out,
                     "--scores", "if,loss", "--quiet")
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    members = meta["checkpoints"]["members"]
    assert [m["step"] for m in members] == [1, 2]
    assert [m["gradients"]["recorded"] for m in members] == [8, 0]
    assert members[0]["learning_rate"] > members[1]["learning_rate"] > 0
    assert meta["trl"]["objective"] == "dpo" and meta["ensemble"]["members"] == 2
    assert_learning_rate_weighted(out, members, tmp_path / "scores.parquet.work")


def test_the_callback_refuses_what_it_cannot_record(tiny_lm, tmp_path):
    with pytest.raises(InfluenceError, match="precompute_ref_log_probs"):
        train_dpo(tiny_lm, plain_rows(), tmp_path / "run", callbacks=(PrefpruneCallback(),),
                  precompute_ref_log_probs=True)
