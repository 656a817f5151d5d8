"""Parameter sync shared by every online-trained ranker: the delta, its wire format, and the replicas that apply it.

A trainer (Monolith's :class:`~lifelong.monolith.online.OnlineTrainer`, whatever model it
trains) hands out :class:`Delta` s: the table rows touched since the previous one, the dense
weights now and then, a version, the version it applies on top of (None: a full snapshot), and
the trainer's lineage. They travel to a running service (``POST /admin/sync``) as one
``application/octet-stream`` body: an uncompressed ``.npz`` (read back with
``allow_pickle=False``, so a payload can only ever be arrays) holding every table's ids,
values, removed ids and default row, the dense weights when the delta carries them, and a
``meta`` entry with the versions, the watermark, the stream offset, the model's kind and its
configuration (plain data; the receiving ranker checks it is the model it serves).

Two receiving ends apply deltas in order and refuse one that does not follow (:func:`check_follows`):

- :class:`ParameterReplica` keeps the rows as sorted arrays (Monolith's online ranker serves from
  frozen copies of it);
- :class:`InPlaceReplica` writes into a served model's own collision-less tables
  (:meth:`~lifelong.tables.table.EmbeddingTable.assign`) and dense tensors (``copy_``), so the
  optimized path scores with the pushed parameters without rebuilding anything. The caller
  applies it between two batches.

Example::

    payload = encode_delta(trainer.delta(), *trainer.model.wire_model())
    delta, kind, model = decode_delta(payload)
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lifelong.core.errors import DataError
from lifelong.core.sorted_index import positions_in
from lifelong.serving.ranking import MalformedDelta
from lifelong.tables.table import EmbeddingTable

__all__ = ["WIRE_FORMAT", "Delta", "InPlaceReplica", "ParameterReplica", "TableDelta", "check_follows", "decode_delta",
           "encode_delta"]

WIRE_FORMAT = "lifelong.sync/1"
_TABLE_FIELDS = ("ids", "values", "removed", "default")
Offset = Any
"""A stream offset (an int, or a Redis entry id and record index): carried, never interpreted here."""


@dataclass(frozen=True)
class TableDelta:
    """The change of one table between two deltas (or all of it, in a full snapshot).

    Args:
        ids: (n,) int64 ascending: rows to insert or replace.
        values: (n, dim) float16 or float32: their new values.
        removed: (m,) int64 ascending, disjoint from ``ids``: ids whose row was dropped
            (expired); they read ``default`` from now on.
        default: (dim,) float32: what ids without a row read.
    """

    ids: np.ndarray
    values: np.ndarray
    removed: np.ndarray
    default: np.ndarray


@dataclass(frozen=True)
class Delta:
    """What serving needs to catch up with the trainer.

    Args:
        version: increases with every delta a trainer lineage hands out, restarts included.
        base_version: the version this delta applies on top of; None for a full snapshot,
            which replaces everything.
        watermark_ms: the trainer's event time (None before any event).
        offset: the stream offset of the next event the trainer will read.
        tables: slot -> its rows.
        dense: the dense weights (the model's dense ``state_dict`` as float32 arrays), or
            None when this delta leaves them as they were.
        lineage: the trainer lineage (checkpoint directory) the versions belong to.
    """

    version: int
    base_version: int | None
    watermark_ms: int | None
    offset: Offset
    tables: dict[str, TableDelta]
    dense: dict[str, np.ndarray] | None
    lineage: str = ""

    @property
    def full(self) -> bool:
        return self.base_version is None

    @property
    def n_rows(self) -> int:
        """Rows carried, over all tables."""
        return sum(len(t.ids) for t in self.tables.values())


def encode_delta(delta: Delta, kind: str, model: Mapping[str, Any]) -> bytes:
    """The wire form of ``delta`` of a model of ``kind`` configured by ``model`` (plain data).

    Example::

        >>> d = Delta(3, 2, 1_000, 17, {"item": TableDelta(np.array([5]), np.ones((1, 4), np.float16),
        ...           np.zeros(0, np.int64), np.zeros(4, np.float32))}, None)
        >>> back, kind, model = decode_delta(encode_delta(d, "toy", {"dim": 4}))
        >>> back.version, back.base_version, back.tables["item"].ids.tolist(), back.dense, kind, model
        (3, 2, [5], None, 'toy', {'dim': 4})
    """
    meta = {"format": WIRE_FORMAT, "version": delta.version, "base_version": delta.base_version,
            "watermark_ms": delta.watermark_ms, "offset": delta.offset, "lineage": delta.lineage,
            "kind": kind, "model": dict(model),
            "tables": sorted(delta.tables), "dense": None if delta.dense is None else sorted(delta.dense)}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for slot, t in delta.tables.items():
        arrays |= {f"table.{slot}.{name}": getattr(t, name) for name in _TABLE_FIELDS}
    for key, value in (delta.dense or {}).items():
        arrays[f"dense.{key}"] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_delta(payload: bytes) -> tuple[Delta, str, dict[str, Any]]:
    """Inverse of :func:`encode_delta`: the delta, the model's kind and its configuration.

    Only the delta's own consistency is checked (shapes); whether it fits the served model is
    the receiver's question.

    Raises:
        MalformedDelta: the payload is not a delta of this format (truncated, foreign, inconsistent).
    """
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile/json raise many types for a bad body
        raise MalformedDelta(f"not a delta ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != WIRE_FORMAT:
        raise MalformedDelta(f"format {meta.get('format') if isinstance(meta, dict) else meta!r} is not "
                             f"{WIRE_FORMAT!r}")
    try:
        tables = {}
        for slot in meta["tables"]:
            t = TableDelta(**{name: arrays[f"table.{slot}.{name}"] for name in _TABLE_FIELDS})
            if (t.ids.ndim != 1 or t.default.ndim != 1 or t.values.shape != (len(t.ids), t.default.shape[0])
                    or t.removed.ndim != 1):
                width = t.default.shape[-1] if t.default.ndim else "?"
                raise MalformedDelta(f"table {slot}: {t.ids.shape} ids, values {t.values.shape} and default "
                                     f"{t.default.shape} do not fit rows of width {width}")
            tables[str(slot)] = t
        dense = None if meta["dense"] is None else {key: arrays[f"dense.{key}"] for key in meta["dense"]}
        delta = Delta(version=int(meta["version"]), base_version=meta["base_version"],
                      watermark_ms=meta["watermark_ms"], offset=meta["offset"], tables=tables, dense=dense,
                      lineage=str(meta["lineage"]))
        kind, model = str(meta["kind"]), meta["model"]
        if not isinstance(model, dict):
            raise MalformedDelta(f"the model configuration is {type(model).__name__}, not a mapping")
    except MalformedDelta:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing key or a bad value: the payload is wrong
        raise MalformedDelta(f"inconsistent delta ({type(exc).__name__}: {exc})") from None
    return delta, kind, model


def check_follows(delta: Delta, version: int | None, lineage: str | None) -> None:
    """Refuse an incremental delta that does not apply on top of ``version`` of ``lineage``.

    Raises:
        DataError: another lineage, or a ``base_version`` other than ``version`` (the trainer
            then sends a full snapshot, which always applies).
    """
    if delta.full:
        return
    if delta.lineage != lineage:
        raise DataError(f"delta {delta.version}", f"from trainer lineage {delta.lineage!r}, the replica holds "
                                                  f"lineage {lineage!r} (wait for a full snapshot)")
    if delta.base_version != version:
        raise DataError(f"delta {delta.version}", f"based on version {delta.base_version}, the replica holds "
                                                  f"version {version} (wait for a full snapshot)")


class ParameterReplica:
    """A receiving end of the trainer's deltas: tables and dense weights as sorted arrays.

    Rows are kept as float32 (fp16 deltas are widened), sorted by id.

    Example::

        >>> replica = ParameterReplica()
        >>> d = lambda v, base, ids: Delta(v, base, None, 0, {"item_id": TableDelta(
        ...     np.array(ids), np.ones((len(ids), 2), np.float16) * v, np.zeros(0, np.int64), np.zeros(2, np.float32))},
        ...     None)
        >>> replica.apply(d(1, None, [3, 5])); replica.apply(d(2, 1, [5, 8]))
        >>> replica.version, replica.vectors("item_id", [3, 5, 8, 9])[:, 0].tolist()
        (2, [1.0, 2.0, 2.0, 0.0])
        >>> replica.apply(d(4, 3, [1]))
        Traceback (most recent call last):
        ...
        lifelong.core.errors.DataError: delta 4: based on version 3, the replica holds version 2 (wait for a full snapshot)
    """

    def __init__(self) -> None:
        self.version: int | None = None
        self.lineage: str | None = None
        self.ids: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        self.defaults: dict[str, np.ndarray] = {}
        self.dense: dict[str, np.ndarray] | None = None

    def apply(self, delta: Delta) -> None:
        """Apply a delta; a full snapshot always applies.

        Raises:
            DataError: an incremental delta whose ``base_version`` is not this replica's version.
        """
        check_follows(delta, self.version, self.lineage)
        if delta.full:
            self.ids, self.values, self.defaults = {}, {}, {}
        for slot, t in delta.tables.items():
            new = np.asarray(t.values, dtype=np.float32)
            if slot in self.ids:
                keep = ~np.isin(self.ids[slot], np.concatenate([t.removed, t.ids]))
                ids = np.concatenate([self.ids[slot][keep], t.ids])
                values = np.concatenate([self.values[slot][keep], new])
                order = np.argsort(ids, kind="stable")
                self.ids[slot], self.values[slot] = ids[order], values[order]
            else:
                self.ids[slot], self.values[slot] = t.ids.copy(), new
            self.defaults[slot] = np.array(t.default, dtype=np.float32)
        if delta.dense is not None:
            self.dense = {k: v.copy() for k, v in delta.dense.items()}
        self.version, self.lineage = delta.version, delta.lineage

    def _positions(self, slot: str, ids: object) -> tuple[np.ndarray, np.ndarray]:
        return positions_in(self.ids[slot], np.asarray(ids, dtype=np.int64))

    def has_rows(self, slot: str, ids: object) -> np.ndarray:
        """Which ``ids`` have a row of their own (the others read the default).

        Raises:
            KeyError: no delta has carried ``slot``.
        """
        return self._positions(slot, ids)[1]

    def vectors(self, slot: str, ids: object) -> np.ndarray:
        """(n, dim) float32 rows of ``ids``; ids without a row read the table's default.

        Raises:
            KeyError: no delta has carried ``slot``.
        """
        pos, hit = self._positions(slot, ids)
        if not len(self.ids[slot]):
            return np.tile(self.defaults[slot], (len(hit), 1))
        return np.where(hit[:, None], self.values[slot][pos], self.defaults[slot])


class InPlaceReplica:
    """Applies deltas to a served model's own tables and dense tensors, in place.

    Not thread-safe against readers: call :meth:`apply` between two batches (the ranker holds
    its batch lock while it does).

    Args:
        tables: slot -> the served model's table (every slot a delta may carry).
        dense: name -> the served model's dense tensor (e.g. a filtered ``state_dict()``,
            whose tensors share storage with the parameters).
        version, lineage: what the model holds now (None: nothing pushed yet, so only a full
            snapshot applies).

    Example::

        >>> from lifelong.tables.table import TableConfig
        >>> table, w = EmbeddingTable(TableConfig(dim=2)), torch.zeros(3)
        >>> replica = InPlaceReplica({"item": table}, {"w": w})
        >>> rows = lambda ids: TableDelta(np.array(ids), np.ones((len(ids), 2), np.float32), np.zeros(0, np.int64),
        ...                               np.zeros(2, np.float32))
        >>> replica.apply(Delta(1, None, None, 0, {"item": rows([4, 9])}, {"w": np.ones(3, np.float32)}, "L"))
        >>> replica.apply(Delta(2, 1, None, 0, {"item": rows([5])}, None, "L"))
        >>> len(table), w.tolist(), replica.version
        (3, [1.0, 1.0, 1.0], 2)
    """

    def __init__(self, tables: Mapping[str, EmbeddingTable], dense: Mapping[str, torch.Tensor],
                 version: int | None = None, lineage: str | None = None):
        self.tables, self.dense = dict(tables), dict(dense)
        self.version, self.lineage = version, lineage

    def check(self, delta: Delta) -> None:
        """Raise what :meth:`apply` would refuse, without changing anything.

        Raises:
            DataError: the delta does not follow (:func:`check_follows`), names a table or a dense
                tensor the model lacks, has rows of another width, lacks a table or the dense
                weights in a full snapshot.
        """
        check_follows(delta, self.version, self.lineage)
        unknown = sorted(set(delta.tables) - set(self.tables))
        if unknown:
            raise MalformedDelta(f"tables {unknown} are not the served model's ({sorted(self.tables)})")
        for slot, t in delta.tables.items():
            if t.default.shape != (self.tables[slot].dim,):
                raise MalformedDelta(f"table {slot}: rows of width {t.default.shape}, the model's are "
                                     f"{self.tables[slot].dim} wide")
        if delta.dense is not None:
            if set(delta.dense) != set(self.dense):
                raise MalformedDelta(f"dense weights {sorted(set(delta.dense) ^ set(self.dense))[:5]} differ from the "
                                     "served model's")
            bad = [k for k, v in delta.dense.items() if tuple(v.shape) != tuple(self.dense[k].shape)]
            if bad:
                raise MalformedDelta(f"dense weights {bad[:5]} have other shapes than the served model's")
        if delta.full and (set(delta.tables) != set(self.tables) or delta.dense is None):
            raise MalformedDelta(f"full snapshot {delta.version} must carry every table and the dense weights")

    @torch.no_grad()
    def apply(self, delta: Delta) -> None:
        """Check, then write the delta into the tables and tensors; a full snapshot replaces every row.

        Raises:
            DataError: as :meth:`check` (nothing is changed then).
        """
        self.check(delta)
        for slot, t in delta.tables.items():
            table = self.tables[slot]
            if delta.full:
                held, _ = table.index.items()
                table.remove(held[~np.isin(held, t.ids)])
            if len(t.removed):
                table.remove(t.removed)
            if len(t.ids):
                table.assign(t.ids, t.values, delta.watermark_ms)
            table.default[:] = np.asarray(t.default, dtype=np.float32)
        for key, value in (delta.dense or {}).items():
            target = self.dense[key]
            target.copy_(torch.from_numpy(np.asarray(value)).to(dtype=target.dtype, device=target.device))
        self.version, self.lineage = delta.version, delta.lineage
