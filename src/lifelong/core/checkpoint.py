"""Checkpoint files written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
