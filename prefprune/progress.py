"""Progress bars for long steps, shared by the library and the CLI.

Library calls show a bar on stderr by default (a notebook user wants to see a 5-minute
epoch move too) and take ``progress=False`` to stay silent, e.g. inside tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]


def _noop(_: int = 1) -> None:
    return None


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' own bars (e.g. "Flattening the indices") for a block: they are
    internal steps, not progress a user waits on, and they break ``--quiet``."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Advance]:
    """Yield ``advance(n)``; draw a rich bar with elapsed and remaining time when enabled."""
    if not enabled:
        yield _noop
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
