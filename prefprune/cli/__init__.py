"""The ``prefprune`` command line (typer): :mod:`options` builds flags from the configs,
:mod:`commands` (single steps) and :mod:`runs` (experiment, validate, demo) parse and call the
library, :mod:`render` prints."""

from prefprune.cli import runs  # noqa: F401  (registers experiment, validate and demo)
from prefprune.cli.commands import app, main

__all__ = ["app", "main"]
