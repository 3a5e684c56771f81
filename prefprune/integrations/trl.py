"""TRL output folders as prefprune models, read on the token sequences TRL trained on.

A ``RewardTrainer`` run is a model only with the tokens it was trained on: another chat
template, another end-of-sequence token, another reading position, and the gradients belong
to another model. TRL 1.16 encodes a pair like this (``RewardTrainer._prepare_dataset`` and
``DataCollatorForPreference``), and so does :class:`TrlPairEncoder` (docs/trl.md):

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
set, the chat template, the objective from the model card's tags); ``training_args.bin`` is a
pickle and is never opened, so what only it holds (``max_length``) comes from the user
(:class:`TrlConfig`), and whether the data was conversational from the data itself, by TRL's
own test (:func:`trl_reading`).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml

from prefprune.config import Settings, setting
from prefprune.data import DataOptions, default_dataset_path
from prefprune.data.loader import open_source
from prefprune.data.messages import PLAIN, Rendering
from prefprune.errors import ModelError
from prefprune.model.encoding import EncodingStats, PairBatch
from prefprune.model.loading import ADAPTER_WEIGHTS, head_name, read_json

#: The model card's tag that names the trainer, and the objective prefprune scores it with.
#: A DPOTrainer output (tag ``dpo``) plugs in here once prefprune has a DPO objective.
OBJECTIVES = {"reward-trainer": "reward"}
#: TRL's own default for ``RewardConfig.max_length``.
TRL_MAX_LENGTH = 1024
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class TrlConfig(Settings):
    """What a TRL run's folder cannot say: the settings only its pickled training arguments
    hold, and which of its saved checkpoints to score (docs/trl.md)."""

    section: ClassVar[str] = "trl"

    checkpoints: str | None = setting(
        None, metavar="DIR|GLOB",
        help="A TRL output folder (or a glob of its checkpoint-* folders): score with every "
             "saved checkpoint and combine them, each weighted by its learning rate from "
             "trainer_state.json (TracIn-CP).")
    max_length: int | None = setting(
        TRL_MAX_LENGTH, min=1, negatable=True,
        help="The max_length the TRL run trained with: TRL dropped (never cut) the pairs with "
             "a side longer than this. It is kept only in the pickled training_args.bin, which "
             "prefprune never opens. Default: TRL's default.")
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
    tags = _card_tags(model_folder / "README.md") or _card_tags(path / "README.md")
    if "trl" not in tags:
        return None
    objective = next((OBJECTIVES[t] for t in tags if t in OBJECTIVES), None)
    if objective is None:
        trainer = ", ".join(sorted(set(tags) - {"trl", "transformers", "lora"})) or "unknown"
        raise ModelError(f"{path}: a TRL output of another trainer (model card tags: "
                         f"{trainer}); prefprune reads RewardTrainer outputs (DPO is planned)")
    return TrlOutput(path, model_folder, objective)


def has_model(folder: Path) -> bool:
    """Whether ``folder`` holds an adapter or full weights in safetensors."""
    adapter = (folder / "adapter_config.json").is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    full = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    return adapter or full


def _latest_checkpoint(path: Path) -> Path | None:
    found = [c for c in _checkpoint_folders(path) if has_model(c)]
    return found[-1] if found else None


def _checkpoint_folders(path: Path) -> list[Path]:
    """``checkpoint-N`` sub-folders, by step."""
    if not path.is_dir():
        return []
    return sorted((c for c in path.iterdir() if c.is_dir() and CHECKPOINT.match(c.name)),
                  key=_step_of)


def _step_of(folder: Path) -> int:
    return int(CHECKPOINT.match(folder.name).group(1))  # type: ignore[union-attr]


def _card_tags(readme: Path) -> list[str]:
    """The tags of a Hugging Face model card's YAML header (TRL writes ``trl`` and the
    trainer's tag there)."""
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8", errors="replace")
    header = re.match(r"---\n(.*?)\n---", text, re.DOTALL)
    if header is None:
        return []
    try:
        card = yaml.safe_load(header.group(1))
    except yaml.YAMLError:
        return []
    tags = card.get("tags") if isinstance(card, dict) else None
    return [str(t) for t in tags] if isinstance(tags, list) else []


