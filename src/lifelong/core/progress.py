"""Progress bars for long work: one helper so every command looks and behaves the same.

Bars go to stderr (stdout stays clean for results) and disappear when output is not a
terminal or ``LIFELONG_QUIET=1`` is set, as in tests.

Example::

    with progress("simulating users", total=n_chunks) as advance:
        for chunk in chunks:
            ...
            advance(1)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lifelong.core.console import err


def _enabled() -> bool:
    return os.environ.get("LIFELONG_QUIET", "") != "1" and sys.stderr.isatty()


@contextlib.contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Callable[[float], None]]:
    """Show a bar for ``description``; yield ``advance(n)`` to move it by ``n`` of ``total``."""
    if not _enabled():
        yield lambda n=1: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
