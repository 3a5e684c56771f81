"""TRL output folders as prefprune models, read on the token sequences TRL trained on.

A TRL run is a model only with the tokens it was trained on: another chat template, another
end-of-sequence token, another reading position, and the gradients belong to another model.
A ``DPOTrainer`` run is read by :mod:`prefprune.integrations.trl_dpo` (its rows, its β and its
reference); what follows is the ``RewardTrainer``. TRL 1.16 encodes a pair like this
(``RewardTrainer._prepare_dataset`` and ``DataCollatorForPreference``), and so does
:class:`TrlPairEncoder` (docs/trl.md):

* **plain text**: the tokenizer's eos token is appended to each response that does not
  already end with it, and prompt + response is tokenized as one text, with the tokenizer's
  special tokens (BERT's ``[CLS] ... [SEP]``, a Llama ``<s>``);
* **conversational** (message lists): the prompt and response messages go through the chat
  template and are tokenized without adding special tokens (the template writes them); no eos
  is appended;
* **nothing is cut**: a pair with a side longer than ``max_length`` tokens is dropped from
  training, never truncated;
* rows are padded on the right, and the reward is the head's score at the **last token that
  is not the pad token** (transformers' pooling for heads that score every position). When
  the pad token is also the eos TRL appended (a tokenizer without a pad token), that is the
  token before it: the encoder drops such trailing tokens, which a causal model's score at
  the tokens before them does not depend on.

What the folder says is read from its JSON and tokenizer files (the eos and pad tokens TRL
set, the chat template, the objective from the model card's tags) and from its
``training_args.bin`` (``max_length``, DPO's β), read as plain values without running the
pickle (:mod:`prefprune.integrations.trl_args`); :class:`TrlConfig` overrides them or stands
in when that file is gone, and names what no file holds (a reference model given to the
trainer). Whether the data was conversational comes from the data itself, by TRL's own test
(:func:`trl_reading`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from prefprune.config import Settings, setting
from prefprune.data import DataOptions, default_dataset_path
from prefprune.data.loader import open_source
from prefprune.data.messages import PLAIN, Rendering
from prefprune.errors import ModelError
from prefprune.integrations.trl_args import ARGS_FILE, saved_training_args
from prefprune.integrations.trl_encoding import TrlPairEncoder, TrlTokenization
from prefprune.model import RewardModel
from prefprune.model.loading import ADAPTER_WEIGHTS, head_name

#: The model card's tag that names the trainer, and the objective prefprune scores it with.
OBJECTIVES = {"reward-trainer": "reward", "dpo": "dpo"}
#: TRL's own default for ``RewardConfig.max_length`` and ``DPOConfig.max_length``.
TRL_MAX_LENGTH = 1024
#: TRL's own defaults for ``DPOConfig.beta``, ``truncation_mode`` and ``loss_type``.
TRL_BETA = 0.1
TRL_TRUNCATION = "keep_start"
TRL_LOSS = ["sigmoid"]
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


@dataclass(frozen=True)
class TrlConfig(Settings):
    """What a TRL run's folder may not say (the settings of a run whose training_args.bin is
    gone or unreadable, a reference it was given), what to override, and which of its saved
    checkpoints to score (docs/trl.md)."""

    section: ClassVar[str] = "trl"

    checkpoints: str | None = setting(
        None, metavar="DIR|GLOB",
        help="A TRL output folder (or a glob of its checkpoint-* folders): score with every "
             "saved checkpoint and combine them, each weighted by its learning rate from "
             "trainer_state.json (TracIn-CP).")
    max_length: int | None = setting(
        None, min=1,
        help="The max_length the TRL run trained with: RewardTrainer dropped the pairs with a "
             "side longer than this; DPOTrainer cut prompt + response to it and dropped the "
             "pairs whose prompt alone filled it. Default: the run's training_args.bin, else "
             "TRL's default.")
    beta: float | None = setting(
        None, above=0.0,
        help="The beta a DPOTrainer run trained with (DPOConfig.beta). Default: the run's "
             "training_args.bin, else TRL's default.")
    reference: str | None = setting(
        None, metavar="DIR",
        help="The reference of a DPOTrainer run when its folder does not hold it: the model "
             "given as ref_model=..., or the one a full-weight run started from (a model "
             "folder or hub name), or a LoRA adapter folder. Default: the base model under "
             "the run's adapter, or TRL's copy of the adapter it started from (ref/).")
    data: str = setting(
        "auto", choices=("auto", "plain", "conversational"),
        help="How TRL read the data: plain text (eos appended) or conversational (message "
             "lists through the chat template). auto: conversational exactly when the data "
             "holds message lists.")
    messages: bool | None = setting(
        None, cli=False, persist=False,
        help="Whether the data's first record holds message lists (TRL's own test for a "
             "conversational dataset), once prefprune has looked (see trl_reading); None when "
             "unknown.")

    def reading(self, tokenizer: Any) -> tuple[str, str]:
        """(``plain`` or ``conversational``, where that came from)."""
        if self.data != "auto":
            return self.data, "the --trl-data setting"
        if self.messages is not None:
            return ("conversational" if self.messages else "plain"), "the data's first record"
        if not getattr(tokenizer, "chat_template", None):
            return "plain", "the tokenizer (no chat template: TRL read plain text)"
        raise ModelError("say how the TRL run read its data (--trl-data plain or "
                         "conversational): its tokenizer has a chat template, so either is "
                         "possible")


def trl_reading(model: str | os.PathLike | None, source: str | os.PathLike | None,
                options: DataOptions, rendering: Rendering,
                config: TrlConfig) -> tuple[Rendering, TrlConfig]:
    """How to read ``source`` for ``model`` and the config that knows it: for a TRL output, as
    TRL read it. TRL calls a dataset conversational when its first record holds message lists
    and renders those with the chat template; it reads text as it is (an HH transcript is
    never turned into chat turns). Any other model keeps ``rendering``."""
    if model is None or read_trl_output(Path(model)) is None:
        return rendering, config
    if config.data == "auto":
        config = config.replace(messages=_first_record_has_messages(source, options))
    conversational = config.data == "conversational" or (config.data == "auto"
                                                         and config.messages)
    return (rendering if conversational else PLAIN), config


def _first_record_has_messages(source: str | os.PathLike | None, options: DataOptions) -> bool:
    container, _, _ = open_source(default_dataset_path() if source is None else source, options)
    first = next((row.record for row in container.rows if isinstance(row.record, dict)), {})
    return any(isinstance(value, list) and value and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)
        for value in first.values())


# --- the folder -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrlOutput:
    """A TRL output folder: the folder named, where its weights are, and its objective."""

    folder: Path
    model_folder: Path
    objective: str


def read_trl_output(path: Path) -> TrlOutput | None:
    """The TRL run ``path`` holds (its final model, or its latest checkpoint when the run saved
    none), or None when no TRL model card says TRL wrote it."""
    model_folder = path if has_model(path) else _latest_checkpoint(path)
    if model_folder is None:
        return None
    tags = _card_tags(model_folder) or _card_tags(path)
    if "trl" not in tags:
        return None
    objective = next((OBJECTIVES[t] for t in tags if t in OBJECTIVES), None)
    if objective is None:
        trainer = ", ".join(sorted(t for t in set(tags) - {"trl", "transformers", "lora"}
                                   if ":" not in t)) or "unknown"
        raise ModelError(f"{path}: a TRL output of another trainer (model card tags: "
                         f"{trainer}); prefprune reads RewardTrainer and DPOTrainer outputs")
    return TrlOutput(path, model_folder, objective)


def card_base_model(run: TrlOutput) -> str | None:
    """The model the run started from, as its model card names it (TRL writes it only for a
    model loaded by hub name, not from a local folder)."""
    for folder in (run.model_folder, run.folder):
        base = _card(folder / "README.md").get("base_model")
        if isinstance(base, str) and base:
            return base
    return None


def has_model(folder: Path) -> bool:
    """Whether ``folder`` holds an adapter or full weights in safetensors."""
    adapter = (folder / "adapter_config.json").is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    full = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    return adapter or full


def _latest_checkpoint(path: Path) -> Path | None:
    found = [c for c in checkpoint_folders(path) if has_model(c)]
    return found[-1] if found else None


def checkpoint_folders(path: Path) -> list[Path]:
    """``checkpoint-N`` sub-folders, by step."""
    if not path.is_dir():
        return []
    return sorted((c for c in path.iterdir() if c.is_dir() and CHECKPOINT.match(c.name)),
                  key=step_of)


def step_of(folder: Path) -> int:
    """The step N of a ``checkpoint-N`` folder."""
    return int(CHECKPOINT.match(folder.name).group(1))  # type: ignore[union-attr]


def _card_tags(folder: Path) -> list[str]:
    """The tags of a folder's model card (TRL writes ``trl`` and the trainer's tag there)."""
    tags = _card(folder / "README.md").get("tags")
    return [str(t) for t in tags] if isinstance(tags, list) else []


def _card(readme: Path) -> dict[str, Any]:
    """The YAML header of a Hugging Face model card, or nothing."""
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    header = re.match(r"---\n(.*?)\n---", text, re.DOTALL)
    if header is None:
        return {}
    try:
        card = yaml.safe_load(header.group(1))
    except yaml.YAMLError:
        return {}
    return card if isinstance(card, dict) else {}


def run_setting(run: TrlOutput, name: str, given: Any, default: Any) -> tuple[Any, str]:
    """A training argument of ``run``: ``given`` (the user's ``--trl-<name>``) when set, else
    what the run's training_args.bin holds, else TRL's default; with where it came from."""
    if given is not None:
        return given, f"the --trl-{name.replace('_', '-')} setting"
    saved = saved_training_args(run.model_folder, run.folder)
    if name in saved:
        return saved[name], f"the run's {ARGS_FILE}"
    return default, f"TRL's default (the run has no readable {ARGS_FILE})"


def load_model(path: str | os.PathLike, *, trl: TrlConfig | None = None,
               **load: Any) -> RewardModel:
    """A trained model to score. A TRL output folder (its model card says so) loads its final
    model, or its latest checkpoint when the run saved none, as the objective it was trained
    for, reading pairs as TRL did (``trl`` says what its files cannot); anything else is
    :meth:`RewardModel.load`'s (``load`` are its keywords, for both)."""
    run = read_trl_output(Path(path))
    if run is None:
        return RewardModel.load(path, **load)
    config = trl or TrlConfig()
    model = RewardModel.load(run.model_folder, settings=trl_objective(run, config), **load)
    as_trl_trained(model, run, config)
    return model


def trl_objective(run: TrlOutput, config: TrlConfig) -> dict[str, Any]:
    """The model settings (:class:`~prefprune.model.RewardModelConfig` fields) the objective of
    ``run`` needs beyond the defaults: DPO and its β for a DPOTrainer run."""
    if run.objective != "dpo":
        return {}
    return {"objective": "dpo", "beta": run_setting(run, "beta", config.beta, TRL_BETA)[0]}


def as_trl_trained(model: Any, run: TrlOutput, config: TrlConfig) -> None:
    """Make ``model`` (a :class:`~prefprune.model.RewardModel` loaded from ``run``) read pairs
    as TRL trained on them and, for DPO, score against the run's reference; its metadata
    records how, as ``trl``."""
    recipe = trl_tokenization(run, model.tokenizer, model.model, config)
    if run.objective == "dpo":
        from prefprune.integrations.trl_dpo import as_dpo_trained  # builds on the DPO policy

        recipe = as_dpo_trained(model, run, recipe, config)
    else:
        model.encoder = TrlPairEncoder(model.tokenizer, recipe)
    model.metadata["trl"] = recipe.to_dict()


def trl_tokenization(run: TrlOutput, tokenizer: Any, model: torch.nn.Module,
                     config: TrlConfig) -> TrlTokenization:
    """The recipe of ``run`` read with ``tokenizer`` (the one TRL saved in the folder)."""
    try:
        data, data_from = config.reading(tokenizer)
    except ModelError as exc:
        raise ModelError(f"{run.folder}: {exc}") from None
    if data == "plain" and tokenizer.eos_token is None:
        raise ModelError(f"{run.folder}: its tokenizer has no eos token, which TRL appends to "
                         "plain-text responses; was the run given an eos_token?")
    max_length, max_length_from = run_setting(run, "max_length", config.max_length,
                                              TRL_MAX_LENGTH)
    common = dict(
        objective=run.objective, folder=str(run.folder), model_folder=str(run.model_folder),
        data=data, data_from=data_from, eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        tokens_from=f"{run.model_folder}'s tokenizer files (TRL saves the eos and pad tokens "
                    "and the chat template it used)",
        max_length=max_length, max_length_from=max_length_from)
    if run.objective == "dpo":
        from prefprune.integrations.trl_dpo import dpo_reading

        return TrlTokenization(**common, **dpo_reading(run, config))
    per_position = head_name(model.get_base_model() if hasattr(model, "get_base_model")
                             else model) == "score"
    return TrlTokenization(**common, reward_at=("the last token that is not the pad token"
                                                if per_position
                                                else "the head's pooled first token"))


