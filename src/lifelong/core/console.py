"""The command line's two consoles: results to stdout, errors and progress bars to stderr.

Both soft-wrap: a printed line is never broken by rich at the console's width, so a path or a
store URL in a message stays whole for copying (and for tests that read the output); the
terminal wraps long lines itself. Tables still lay out to the width.
"""

from __future__ import annotations

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
