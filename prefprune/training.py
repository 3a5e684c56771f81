"""Train and evaluate a reward model on preference pairs with the Bradley–Terry loss.

Under ``torchrun`` training is data-parallel (see :mod:`prefprune.distributed`): every process
walks the same seeded batch order, computes the loss gradient of its slice of each batch, and
the slices' gradient sums are all-reduced before the optimiser step. Each step therefore
minimises the same batch mean as a single process would, and K processes give the same
weights as one, up to float summation order (and dropout masks, which depend on the rows a
process sees).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from prefprune import distributed
from prefprune.config import Settings, setting
from prefprune.errors import ConfigError, DataError
from prefprune.model import (
    PairBatch,
    RewardModel,
    bradley_terry_loss,
    encoded_batches,
    length_order,
    loss_slope,
    seed_everything,
)
from prefprune.progress import progress_bar


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Optimisation settings. Retraining after pruning reuses the same object, so that the only
    difference between two runs is the data."""

    section: ClassVar[str] = "train"

    epochs: int = setting(2, min=1, help="Passes over the training pairs.")
    batch_size: int = setting(8, min=1, help="Pairs per forward pass.")
    learning_rate: float = setting(5e-3, above=0.0, help="Peak AdamW learning rate.")
    weight_decay: float = setting(0.0, min=0.0, help="AdamW weight decay.")
    warmup_ratio: float = setting(
        0.1, min=0.0, max=1.0, help="Share of the optimiser steps spent warming the learning "
                                    "rate up (then it decays linearly to zero).")
    grad_accum_steps: int = setting(
        1, min=1, help="Batches whose gradients are summed before each optimiser step.")
    max_grad_norm: float = setting(1.0, above=0.0, help="Gradient clipping norm.")
    seed: int = setting(0, help="Seeds the initialisation, the data order and dropout.")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    bf16: bool | None = setting(
        None, cli=False, help="bf16 autocast; null: on when the CUDA device supports it.")

    def validate(self) -> None:
        try:
            torch.device("cpu" if self.device == "auto" else self.device)
        except RuntimeError:
            raise ConfigError("device", f"'{self.device}' is not a device; use auto, cpu, "
                                        "cuda or cuda:N") from None


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
    """``auto`` takes CUDA when present, else the CPU. Under ``torchrun`` plain ``cuda`` means
    this process's own GPU (``LOCAL_RANK``). Asking for a device this torch cannot use is a
    :class:`ConfigError`, before any work starts."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"'{name}' is not a device; use auto, cpu, cuda or "
                                    "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"'{name}' was asked for, but this torch build has no "
                                        "usable CUDA device; use --device cpu (or auto)")
        if device.index is None and distributed.launched():
            return torch.device("cuda", distributed.local_rank())
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"'{name}': only {torch.cuda.device_count()} CUDA "
                                        "device(s) here")
    elif device.type != "cpu":
        raise ConfigError("device", f"'{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, bf16: bool | None):
    use = bf16 if bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(use))


class Capture(Protocol):
    """Takes per-pair gradients while training (see :mod:`prefprune.checkpoints`): for the
    epochs it ``captures``, each step's gradient is assembled from per-pair margin gradients
    (no extra backward), which are handed to ``record``; ``end_epoch`` runs after the epoch."""

    def captures(self, epoch: int) -> bool: ...

    def pair_gradients(self, batch: PairBatch) -> Any: ...

    def record(self, rows: list[int], pairs: Any) -> None: ...

    def end_epoch(self, epoch: int) -> None: ...


def train_reward_model(model: RewardModel, train: Any, config: TrainConfig | None = None, *,
                       progress: bool = True, capture: Capture | None = None) -> TrainResult:
    """Fit LoRA + head with AdamW, linear warm-up then linear decay, on the BT loss.

    Seeded: the same model initialisation, data and config give the same weights on CPU.
    Under ``torchrun`` every process calls this with the same arguments and ends with the
    same weights; only the main process shows progress.
    """
    config = config or TrainConfig()
    if len(train) == 0:
        raise DataError("cannot train on an empty dataset")
    distributed.setup()
    progress = progress and distributed.is_main_process()
    device = resolve_device(config.device)
    model.to(device)
    params = [p for _, p in model.trainable_parameters()]
    distributed.broadcast_from_main(params)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    steps = math.ceil(batches_per_epoch / config.grad_accum_steps) * config.epochs
    scheduler = _schedule(optimizer, steps, int(config.warmup_ratio * steps))
    result = TrainResult(pairs=len(train))
    ids = _pair_ids(train)
    seed_everything(config.seed)
    model.model.train()
    try:
        for epoch in range(config.epochs):
            order = epoch_order(ids, config.seed, epoch)
            start = time.perf_counter()
            taking = capture if capture is not None and capture.captures(epoch) else None
            with progress_bar(f"train epoch {epoch + 1}/{config.epochs}", len(train),
                              progress) as advance:
                loss = _run_epoch(model, train, order, config, optimizer, scheduler, result,
                                  device, advance, taking)
            result.epoch_seconds.append(time.perf_counter() - start)
            result.epoch_losses.append(loss)
            if taking is not None:
                taking.end_epoch(epoch)
                model.model.train()
    finally:
        model.model.eval()
    result.tokens = int(distributed.all_reduce_sum(torch.tensor([result.tokens])))
    return result


def epoch_order(ids: list[str], seed: int, epoch: int) -> list[int]:
    """The rows of one epoch, in an order that depends only on each pair's id, the seed and
    the epoch: every pair gets a pseudo-random key from (seed, epoch, id) and rows are sorted
    by it. Removing pairs therefore leaves the relative order of every remaining pair
    unchanged, so a retrain after pruning differs from its baseline only by the removed
    pairs, not by a reshuffle of all the others (docs/method.md, section 4)."""
    prefix = f"{seed}\x1f{epoch}\x1f".encode()

    def key(row: int) -> bytes:
        return hashlib.blake2b(prefix + ids[row].encode(), digest_size=8).digest()

    return sorted(range(len(ids)), key=key)


def _pair_ids(train: Any) -> list[str]:
    """Pair ids (which order the epochs); rows without ids are keyed by their position."""
    if "id" in getattr(train, "column_names", ()):
        return [str(i) for i in train["id"]]
    return [str(i) for i in range(len(train))]


def _run_epoch(model: RewardModel, train: Any, order: list[int], config: TrainConfig,
               optimizer: torch.optim.Optimizer, scheduler: Any, result: TrainResult,
               device: torch.device, advance: Any, capture: Capture | None = None) -> float:
    params = optimizer.param_groups[0]["params"]  # the same θ the optimiser steps
    totals = torch.zeros(2, dtype=torch.float64)  # loss sum, pairs, over this process's slices
    n_batches = math.ceil(len(order) / config.batch_size)
    for i, (size, rows, batch) in enumerate(_my_slices(model, train, order,
                                                        config.batch_size)):
        if batch is not None:
            batch = batch.to(device)
            step_pairs = _step_pairs(i, len(order), config)
            if capture is None:
                with _autocast(device, config.bf16):
                    losses = bradley_terry_loss(model.margins(batch))
                (losses.sum() / step_pairs).backward()
            else:
                losses = _captured_step(capture, rows, batch, params, step_pairs)
            totals += torch.tensor([float(losses.detach().sum()), batch.size])
            result.tokens += batch.tokens
        if (i + 1) % config.grad_accum_steps == 0 or i + 1 == n_batches:
            _sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
        advance(size)
    distributed.all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def _captured_step(capture: Capture, rows: list[int], batch: PairBatch,
                   params: list[torch.Tensor], step_pairs: int) -> torch.Tensor:
    """One step's gradient from the per-pair margin gradients ``J``:
    ``∇(Σ ℓ_i / N) = Jᵀ (dℓ/dm) / N``, accumulated into ``.grad`` as ``backward`` would."""
    pairs = capture.pair_gradients(batch)
    flat = pairs.margin_grads.T @ (loss_slope(pairs.margins) / step_pairs)
    offset = 0
    for p in params:
        part = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        p.grad = part.clone() if p.grad is None else p.grad + part
        offset += p.numel()
    capture.record(rows, pairs)
    return bradley_terry_loss(pairs.margins)


def _my_slices(model: RewardModel, train: Any, order: list[int], batch_size: int
               ) -> Iterator[tuple[int, list[int], PairBatch | None]]:
    """Yield (global batch size, this process's rows, their encoded batch or None when empty).

    Every process walks the same batches, so optimiser steps stay aligned across processes.
    """
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        mine = [rows[i] for i in distributed.my_share(len(rows))]
        if not mine:
            yield len(rows), mine, None
            continue
        chunk = train[mine]
        yield len(rows), mine, model.encode_pairs(chunk["prompt"], chunk["chosen"],
                                                  chunk["rejected"])


def _sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum every process's gradients, in one all-reduce over a flat buffer."""
    if distributed.world_size() == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    distributed.all_reduce_sum(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _step_pairs(batch_index: int, total: int, config: TrainConfig) -> int:
    """Pairs in the optimiser step that batch ``batch_index`` belongs to, so that a short last
    batch or accumulation group is weighted like the others: each step minimises a mean."""
    group = config.batch_size * config.grad_accum_steps
    start = (batch_index // config.grad_accum_steps) * group
    return min(group, total - start)


@torch.no_grad()
def evaluate(model: RewardModel, records: Any, *, batch_size: int = 64,
             progress: bool = True) -> EvalResult:
    """Pairwise accuracy (a tie counts one half), mean BT loss and margin statistics.

    Under ``torchrun`` each process evaluates its share of the batches and the margins are
    all-reduced, so every process returns the full result.
    """
    if len(records) == 0:
        raise DataError("cannot evaluate on an empty dataset")
    device = model.device
    order = length_order(records)
    mine = [order[i] for i in distributed.my_share(len(order))]
    margins = torch.zeros(len(records), dtype=torch.float64)
    model.model.eval()
    with progress_bar("evaluate", len(mine), progress and distributed.is_main_process()) \
            as advance:
        for rows, batch in encoded_batches(model.encoder, records, batch_size, mine):
            with _autocast(device, None):
                margins[rows] = model.margins(batch.to(device)).double().cpu()
            advance(len(rows))
    distributed.all_reduce_sum(margins)
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
