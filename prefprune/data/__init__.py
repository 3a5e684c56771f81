"""Data layer: load preference pairs from many layouts, account for every row, split them.

Public names are re-exported here; see each module for the reasons behind the rules.
"""

from prefprune.data.containers import locate_source
from prefprune.data.loader import LoadResult, load_preferences
from prefprune.data.messages import PLAIN, Rendering, rendering_for
from prefprune.data.options import FORMATS, DataOptions
from prefprune.data.report import IngestionReport, SkippedRow
from prefprune.data.splits import DEFAULT_SPLIT_FRACTIONS, fingerprint, split_preferences
from prefprune.data.synthetic import (
    GENERATOR_VERSION,
    default_dataset_path,
    default_expert_validation_path,
    expert_validation,
    generate_synthetic,
)
from prefprune.errors import DataError

__all__ = [
    "DEFAULT_SPLIT_FRACTIONS",
    "FORMATS",
    "GENERATOR_VERSION",
    "PLAIN",
    "DataError",
    "DataOptions",
    "IngestionReport",
    "LoadResult",
    "Rendering",
    "SkippedRow",
    "default_dataset_path",
    "default_expert_validation_path",
    "expert_validation",
    "fingerprint",
    "generate_synthetic",
    "load_preferences",
    "locate_source",
    "rendering_for",
    "split_preferences",
]
