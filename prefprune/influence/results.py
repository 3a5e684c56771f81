"""What a scoring run produces: the score table and its sidecar, marked as prefprune's own.

The Parquet table carries ``prefprune: prefprune-scores`` in its schema metadata and the sidecar
``"kind": "prefprune-scores"``, so later commands can tell prefprune's outputs (which they may
replace with ``--overwrite``) from a user's files (which they never touch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prefprune.files import write_atomic, write_json_atomic
from prefprune.model import RewardModel

#: Marks a score table (Parquet schema metadata) and its sidecar as prefprune's own.
SCORES_KIND = "prefprune-scores"


def ranked_columns(table: pd.DataFrame) -> list[str]:
    """The score columns of a table prefprune wrote: each has a ``rank_<score>`` beside it."""
    return [c for c in table.columns if f"rank_{c}" in table.columns]


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar beside a score table: ``scores.parquet`` -> ``scores.json``."""
    return Path(path).with_suffix(".json")


def score_table_entries(stem: str) -> tuple[str, ...]:
    """Globs of what saving the score table ``stem + '.parquet'`` writes: the table, its
    sidecar and its work folder of resumable shards."""
    return (f"{stem}.parquet", f"{stem}.json", f"{stem}.parquet.work")


def is_score_table(path: Path) -> bool:
    """Whether ``path`` is a score table prefprune wrote (its Parquet metadata says so)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return metadata.get(b"prefprune") == SCORES_KIND.encode()


def is_score_sidecar(path: Path) -> bool:
    """Whether ``path`` is a score sidecar prefprune wrote."""
    try:
        return json.loads(Path(path).read_text()).get("kind") == SCORES_KIND
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class ScoreResult:
    """The score table (one row per training pair) and the run's metadata sidecar."""

    table: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` (Parquet, marked as prefprune's) and its ``.json`` sidecar, each
        atomically."""
        path = Path(path)
        table = pa.Table.from_pandas(self.table, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               b"prefprune": SCORES_KIND.encode()})
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
        sidecar = sidecar_of(path)
        write_json_atomic(sidecar, self.metadata)
        return path, sidecar


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model: RewardModel) -> str:
    """sha256 over θ's values and the model config: the scores' identity of the model."""
    digest = hashlib.sha256(json.dumps(model.config.identity(), sort_keys=True).encode())
    for name, param in model.trainable_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
