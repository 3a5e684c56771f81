"""Crash-safe storage of a scoring run's intermediate results (the TRAK "saver").

Each finished piece (a shard of pass-1 statistics, the solve, a shard of projections) is one
safetensors file written through a temporary name and a rename. A rerun with the same run key
(model, data and config fingerprints) reuses what exists; a different key starts afresh in a
sub-directory of its own, so stale results are never mixed in. Temporary names carry the process
id: in a data-parallel run several processes write into one directory, and a process killed
mid-write leaves only a temporary file that no load ever reads. A piece that cannot be read
back (a truncated file, a disk error) is reported, removed and computed again.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prefprune.errors import PrefpruneWarning
from prefprune.files import write_atomic, write_json_atomic


class ShardStore:
    """Named tensor dicts and JSON records under ``root/<run key>/``."""

    def __init__(self, root: Path, key: str) -> None:
        self.directory = Path(root) / key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = key

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{name}{suffix}"

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        write_atomic(self._path(name, ".safetensors"),
                     lambda tmp: save_file(contiguous, str(tmp)))

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The saved piece, or None when it is missing or damaged (then it is recomputed)."""
        path = self._path(name, ".safetensors")
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            _discard(path, exc)
            return None

    def save_json(self, name: str, data: Any) -> None:
        write_json_atomic(self._path(name, ".json"), data)

    def load_json(self, name: str) -> Any:
        """The saved record, or None when it is missing or damaged."""
        path = self._path(name, ".json")
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            _discard(path, exc)
            return None


def _discard(path: Path, exc: Exception) -> None:
    warnings.warn(f"{path} is damaged ({exc}); removing it and computing that piece again",
                  PrefpruneWarning, stacklevel=3)
    path.unlink(missing_ok=True)
