"""Scoring runs of other training libraries: TRL's output folders and checkpoints
(:mod:`prefprune.integrations.trl`) and a callback that records, while TRL trains, what
scoring its checkpoints needs (:class:`PrefpruneCallback`).

The callback is imported on first use: it pulls in ``transformers.Trainer``, which loading a
model for scoring does not need.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PrefpruneCallback"]


def __getattr__(name: str) -> Any:
    if name == "PrefpruneCallback":
        from prefprune.integrations.callback import PrefpruneCallback

        return PrefpruneCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
