"""Writing outputs without ever losing a user's file.

Two rules, shared by every command:

* **Atomic writes.** Every file is written under a temporary name beside its destination and
  renamed into place, so a crash leaves the old file or the new one, never half of one. The
  temporary name carries the process id, because several ``torchrun`` processes may write into
  one folder.
* **Only prefprune's own outputs are replaced.** A folder prefprune creates carries a marker
  file (:data:`MARKER`) saying what it holds. An output folder must be new, empty, or marked
  by prefprune; replacing a marked one needs the user's ``overwrite``, and a folder, file or
  sidecar that prefprune did not write is never deleted or overwritten. No output may be, or
  contain, one of the command's inputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from prefprune.errors import OutputError

#: Rust libraries (tokenizers, safetensors) report a failed write as a plain exception whose
#: text ends like Rust's I/O errors: "No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"([A-Z][^()\n]*?) \(os error \d+\)")

#: Marker file in every folder prefprune creates: JSON ``{"kind": ...}``.
MARKER = ".prefprune"


def temporary_path(path: Path) -> Path:
    """A sibling name for writing ``path`` before the rename (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to produce the file (or folder) at a temporary path, then rename it
    to ``path``. On any error the temporary output is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_path(path)
    with _cleaning(tmp, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        write(tmp)
        os.replace(tmp, path)
    return path


@contextmanager
def _cleaning(tmp: Path, destination: Path) -> Iterator[None]:
    """Remove the temporary output ``tmp`` when the block fails, and report a failed write
    (a full disk, say) as an :class:`OutputError` naming ``destination``, whatever library
    raised it."""
    try:
        yield
    except BaseException as exc:
        _remove(tmp)
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise OutputError(f"cannot write {destination}: {reason}") from exc


def _write_failure(exc: BaseException) -> str | None:
    """The OS's words when ``exc`` is a failed write ("No space left on device"), from Python,
    safetensors or tokenizers alike; None for any other exception (a bug stays a bug)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if isinstance(exc, SafetensorError):  # IoError(Os { code: 28, .., message: "..." })
        found = re.search(r'message: "([^"]+)"', text)
        return found.group(1) if found else text
    found = _RUST_OS_ERROR.search(text)
    return found.group(1) if found else None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """JSON with sorted keys (stable diffs); values JSON lacks (paths, numpy) as strings."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


# --- what a folder holds ------------------------------------------------------------------------

def marker_kind(folder: Path) -> str | None:
    """The kind of prefprune output ``folder`` holds, from its marker; None when unmarked.

    A reward model saved before markers existed is recognised by its own ``prefprune.json``.
    """
    marker = folder / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("kind"))
        except (ValueError, OSError, AttributeError):
            return None
    legacy = folder / "prefprune.json"
    if legacy.is_file():
        try:
            if json.loads(legacy.read_text()).get("kind") == "prefprune-reward-model":
                return "model"
        except (ValueError, OSError, AttributeError):
            return None
    return None


def mark(folder: Path, kind: str) -> None:
    """Write ``folder``'s marker (prefprune created it and owns what it writes there)."""
    write_json_atomic(folder / MARKER, {"kind": kind, "written_by": "prefprune"})


def _resolved(paths: Iterable[str | os.PathLike | None]) -> list[Path]:
    return [Path(p).resolve() for p in paths if p is not None and Path(p).exists()]


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                    what: str = "--output") -> None:
    """Refuse an output that is an input, lies inside an input folder, or contains one."""
    target = Path(output).resolve()
    for source in _resolved(inputs):
        if target == source or source.is_relative_to(target) or (
                source.is_dir() and target.is_relative_to(source)):
            raise OutputError(f"{what} {output} would overwrite the input {source}; choose an "
                              "output outside your inputs")


