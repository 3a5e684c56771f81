"""Data layer: load preference pairs from many layouts, account for every row, split them.

Public names are re-exported here; see each module for the reasons behind the rules.
"""

from prefprune.data.loader import LoadResult, load_preferences
from prefprune.data.report import DataError, IngestionReport, SkippedRow
from prefprune.data.splits import fingerprint, split_preferences

__all__ = [
    "DataError",
    "IngestionReport",
    "LoadResult",
    "SkippedRow",
    "fingerprint",
    "load_preferences",
    "split_preferences",
]
