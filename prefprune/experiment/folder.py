"""The folder of a retraining run (an experiment or a validation): its settings, the data it
was started on, and what it may replace.

A run writes ``config.yaml`` (every setting) and ``state.json`` (the fingerprint of the source
and of every data split, per replicate when each draws its own) when it starts. A rerun with
the same settings on the same data resumes from the models, scores and records saved there;
other settings or other data are refused with a message saying what changed, because the saved
results would silently be stale. With ``overwrite``, the run's own entries are removed first
and it starts afresh.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefprune.data import fingerprint
from prefprune.errors import ExperimentError
from prefprune.experiment.config import RunConfig
from prefprune.files import (
    check_folder,
    claim_folder,
    remove_owned,
    write_json_atomic,
    write_text_atomic,
)
from prefprune.pipeline import PreparedData

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"


def split_fingerprints(data: PreparedData, prefix: str = "") -> dict[str, str]:
    """The fingerprint of the source and of every split (names prefixed, e.g. ``seed3/``):
    what a saved run's results depend on."""
    return {"source": data.source_fingerprint,
            **{f"{prefix}{name}": fingerprint(split) for name, split in data.splits.items()}}


class RunFolder:
    """``path`` as the home of one ``kind`` of run with ``config``; ``entries`` are globs of
    what the run writes there (all that ``overwrite`` removes, see
    :func:`~prefprune.files.remove_owned`)."""

    def __init__(self, path: str | Path, kind: str, config: RunConfig,
                 entries: Iterable[str], *, overwrite: bool = False) -> None:
        self.path, self.kind, self.config = Path(path), kind, config
        self.entries = (CONFIG_FILE, STATE_FILE, *entries)
        self.overwrite = overwrite

    def check(self) -> None:
        """Before any work: the folder is new, empty, or this kind of run's own."""
        check_folder(self.path, self.kind, resume=True, overwrite=self.overwrite,
                     inputs=[self.config.data, self.config.validation, self.config.test])

    def claim(self, fingerprints: dict[str, str]) -> None:
        """Start the folder, or check that it holds this very run on this very data
        (``fingerprints`` from :func:`split_fingerprints`).

        Called only after the settings validated and the data loaded, so a bad setting or a
        bad file never leaves a half-made folder behind.
        """
        state = {"fingerprints": fingerprints}
        if self.overwrite:
            remove_owned(self.path, self.entries)
        claim_folder(self.path, self.kind, resume=True)
        config_path, state_path = self.path / CONFIG_FILE, self.path / STATE_FILE
        if config_path.exists():
            saved = type(self.config).from_yaml(config_path)
            before, now = saved.run_identity(), self.config.run_identity()
            if before != now:
                changed = ", ".join(k for k in now if before.get(k) != now[k])
                raise ExperimentError(
                    f"{self.path} holds a different {self.kind} (its {CONFIG_FILE} differs in "
                    f"{changed}); use another --output, rerun with --config {config_path} to "
                    "resume it, or pass --overwrite to start afresh")
            self._check_state(state_path, state)
            if saved.identity() != self.config.identity():  # a new plan: more seeds, say
                write_text_atomic(config_path, self.config.to_yaml())
            return
        write_text_atomic(config_path, self.config.to_yaml())
        write_json_atomic(state_path, state)

    def _check_state(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse to resume on other data: its saved models and runs would be stale. Splits
        the folder has not seen yet (a new replicate's) are added to its state."""
        if not path.exists():
            raise ExperimentError(f"{self.path} has no {STATE_FILE}, so its saved runs cannot "
                                  "be matched to the data; pass --overwrite to start afresh")
        saved = json.loads(path.read_text()).get("fingerprints", {})
        now = state["fingerprints"]
        changed = [f"{name} ({saved[name]} -> {value})" for name, value in now.items()
                   if name in saved and saved[name] != value]
        if changed:
            raise ExperimentError(
                f"{self.path} was started on other data or another given model: their "
                f"fingerprints changed since ({'; '.join(changed)}). Its saved models and "
                "runs would be stale: use another --output, or pass --overwrite to start "
                "afresh")
        if now.keys() - saved.keys():
            write_json_atomic(path, {"fingerprints": {**saved, **now}})


def check_splits(data: PreparedData) -> None:
    """A retraining run needs pairs in every split."""
    for name in ("train", "validation", "test"):
        if len(data.splits[name]) == 0:
            raise ExperimentError(f"the {name} split of {data.source} is empty")
