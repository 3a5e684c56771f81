"""Crash-safe storage of a scoring run's intermediate results (the TRAK "saver").

Each finished piece (a shard of pass-1 statistics, the solve, a shard of projections) is one
safetensors file written through a temporary name and a rename. A rerun with the same run key
(model, data and config fingerprints) reuses what exists; a different key starts afresh in a
sub-directory of its own, so stale results are never mixed in. Temporary names carry the process
id: in a data-parallel run several processes write into one directory, and a process killed
mid-write leaves only a ``*.tmp-<pid>`` file that no load ever reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class ShardStore:
    """Named tensor dicts and JSON records under ``root/<run key>/``."""

    def __init__(self, root: Path, key: str) -> None:
        self.directory = Path(root) / key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = key

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{name}{suffix}"

    @staticmethod
    def _tmp(path: Path) -> Path:
        return path.with_name(f"{path.name}.tmp-{os.getpid()}")

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(name, ".safetensors")
        tmp = self._tmp(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self._path(name, ".safetensors")
        return load_file(str(path)) if path.is_file() else None

    def save_json(self, name: str, data: Any) -> None:
        path = self._path(name, ".json")
        tmp = self._tmp(path)
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)

    def load_json(self, name: str) -> Any:
        return json.loads(self._path(name, ".json").read_text())
