"""Per-pair gradients of the margin over the trainable parameters θ (LoRA + head).

One forward and one backward pass per batch give every pair's gradient: forward hooks keep
each trainable linear layer's input and output, ``torch.autograd.grad`` returns the gradient
of the summed rewards with respect to those outputs, and a per-row outer product rebuilds each
row's weight gradient exactly (``∂r/∂W = Σ_t δ_t x_tᵀ`` over that row's tokens). Rows are
independent in eval mode, so summing the rewards does not mix them. The two rows of a pair
(chosen, rejected) are folded back into one margin gradient ``∇m = ∇r_w − ∇r_l``; the loss
gradient is ``∇ℓ = −σ(−m) ∇m`` (docs/method.md, section 1), so margins and ``∇m`` are all a
score needs.

``torch.func.vmap`` is not used on purpose: HF BERT's mask code branches on data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prefprune.errors import GradientError
from prefprune.model import PairBatch, RewardModel, bradley_terry_loss, loss_slope


@dataclass
class PairGradients:
    """Margins ``m`` (B,) and margin gradients ``∇m`` (B, P) of a batch, in θ's order."""

    margins: torch.Tensor
    margin_grads: torch.Tensor

    @property
    def loss_weights(self) -> torch.Tensor:
        """``−σ(−m)``: the factor turning ``∇m`` into ``∇ℓ``."""
        return loss_slope(self.margins)

    def loss_grads(self) -> torch.Tensor:
        """Per-pair loss gradients ``∇ℓ_i`` (B, P)."""
        return self.loss_weights[:, None] * self.margin_grads

    @property
    def losses(self) -> torch.Tensor:
        return bradley_terry_loss(self.margins)


@dataclass(frozen=True)
class _Slot:
    """Where one linear layer's weight (and bias) live in the flat parameter vector."""

    module: nn.Linear
    weight: slice | None
    bias: slice | None


def parameter_layout(model: RewardModel) -> dict[int, slice]:
    """Offsets of every trainable parameter (by ``id``) in the flat vector θ."""
    layout, offset = {}, 0
    for _, param in model.trainable_parameters():
        layout[id(param)] = slice(offset, offset + param.numel())
        offset += param.numel()
    return layout


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-parameter tensors into one flat vector in θ's order."""
    return torch.cat([t.reshape(-1) for t in tensors])


class MarginGradientComputer:
    """Computes :class:`PairGradients` for batches of a fixed model.

    ``mode="hooks"`` is the batched path (one backward per batch). ``mode="loop"`` runs one
    backward per pair: slow, but it handles any trainable parameter, and it is the reference
    the hooks are tested against. Gradients are taken in eval mode (no dropout), unless
    ``train_mode``: then the model is left in the mode its caller set, which is how a training
    step gets its own per-pair gradients (rows stay independent under dropout).
    """

    def __init__(self, model: RewardModel, mode: str = "hooks", *,
                 train_mode: bool = False) -> None:
        if mode not in ("hooks", "loop"):
            raise ValueError(f"mode must be 'hooks' or 'loop', not {mode!r}")
        self.model = model
        self.mode = mode
        self.train_mode = train_mode
        self.params = [p for _, p in model.trainable_parameters()]
        self.dim = sum(p.numel() for p in self.params)
        self.slots = _linear_slots(model) if mode == "hooks" else []

    def __call__(self, batch: PairBatch) -> PairGradients:
        if not self.train_mode:
            self.model.model.eval()
        if self.mode == "loop":
            return self._loop(batch)
        return self._hooks(batch)

    def _hooks(self, batch: PairBatch) -> PairGradients:
        with _capture(self.slots) as captured:
            rewards = self.model.rewards(batch)
        outputs = [out for slot in self.slots for _, out in captured[id(slot.module)]]
        deltas = torch.autograd.grad(rewards.sum(), outputs, allow_unused=True)
        rows = rewards.shape[0]
        flat = torch.zeros(rows, self.dim, dtype=torch.float32, device=rewards.device)
        inputs = [(slot, inp) for slot in self.slots for inp, _ in captured[id(slot.module)]]
        for (slot, inp), delta in zip(inputs, deltas):
            if delta is not None:
                _write_rows(flat, slot, inp.float(), delta.float())
        half = batch.size
        rewards = rewards.detach()
        return PairGradients(rewards[:half] - rewards[half:], flat[:half] - flat[half:])

    def _loop(self, batch: PairBatch) -> PairGradients:
        margins = self.model.margins(batch)
        grads = [flatten(list(torch.autograd.grad(m, self.params, retain_graph=True)))
                 for m in margins]
        return PairGradients(margins.detach(), torch.stack(grads).float())


def _linear_slots(model: RewardModel) -> list[_Slot]:
    layout = parameter_layout(model)
    slots, covered = [], set()
    for module in model.model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = layout.get(id(module.weight)) if module.weight.requires_grad else None
        bias = (layout.get(id(module.bias))
                if module.bias is not None and module.bias.requires_grad else None)
        if weight is None and bias is None:
            continue
        slots.append(_Slot(module, weight, bias))
        covered.update(id(p) for p in (module.weight, module.bias) if p is not None)
    missing = [n for n, p in model.trainable_parameters() if id(p) not in covered]
    if missing:
        raise GradientError(
            f"trainable parameters outside linear layers: {missing[:3]}; "
            "use mode='loop' for such models"
        )
    return slots


@contextmanager
def _capture(slots: list[_Slot]) -> Iterator[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Record (input, output) of every call of each slot's layer during a forward pass."""
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(s.module): [] for s in slots}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured[id(module)].append((args[0].detach(), output))

    handles = [slot.module.register_forward_hook(hook) for slot in slots]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _write_rows(flat: torch.Tensor, slot: _Slot, inp: torch.Tensor, delta: torch.Tensor) -> None:
    """Add each row's exact weight/bias gradient of one layer call into ``flat``."""
    rows = flat.shape[0]
    inp = inp.reshape(rows, -1, inp.shape[-1])  # (rows, tokens, in)
    delta = delta.reshape(rows, -1, delta.shape[-1])  # (rows, tokens, out)
    if slot.weight is not None:
        flat[:, slot.weight] += torch.einsum("bto,bti->boi", delta, inp).reshape(rows, -1)
    if slot.bias is not None:
        flat[:, slot.bias] += delta.sum(dim=1)
