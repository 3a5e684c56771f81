"""Train and evaluate a reward model on preference pairs with the Bradley–Terry loss."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .progress import progress_bar
from .reward_model import PairBatch, RewardModel, bradley_terry_loss, seed_everything


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Retraining after pruning reuses the same object, so that the only
    difference between two runs is the data."""

    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = None  # None: bf16 autocast when the CUDA device supports it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run did and how fast: the figures a benchmark or report needs."""

    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    steps: int = 0
    pairs: int = 0

    @property
    def tokens_per_second(self) -> float:
        seconds = sum(self.epoch_seconds)
        return self.tokens / seconds if seconds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@dataclass
class EvalResult:
    """Pairwise accuracy, mean loss and margin statistics over a set of pairs."""

    accuracy: float
    loss: float
    margin_mean: float
    margin_std: float
    margin_median: float
    pairs: int
    margins: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, *, with_margins: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_margins:
            data.pop("margins")
        return data


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def iter_pair_batches(model: RewardModel, records: Any, batch_size: int,
                      order: Sequence[int] | None = None) -> Iterator[tuple[list[int], PairBatch]]:
    """Yield (row indices, encoded batch) over ``records`` (anything indexable by a list of
    rows that returns ``prompt``/``chosen``/``rejected`` columns, e.g. a ``datasets.Dataset``)."""
    order = list(range(len(records))) if order is None else list(order)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = records[rows]
        yield rows, model.encode_pairs(chunk["prompt"], chunk["chosen"], chunk["rejected"])


def length_order(records: Any) -> list[int]:
    """Rows sorted by text length, so that evaluation batches carry little padding."""
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(records["prompt"], records["chosen"], records["rejected"])]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, bf16: bool | None):
    use = bf16 if bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(use))


def train_reward_model(model: RewardModel, train: Any, config: TrainConfig | None = None, *,
                       progress: bool = True) -> TrainResult:
    """Fit LoRA + head with AdamW, linear warm-up then linear decay, on the BT loss.

    Seeded: the same model initialisation, data and config give the same weights on CPU.
    """
    config = config or TrainConfig()
    if len(train) == 0:
        raise ValueError("cannot train on an empty dataset")
    device = resolve_device(config.device)
    model.to(device)
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    steps = math.ceil(batches_per_epoch / config.grad_accum_steps) * config.epochs
    scheduler = _schedule(optimizer, steps, int(config.warmup_ratio * steps))
    result = TrainResult(pairs=len(train))
    generator = torch.Generator().manual_seed(config.seed)
    seed_everything(config.seed)
    model.model.train()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(train), generator=generator).tolist()
            start = time.perf_counter()
            with progress_bar(f"train epoch {epoch + 1}/{config.epochs}", len(train),
                              progress) as advance:
                loss = _run_epoch(model, train, order, config, optimizer, scheduler, result,
                                  device, advance)
            result.epoch_seconds.append(time.perf_counter() - start)
            result.epoch_losses.append(loss)
    finally:
        model.model.eval()
    return result


def _run_epoch(model: RewardModel, train: Any, order: list[int], config: TrainConfig,
               optimizer: torch.optim.Optimizer, scheduler: Any, result: TrainResult,
               device: torch.device, advance: Any) -> float:
    params = optimizer.param_groups[0]["params"]  # the same θ the optimiser steps
    total, count = 0.0, 0
    n_batches = math.ceil(len(order) / config.batch_size)
    for i, (rows, batch) in enumerate(iter_pair_batches(model, train, config.batch_size, order)):
        batch = batch.to(device)
        with _autocast(device, config.bf16):
            losses = bradley_terry_loss(model.margins(batch))
        (losses.sum() / _step_pairs(i, len(order), config)).backward()
        total += float(losses.detach().sum())
        count += len(rows)
        result.tokens += batch.tokens
        if (i + 1) % config.grad_accum_steps == 0 or i + 1 == n_batches:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
        advance(len(rows))
    return total / count


def _step_pairs(batch_index: int, total: int, config: TrainConfig) -> int:
    """Pairs in the optimiser step that batch ``batch_index`` belongs to, so that a short last
    batch or accumulation group is weighted like the others: each step minimises a mean."""
    group = config.batch_size * config.grad_accum_steps
    start = (batch_index // config.grad_accum_steps) * group
    return min(group, total - start)


@torch.no_grad()
def evaluate(model: RewardModel, records: Any, *, batch_size: int = 64,
             progress: bool = True) -> EvalResult:
    """Pairwise accuracy (a tie counts one half), mean BT loss and margin statistics."""
    if len(records) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = model.device
    margins = torch.empty(len(records), dtype=torch.float64)
    model.model.eval()
    with progress_bar("evaluate", len(records), progress) as advance:
        for rows, batch in iter_pair_batches(model, records, batch_size, length_order(records)):
            with _autocast(device, None):
                margins[rows] = model.margins(batch.to(device)).double().cpu()
            advance(len(rows))
    correct = (margins > 0).double() + 0.5 * (margins == 0).double()
    return EvalResult(
        accuracy=float(correct.mean()),
        loss=float(bradley_terry_loss(margins).mean()),
        margin_mean=float(margins.mean()),
        margin_std=float(margins.std()) if len(margins) > 1 else 0.0,
        margin_median=float(margins.median()),
        pairs=len(records),
        margins=margins.tolist(),
    )
