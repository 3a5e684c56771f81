"""A TRL ``DPOTrainer`` output as a prefprune DPO policy: the rows it trained on, its β and the
reference it trained against (docs/trl.md).

TRL 1.16's DPOTrainer builds a pair's rows like this (``DPOTrainer._prepare_dataset`` and
``DataCollatorForPreference``), and so does :class:`TrlCompletionEncoder`:

* **plain text**: the tokenizer's eos token is appended to each response that does not end
  with it; the prompt, prompt + chosen and prompt + rejected are each tokenized as one text
  with the tokenizer's special tokens;
* **conversational** (message lists): the same texts come from the chat template (the prompt
  with its generation prompt) and are tokenized without adding special tokens;
* the response starts where the prompt's tokens and both prompt + response sequences first
  differ (a template may render the prompt alone differently);
* **truncation** (``truncation_mode``): ``keep_start``, TRL's default, cuts prompt + response
  to ``max_length`` (default 1024) at its end, so a long prompt leaves little or nothing of the
  response, and drops a pair whose prompt alone fills ``max_length``; ``keep_end`` cuts at the
  start and drops nothing. prefprune's own
  :class:`~prefprune.model.policy.CompletionEncoder` cuts the prompt from the left instead;
* rows are padded on the right with the pad token (TRL sets it to the eos token when the
  tokenizer has none, and saves it), with a completion mask over the response tokens.

The reference (what ``log π_ref`` is) is read from the folder:

* a new adapter (``DPOTrainer(peft_config=...)``): the base model, the adapter disabled;
* an adapter TRL was given as a PEFT model: TRL trains it against a frozen copy of its starting
  weights, the ``ref`` adapter, which it saves in ``ref/`` beside the trained one; prefprune
  loads it beside θ's adapter and runs it as TRL's ``use_adapter`` does;
* full weights: a copy of the model the run started from, which the folder names only when the
  model card has a ``base_model`` (a hub name);
* anything else (``DPOTrainer(ref_model=...)``, a full-weight run from a local folder, a ``ref``
  adapter that was not saved) is the ``reference`` setting.

β, ``max_length``, ``truncation_mode`` and ``loss_type`` come from the run's
``training_args.bin`` (TRL's defaults when it is gone; ``--trl-beta`` and ``--trl-max-length``
override). prefprune's objective is the sigmoid DPO loss; what TRL can add to it is listed as
not read in the sidecar.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from prefprune.data.messages import shared_items
from prefprune.errors import ModelError, PrefpruneWarning
from prefprune.integrations.trl import (
    TRL_BETA,
    TRL_LOSS,
    TRL_TRUNCATION,
    TrlConfig,
    TrlOutput,
    card_base_model,
    run_setting,
)
from prefprune.integrations.trl_encoding import TrlEncoder, TrlTokenization, pair_key
from prefprune.model.config import RewardModelConfig
from prefprune.model.encoding import PairBatch
from prefprune.model.loading import ADAPTER_WEIGHTS, check_safetensors, load_causal_lm, quiet_peft
from prefprune.model.policy import DPOPolicy, padded_rows

#: The adapter name TRL gives its frozen copy of a pre-trained adapter, and the folder it
#: saves that copy in.
REFERENCE_ADAPTER = "ref"
#: What a DPOTrainer run may add to the sigmoid DPO loss that prefprune's objective leaves out.
NOT_READ = ("loss_type other than sigmoid (scored as sigmoid, with a warning), and "
            "label_smoothing, ld_alpha, use_weighting, f_divergence_type",
            "sync_ref_model (a reference that moves during training)",
            "tools and chat_template_kwargs columns")
#: How DPOTrainer's collator cuts prompt + response to max_length, by truncation_mode.
TRUNCATIONS = {"keep_start": "keep_start: prompt + response cut to max_length at the end; a "
                             "pair whose prompt alone fills max_length is dropped",
               "keep_end": "keep_end: prompt + response cut to max_length at the start; no "
                           "pair is dropped"}


def dpo_reading(run: TrlOutput, config: TrlConfig) -> dict[str, Any]:
    """The recipe fields of a DPOTrainer run that are not about its tokenizer (the reference
    is added once it is loaded, :func:`as_dpo_trained`). A loss other than the sigmoid one is
    scored as the sigmoid loss, with a warning that says so."""
    beta, beta_from = run_setting(run, "beta", config.beta, TRL_BETA)
    mode, _ = run_setting(run, "truncation_mode", None, TRL_TRUNCATION)
    if mode not in TRUNCATIONS:
        raise ModelError(f"{run.folder}: truncation_mode {mode!r} is not one TRL 1.16 knows")
    loss, loss_from = run_setting(run, "loss_type", None, TRL_LOSS)
    losses = [loss] if isinstance(loss, str) else list(loss)
    if losses != ["sigmoid"]:
        warnings.warn(f"{run.folder}: trained with loss_type {losses} ({loss_from}); prefprune "
                      "scores the sigmoid DPO loss on the same implicit rewards",
                      PrefpruneWarning, stacklevel=2)
    return {"reward_at": "the implicit reward β·(log π − log π_ref), log-probabilities summed "
                         "over the response tokens",
            "truncation": TRUNCATIONS[mode], "truncation_mode": mode,
            "not_read": NOT_READ, "beta": beta, "beta_from": beta_from, "loss_type": losses}


def as_dpo_trained(policy: Any, run: TrlOutput, recipe: TrlTokenization,
                   config: TrlConfig) -> TrlTokenization:
    """Give ``policy`` (loaded from ``run``) the run's rows and reference; the recipe with
    the reference recorded."""
    if not isinstance(policy, DPOPolicy):
        raise ModelError(f"{run.folder}: a DPOTrainer output loaded as a reward model")
    reference, origin = _set_reference(policy, run, config)
    recipe = replace(recipe, reference=reference, reference_from=origin)
    policy.encoder = TrlCompletionEncoder(policy.tokenizer, recipe)
    return recipe


def _set_reference(policy: DPOPolicy, run: TrlOutput, config: TrlConfig) -> tuple[str, str]:
    """Make the policy's reference the run's (module docstring); (what it is, where from)."""
    lora = (run.model_folder / "adapter_config.json").is_file()
    copied = run.model_folder / REFERENCE_ADAPTER
    if config.reference is not None:
        source, origin = config.reference, "the --trl-reference setting"
    elif _is_adapter(copied):
        source, origin = str(copied), ("TRL's frozen copy of the adapter the run started from "
                                       "(DPOTrainer was given a PEFT model)")
    elif lora:
        return ("the base model (the adapter disabled)",
                "TRL's reference for an adapter it created: the base model")
    elif (base := card_base_model(run)) is not None:
        source, origin = base, "the model card's base_model (the model the run started from)"
    else:
        raise ModelError(f"{run.folder}: a full-weight DPO run, whose reference is the model "
                         "it started from; the folder does not say which: pass "
                         "--trl-reference MODEL")
    if _is_adapter(Path(source)):
        if not lora:
            raise ModelError(f"{source}: a LoRA adapter cannot be the reference of a "
                             f"full-weight run ({run.folder}); pass the model it started from")
        _load_reference_adapter(policy.model, Path(source))
        policy.reference_adapter = REFERENCE_ADAPTER
    else:
        policy.reference_model = _reference_model(source, policy.config)
    return source, origin


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _load_reference_adapter(model: nn.Module, folder: Path) -> None:
    """The adapter of ``folder``, frozen, beside θ's, which stays the active one."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: no {ADAPTER_WEIGHTS} (pickled adapter weights are "
                         "refused)")
    check_safetensors(weights)
    try:
        with quiet_peft():
            model.load_adapter(str(folder), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{folder}: cannot load the reference adapter: {exc}") from exc


def _reference_model(source: str, config: RewardModelConfig) -> nn.Module:
    """A frozen causal LM to take reference log-probabilities from."""
    model = load_causal_lm(source, config)
    model.requires_grad_(False)
    return model.eval()


class TrlCompletionEncoder(TrlEncoder):
    """Encodes pairs into the rows TRL's DPOTrainer trained on, with their completion masks
    (module docstring); a drop-in for the policy's own encoder."""

    def __init__(self, tokenizer: Any, recipe: TrlTokenization) -> None:
        super().__init__(tokenizer, recipe)
        self.keep_end = recipe.truncation_mode == "keep_end"

    def split(self, prompt: str, chosen: str, rejected: str) -> tuple[int, list[list[int]]]:
        """TRL's prompt length and the whole prompt + response ids of (chosen, rejected)."""
        prompt_ids = self.tokens(prompt)
        full = [self.sequence(prompt, r) for r in (chosen, rejected)]
        return min(shared_items(prompt_ids, ids) for ids in full), full

    def rows(self, prompt: str, chosen: str,
             rejected: str) -> tuple[list[list[int]], list[list[int]]]:
        """The (chosen, rejected) rows' token ids and completion masks, cut as TRL's collator
        cuts them."""
        return self._cut(*self.split(prompt, chosen, rejected))

    def _cut(self, start: int, full: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        masks = [[0] * start + [1] * (len(ids) - start) for ids in full]
        if self.max_length is None:
            return full, masks
        kept = slice(-self.max_length, None) if self.keep_end else slice(self.max_length)
        return [ids[kept] for ids in full], [mask[kept] for mask in masks]

    def pair_key(self, prompt: str, chosen: str, rejected: str) -> int:
        (chosen_ids, rejected_ids), _ = self.rows(prompt, chosen, rejected)
        return pair_key(chosen_ids, rejected_ids)

    def over_max_length(self, prompt: str, chosen: str, rejected: str) -> bool:
        """The prompt alone fills max_length: DPOTrainer drops the pair when it keeps the start
        (no response token would be left), never when it keeps the end."""
        return self.max_length is not None and not self.keep_end and \
            self.split(prompt, chosen, rejected)[0] >= self.max_length

    def __call__(self, prompts: Sequence[str], chosen: Sequence[str],
                 rejected: Sequence[str]) -> PairBatch:
        """Right-padded as TRL's collator pads them."""
        splits = [self.split(p, c, r) for p, c, r in zip(prompts, chosen, rejected)]
        if self.max_length is not None:
            cut = sum(len(ids) > self.max_length for _, full in splits for ids in full)
            if self.keep_end:
                self.stats.prompts_truncated += cut
            else:
                self.stats.responses_truncated += cut
        pairs = [self._cut(start, full) for start, full in splits]
        ids = [pair[0][side] for side in (0, 1) for pair in pairs]
        masks = [pair[1][side] for side in (0, 1) for pair in pairs]
        return padded_rows(ids, masks, self.tokenizer.pad_token_id, len(prompts))