# --- the tokens -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrlTokenization:
    """How a TRL run turned pairs into tokens, and where each setting came from; it goes to
    the score sidecar as ``trl``."""

    objective: str
    folder: str
    model_folder: str
    data: str
    data_from: str
    eos_token: str | None
    pad_token: str
    tokens_from: str
    max_length: int | None
    max_length_from: str
    reward_at: str
    not_read: tuple[str, ...] = ("center_rewards_coefficient", "a per-pair margin column",
                                 "tools and chat_template_kwargs columns")

    @property
    def conversational(self) -> bool:
        return self.data == "conversational"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "not_read": list(self.not_read)}


def trl_tokenization(run: TrlOutput, tokenizer: Any, model: torch.nn.Module,
                     config: TrlConfig) -> TrlTokenization:
    """The recipe of ``run`` read with ``tokenizer`` (the one TRL saved in the folder)."""
    try:
        data, data_from = config.reading(tokenizer)
    except ModelError as exc:
        raise ModelError(f"{run.folder}: {exc}") from None
    if data == "plain" and tokenizer.eos_token is None:
        raise ModelError(f"{run.folder}: its tokenizer has no eos token, which TRL appends to "
                         "plain-text responses; was the run given RewardConfig(eos_token=...)?")
    per_position = head_name(model.get_base_model() if hasattr(model, "get_base_model")
                             else model) == "score"
    return TrlTokenization(
        objective=run.objective, folder=str(run.folder), model_folder=str(run.model_folder),
        data=data, data_from=data_from, eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        tokens_from=f"{run.model_folder}'s tokenizer files (TRL saves the eos and pad tokens "
                    "and the chat template it used)",
        max_length=config.max_length,
        max_length_from=("TRL's default; pass --trl-max-length if the run set another"
                         if config.max_length == TRL_MAX_LENGTH else "the --trl-max-length "
                         "setting (training_args.bin is a pickle and is never opened)"),
        reward_at=("the last token that is not the pad token" if per_position
                   else "the head's pooled first token"))


