"""Frozen-layer features on disk, shared by every command, process and run on one machine.

When LoRA adapts only the top layers, the hidden states entering the first adapted layer are a
fixed function of a sequence's tokens and of the frozen weights below it. The in-RAM
:class:`~prefprune.model.layer_cache.FrozenLayerCache` keeps them for one process; this store
keeps them across processes and commands, so ``score`` right after ``train``, every seed,
retrain and ensemble member of an experiment, and a ``validate`` on the same data run the
frozen layers once per sequence, ever.

Layout: ``<root>/<frozen fingerprint>/shard-*.safetensors``. The folder is named by a digest of
the frozen weights themselves (embeddings and every layer below the first adapted one) and of
that layer's index: another backbone, another ``lora_layers`` or changed weights land in
another folder, never on stale features. Inside, each tensor is named by a digest of the
sequence's token ids, which already encode the text, its rendering (chat template or plain)
and its truncation at ``max_length``.

Each process writes whole shards of its own, atomically (a temporary name, then a rename), so
concurrent writers never collide and a process killed at any point leaves complete shards or
none. A shard that does not read back (damaged, truncated) or holds features of the wrong shape
is removed with a warning and its sequences are computed again. Past ``budget_mb`` the store
writes nothing more (features then stay in RAM only).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import time
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prefprune.errors import PrefpruneError, PrefpruneWarning
from prefprune.files import cache_home, write_atomic

#: Features are written in shards of about this size (a unit of resuming and of reading).
SHARD_BYTES = 64 * 2**20


def default_feature_root() -> Path:
    """``features/`` in prefprune's cache folder (``$PREFPRUNE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/prefprune`` or ``~/.cache/prefprune``)."""
    return cache_home() / "features"


def frozen_fingerprint(module: torch.nn.Module, names: list[str], start: int) -> str:
    """Digest of the frozen parameters and buffers whose names are in ``names``, and of the
    first adapted layer's index: what the cached hidden states are a function of."""
    digest = hashlib.sha256(f"start={start}".encode())
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(names):
        value = tensors[name].detach().to("cpu")
        digest.update(name.encode())
        digest.update(str((tuple(value.shape), str(value.dtype))).encode())
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sequence_key(tokens: bytes) -> str:
    """A sequence's name in the store: the digest of its token ids."""
    return hashlib.blake2b(tokens, digest_size=16).hexdigest()


class FeatureStore:
    """The shards of one frozen fingerprint; see the module docstring."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, *, width: int,
                 budget_mb: float) -> None:
        self.directory = Path(root) / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.width = width
        self.budget_bytes = int(budget_mb * 2**20)
        self.index: dict[str, Path] = {}
        self._sizes: dict[Path, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.written = 0  # sequences this process added to the store
        self.refused = 0  # sequences not written because the budget was full
        self._scan()
        atexit.register(self._flush_at_exit)

    # --- reading ------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index every complete shard (other processes may have added some since), and remove
        what writers killed mid-write left (their temporary files)."""
        for leftover in self.directory.glob(".shard-*.tmp-*"):
            if not _alive(int(leftover.name.rsplit("-", 1)[-1])):
                leftover.unlink(missing_ok=True)
        for path in sorted(self.directory.glob("shard-*.safetensors")):
            if path in self._sizes:
                continue
            try:
                with safe_open(str(path), framework="pt") as handle:
                    names = list(handle.keys())
            except (SafetensorError, OSError) as exc:
                self._discard(path, exc)
                continue
            self._sizes[path] = path.stat().st_size
            self.index.update(dict.fromkeys(names, path))

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The features of those ``keys`` the store has, read shard by shard."""
        if any(key not in self.index and key not in self._pending for key in keys):
            self._scan()
        found = {key: self._pending[key] for key in keys if key in self._pending}
        by_shard: dict[Path, list[str]] = {}
        for key in keys:
            if key in self.index and key not in found:
                by_shard.setdefault(self.index[key], []).append(key)
        for path, wanted in by_shard.items():
            found.update(self._read(path, wanted))
        return found

    def _read(self, path: Path, wanted: list[str]) -> dict[str, torch.Tensor]:
        try:
            shard = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            self._discard(path, exc)
            return {}
        bad = [k for k in wanted if k not in shard or shard[k].dim() != 2
               or shard[k].shape[1] != self.width]
        if bad:
            self._discard(path, ValueError(f"{len(bad)} feature(s) missing or not of width "
                                           f"{self.width}"))
            return {}
        return {key: shard[key] for key in wanted}

    def _discard(self, path: Path, exc: Exception) -> None:
        warnings.warn(f"{path} is damaged or stale ({exc}); removing it and computing its "
                      "features again", PrefpruneWarning, stacklevel=4)
        path.unlink(missing_ok=True)
        self._sizes.pop(path, None)
        self.index = {k: p for k, p in self.index.items() if p != path}

    # --- writing ------------------------------------------------------------------------

    def add(self, key: str, states: torch.Tensor) -> None:
        """Queue one sequence's features; a shard is written once enough are queued."""
        if key in self.index or key in self._pending:
            return
        size = states.numel() * states.element_size()
        if sum(self._sizes.values()) + self._pending_bytes + size > self.budget_bytes:
            self.refused += 1
            return
        self._pending[key] = states.detach().to("cpu").contiguous()
        self._pending_bytes += size
        if self._pending_bytes >= SHARD_BYTES:
            self.flush()

    def _flush_at_exit(self) -> None:
        """What is left is written when the process ends; a failure then (a full disk) is a
        warning, since every result is already out."""
        try:
            self.flush()
        except (PrefpruneError, OSError) as exc:
            warnings.warn(f"frozen-layer features not saved: {exc}", PrefpruneWarning,
                          stacklevel=1)

    def flush(self) -> None:
        """Write the queued features as one new shard (atomically)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        path = self.directory / f"shard-{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:8]}" \
                                f".safetensors"
        write_atomic(path, lambda tmp: save_file(pending, str(tmp)))
        self._sizes[path] = path.stat().st_size
        self.index.update(dict.fromkeys(pending, path))
        self.written += len(pending)
