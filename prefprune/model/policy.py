"""The DPO objective: a causal-LM policy whose implicit reward the Bradley–Terry loss fits.

DPO (docs/method.md, section 1b) trains a policy π_θ (a causal LM with LoRA) against a
reference π_ref (the same model with its adapter disabled) on the loss ``−log σ(m)`` of the
margin ``m = r(x, y_w) − r(x, y_l)`` between the implicit rewards
``r(x, y) = β·(log π_θ(y|x) − log π_ref(y|x))``, with ``log π(y|x)`` the sum of the response
tokens' log-probabilities (prompt tokens masked). That is the reward model's loss on another
reward, so :class:`DPOPolicy` is a :class:`~prefprune.model.reward_model.RewardModel` whose
:meth:`rewards` are implicit rewards: training, per-pair gradients, curvature, every score,
pruning, the experiment and validate apply unchanged. ``∇m = β·(∇log π_θ(y_w|x) −
∇log π_θ(y_l|x))``; the reference is a constant.

Tokens are built as TRL's ``DPOTrainer`` builds them (prompt and prompt + response tokenized
separately, the response starting where they first differ, an end-of-sequence token closing
a response that has none); the one difference is truncation at ``max_length``, which cuts the
prompt from the left and keeps the response, as the reward model's encoder does, instead of
dropping the response's end. Log-probabilities are taken only at response positions, so the
LM head runs on those rows alone. The reference's log-probabilities are computed once per
sequence (without the adapter; the frozen-layer cache serves its lower layers too) and kept
in RAM and in the feature store on disk, named by the digest of the whole base model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prefprune.data.messages import shared_items
from prefprune.errors import ModelError
from prefprune.model.config import RewardModelConfig
from prefprune.model.encoding import PairBatch, PairEncoder
from prefprune.model.feature_store import FeatureStore, frozen_fingerprint, sequence_key
from prefprune.model.loading import load_causal_lm
from prefprune.model.pooling import right_aligned
from prefprune.model.reward_model import RewardModel


class CompletionEncoder(PairEncoder):
    """Encodes pairs for a causal LM: 2B rows of prompt + response tokens, right-padded, with
    a ``completion_mask`` marking each row's response tokens."""

    @property
    def _budget(self) -> int:
        """Tokens for prompt + response; one is kept for the end-of-sequence token."""
        return self.max_length - 1

    def __call__(self, prompts: Sequence[str], chosen: Sequence[str],
                 rejected: Sequence[str]) -> PairBatch:
        size = len(prompts)
        prompt_ids = self._ids(list(prompts))
        full = [self._ids([p + self._closed(r) for p, r in zip(prompts, responses)])
                for responses in (chosen, rejected)]
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        for side in full:
            for i in range(size):
                start = min(shared_items(prompt_ids[i], full[0][i]),
                            shared_items(prompt_ids[i], full[1][i]))
                ids, mask = self._fit(side[i][:start], side[i][start:])
                rows.append(ids)
                masks.append(mask)
        return padded_rows(rows, masks, self.tokenizer.pad_token_id, size)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids as TRL's plain-text path makes them (the tokenizer's special tokens),
        except for text a chat template already opened with the beginning token."""
        bos = self.tokenizer.bos_token
        out = []
        for text in texts:
            special = not (bos and text.startswith(bos))
            out.append(self.tokenizer(text, add_special_tokens=special,
                                      verbose=False).input_ids)
        return out

    def _closed(self, response: str) -> str:
        """The response with the end-of-sequence token appended when it has none."""
        eos = self.tokenizer.eos_token
        return response if not eos or eos in response else response + eos

    def _fit(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        """Cut to ``max_length``: the prompt from the left, the response (when it alone is too
        long) on the right; one prompt token always stays to predict the first response
        token from."""
        if len(completion) > self.max_length - 1:
            completion = completion[: self.max_length - 1]
            self.stats.responses_truncated += 1
        room = self.max_length - len(completion)
        if len(prompt) > room:
            prompt = prompt[-room:]
            self.stats.prompts_truncated += 1
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def padded_rows(rows: list[list[int]], masks: list[list[int]], pad: int, size: int) -> PairBatch:
    """2B rows right-padded with ``pad``, with attention and completion masks."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        completion[i, :len(row)] = torch.tensor(mask)
    return PairBatch({"input_ids": ids, "attention_mask": attention}, size, completion)


