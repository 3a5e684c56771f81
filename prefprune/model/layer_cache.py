"""Cache the frozen lower layers' activations, so that training, retraining and scoring stop
recomputing them.

When LoRA adapts only the top layers (``RewardModelConfig.lora_layers``), everything below the
first adapted layer is a fixed function of the tokens: the same for every seed, every retrain
after pruning and every gradient pass. :class:`FrozenLayerCache` stores, per encoded sequence,
the hidden states that enter the first adapted layer, and runs the model from there on. The
lower layers then run once per sequence per process instead of once per epoch, retrain and pass.

The cached states are computed in eval mode, so the frozen layers apply no dropout: with the
cache, training differs from an uncached run only by that dropout (eval-mode rewards, gradients
and scores agree to float rounding; tested). Memory grows with tokens × hidden size, so the
cache has a budget: past it, new sequences are computed through the full model and not stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prefprune.errors import ModelError

# Attribute names of the transformer layer stack, by architecture family.
_STACK_NAMES = ("layer", "layers", "h", "block", "blocks")
# Names of the scoring head (the only trainable module allowed above the layer stack).
HEAD_NAMES = ("classifier", "score", "head")


class _StopForward(Exception):
    """Raised by the capture hook: nothing above the first adapted layer is needed."""


@dataclass
class CacheStats:
    """What the cache did, for run metadata and benchmarks."""

    hits: int = 0
    misses: int = 0
    uncached: int = 0  # sequences computed through the full model because the budget was full
    bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "uncached": self.uncached,
                "megabytes": round(self.bytes / 2**20, 1)}


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The module holding the transformer layers, its attribute name, and the layers.

    Only ``lora_layers`` > 0 needs it (the default, 1), so an architecture whose layers are
    stored otherwise (ALBERT shares one layer group across its depth) is told to adapt all
    layers instead.
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        for name in _STACK_NAMES:
            stack = module._modules.get(name)
            if isinstance(stack, nn.ModuleList) and (count is None or len(stack) == count):
                return module, name, stack
    expected = f"{count} " if count is not None else ""
    raise ModelError(
        f"lora_layers: cannot find this backbone's {expected}transformer layers (a list named "
        f"{', '.join(_STACK_NAMES)}), so LoRA cannot be limited to the top layers; pass "
        "--lora-layers 0 to adapt every layer")


def first_adapted_layer(model: nn.Module) -> int:
    """Index of the lowest layer with a trainable parameter.

    Raises ``ValueError`` when something below it (e.g. the embeddings) is trainable, since
    then the lower activations are not a fixed function of the tokens.
    """
    _, _, layers = layer_stack(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in in_layers \
                and not set(name.split(".")) & set(HEAD_NAMES):
            raise ValueError(f"{name} is trainable and outside the adapted layers")
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(layers)


class FrozenLayerCache:
    """Hidden states entering the first adapted layer, keyed by each sequence's tokens.

    One cache can serve several models built on the same backbone with the same adapted
    layers (every seed and retrain of an experiment): the key is the token content, and the
    first model to use the cache fixes the backbone signature it accepts.
    """

    def __init__(self, budget_mb: float = 2048.0) -> None:
        if budget_mb <= 0:
            raise ValueError(f"budget_mb must be positive, got {budget_mb}")
        self.budget_bytes = int(budget_mb * 2**20)
        self.stats = CacheStats()
        self.signature: tuple[str, int] | None = None
        self._store: dict[bytes, torch.Tensor] = {}

    def bind(self, backbone: str, model: nn.Module) -> int:
        """Check that ``model`` can use this cache; return its first adapted layer."""
        start = first_adapted_layer(model)
        if start == 0:
            raise ValueError("LoRA adapts the lowest layer, so no layer is frozen to cache; "
                             "restrict it to the top layers (lora_layers)")
        signature = (backbone, start)
        if self.signature not in (None, signature):
            raise ValueError(f"this cache holds activations of {self.signature}, "
                             f"not of {signature}")
        self.signature = signature
        return start

    def rewards(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's rewards for a padded batch, running only the layers from the first
        adapted one upwards (the layers below come from the cache)."""
        assert self.signature is not None, "bind the cache to a model first"
        start = self.signature[1]
        mask = inputs["attention_mask"].bool()
        keys = [self._key(inputs, mask, row) for row in range(mask.shape[0])]
        missing = [row for row, key in enumerate(keys) if key not in self._store]
        fresh = self._compute(model, inputs, missing, start) if missing else {}
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        hidden = None
        for row, key in enumerate(keys):
            states = fresh[row] if row in fresh else self._store[key]
            if hidden is None:
                hidden = states.new_zeros(*mask.shape, states.shape[-1])
            hidden[row, mask[row]] = states
            if row in fresh:
                self._keep(key, states)
        with _run_from(model, start, hidden):
            return model(**inputs).logits.squeeze(-1).float()

    @staticmethod
    def _key(inputs: dict[str, torch.Tensor], mask: torch.Tensor, row: int) -> bytes:
        parts = [inputs["input_ids"][row][mask[row]]]
        if "token_type_ids" in inputs:
            parts.append(inputs["token_type_ids"][row][mask[row]])
        return torch.cat(parts).to("cpu", torch.int64).numpy().tobytes()

    def _keep(self, key: bytes, states: torch.Tensor) -> None:
        if key in self._store:  # the same sequence twice in one batch
            return
        size = states.numel() * states.element_size()
        if self.stats.bytes + size > self.budget_bytes:
            self.stats.uncached += 1
            return
        self._store[key] = states
        self.stats.bytes += size

    @staticmethod
    def _compute(model: nn.Module, inputs: dict[str, torch.Tensor], rows: list[int],
                 start: int) -> dict[int, torch.Tensor]:
        """Run the frozen layers (eval mode, no graph) for ``rows`` and capture their output."""
        _, _, layers = layer_stack(model)
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        index = torch.tensor(rows, device=inputs["input_ids"].device)
        sub = {name: value.index_select(0, index) for name, value in inputs.items()}
        was_training = model.training
        handle = layers[start].register_forward_pre_hook(capture, with_kwargs=True)
        model.eval()
        try:
            with torch.no_grad():
                model(**sub)
        except _StopForward:
            pass
        finally:
            handle.remove()
            model.train(was_training)
        mask = sub["attention_mask"].bool()
        return {row: captured[0][i][mask[i]].detach().clone() for i, row in enumerate(rows)}


@contextmanager
def _run_from(model: nn.Module, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, the model skips its layers below ``start`` and feeds ``hidden`` to
    layer ``start``; embeddings, masks, the upper layers and the head run as usual."""
    parent, name, layers = layer_stack(model)

    def feed(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[start].register_forward_pre_hook(feed, with_kwargs=True)
    setattr(parent, name, layers[start:])
    try:
        yield
    finally:
        setattr(parent, name, layers)
        handle.remove()
