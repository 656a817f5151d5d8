"""Reading and writing dataset directories: validated reads, atomic writes.

A dataset directory (a simulated world or an ingested real dataset) holds ``items.parquet``,
``events.parquet``, ``users.parquet``, optionally ``oracle.parquet`` (simulated worlds), and a
JSON metadata file (``world.json`` or ``dataset.json``) with the protocol dates.

Writers never leave half-written output: everything goes to a temporary sibling first and is
renamed into place only when complete; temporaries left by a killed writer are removed by the
next one (:func:`lifelong.core.atomic.clean_stale_temps`).

Every Parquet file lifelong writes or reads goes through this module, so that each is written
with page checksums (CRC32 of every data page) and each read verifies them: a flipped byte
is a :class:`DataError` naming the file, never wrong numbers. Writers: :func:`write_parquet`,
:func:`parquet_writer`; readers: :func:`read_table` (validated), :func:`read_parquet`,
:func:`iter_parquet_batches`, :func:`open_dataset`. Files written without checksums (before
they were added) read as before: there is nothing to verify.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lifelong.core.atomic import clean_stale_temps, write_atomic
from lifelong.core.errors import DataError
from lifelong.data.schema import TABLES
from lifelong.data.validate import require_file, validate_table

META_FILES = ("world.json", "dataset.json")

#: Options of every Parquet file lifelong writes. Row groups and statistics are fixed so the
#: same table always gives the same bytes; page checksums let every read detect corruption.
PARQUET_WRITE_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_statistics": True, "write_page_checksum": True}
#: Options of every Parquet read: verify the page checksums (a file without them passes).
PARQUET_READ_OPTIONS: dict[str, Any] = {"page_checksum_verification": True}
ROW_GROUP_SIZE = 1 << 20


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
    clean_stale_temps(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
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


def write_parquet(table: pa.Table, path: str | os.PathLike[str], **options: Any) -> None:
    """Write ``table`` to ``path`` with page checksums, via a temporary file and a rename.

    Row groups and statistics are fixed so the same table always gives the same bytes;
    ``options`` (``pyarrow.parquet.write_table`` keywords) override :data:`PARQUET_WRITE_OPTIONS`.
    """
    kw = {**PARQUET_WRITE_OPTIONS, "row_group_size": ROW_GROUP_SIZE, **options}
    write_atomic(path, lambda f: pq.write_table(table, f, **kw))


def parquet_writer(path: str | os.PathLike[str], schema: pa.Schema, **options: Any) -> pq.ParquetWriter:
    """A ``ParquetWriter`` with lifelong's options (page checksums), for files written in pieces.

    It writes ``path`` in place: open it inside :func:`atomic_output_dir`.
    """
    return pq.ParquetWriter(path, schema, **{**PARQUET_WRITE_OPTIONS, **options})


class NpyWriter:
    """An ``.npy`` file of a known shape written block by block along its first axis, in order.

    For arrays larger than memory: each block goes to the file as it comes (plain writes, not a
    memory map, whose written pages would stay mapped and count as the process's memory). The
    file is what ``np.save`` of the whole array writes. Write it inside :func:`atomic_output_dir`;
    :meth:`close` checks that every row came.

    Example::

        with NpyWriter(path, np.int32, (4, 2)) as w:
            w.write(np.zeros((3, 2), np.int32))
            w.write(np.ones((1, 2), np.int32))
    """

    def __init__(self, path: str | os.PathLike[str], dtype: Any, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape, self.rows = Path(path), np.dtype(dtype), tuple(shape), 0
        self._file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or block.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: a block of {block.dtype} {block.shape} does not fit {self.dtype} {self.shape}")
        if self.rows + block.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path.name}: more than {self.shape[0]} rows written")
        self._file.write(np.ascontiguousarray(block).tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        self._file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} of {self.shape[0]} rows written")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # the atomic output directory is discarded: do not mask the error with a row count
            self._file.close()


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
        table = pq.read_table(path, columns=columns, **PARQUET_READ_OPTIONS)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from None
    return validate_table(table, kind, path, columns=columns)


def _unreadable(path: Path, exc: BaseException) -> DataError:
    """The one-line error of a Parquet file pyarrow cannot read (truncated, corrupted page, bad checksum)."""
    return DataError(path, f"not a readable Parquet file ({' '.join(str(exc).split())})")


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, verifying its page checksums, without schema validation.

    Raises:
        DataError: the file is missing, unreadable or corrupted.
    """
    path = require_file(Path(path))
    try:
        return pq.read_table(path, columns=columns, **PARQUET_READ_OPTIONS)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from None


def iter_parquet_batches(path: str | os.PathLike[str], columns: Sequence[str] | None = None,
                         batch_size: int = 1 << 16) -> Iterator[pa.RecordBatch]:
    """Record batches of a Parquet file, streamed, with page checksums verified as pages are read.

    Raises:
        DataError: the file is missing, unreadable or corrupted (possibly after some batches).
    """
    path = require_file(Path(path))
    try:
        with pq.ParquetFile(path, **PARQUET_READ_OPTIONS) as f:
            yield from f.iter_batches(batch_size=batch_size, columns=None if columns is None else list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from None


def open_dataset(path: str | os.PathLike[str]):
    """A ``pyarrow.dataset.Dataset`` over Parquet ``path`` whose scans verify page checksums.

    Scans raise ``OSError`` on a corrupted page; callers turn it into a :class:`DataError`.
    """
    import pyarrow.dataset as pads

    fmt = pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(**PARQUET_READ_OPTIONS))
    return pads.dataset(path, format=fmt)


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
