"""The passes a scoring run makes over pairs, sharded over processes and saved for resume.

* **Validation gradients**: the mean loss gradient ``g_val`` of every target (one row each).
* **Pass 1** over the training pairs, shard by shard: margins, ``‖∇m‖²`` and ``g_valᵀ∇m``; the
  margin gradients themselves are kept (the gradient cache) only when they fit the memory
  budget.
* **Projection**: ``∇m_iᵀ s_t`` for every pair and solved target ``s_t``: a product with the
  cache, or a second streaming pass.

Under ``torchrun`` (see :mod:`prefprune.distributed`) each process takes a contiguous block of
shards and of the validation pairs. Validation gradients are summed with ``all_reduce``;
per-pair gradients stay on the process that computed them (the cache is sharded, never
gathered), and only per-pair statistics (O(pairs)) are gathered in shard order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from prefprune import distributed
from prefprune.errors import InfluenceError
from prefprune.influence.config import InfluenceConfig
from prefprune.influence.gradients import MarginGradientComputer, PairGradients
from prefprune.influence.projection import ProjectedGradients, RandomProjection
from prefprune.influence.store import ShardStore
from prefprune.model import RewardModel, encoded_batches
from prefprune.progress import progress_bar


class GradientPasses:
    """The pairs' gradient passes for one scoring run.

    ``given`` are the training pairs' margins and margin gradients when they were already
    taken (a training checkpoint's): pass 1 then reads them instead of running the model.
    ``meta`` is the run's metadata, which the passes add their counts and settings to.
    """

    def __init__(self, model: RewardModel, train: Any, targets: dict[str, Any],
                 config: InfluenceConfig, meta: dict[str, Any], *, progress: bool,
                 given: PairGradients | None = None) -> None:
        self.model, self.train, self.targets, self.config = model, train, targets, config
        self.meta, self.progress, self.given = meta, progress, given
        self.meta["pairs_through_gradient_passes"] = 0
        self.n = len(train)
        self.grads = self._gradient_computer()
        self.dim = self.grads.dim
        self.store: ShardStore | None = None
        self.shards = [range(s, min(s + config.shard_size, self.n))
                       for s in range(0, self.n, config.shard_size)]
        self.my_shards = [(k, self.shards[k]) for k in distributed.my_share(len(self.shards))]
        self.rows = range(self.my_shards[0][1].start, self.my_shards[-1][1].stop) \
            if self.my_shards else range(0)
        self.cache = self._cache_fits() or given is not None  # given: already in memory
        self.local: dict[str, torch.Tensor] = {}  # this process's margins and gradient cache

    def _gradient_computer(self) -> MarginGradientComputer | ProjectedGradients:
        grads = MarginGradientComputer(self.model, self.config.gradient_mode)
        dim = self.config.projection_dim
        if dim is None:
            return grads
        projection = RandomProjection(grads.dim, dim, self.config.seed,
                                      keep_bytes=self.config.memory_budget_mb * 2**20 / 4)
        self.meta["projection"] = {"kind": "rademacher", "dim": dim, "from": grads.dim,
                                   "seed": self.config.seed}
        return ProjectedGradients(grads, projection)

    def _cache_fits(self) -> bool:
        """Whether every process's share of the per-pair gradients fits the budget.

        Decided from the shard layout alone, so all processes decide the same.
        """
        largest = max(sum(len(self.shards[k]) for k in share)
                      for share in distributed.split(len(self.shards)))
        cache_bytes = largest * self.dim * 4
        fits = cache_bytes <= self.config.memory_budget_mb * 2**20
        self.meta["gradient_cache"] = {"fits": fits, "bytes": cache_bytes,
                                       "budget_mb": self.config.memory_budget_mb}
        if self.config.projection_dim is not None and not fits:
            raise InfluenceError(
                f"projected gradients ({cache_bytes / 2**20:.0f} MB per process) exceed "
                "memory_budget_mb; lower projection_dim or raise the budget")
        return fits

    def batches(self, records: Any) -> Iterator[tuple[list[int], Any]]:
        return encoded_batches(self.model.encoder, records, self.config.score_batch_size)

    # --- what every process needs ---------------------------------------------------------

    def load_shared(self, name: str) -> dict[str, torch.Tensor] | None:
        """A saved item every process needs, used only when every process can load it."""
        saved = self.store.load(name) if self.store else None
        return saved if distributed.all_agree(saved is not None) else None

    def save_shared(self, name: str, tensors: dict[str, torch.Tensor],
                    record: Any = None) -> None:
        """Save an item (and its JSON ``record``) once, from the main process."""
        if self.store and distributed.is_main_process():
            self.store.save(name, tensors)
            if record is not None:
                self.store.save_json(name, record)

    # --- the passes ---------------------------------------------------------------------

    def validation_gradients(self) -> torch.Tensor:
        """Mean loss gradient per target, (T, P); saved, so a resumed run skips the pass.

        Each process sums the gradients of its share of the validation pairs; the sums are
        all-reduced.
        """
        saved = self.load_shared("validation")
        if saved is not None:
            self.meta["validation_loss"] = dict(zip(self.targets, saved["losses"].tolist()))
            return saved["gradients"]
        rows, losses = [], {}
        for name, data in self.targets.items():
            total = torch.zeros(self.dim + 1, dtype=torch.float64)  # gradient sum, loss sum
            mine = data.select(distributed.my_share(len(data), self.config.score_batch_size))
            with progress_bar(f"validation gradients ({name})", len(mine),
                              self.progress) as advance:
                for idx, batch in self.batches(mine):
                    pairs = self.grads(batch.to(self.model.device))
                    total[:-1] += pairs.loss_grads().sum(dim=0).cpu().double()
                    total[-1] += float(pairs.losses.sum())
                    advance(len(idx))
            distributed.all_reduce_sum(total)
            rows.append((total[:-1] / len(data)).float())
            losses[name] = float(total[-1]) / len(data)
        self.meta["validation_loss"] = losses
        gradients = torch.stack(rows)
        self.save_shared("validation", {"gradients": gradients,
                                        "losses": torch.tensor(list(losses.values()))})
        return gradients

    def gradient_pass(self, g_val: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pass 1 over this process's shards: margins, ‖∇m‖², g_valᵀ∇m, gathered over processes
        in shard order, and ∇m itself kept in ``self.local`` when cached."""
        parts: list[dict[str, torch.Tensor]] = []
        cache = torch.empty(len(self.rows), self.dim) if self.cache else None
        with progress_bar("gradient pass", len(self.rows), self.progress) as advance:
            for k, shard in self.my_shards:
                part = self._load_or_compute_shard(k, shard, g_val)
                grads = part.pop("margin_grads", None)
                if cache is not None:  # filled in place: no second copy of the cache
                    cache[shard.start - self.rows.start:shard.stop - self.rows.start] = grads
                parts.append(part)
                advance(len(shard))
        local = {"margins": _cat([p["margins"] for p in parts], (0,)),
                 "norms2": _cat([p["norms2"] for p in parts], (0,), torch.float64),
                 "dots": _cat([p["dots"] for p in parts], (0, len(self.targets)))}
        self.local = {"margins": local["margins"]}
        if cache is not None:
            self.local["margin_grads"] = cache
        return {key: distributed.gather_rows(value) for key, value in local.items()}

    def _load_or_compute_shard(self, k: int, shard: range,
                               g_val: torch.Tensor) -> dict[str, torch.Tensor]:
        part = self.store.load(f"grads-{k:05d}") if self.store else None
        if part is None or (self.cache and "margin_grads" not in part):
            part = self._gradient_shard(shard, g_val)
            if self.store:
                self.store.save(f"grads-{k:05d}", part)
        return part

    def _gradient_shard(self, shard: range, g_val: torch.Tensor) -> dict[str, torch.Tensor]:
        margins, norms, dots, cached = [], [], [], []
        for pairs in self._shard_gradients(shard):
            j = pairs.margin_grads.cpu()
            margins.append(pairs.margins.cpu())
            norms.append((j.double() ** 2).sum(dim=1))
            dots.append(j @ g_val.T)
            if self.cache:
                cached.append(j)
        self._count_work(len(shard))
        part = {"margins": torch.cat(margins), "norms2": torch.cat(norms),
                "dots": torch.cat(dots)}
        if self.cache:
            part["margin_grads"] = torch.cat(cached)
        return part

    def _shard_gradients(self, shard: range) -> Iterator[PairGradients]:
        """The shard's per-pair gradients: given ones sliced, or computed batch by batch."""
        if self.given is not None:
            yield PairGradients(self.given.margins[shard.start:shard.stop],
                                self.given.margin_grads[shard.start:shard.stop])
            return
        for _, batch in self.batches(self.train.select(shard)):
            yield self.grads(batch.to(self.model.device))

    def project(self, solutions: torch.Tensor, solve_key: str) -> torch.Tensor:
        """``∇m_iᵀ s_t`` for every pair and target, (n, T): from this process's cache or a
        second pass over its shards, gathered over processes in shard order."""
        if self.cache:
            grads = self.local["margin_grads"]
            return distributed.gather_rows(grads @ solutions.T.to(grads.dtype))
        parts = []
        with progress_bar("scoring pass", len(self.rows), self.progress) as advance:
            for k, shard in self.my_shards:
                name = f"proj-{solve_key}-{k:05d}"
                part = self.store.load(name) if self.store else None
                if part is None:
                    part = {"proj": self._project_shard(shard, solutions)}
                    if self.store:
                        self.store.save(name, part)
                parts.append(part["proj"])
                advance(len(shard))
        return distributed.gather_rows(_cat(parts, (0, len(solutions))))

    def _project_shard(self, shard: range, solutions: torch.Tensor) -> torch.Tensor:
        rows = self.train.select(shard)
        out = [self.grads(batch.to(self.model.device)).margin_grads.cpu() @ solutions.T
               for _, batch in self.batches(rows)]
        self._count_work(len(shard))
        return torch.cat(out)

    def _count_work(self, pairs: int) -> None:
        self.meta["pairs_through_gradient_passes"] += pairs

    def total_work(self) -> int:
        """Pairs that went through a gradient pass, over every process."""
        work = torch.tensor([self.meta["pairs_through_gradient_passes"]])
        return int(distributed.all_reduce_sum(work))


def _cat(parts: list[torch.Tensor], empty: tuple[int, ...],
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Concatenate rows; a process with no shards (more processes than shards) has none."""
    return torch.cat(parts) if parts else torch.zeros(empty, dtype=dtype)
