"""The ``prefprune`` command line (typer): :mod:`options` builds flags from the configs,
:mod:`commands` parses and calls the library, :mod:`render` prints."""

from prefprune.cli.commands import app, main

__all__ = ["app", "main"]
