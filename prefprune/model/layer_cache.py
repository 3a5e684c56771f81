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

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prefprune.errors import ModelError
from prefprune.model.feature_store import FeatureStore, frozen_fingerprint, sequence_key

if TYPE_CHECKING:
    from prefprune.model.config import RewardModelConfig

# Attribute names of the transformer layer stack, by architecture family.
_STACK_NAMES = ("layer", "layers", "h", "block", "blocks")
# Names of the scoring head (the only trainable module allowed above the layer stack).
HEAD_NAMES = ("classifier", "score", "head")


class _StopForward(Exception):
    """Raised by the capture hook: nothing above the first adapted layer is needed."""


@dataclass
class CacheStats:
    """What the cache did, for run metadata and benchmarks.

    ``misses`` counts the sequences that went through the frozen layers (in
    ``frozen_seconds``); ``hits`` those served from RAM and ``disk_hits`` those read from the
    feature store on disk."""

    hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    uncached: int = 0  # computed sequences not kept in RAM because the budget was full
    bytes: int = 0
    frozen_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses,
                "sequences_through_frozen_layers": self.misses, "uncached": self.uncached,
                "megabytes": round(self.bytes / 2**20, 1),
                "frozen_seconds": round(self.frozen_seconds, 2)}


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
    first model to use the cache fixes the backbone signature it accepts. ``budget_mb`` bounds
    the RAM it keeps (0: none); ``features`` adds the on-disk store of
    :mod:`prefprune.model.feature_store` (a folder, and its budget in MB), shared by every
    process and command.
    """

    def __init__(self, budget_mb: float = 2048.0, *,
                 features: tuple[str | os.PathLike, float] | None = None) -> None:
        if budget_mb < 0:
            raise ValueError(f"budget_mb must not be negative, got {budget_mb}")
        self.budget_bytes = int(budget_mb * 2**20)
        self.stats = CacheStats()
        self.signature: tuple[str, int] | None = None
        self.features = features
        self.store: FeatureStore | None = None
        self._ram: dict[bytes, torch.Tensor] = {}
        #: What else models on this cache compute once and share (a DPO reference).
        self.shared: dict[str, Any] = {}

    @classmethod
    def for_config(cls, config: RewardModelConfig) -> FrozenLayerCache | None:
        """The cache a model built from ``config`` uses: None when every layer trains or
        both the RAM and the disk cache are off."""
        features = config.feature_store()
        if config.lora_layers == 0 or (config.layer_cache_mb == 0 and features is None):
            return None
        return cls(config.layer_cache_mb, features=features)

    def bind(self, backbone: str, model: nn.Module) -> int:
        """Check that ``model`` can use this cache; return its first adapted layer. The
        first model bound opens the feature store of its frozen weights."""
        start = first_adapted_layer(model)
        if start == 0:
            raise ValueError("LoRA adapts the lowest layer, so no layer is frozen to cache; "
                             "restrict it to the top layers (lora_layers)")
        signature = (backbone, start)
        if self.signature not in (None, signature):
            raise ValueError(f"this cache holds activations of {self.signature}, "
                             f"not of {signature}")
        if self.signature is None and self.features is not None:
            root, budget = self.features
            width = model.config.get_text_config().hidden_size
            self.store = FeatureStore(root, frozen_fingerprint(model, _frozen_names(model,
                                                                                   start),
                                                               start),
                                      width=width, budget_mb=budget)
        self.signature = signature
        return start

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's output for a padded batch, running only the layers from the first
        adapted one upwards (the layers below come from RAM, the disk, or are run once)."""
        assert self.signature is not None, "bind the cache to a model first"
        start = self.signature[1]
        mask = inputs["attention_mask"].bool()
        keys = [self._key(inputs, mask, row) for row in range(mask.shape[0])]
        states = {row: self._ram[key] for row, key in enumerate(keys) if key in self._ram}
        self.stats.hits += len(states)
        states.update(self._from_disk(keys, states))
        missing = [row for row in range(len(keys)) if row not in states]
        if missing:
            began = time.perf_counter()
            fresh = self._compute(model, inputs, missing, start)
            self.stats.frozen_seconds += time.perf_counter() - began
            self.stats.misses += len(missing)
            for row, value in fresh.items():
                self._keep(keys[row], value)
                if self.store is not None:
                    self.store.add(sequence_key(keys[row]), value)
            states.update(fresh)
        hidden = None
        for row in range(len(keys)):
            if hidden is None:
                hidden = states[row].new_zeros(*mask.shape, states[row].shape[-1])
            hidden[row, mask[row]] = states[row].to(hidden.device)
        with _run_from(model, start, hidden):
            return model(**inputs)

    def rewards(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A one-output model's score per row (a reward model's rewards)."""
        return self.forward(model, inputs).logits.squeeze(-1).float()

    def flush(self) -> None:
        """Write the features computed so far to disk (also done at exit)."""
        if self.store is not None:
            self.store.flush()

    def summary(self) -> dict[str, Any]:
        """The stats, plus what the disk store wrote, for a command's sidecar."""
        out: dict[str, Any] = self.stats.to_dict()
        if self.store is not None:
            out["feature_store"] = {"folder": str(self.store.directory),
                                    "written": self.store.written,
                                    "refused_over_budget": self.store.refused}
        return out

    def _from_disk(self, keys: list[bytes],
                   known: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if self.store is None:
            return {}
        wanted = {row: sequence_key(key) for row, key in enumerate(keys) if row not in known}
        found = self.store.load(list(wanted.values())) if wanted else {}
        out = {row: found[name] for row, name in wanted.items() if name in found}
        for row, value in out.items():
            self._keep(keys[row], value)
        self.stats.disk_hits += len(out)
        return out

    @staticmethod
    def _key(inputs: dict[str, torch.Tensor], mask: torch.Tensor, row: int) -> bytes:
        parts = [inputs["input_ids"][row][mask[row]]]
        if "token_type_ids" in inputs:
            parts.append(inputs["token_type_ids"][row][mask[row]])
        return torch.cat(parts).to("cpu", torch.int64).numpy().tobytes()

    def _keep(self, key: bytes, states: torch.Tensor) -> None:
        if key in self._ram:  # the same sequence twice in one batch
            return
        size = states.numel() * states.element_size()
        if self.stats.bytes + size > self.budget_bytes:
            self.stats.uncached += 1
            return
        self._ram[key] = states
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


def _frozen_names(model: nn.Module, start: int) -> list[str]:
    """Parameters and buffers the cached states depend on: every frozen tensor outside the
    adapted layers (embeddings, the layers below, position tables)."""
    _, _, layers = layer_stack(model)
    above = {id(t) for layer in layers[start:] for t in (*layer.parameters(), *layer.buffers())}
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in named
            if id(tensor) not in above and not getattr(tensor, "requires_grad", False)
            and not set(name.split(".")) & set(HEAD_NAMES)]


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
