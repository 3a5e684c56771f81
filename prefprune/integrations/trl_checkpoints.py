"""A TRL run's ``checkpoint-N`` folders as checkpoint-ensemble members, each with the learning
rate TracIn-CP weights it by (docs/trl.md): the step's rate as ``trainer_state.json`` logs it,
interpolated between logged steps when ``logging_steps`` skipped it."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefprune.errors import ModelError
from prefprune.integrations.trl import (
    CHECKPOINT,
    checkpoint_folders,
    has_model,
    read_trl_output,
    step_of,
)
from prefprune.model.loading import ADAPTER_WEIGHTS, read_json

STATE_FILE = "trainer_state.json"

@dataclass(frozen=True)
class SavedCheckpoint:
    """One ``checkpoint-N`` folder of a TRL run, with the learning rate TracIn-CP weights it
    by and where that rate came from."""

    folder: Path
    step: int
    learning_rate: float
    rate_from: str

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "step": self.step,
                "learning_rate": self.learning_rate, "learning_rate_from": self.rate_from}


def saved_checkpoints(spec: str) -> list[SavedCheckpoint]:
    """The checkpoints of a TRL output folder, or of a glob of ``checkpoint-*`` folders, by
    step. A checkpoint without an adapter or weights, or without its trainer state, is an
    error that names it."""
    folders = checkpoint_folders(Path(spec)) if Path(spec).is_dir() else sorted(
        (Path(p) for p in glob.glob(spec) if Path(p).is_dir() and CHECKPOINT.match(Path(p).name)),
        key=step_of)
    if not folders:
        raise ModelError(f"{spec}: no checkpoint-N folders (is it a TRL output folder with "
                         "save_strategy on?)")
    for folder in folders:
        if not has_model(folder):
            raise ModelError(f"{folder}: no adapter or weights in safetensors "
                             f"({ADAPTER_WEIGHTS} or model.safetensors)")
        if not (folder / STATE_FILE).is_file():
            raise ModelError(f"{folder}: no {STATE_FILE}, so its step and learning rate are "
                             "unknown")
    states = [read_json(folder / STATE_FILE, "trainer state") for folder in folders]
    rates = _logged_rates(states)
    if not rates:
        raise ModelError(f"{spec}: no learning rate is logged in any {STATE_FILE} (TracIn-CP "
                         "weights each checkpoint by it); train with logging on")
    return [SavedCheckpoint(folder, step, *_rate_at(step, rates))
            for folder, step in zip(folders, (int(s.get("global_step", step_of(f)))
                                              for s, f in zip(states, folders)))]


def final_model(spec: str) -> Path:
    """The model a ``--checkpoints`` run is scored with: the output folder's final model (else
    its latest checkpoint), or the latest of a glob's checkpoints."""
    run = read_trl_output(Path(spec)) if Path(spec).is_dir() else None
    return run.model_folder if run is not None else saved_checkpoints(spec)[-1].folder


def _logged_rates(states: list[dict[str, Any]]) -> dict[int, float]:
    """Step -> logged learning rate, over every state (a later one holds the earlier logs)."""
    return {int(entry["step"]): float(entry["learning_rate"])
            for state in states for entry in state.get("log_history") or []
            if isinstance(entry, dict) and "learning_rate" in entry and "step" in entry}


def _rate_at(step: int, rates: dict[int, float]) -> tuple[float, str]:
    """The learning rate of ``step``: logged, or interpolated linearly between the logged
    steps around it (exact for TRL's default linear schedule), or the nearest one logged."""
    if step in rates:
        return rates[step], "logged"
    steps = sorted(rates)
    below = [s for s in steps if s < step]
    above = [s for s in steps if s > step]
    if below and above:
        a, b = below[-1], above[0]
        rate = rates[a] + (rates[b] - rates[a]) * (step - a) / (b - a)
        return rate, f"interpolated between steps {a} and {b}"
    nearest = below[-1] if below else above[0]
    return rates[nearest], f"the nearest logged step, {nearest}"
