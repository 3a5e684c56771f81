"""Data parallelism over ``torch.distributed``, for runs launched by ``torchrun``.

The library detects a launch itself (``WORLD_SIZE`` > 1 in the environment, or a process group
the caller already initialised), so ``train_reward_model`` and ``compute_scores`` scale out
without a separate code path in the CLI. The process group is created with
``cpu:gloo,cuda:nccl`` when CUDA is present (collectives on CUDA tensors go over NCCL, the small
per-pair statistics kept on the CPU over gloo) and plain ``gloo`` otherwise, so multi-process
runs work and are tested on a CPU-only machine.

Every helper is a no-op, or the identity, in a single process: callers never branch on the
world size. Outputs should be written by one process only; :func:`is_main_process` says which.
"""

from __future__ import annotations

import atexit
import itertools
import os

import numpy as np
import torch
import torch.distributed as dist


def launched() -> bool:
    """True under ``torchrun`` with more than one process, or inside an initialised group."""
    if dist.is_available() and dist.is_initialized():
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> bool:
    """Join the process group ``torchrun`` describes (once per process); True when distributed.

    The group is destroyed at exit only when this call created it: a caller's own group is the
    caller's to manage.
    """
    if not launched():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_teardown)
    return True


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """The process's index on its node: the CUDA device it should use."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on the one process (global rank 0) that should write outputs and print.

    Before :func:`setup` it falls back on the ``RANK`` variable ``torchrun`` sets, so a CLI can
    ask before any library call has joined the group.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; every process gets the same values."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with the main process's values (as DDP does at start)."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def all_agree(flag: bool) -> bool:
    """True only when ``flag`` is true on every process.

    Decisions that lead to collectives (reuse a saved solve, or compute it) must be the same on
    every rank, or the ranks that compute wait forever for the ranks that skipped.
    """
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows (dim 0, any length) in rank order, on every process.

    Used for per-pair statistics (O(pairs), small); never for per-pair gradients.
    """
    if world_size() == 1:
        return local
    counts = torch.zeros(world_size(), dtype=torch.int64)
    counts[rank()] = local.shape[0]
    all_reduce_sum(counts)
    padded = torch.zeros((int(counts.max()), *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local.cpu()
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)]).to(local.device)


def split(count: int) -> list[range]:
    """Contiguous, balanced ranges of ``count`` items, one per process, in rank order.

    Contiguous ranges make :func:`gather_rows` return items in their original order.
    """
    bounds = np.linspace(0, count, world_size() + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def my_share(count: int, unit: int = 1) -> range:
    """This process's range of ``count`` items (see :func:`split`), in whole blocks of ``unit``.

    Splitting at batch boundaries keeps every batch the same as in a single process (padding,
    and so rounding, depend on a batch's rows), so only the order of a final sum differs.
    """
    blocks = split(-(-count // unit))[rank()]
    return range(min(blocks.start * unit, count), min(blocks.stop * unit, count))


def gram(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``J Jᵀ`` (float64, n × n) of a matrix whose rows are split over the processes.

    Each process's block is broadcast in turn and multiplied with the local rows, so no process
    ever holds more than its own rows and one other block: O(pairs²) instead of
    O(pairs × parameters). ``sizes`` are the row counts per rank, in rank order.
    """
    mine = local.double()
    if world_size() == 1:
        return mine @ mine.T
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    out = torch.zeros(offsets[-1], offsets[-1], dtype=torch.float64)
    me = rank()
    for source, size in enumerate(sizes):
        block = local.cpu().clone() if source == me else torch.empty(size, local.shape[1],
                                                                       dtype=local.dtype)
        dist.broadcast(block, src=source)
        out[offsets[me]:offsets[me + 1], offsets[source]:offsets[source + 1]] = \
            mine.cpu() @ block.double().T
    return all_reduce_sum(out)
