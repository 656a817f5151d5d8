"""Files written whole or not at all: a temporary file in the same directory, then a rename.

Every temporary entry lifelong creates beside its output is named
``.<target>.tmp-<pid>[-<random> | .<ext>]`` (a file, or the directory of
``lifelong.data.io.atomic_output_dir``), and a replaced output directory is parked as
``.<target>.old-<pid>`` for the instant of the swap. A command killed mid-write leaves such an
entry behind; :func:`clean_stale_temps`, called by every writer before it writes into a
directory, removes those whose owning process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TEMP = re.compile(r"\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:[-.].*)?")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    if pid <= 0:
        return True  # not one process: never judged dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return True  # not a pid at all: leave the entry alone
    return True


def clean_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary entries in ``directory`` left by writers that died; returns them.

    An entry is stale when its name follows lifelong's temporary naming (see the module
    docstring) and the process id it carries is no longer alive; entries of live processes
    (this one included) are kept. A stale ``.<target>.old-<pid>`` is the previous output of a
    swap killed half-way: when ``<target>`` is missing it is put back, otherwise removed.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for name in (".rows.tmp-999999999", f".rows.tmp-{os.getpid()}-x1", "rows"):
        ...         os.mkdir(os.path.join(d, name))
        ...     removed = [p.name for p in clean_stale_temps(d)]
        ...     removed, len(os.listdir(d))
        (['.rows.tmp-999999999'], 2)
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        target = directory / m["target"]
        try:
            if m["kind"] == "old" and not os.path.lexists(target):
                os.replace(path, target)  # the swap died between parking the old output and the rename
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            continue  # another process cleaned it first, or it cannot be removed: leave it
        removed.append(path)
    return removed


def write_atomic(path: str | os.PathLike[str], content: str | bytes | Callable[[Any], None]) -> None:
    """Write ``content`` (text, bytes, or a function writing to a binary file) to ``path`` through
    a temporary file in the same directory and a rename: ``path`` is whole or as it was.

    Stale temporaries of killed writers in that directory are removed first (:func:`clean_stale_temps`).
    """
    path = Path(path)
    clean_stale_temps(path.parent)
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
