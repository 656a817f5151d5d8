"""Checkpoint files written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import torch

from lifelong.core.atomic import write_atomic


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a reader never sees half a file."""
    write_atomic(path, lambda f: torch.save(obj, f))