class TrlPairEncoder:
    """Encodes pairs into the rows TRL's RewardTrainer trained on (module docstring); a
    drop-in for :class:`~prefprune.model.encoding.PairEncoder`."""

    def __init__(self, tokenizer: Any, recipe: TrlTokenization) -> None:
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.max_length = recipe.max_length
        self.stats = EncodingStats()  # TRL cuts nothing
        self.drop_trailing_pad = recipe.reward_at.startswith("the last token")

    def sequence(self, prompt: str, response: str) -> list[int]:
        """The token ids TRL built for one side of a pair."""
        if self.recipe.conversational:
            return self.tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        eos = self.recipe.eos_token
        text = response if response.endswith(eos) else response + eos
        return self.tokenizer(prompt + text)["input_ids"]

    def pair_key(self, prompt: str, chosen: str, rejected: str) -> int:
        """The pair's identity as TRL read it (see :func:`pair_key`)."""
        return pair_key(self.sequence(prompt, chosen), self.sequence(prompt, rejected))

    def over_max_length(self, prompt: str, chosen: str, rejected: str) -> bool:
        """Whether TRL dropped this pair from training (a side longer than max_length)."""
        if self.max_length is None:
            return False
        return max(len(self.sequence(prompt, chosen)),
                   len(self.sequence(prompt, rejected))) > self.max_length

    def __call__(self, prompts: Sequence[str], chosen: Sequence[str],
                 rejected: Sequence[str]) -> PairBatch:
        """B pairs as 2B rows (chosen first), right-padded as TRL's collator pads them."""
        rows = [self._model_input(self.sequence(p, r))
                for p, r in zip(list(prompts) * 2, list(chosen) + list(rejected))]
        width = max(len(ids) for ids in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return PairBatch({"input_ids": ids, "attention_mask": mask}, len(prompts))

    def _model_input(self, ids: list[int]) -> list[int]:
        """``ids`` without trailing pad-id tokens when the reward is read at the last token
        that is not the pad token: a causal model's score there does not depend on them."""
        if not self.drop_trailing_pad:
            return ids
        pad = self.tokenizer.pad_token_id
        end = len(ids)
        while end > 1 and ids[end - 1] == pad:
            end -= 1
        return ids[:end]


def as_trl_read(encoder: TrlPairEncoder, train: Any,
                targets: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The training pairs and targets without the pairs TRL dropped (a side over
    ``max_length``: TRL never trained or evaluated on them, so they have no influence to
    score), and the sidecar's ``trl`` record, with the ids dropped."""
    kept, dropped = _kept(encoder, train)
    kept_targets = {name: _kept(encoder, pairs)[0] for name, pairs in targets.items()}
    record = {**encoder.recipe.to_dict(), "dropped_over_max_length": dropped,
              "targets_dropped_over_max_length": {name: len(targets[name]) - len(pairs)
                                                  for name, pairs in kept_targets.items()}}
    return kept, kept_targets, record


def _kept(encoder: TrlPairEncoder, pairs: Any) -> tuple[Any, list[str]]:
    over = [i for i, (p, c, r) in enumerate(zip(pairs["prompt"], pairs["chosen"],
                                                 pairs["rejected"]))
            if encoder.over_max_length(p, c, r)]
    if not over:
        return pairs, []
    out = set(over)
    return (pairs.select([i for i in range(len(pairs)) if i not in out]),
            [pairs["id"][i] for i in over])


def pair_key(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> int:
    """A pair's identity: a 63-bit hash of its two token sequences. The callback records
    gradients under it and scoring looks them up by it, so a pair is found whatever the order,
    split or filtering of the rows around it."""
    digest = hashlib.blake2b(digest_size=8)
    for ids in (chosen_ids, rejected_ids):
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return int.from_bytes(digest.digest(), "little") >> 1


# --- checkpoints ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SavedCheckpoint:
    """One ``checkpoint-N`` folder of a TRL run, with the learning rate TracIn-CP weights it
    by and where that rate came from."""

    folder: Path
    step: int
    learning_rate: float
    rate_from: str

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "step": self.step,
                "learning_rate": self.learning_rate, "learning_rate_from": self.rate_from}


def saved_checkpoints(spec: str) -> list[SavedCheckpoint]:
    """The checkpoints of a TRL output folder, or of a glob of ``checkpoint-*`` folders, by
    step. A checkpoint without an adapter or weights, or without its trainer state, is an
    error that names it."""
    folders = _checkpoint_folders(Path(spec)) if Path(spec).is_dir() else sorted(
        (Path(p) for p in glob.glob(spec) if Path(p).is_dir() and CHECKPOINT.match(Path(p).name)),
        key=_step_of)
    if not folders:
        raise ModelError(f"{spec}: no checkpoint-N folders (is it a TRL output folder with "
                         "save_strategy on?)")
    for folder in folders:
        if not has_model(folder):
            raise ModelError(f"{folder}: no adapter or weights in safetensors "
                             f"({ADAPTER_WEIGHTS} or model.safetensors)")
        if not (folder / STATE_FILE).is_file():
            raise ModelError(f"{folder}: no {STATE_FILE}, so its step and learning rate are "
                             "unknown")
    states = [read_json(folder / STATE_FILE, "trainer state") for folder in folders]
    rates = _logged_rates(states)
    if not rates:
        raise ModelError(f"{spec}: no learning rate is logged in any {STATE_FILE} (TracIn-CP "
                         "weights each checkpoint by it); train with logging on")
    return [SavedCheckpoint(folder, step, *_rate_at(step, rates))
            for folder, step in zip(folders, (int(s.get("global_step", _step_of(f)))
                                              for s, f in zip(states, folders)))]


def final_model(spec: str) -> Path:
    """The model a ``--checkpoints`` run is scored with: the output folder's final model (else
    its latest checkpoint), or the latest of a glob's checkpoints."""
    run = read_trl_output(Path(spec)) if Path(spec).is_dir() else None
    return run.model_folder if run is not None else saved_checkpoints(spec)[-1].folder


def _logged_rates(states: list[dict[str, Any]]) -> dict[int, float]:
    """Step -> logged learning rate, over every state (a later one holds the earlier logs)."""
    return {int(entry["step"]): float(entry["learning_rate"])
            for state in states for entry in state.get("log_history") or []
            if isinstance(entry, dict) and "learning_rate" in entry and "step" in entry}


def _rate_at(step: int, rates: dict[int, float]) -> tuple[float, str]:
    """The learning rate of ``step``: logged, or interpolated linearly between the logged
    steps around it (exact for TRL's default linear schedule), or the nearest one logged."""
    if step in rates:
        return rates[step], "logged"
    steps = sorted(rates)
    below = [s for s in steps if s < step]
    above = [s for s in steps if s > step]
    if below and above:
        a, b = below[-1], above[0]
        rate = rates[a] + (rates[b] - rates[a]) * (step - a) / (b - a)
        return rate, f"interpolated between steps {a} and {b}"
    nearest = below[-1] if below else above[0]
    return rates[nearest], f"the nearest logged step, {nearest}"