def completion_logps(hidden: torch.Tensor, lm_head: nn.Module, input_ids: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
    """``log π(y|x)`` per row: the sum over response tokens of the log-probability the model
    gave each of them. The hidden state at position t predicts token t+1, so only positions
    followed by a response token are projected through the LM head: gathered to the start of
    their row (rows stay rows, so per-row gradient hooks work on a LoRA-adapted head too)."""
    following = completion_mask[:, 1:]
    rows, positions = following.nonzero(as_tuple=True)
    slots = (following.cumsum(dim=1) - 1)[rows, positions]
    gathered = hidden.new_zeros(hidden.shape[0], int(following.sum(dim=1).max()),
                                hidden.shape[-1])
    gathered[rows, slots] = hidden[rows, positions]
    logits = lm_head(gathered)[rows, slots]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast
    targets = input_ids[rows, positions + 1]
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return torch.zeros(input_ids.shape[0], dtype=token_logps.dtype,
                       device=token_logps.device).index_add(0, rows, token_logps)


class ReferenceLogps:
    """``log π_ref(y|x)`` per sequence, computed once: kept in RAM and, with a feature store
    folder, on disk under the digest of the whole base model."""

    def __init__(self, model: nn.Module, features: tuple[Any, float] | None) -> None:
        self._ram: dict[bytes, float] = {}
        self.computed = 0
        self.store: FeatureStore | None = None
        if features is not None:
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            root, budget = features
            self.store = FeatureStore(root, "reference-" + frozen_fingerprint(model, frozen, -1),
                                      width=1, budget_mb=budget)

    def __call__(self, batch: PairBatch, compute: Any) -> torch.Tensor:
        """The reference log-probabilities of the batch's rows; ``compute(rows)`` runs the
        reference on the rows not seen before."""
        keys = [_row_key(batch, row) for row in range(batch.inputs["input_ids"].shape[0])]
        known = {row: self._ram[key] for row, key in enumerate(keys) if key in self._ram}
        if self.store is not None and len(known) < len(keys):
            names = {row: sequence_key(key) for row, key in enumerate(keys) if row not in known}
            found = self.store.load(list(names.values()))
            known.update({row: float(found[n][0, 0]) for row, n in names.items() if n in found})
        missing = [row for row in range(len(keys)) if row not in known]
        if missing:
            values = compute(missing)
            self.computed += len(missing)
            for row, value in zip(missing, values.tolist()):
                known[row] = value
                if self.store is not None:
                    self.store.add(sequence_key(keys[row]), torch.tensor([[value]]))
        for row, key in enumerate(keys):
            self._ram[key] = known[row]
        return torch.tensor([known[row] for row in range(len(keys))], dtype=torch.float64)

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()


def _row_key(batch: PairBatch, row: int) -> bytes:
    """A row's identity for the reference: its tokens and which of them are the response."""
    mask = batch.inputs["attention_mask"][row].bool()
    parts = (batch.inputs["input_ids"][row][mask], batch.completion_mask[row][mask])
    return torch.cat(parts).to("cpu", torch.int64).numpy().tobytes()


class DPOPolicy(RewardModel):
    """A causal-LM policy with LoRA whose rewards are DPO's implicit rewards (see the module
    docstring). Built, saved and loaded like a reward model; ``config.objective`` is ``dpo``
    and ``config.beta`` scales the reward."""

    def _prepare(self, model: nn.Module) -> None:
        """A policy reads log-probabilities at response tokens: no head, no pooling. The
        reference is this model with its adapter disabled unless a run trained against another
        one (a TRL run, docs/trl.md): ``reference_adapter`` names a frozen adapter loaded beside
        θ's (TRL's copy of a pre-trained adapter), ``reference_model`` is a separate frozen
        causal LM (the start of a full-weight run)."""
        self._reference: ReferenceLogps | None = None
        self.reference_adapter: str | None = None
        self.reference_model: nn.Module | None = None

    @property
    def reference(self) -> ReferenceLogps:
        """The reference log-probabilities, shared by every model on the same frozen-layer
        cache (the seeds and retrains of an experiment), so each is computed once."""
        if self._reference is None:
            shared = self.layer_cache.shared if self.layer_cache is not None else {}
            if "reference" not in shared:
                shared["reference"] = ReferenceLogps(self.reference_model or self.model,
                                                     self.config.feature_store())
            self._reference = shared["reference"]
        return self._reference

    def _make_encoder(self, tokenizer: Any) -> PairEncoder:
        return CompletionEncoder(tokenizer, self.config.max_length)

    @classmethod
    def _base_model(cls, source: str, config: RewardModelConfig, tokenizer: Any) -> nn.Module:
        return load_causal_lm(source, config)

    def rewards(self, batch: PairBatch) -> torch.Tensor:
        """``β·(log π_θ(y|x) − log π_ref(y|x))`` per row, shape (2B,)."""
        inputs, completion = self._aligned(batch)
        logps = self._logps(inputs, completion)
        reference = self.reference(PairBatch(inputs, batch.size, completion),
                                   lambda rows: self._reference_logps(inputs, completion, rows))
        return self.config.beta * (logps - reference.to(logps.device, logps.dtype))

    def policy_logps(self, batch: PairBatch) -> torch.Tensor:
        """``log π_θ(y|x)`` per row, with the adapter (what TRL calls the policy log-probs)."""
        inputs, completion = self._aligned(batch)
        return self._logps(inputs, completion)

    def reference_logps(self, batch: PairBatch) -> torch.Tensor:
        """``log π_ref(y|x)`` per row: the model with its adapter disabled, or the reference
        a run set (see :meth:`_prepare`); cached."""
        inputs, completion = self._aligned(batch)
        return self.reference(PairBatch(inputs, batch.size, completion),
                              lambda rows: self._reference_logps(inputs, completion, rows))

    def flush(self) -> None:
        super().flush()
        self.reference.flush()

    def to(self, device: torch.device | str) -> DPOPolicy:
        if self.reference_model is not None:
            self.reference_model.to(device)
        super().to(device)
        return self

    @staticmethod
    def _aligned(batch: PairBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if batch.completion_mask is None:
            raise ModelError("a DPO policy needs batches with a completion mask (encode the "
                             "pairs with the policy's own encoder)")
        aligned = right_aligned({**batch.inputs, "completion_mask": batch.completion_mask})
        completion = aligned.pop("completion_mask")
        return aligned, completion

    def _logps(self, inputs: dict[str, torch.Tensor], completion: torch.Tensor,
               model: nn.Module | None = None) -> torch.Tensor:
        """Log-probabilities of this model, or of ``model`` (a separate reference, run without
        the frozen-layer cache, which holds this model's layers)."""
        own = model is None
        model = self.model if own else model
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(lm, lm.base_model_prefix)
        if own and self.layer_cache is not None:
            hidden = self.layer_cache.forward(decoder, inputs).last_hidden_state
        else:
            hidden = decoder(**inputs).last_hidden_state
        return completion_logps(hidden, lm.get_output_embeddings(), inputs["input_ids"],
                                completion)

    @torch.no_grad()
    def _reference_logps(self, inputs: dict[str, torch.Tensor], completion: torch.Tensor,
                         rows: list[int]) -> torch.Tensor:
        index = torch.tensor(rows, device=completion.device)
        sub = {k: v.index_select(0, index) for k, v in inputs.items()}
        mask = completion.index_select(0, index)
        if self.reference_model is not None:
            return self._logps(sub, mask, self.reference_model).double().cpu()
        with _adapter_disabled(self.model, instead=self.reference_adapter):
            return self._logps(sub, mask).double().cpu()


@contextmanager
def _adapter_disabled(model: nn.Module, instead: str | None = None) -> Iterator[None]:
    """PEFT's ``disable_adapter`` (or, with ``instead``, that adapter active in place of θ's,
    as TRL's ``use_adapter`` runs its reference copy), leaving θ as it was: re-enabling the
    adapter marks every adapter parameter trainable again, which would add frozen ones (or
    undo a caller's freezing) to θ."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if instead is None:
            with model.disable_adapter():
                yield
        else:
            active = model.active_adapter
            model.set_adapter(instead)
            try:
                yield
            finally:
                model.set_adapter(active)
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
