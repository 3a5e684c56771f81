"""The tokens a TRL run trained on: its recipe (:class:`TrlTokenization`), encoders that
rebuild the rows TRL built from it, and each pair's identity (:func:`pair_key`).

:mod:`prefprune.integrations.trl` reads the recipe from a run's folder; this module only turns
pairs into tokens by it, so the callback, scoring and the DPO reader share one definition of a
pair's tokens and identity (docs/trl.md).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from prefprune.model.encoding import EncodingStats, PairBatch


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
    truncation: str = "none: a pair with a side longer than max_length is dropped"
    not_read: tuple[str, ...] = ("center_rewards_coefficient", "a per-pair margin column",
                                 "tools and chat_template_kwargs columns")
    #: DPO only: β and the reference, each with where it came from, how rows were cut to
    #: max_length and the loss the run trained with.
    beta: float | None = None
    beta_from: str | None = None
    truncation_mode: str | None = None
    loss_type: list[str] | None = None
    reference: str | None = None
    reference_from: str | None = None

    @property
    def conversational(self) -> bool:
        return self.data == "conversational"

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if v is not None},
                "not_read": list(self.not_read)}


class TrlEncoder(ABC):
    """Reads pairs as a TRL run did (``recipe``). Besides encoding, scoring a run needs each
    pair's identity (the key of the callback's record) and whether TRL trained on it."""

    def __init__(self, tokenizer: Any, recipe: TrlTokenization) -> None:
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.max_length = recipe.max_length
        self.stats = EncodingStats()

    def tokens(self, text: str) -> list[int]:
        """TRL's tokenization of a text: with the tokenizer's special tokens for plain text,
        without for a rendered conversation (its chat template wrote them)."""
        return self.tokenizer(text, add_special_tokens=not self.recipe.conversational,
                              verbose=False)["input_ids"]

    def sequence(self, prompt: str, response: str) -> list[int]:
        """The token ids TRL built for prompt + response: a plain-text response gets the eos
        token appended when it does not end with it."""
        eos = self.recipe.eos_token
        if not self.recipe.conversational and not response.endswith(eos):
            response += eos
        return self.tokens(prompt + response)

    @abstractmethod
    def __call__(self, prompts: Sequence[str], chosen: Sequence[str],
                 rejected: Sequence[str]) -> PairBatch:
        """B pairs as 2B rows (chosen first), as TRL's collator built them."""

    @abstractmethod
    def pair_key(self, prompt: str, chosen: str, rejected: str) -> int:
        """The pair's identity as TRL read it (see :func:`pair_key`)."""

    @abstractmethod
    def over_max_length(self, prompt: str, chosen: str, rejected: str) -> bool:
        """Whether TRL dropped this pair from training for its length."""


class TrlPairEncoder(TrlEncoder):
    """Encodes pairs into the rows TRL's RewardTrainer trained on (module docstring); a
    drop-in for :class:`~prefprune.model.encoding.PairEncoder`."""

    def __init__(self, tokenizer: Any, recipe: TrlTokenization) -> None:
        super().__init__(tokenizer, recipe)  # its stats stay zero: RewardTrainer cuts nothing
        self.drop_trailing_pad = recipe.reward_at.startswith("the last token")

    def pair_key(self, prompt: str, chosen: str, rejected: str) -> int:
        return pair_key(self.sequence(prompt, chosen), self.sequence(prompt, rejected))

    def over_max_length(self, prompt: str, chosen: str, rejected: str) -> bool:
        """A side longer than max_length: RewardTrainer drops the pair, never cuts it."""
        if self.max_length is None:
            return False
        return max(len(self.sequence(prompt, chosen)),
                   len(self.sequence(prompt, rejected))) > self.max_length

    def __call__(self, prompts: Sequence[str], chosen: Sequence[str],
                 rejected: Sequence[str]) -> PairBatch:
        """Right-padded as TRL's collator pads them."""
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


def as_trl_read(encoder: TrlEncoder, train: Any,
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


def _kept(encoder: TrlEncoder, pairs: Any) -> tuple[Any, list[str]]:
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
