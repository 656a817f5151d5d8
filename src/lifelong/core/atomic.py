"""Files written whole or not at all: a temporary file in the same directory, then a rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], content: str | bytes | Callable[[Any], None]) -> None:
    """Write ``content`` (text, bytes, or a function writing to a binary file) to ``path`` through
    a temporary file in the same directory and a rename: ``path`` is whole or as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w" if isinstance(content, str) else "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
