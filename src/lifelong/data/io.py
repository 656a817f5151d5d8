"""Reading and writing dataset directories: validated reads, atomic writes.

A dataset directory (a simulated world or an ingested real dataset) holds ``items.parquet``,
``events.parquet``, ``users.parquet``, optionally ``oracle.parquet`` (simulated worlds), and a
JSON metadata file (``world.json`` or ``dataset.json``) with the protocol dates.

Writers never leave half-written output: everything goes to a temporary sibling first and is
renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lifelong.core.atomic import write_atomic
from lifelong.core.errors import DataError
from lifelong.data.schema import TABLES
from lifelong.data.validate import require_file, validate_table

META_FILES = ("world.json", "dataset.json")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    Args:
        out: the final directory.
        overwrite: replace an existing ``out``; otherwise refuse with a clear error.

    Example::

        with atomic_output_dir("worlds/small") as tmp:
            write_parquet(table, tmp / "events.parquet")
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(out, "output already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_parquet(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write ``table`` to ``path`` via a temporary file and a rename.

    Row groups and statistics are fixed so the same table always gives the same bytes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20, write_statistics=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_table(path: str | os.PathLike[str], kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file of a declared kind and validate it.

    Args:
        path: the Parquet file.
        kind: ``items``, ``events``, ``users`` or ``oracle``.
        columns: read only these columns (validation then covers what was read).

    Raises:
        DataError: the file is missing, unreadable (e.g. truncated) or violates the schema.
    """
    path = require_file(Path(path))
    try:
        present = set(pq.read_schema(path).names)
        for name in columns or TABLES[kind].names:
            if name not in present:
                raise DataError(path, "missing column", column=name)
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"not a readable Parquet file ({exc})") from None
    return validate_table(table, kind, path, columns=columns)


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the dataset's metadata (``world.json`` or ``dataset.json``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, "dataset directory not found")
    for name in META_FILES:
        p = directory / name
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(p, f"invalid JSON ({exc})") from None
    raise DataError(directory, f"no metadata file ({' or '.join(META_FILES)})")


@dataclass
class Dataset:
    """A validated dataset directory held in memory.

    Args:
        path: where it was read from.
        meta: the metadata JSON (protocol dates, config, provenance).
        items, events, users: the tables, validated.
        oracle: true head probabilities per shown item (simulated worlds), else None.
    """

    path: Path
    meta: dict[str, Any]
    items: pa.Table
    events: pa.Table
    users: pa.Table
    oracle: pa.Table | None = None


def load_dataset(directory: str | os.PathLike[str], with_oracle: bool = True) -> Dataset:
    """Read and validate every table of a dataset directory.

    Raises:
        DataError: a file is missing, corrupted, or events refer to unknown items.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    items = read_table(directory / "items.parquet", "items")
    events = read_table(directory / "events.parquet", "events")
    users = read_table(directory / "users.parquet", "users")
    oracle = None
    if with_oracle and (directory / "oracle.parquet").exists():
        oracle = read_table(directory / "oracle.parquet", "oracle")
    known = pa.compute.is_in(events.column("item_id"), value_set=items.column("item_id"))
    if not pa.compute.all(known).as_py():
        bad = int(pa.compute.index(known, False).as_py())
        raise DataError(directory / "events.parquet", f"unknown item_id {events.column('item_id')[bad].as_py()}",
                        column="item_id", row=bad)
    return Dataset(directory, meta, items, events, users, oracle)