def check_folder(folder: str | os.PathLike, kind: str, *, overwrite: bool = False,
                 resume: bool = False, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse, with an :class:`OutputError` that says why, to put a ``kind`` output in
    ``folder`` unless it is new, empty, or marked with the same kind and the caller may
    ``resume`` it (an experiment picking up where it stopped) or ``overwrite`` it."""
    folder = Path(folder)
    check_not_input(folder, inputs)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder; choose a new folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    found = marker_kind(folder)
    if found is None:
        raise OutputError(f"{folder} is not empty and was not written by prefprune; "
                          "refusing to write into it. Choose a new or empty folder")
    if found != kind:
        raise OutputError(f"{folder} holds a prefprune {found}, not a {kind}; choose "
                          "another folder")
    if not (resume or overwrite):
        raise OutputError(f"{folder} already holds a prefprune {kind} from an earlier "
                          "run; pass --overwrite to replace it, or choose another folder")


def claim_folder(folder: str | os.PathLike, kind: str, *, overwrite: bool = False,
                 resume: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check ``folder`` as :func:`check_folder` does, then create and mark it."""
    check_folder(folder, kind, overwrite=overwrite, resume=resume, inputs=inputs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if marker_kind(folder) is None:
        mark(folder, kind)
    return folder


def check_output_file(path: str | os.PathLike, *, owned: Callable[[Path], bool],
                      overwrite: bool, inputs: Iterable[str | os.PathLike | None] = (),
                      what: str = "--output") -> None:
    """Refuse to write ``path`` when it is an input, or exists and is not prefprune's own
    output of this kind (``owned``), or is prefprune's own but ``overwrite`` is not set."""
    path = Path(path)
    check_not_input(path, inputs, what)
    if not path.exists():
        return
    if path.is_dir() or not owned(path):
        raise OutputError(f"{path} exists and was not written by prefprune's {what}; "
                          "refusing to overwrite it. Choose another name")
    if not overwrite:
        raise OutputError(f"{path} already exists (an earlier run's output); pass --overwrite "
                          "to replace it, or choose another name")


def remove_owned(folder: Path, patterns: Iterable[str]) -> None:
    """Remove what a command writes into a folder prefprune marked as its own (an
    ``overwrite``), and nothing else.

    ``patterns`` are globs relative to ``folder`` naming exactly the entries the command
    writes (``runs/*.json``, ``models/*/adapter``), so a user's notes in the folder or in any
    subfolder survive even an overwrite. A subfolder left empty by the removal (or holding
    only its prefprune marker) goes too.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if marker_kind(folder) is None:
        raise OutputError(f"{folder} was not written by prefprune; refusing to clear it")
    root = folder.resolve()
    emptied: set[Path] = set()
    for pattern in patterns:
        for path in sorted(folder.glob(pattern), reverse=True):
            if not path.parent.resolve().is_relative_to(root):  # reached through a link
                continue
            _remove(path)
            emptied.update(p for p in path.parents if p.is_relative_to(folder) and p != folder)
    for parent in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        if [p.name for p in parent.iterdir()] == [MARKER]:
            _remove(parent / MARKER)
        with suppress(OSError):  # not empty: it holds something the command did not write
            parent.rmdir()


@contextmanager
def replacing_folder(folder: Path) -> Any:
    """Yield a temporary folder to build a complete output in; on success it replaces
    ``folder`` (which must be new, empty or a prefprune output the caller may replace).

    The old folder is moved aside first and removed only after the new one is in place, so a
    crash in between leaves one of the two complete.
    """
    folder = Path(folder)
    tmp = temporary_path(folder)
    with _cleaning(tmp, folder):
        _remove(tmp)
        yield tmp
        aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, aside)
        os.replace(tmp, folder)
        _remove(aside)


@contextmanager
def replacing_entries(folder: Path, names: Sequence[str]) -> Iterator[Path]:
    """Yield a temporary folder to build the entries ``names`` in; on success each replaces
    its namesake in ``folder``, and nothing else there is touched (a user's notes beside a
    saved model survive its overwrite).

    A new folder is renamed into place whole. In an existing one the last name is the commit
    point: it is removed first and put in place last, so a crash in between leaves a folder
    that reads as incomplete (and is refused as such), never a silent mixture of two outputs.
    """
    folder = Path(folder)
    tmp = temporary_path(folder)
    with _cleaning(tmp, folder):
        _remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        if not folder.exists():
            os.replace(tmp, folder)
            return
        _remove(folder / names[-1])
        for name in names:
            _remove(folder / name)
            if (tmp / name).exists():
                os.replace(tmp / name, folder / name)
        _remove(tmp)


#: Overrides prefprune's cache folder (converted backbones, frozen-layer features, the
#: generated synthetic set).
CACHE_ENV = "PREFPRUNE_CACHE_DIR"


def cache_home() -> Path:
    """prefprune's cache folder: ``$PREFPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/prefprune``
    or ``~/.cache/prefprune``. One definition, so every cached artefact moves together."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "prefprune"
