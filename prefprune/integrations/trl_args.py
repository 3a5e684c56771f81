"""The training arguments a TRL run saved, read without running any of its pickle.

``Trainer`` saves its arguments (``RewardConfig``, ``DPOConfig``) as ``training_args.bin``
with ``torch.save``: a zip holding a pickle. Loading a pickle runs whatever classes it names,
so prefprune never loads it as such; :class:`_InertUnpickler` resolves every class the pickle
names to an empty stand-in that only keeps what it is given, so the file yields the plain
values the config held (``beta``, ``max_length``, ``truncation_mode``, ``loss_type``) and no
code of the pickle's choosing runs. What is not a plain value (an enum, a device) is left out.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

ARGS_FILE = "training_args.bin"
#: A training_args.bin is a few kilobytes; anything far larger is not one.
MAX_BYTES = 1 << 20
PLAIN = (str, int, float, bool, type(None))


class _StandIn:
    """What every class a pickle names becomes: it keeps its arguments and state, runs
    nothing."""

    args: tuple[Any, ...] = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return type(name, (_StandIn,), {"module": module})

    def persistent_load(self, pid: Any) -> None:
        """Tensor storages (``torch.save``'s persistent ids) are never read."""
        return None


def saved_training_args(*folders: Path) -> dict[str, Any]:
    """The plain values of the training arguments saved in the first of ``folders`` that has
    them (a run's model folder, then the run's folder); empty when none has them or they are
    not a readable ``torch.save`` of a config."""
    for folder in folders:
        if (folder / ARGS_FILE).is_file():
            return _read(folder / ARGS_FILE)
    return {}


def _read(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_BYTES:
        return {}
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if name is None:
                return {}
            loaded = _InertUnpickler(io.BytesIO(archive.read(name))).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, OSError):
        return {}
    state = loaded.state if isinstance(loaded, _StandIn) else None
    if not isinstance(state, dict):
        return {}
    return {str(k): v for k, v in state.items() if _plain(v)}


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, PLAIN)
