"""The per-pair gradients :class:`~prefprune.integrations.PrefpruneCallback` records in each
TRL checkpoint, and how scoring reads them back (docs/trl.md).

Each ``checkpoint-N`` gets ``prefprune/pair-gradients.safetensors`` (with a ``.json``
beside it) in prefprune's crash-safe store (:class:`~prefprune.influence.store.ShardStore`):
for every pair visited up to step N, its margin and margin gradient ``∇m`` over θ (LoRA + head)
as taken at its latest visit, and that visit's step. Rows are keyed by
:func:`~prefprune.integrations.trl_encoding.pair_key`, the hash of the pair's tokens, so
scoring finds a pair whatever the order, split or filtering of the rows around it. A pair the
run has not visited yet (a checkpoint inside the first epoch) is computed at the checkpoint's
own parameters, so a checkpoint's member always covers every pair.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefprune.errors import PrefpruneWarning
from prefprune.influence.gradients import MarginGradientComputer, PairGradients
from prefprune.influence.store import ShardStore
from prefprune.model import RewardModel, encoded_batches

#: The store's folder inside a checkpoint, and the name of its one record.
STORE = "prefprune"
RECORD = "pair-gradients"
FORMAT = 1


@dataclass
class PairRecord:
    """Recorded pairs: keys (m,), margins (m,), margin gradients (m, P), visit steps (m,),
    and the names of θ's parameters in the order of P."""

    keys: torch.Tensor
    margins: torch.Tensor
    margin_grads: torch.Tensor
    steps: torch.Tensor
    parameters: list[str]


def write_record(checkpoint: Path, record: PairRecord, step: int) -> None:
    """Save ``record`` into ``checkpoint``'s store (atomically: a crash leaves the old record
    or the new one)."""
    store = ShardStore(checkpoint, STORE)
    store.save(RECORD, {"keys": record.keys, "margins": record.margins,
                        "margin_grads": record.margin_grads, "steps": record.steps})
    store.save_json(RECORD, {"format": FORMAT, "step": step, "pairs": len(record.keys),
                             "parameters": record.parameters})


def read_record(checkpoint: Path) -> PairRecord | None:
    """The record in ``checkpoint``, or None when it has none (or a damaged one)."""
    if not (checkpoint / STORE / f"{RECORD}.json").is_file():
        return None
    store = ShardStore(checkpoint, STORE)
    meta, tensors = store.load_json(RECORD), store.load(RECORD)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or tensors is None:
        return None
    return PairRecord(tensors["keys"], tensors["margins"], tensors["margin_grads"],
                      tensors["steps"], list(meta["parameters"]))


def recorded_gradients(checkpoint: Path, model: RewardModel,
                       pairs: Any) -> tuple[PairGradients, dict[str, Any]] | None:
    """Every pair's margin and margin gradient for scoring ``checkpoint`` (loaded as
    ``model``, reading pairs as TRL did): recorded ones where the callback took them, the
    rest computed at the checkpoint. None when the checkpoint holds no usable record."""
    record = read_record(checkpoint)
    if record is None:
        return None
    names = [name for name, _ in model.trainable_parameters()]
    if record.parameters != names:
        warnings.warn(f"{checkpoint / STORE}: recorded over other parameters than the "
                      "checkpoint's adapter has; computing its gradients again",
                      PrefpruneWarning, stacklevel=2)
        return None
    where = {int(k): i for i, k in enumerate(record.keys.tolist())}
    found = [where.get(model.encoder.pair_key(p, c, r)) for p, c, r in
             zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    have = [i for i, j in enumerate(found) if j is not None]
    rows = torch.tensor([found[i] for i in have], dtype=torch.long)
    margins = torch.zeros(len(pairs))
    grads = torch.zeros(len(pairs), model.num_trainable)
    margins[have], grads[have] = record.margins[rows], record.margin_grads[rows]
    missing = [i for i, j in enumerate(found) if j is None]
    if missing:
        margins[missing], grads[missing] = _computed(model, pairs.select(missing))
    steps = record.steps[rows]
    return PairGradients(margins, grads), {
        "recorded": len(have), "computed": len(missing),
        "visit_steps": [int(steps.min()), int(steps.max())] if len(have) else None}


def _computed(model: RewardModel, pairs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins and margin gradients of ``pairs`` at the model's own parameters."""
    computer = MarginGradientComputer(model)
    margins, grads = [], []
    for _, batch in encoded_batches(model.encoder, pairs, 32):
        taken = computer(batch.to(model.device))
        margins.append(taken.margins.float().cpu())
        grads.append(taken.margin_grads.float().cpu())
    return torch.cat(margins), torch.cat(grads)
