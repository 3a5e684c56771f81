"""``PrefpruneCallback``: record, while TRL's RewardTrainer or DPOTrainer trains, the per-pair
gradients that scoring its checkpoints needs, so ``prefprune score --checkpoints`` runs no
gradient pass over the training pairs (docs/trl.md).

Scoring a checkpoint needs every training pair's margin ``m`` and margin gradient ``∇m`` over
θ (LoRA + head); TRL's own training step already computes them, summed. Forward hooks keep
each trainable linear layer's input and, through a tensor hook, the gradient TRL's backward
sends to its output; a hook on the model keeps, per row, the value the loss is a function of
and the loss's gradient in it: a reward model's reward ``r`` (``∂L/∂r``), a DPO policy's
``log π(y|x)`` (``∂L/∂log π``, the same at every token, as TRL sums them), whose reference
value the hook takes from TRL's reference forward right after. Each row's exact weight
gradient is then rebuilt from them as in :mod:`prefprune.influence.gradients` and divided by
that row's slope, which gives ``∇r`` (for DPO ``β·∇log π``) whatever scales TRL's loss (the
batch mean, gradient accumulation, a reward centring term). Nothing runs the model again.
``∇m = ∇r_chosen − ∇r_rejected`` and ``m`` are kept per pair, at its latest visit, and
written into every checkpoint TRL saves (:mod:`prefprune.integrations.records`); a run
resumed from a checkpoint resumes its record.
As in prefprune's own checkpoint ensembles (:mod:`prefprune.checkpoints`), a pair's gradient
is the one taken at the step that last visited it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from prefprune.errors import GradientError, InfluenceError, ModelError
from prefprune.influence.gradients import _linear_slots, _Slot, _write_rows
from prefprune.integrations.records import PairRecord, read_record, write_record
from prefprune.integrations.trl_encoding import pair_key
from prefprune.model.loading import head_name, is_head_bias


class PrefpruneCallback(TrainerCallback):
    """Attach to a LoRA ``RewardTrainer`` or ``DPOTrainer`` (``callbacks=[PrefpruneCallback()]``);
    every checkpoint it saves then holds what ``prefprune score --checkpoints`` needs.

    The record keeps one margin gradient per training pair in memory (pairs × θ × 4 bytes); a
    run that would need more than ``memory_budget_mb`` is refused before its first step.
    ``seconds`` is the time the callback itself took.
    """

    def __init__(self, *, memory_budget_mb: float = 2048.0) -> None:
        self.memory_budget_mb = memory_budget_mb
        self.recorder: _Recorder | None = None
        self.seconds = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if args.world_size > 1:
            raise InfluenceError("PrefpruneCallback records single-process runs; score a "
                                 "distributed run's checkpoints with score --checkpoints alone")
        self.recorder = _Recorder(model, len(train_dataloader.dataset), self.memory_budget_mb,
                                  _dpo_beta(args))
        if state.global_step:  # resumed: the checkpoint it resumed from holds the record so far
            record = read_record(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            if record is not None:
                self.recorder.restore(record)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self._timed(self.recorder.flush, state.global_step + 1)  # the step under way

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        self._timed(self.recorder.flush, state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._timed(lambda step: write_record(folder, self.recorder.record(), step),
                    state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.recorder.close()

    def _timed(self, action: Any, step: int) -> None:
        start = time.perf_counter()
        action(step)
        self.seconds += time.perf_counter() - start


def _dpo_beta(args: TrainingArguments) -> float | None:
    """β of a DPOTrainer run (None for a RewardTrainer's), once its loss is one whose rows'
    slopes the recorder can read."""
    beta = getattr(args, "beta", None)
    if beta is None:
        return None
    if getattr(args, "precompute_ref_log_probs", False):
        raise InfluenceError("PrefpruneCallback takes the reference log-probabilities from "
                             "TRL's reference forward, which precompute_ref_log_probs=True "
                             "skips; train without it or score with score --checkpoints alone")
    if getattr(args, "ld_alpha", None) is not None:
        raise InfluenceError("PrefpruneCallback records DPO losses of log π summed over the "
                             "response; ld_alpha weighs its tokens unevenly")
    return float(beta)


@dataclass
class _Pass:
    """What one training forward and backward left in the hooks."""

    layers: dict[int, list[list[torch.Tensor | None]]]
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    reward_grads: list[torch.Tensor] = field(default_factory=list)
    reference: torch.Tensor | None = None


class _Recorder:
    """The hooks on a PEFT reward model or DPO policy (``beta`` set) and the per-pair record
    they fill."""

    def __init__(self, model: nn.Module, capacity: int, budget_mb: float,
                 beta: float | None) -> None:
        if not hasattr(model, "peft_config"):
            raise InfluenceError("PrefpruneCallback records LoRA runs (a peft_config); score a "
                                 "full-weight run's checkpoints with score --checkpoints alone")
        base = model.get_base_model()
        if beta is None:
            try:
                head_name(base)
            except ModelError:
                raise InfluenceError("PrefpruneCallback records RewardTrainer runs (a model "
                                     "with a scoring head) and DPOTrainer runs") from None
        self.beta = beta
        params = [(n, p) for n, p in model.named_parameters()
                  if p.requires_grad and not is_head_bias(n)]
        try:
            self.slots: list[_Slot] = _linear_slots(
                SimpleNamespace(model=model, trainable_parameters=lambda: params))
        except GradientError as exc:
            raise InfluenceError(f"PrefpruneCallback: {exc}") from None
        self.names = [n for n, _ in params]
        dim = sum(p.numel() for _, p in params)
        if capacity * dim * 4 > budget_mb * 2**20:
            raise InfluenceError(f"PrefpruneCallback keeps a gradient per pair ({capacity} × "
                                 f"{dim} floats, {capacity * dim * 4 / 2**20:.0f} MB), more "
                                 f"than memory_budget_mb ({budget_mb:g})")
        self.model = model
        self.rows: dict[int, int] = {}
        self.margins = torch.zeros(capacity)
        self.grads = torch.zeros(capacity, dim)
        self.steps = torch.full((capacity,), -1, dtype=torch.long)
        self.current = self._new_pass()
        self.done: list[_Pass] = []
        self.in_forward = False
        self.handles = [s.module.register_forward_hook(self._keep_layer) for s in self.slots]
        self.handles += [base.register_forward_pre_hook(self._begin),
                         base.register_forward_hook(self._keep_rewards, with_kwargs=True)]

    def _new_pass(self) -> _Pass:
        return _Pass({id(s.module): [] for s in self.slots})

    def _recording(self, output: torch.Tensor) -> bool:
        return self.model.training and torch.is_grad_enabled() and output.requires_grad

    def _begin(self, module: nn.Module, args: tuple) -> None:
        self.in_forward = True

    def _keep_layer(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # gradient checkpointing runs layers again during the backward: those are not kept
        if self.in_forward and self._recording(output):
            entry: list[torch.Tensor | None] = [args[0].detach(), None]
            output.register_hook(partial(entry.__setitem__, 1))
            self.current.layers[id(module)].append(entry)

    def _keep_rewards(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The rewards (a DPO policy: per-token log-probabilities) of a training forward, or
        the reference's log-probabilities of the DPO forward before it."""
        taken, self.current, self.in_forward = self.current, self._new_pass(), False
        values = output.logits if self.beta is None else output.log_probs
        if self.beta is not None and self.model.training and not torch.is_grad_enabled():
            last = self.done[-1] if self.done else None
            if last is not None and last.reference is None and \
                    torch.equal(last.ids, kwargs["input_ids"]):
                last.reference = values.detach().float().sum(dim=1)
            return
        if not self._recording(values):
            return
        taken.ids = kwargs["input_ids"].detach()
        taken.mask = kwargs["attention_mask"].detach()
        taken.rewards = values.detach().float().reshape(values.shape[0], -1).sum(dim=1)
        values.register_hook(taken.reward_grads.append)
        self.done.append(taken)

    def flush(self, step: int) -> None:
        """Turn the passes since the last flush into per-pair records of ``step``."""
        for taken in self.done:
            if taken.reward_grads:
                self._store(taken, step)
        self.done = []

    def _store(self, taken: _Pass, step: int) -> None:
        rows = taken.rewards.numel()
        half = rows // 2
        flat = torch.zeros(rows, self.grads.shape[1], device=taken.rewards.device)
        for slot in self.slots:
            calls = [(inp, grad) for inp, grad in taken.layers[id(slot.module)]
                     if grad is not None]
            if not calls:
                raise InfluenceError("PrefpruneCallback saw no gradient reach a LoRA layer "
                                     "(reentrant gradient checkpointing hides them); train "
                                     "with gradient_checkpointing_kwargs="
                                     "{'use_reentrant': False}")
            for inp, grad in calls:
                _write_rows(flat, slot, inp.float(), grad.float())
        # ∂L/∂r per row; a DPO loss sums the tokens' log π, so each token has the row's slope
        slope = taken.reward_grads[0].float().reshape(rows, -1)[:, -1]
        usable = (slope != 0).cpu()
        flat /= torch.where(slope != 0, slope, torch.ones_like(slope))[:, None]
        rewards = taken.rewards
        if self.beta is not None:  # r = β·(log π − log π_ref), ∇r = β·∇log π
            if taken.reference is None:
                raise InfluenceError("PrefpruneCallback saw a DPO step without its reference "
                                     "forward; it cannot tell the pairs' margins")
            rewards = self.beta * (rewards - taken.reference)
            flat *= self.beta
        grads = (flat[:half] - flat[half:]).cpu()
        margins = (rewards[:half] - rewards[half:]).cpu()
        ids, mask = taken.ids.cpu(), taken.mask.cpu().bool()
        for j in range(half):
            if not (usable[j] and usable[j + half]):  # a vanishing slope hides ∇r
                continue
            key = pair_key(ids[j][mask[j]].tolist(), ids[j + half][mask[j + half]].tolist())
            row = self.rows.setdefault(key, len(self.rows))
            self.margins[row], self.grads[row], self.steps[row] = margins[j], grads[j], step

    def record(self) -> PairRecord:
        """Every pair visited so far, at its latest visit."""
        m = len(self.rows)
        return PairRecord(torch.tensor(list(self.rows), dtype=torch.long),
                          self.margins[:m].clone(), self.grads[:m].clone(),
                          self.steps[:m].clone(), self.names)

    def restore(self, record: PairRecord) -> None:
        """Continue the record a resumed run's checkpoint holds."""
        if record.parameters != self.names:
            return
        for i, key in enumerate(record.keys.tolist()):
            row = self.rows.setdefault(key, len(self.rows))
            self.margins[row] = record.margins[i]
            self.grads[row] = record.margin_grads[i]
            self.steps[row] = record.steps[i]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
