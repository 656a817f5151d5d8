"""Schema and invariant checks used by every reader of lifelong's tables.

Each check names the file, the column and the first bad row, so a user can find the problem
without reading our code. Checks are vectorised; they cost a few passes over the columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lifelong.core.errors import DataError
from lifelong.data.schema import EMBED_DIM, KNOWN_ACTION_BITS, SURFACES, TABLES


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def _check_embedding(path: object, name: str, col: pa.ChunkedArray) -> np.ndarray:
    """Return the embedding column as an (n, EMBED_DIM) array or raise a DataError."""
    if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type)
            or pa.types.is_large_list(col.type)):
        raise DataError(path, f"expected a list of {EMBED_DIM} floats, got {col.type}", column=name)
    if not pa.types.is_floating(col.type.value_type):
        raise DataError(path, f"expected float embedding values, got {col.type.value_type}", column=name)
    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        if width != EMBED_DIM:
            raise DataError(path, f"wrong embedding width {width}, expected {EMBED_DIM}", column=name, row=0 if len(arr) else None)
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        bad = _first(lengths != EMBED_DIM)
        if bad is not None:
            raise DataError(path, f"wrong embedding width {lengths[bad]}, expected {EMBED_DIM}", column=name, row=bad)
    values = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, EMBED_DIM)
    bad = _first(~np.isfinite(values).all(axis=1))
    if bad is not None:
        raise DataError(path, "NaN or infinite embedding value", column=name, row=bad)
    return values


def validate_table(table: pa.Table, kind: str, path: object = "<memory>",
                   columns: list[str] | None = None) -> pa.Table:
    """Check ``table`` against the schema of ``kind`` and the table's invariants.

    Args:
        table: the table as read.
        kind: one of ``items``, ``events``, ``users``, ``oracle``.
        path: the file it came from, for error messages.
        columns: check only these columns (a reader that reads a subset); default all.

    Returns:
        The table cast to the declared schema (column order and nullability normalised).

    Raises:
        DataError: naming the file, the column and the first bad row.

    Example::

        >>> import pyarrow as pa
        >>> validate_table(pa.table({"user_id": [1]}), "users", "u.parquet")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.DataError: u.parquet, column 'first_ts_ms': missing column
    """
    schema = TABLES[kind]
    if columns is not None:
        unknown = sorted(set(columns) - set(schema.names))
        if unknown:
            raise ValueError(f"{kind} has no columns {unknown}")
        schema = pa.schema([f for f in schema if f.name in columns], metadata=schema.metadata)
    for field in schema:
        if field.name not in table.column_names:
            raise DataError(path, "missing column", column=field.name)
        col = table.column(field.name)
        if field.name == "embedding":
            _check_embedding(path, field.name, col)
        elif col.type != field.type:
            raise DataError(path, f"wrong type {col.type}, expected {field.type}", column=field.name)
        if col.null_count:
            bad = _first(pc.is_null(col).to_numpy(zero_copy_only=False))
            raise DataError(path, "null value", column=field.name, row=bad)
    table = table.select(schema.names)
    if columns is not None:
        if kind == "events":
            _check_events(path, table)
        return table
    if kind == "items":
        ids = table.column("item_id").to_numpy()
        uniq, first_idx, counts = np.unique(ids, return_index=True, return_counts=True)
        if uniq.size != ids.size:
            dup = uniq[counts > 1][0]
            raise DataError(path, f"duplicate item_id {dup}", column="item_id", row=int(np.flatnonzero(ids == dup)[1]))
        _check_nonneg(path, table, "duration_ms")
        table = table.cast(schema)  # fixed-size fp16 embedding, declared nullability
    elif kind == "events":
        _check_events(path, table)
    elif kind in ("users", "oracle"):
        _check_nonneg(path, table, "user_id")
    return table.replace_schema_metadata(schema.metadata)


def _check_nonneg(path: object, table: pa.Table, name: str) -> None:
    bad = _first(table.column(name).to_numpy() < 0)
    if bad is not None:
        raise DataError(path, "negative value", column=name, row=bad)


def _check_events(path: object, table: pa.Table) -> None:
    names = set(table.column_names)
    if "action_mask" in names:
        mask = table.column("action_mask").to_numpy()
        bad = _first((mask & ~np.uint16(KNOWN_ACTION_BITS)) != 0)
        if bad is not None:
            raise DataError(path, f"unknown action bits {int(mask[bad]) & ~KNOWN_ACTION_BITS:#x}",
                            column="action_mask", row=bad)
        bad = _first(mask == 0)
        if bad is not None:
            raise DataError(path, "an event needs at least one action bit", column="action_mask", row=bad)
    if "surface" in names:
        surface = table.column("surface").to_numpy()
        bad = _first((surface < 0) | (surface >= len(SURFACES)))
        if bad is not None:
            raise DataError(path, f"unknown surface code {surface[bad]}", column="surface", row=bad)
    if "dwell_ms" in names:
        _check_nonneg(path, table, "dwell_ms")
    if "ts_ms" in names:
        _check_nonneg(path, table, "ts_ms")
    if not {"user_id", "ts_ms"} <= names:
        return
    users = table.column("user_id").to_numpy()
    ts = table.column("ts_ms").to_numpy()
    if users.size > 1:
        bad = _first(users[1:] < users[:-1])
        if bad is not None:
            raise DataError(path, "events must be grouped by user in ascending user_id", column="user_id", row=bad + 1)
        same_user = users[1:] == users[:-1]
        bad = _first(same_user & (ts[1:] < ts[:-1]))
        if bad is not None:
            raise DataError(path, "timestamps go backwards within a user", column="ts_ms", row=bad + 1)


def require_file(path: Path) -> Path:
    """Raise a DataError unless ``path`` is an existing file."""
    if not path.is_file():
        raise DataError(path, "file not found")
    return path
