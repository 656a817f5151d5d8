"""Incremental parameter sync: the trainer's deltas on the wire to a running ``lifelong serve``.

A :class:`~lifelong.monolith.online.Delta` travels as one ``application/octet-stream`` body: an
uncompressed ``.npz`` (read back with ``allow_pickle=False``, so a payload can only ever be
arrays) holding every table's ids, values, removed ids and default row, the dense weights when
the delta carries them, and a ``meta`` entry with the versions, the watermark, the stream offset
and the ranker's configuration (serving builds the dense layers from it).

:class:`Syncer` is the trainer's side: each :meth:`Syncer.sync` takes the next delta and posts
it to ``<serve>/admin/sync``. The service answers 200 when it applied it, 409 when the delta
does not follow the version it holds (it restarted, or an earlier push was lost): the next sync
is then a full snapshot, as it is after any failed push, because a delta once taken cannot be
taken again.

Example::

    syncer = Syncer(trainer, "http://127.0.0.1:8000")
    trainer.run(max_seconds=10)
    reply = syncer.sync()          # SyncReply(version=7, applied=True, rows=1234, full=False, ...)
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import numpy as np

from lifelong.monolith.online import Delta, TableDelta
from lifelong.monolith.ranker import SLOTS, OnlineRankerConfig
from lifelong.serving.ranking import SYNC_PATH, MalformedDelta

if TYPE_CHECKING:
    from lifelong.monolith.online import OnlineTrainer

__all__ = ["SYNC_PATH", "MalformedDelta", "SyncReply", "Syncer", "decode_delta", "encode_delta"]

WIRE_FORMAT = "lifelong.monolith.sync/1"
_TABLE_FIELDS = ("ids", "values", "removed", "default")


def encode_delta(delta: Delta, model: OnlineRankerConfig) -> bytes:
    """The wire form of ``delta`` of a ranker shaped by ``model``.

    Example::

        >>> d = Delta(3, 2, 1_000, 17, {"user_id": TableDelta(np.array([5]), np.ones((1, 16), np.float16),
        ...           np.zeros(0, np.int64), np.zeros(16, np.float32))}, None)
        >>> back, cfg = decode_delta(encode_delta(d, OnlineRankerConfig()))
        >>> back.version, back.base_version, back.tables["user_id"].ids.tolist(), back.dense, cfg == OnlineRankerConfig()
        (3, 2, [5], None, True)
    """
    meta = {"format": WIRE_FORMAT, "version": delta.version, "base_version": delta.base_version,
            "watermark_ms": delta.watermark_ms, "offset": delta.offset, "lineage": delta.lineage,
            "model": model.to_dict(),
            "tables": sorted(delta.tables), "dense": None if delta.dense is None else sorted(delta.dense)}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for slot, t in delta.tables.items():
        arrays |= {f"table.{slot}.{name}": getattr(t, name) for name in _TABLE_FIELDS}
    for key, value in (delta.dense or {}).items():
        arrays[f"dense.{key}"] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_delta(payload: bytes) -> tuple[Delta, OnlineRankerConfig]:
    """Inverse of :func:`encode_delta`.

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
        model = OnlineRankerConfig.from_dict(meta["model"])
        tables = {}
        for slot in meta["tables"]:
            if slot not in SLOTS:
                raise MalformedDelta(f"unknown id slot {slot!r}")
            t = TableDelta(**{name: arrays[f"table.{slot}.{name}"] for name in _TABLE_FIELDS})
            dim = model.tables[slot].dim
            if t.ids.ndim != 1 or t.values.shape != (len(t.ids), dim) or t.default.shape != (dim,):
                raise MalformedDelta(f"table {slot}: {t.ids.shape} ids, values {t.values.shape} and default "
                                       f"{t.default.shape} do not fit rows of width {dim}")
            tables[slot] = t
        dense = None if meta["dense"] is None else {key: arrays[f"dense.{key}"] for key in meta["dense"]}
        delta = Delta(version=int(meta["version"]), base_version=meta["base_version"],
                      watermark_ms=meta["watermark_ms"], offset=meta["offset"], tables=tables, dense=dense,
                      lineage=str(meta["lineage"]))
    except MalformedDelta:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing key or a bad config: the payload is wrong
        raise MalformedDelta(f"inconsistent delta ({type(exc).__name__}: {exc})") from None
    if delta.full and (set(tables) != set(SLOTS) or dense is None):
        raise MalformedDelta(f"full snapshot {delta.version} must carry every table and the dense weights")
    return delta, model


@dataclass(frozen=True)
class SyncReply:
    """The outcome of one push.

    Args:
        version: the delta's version.
        applied: the service applied it.
        full: it was a full snapshot.
        rows: table rows it carried.
        bytes: payload size.
        seconds: wall time of the push (encoding, transfer, apply).
        error: why it was not applied (None when it was).
    """

    version: int
    applied: bool
    full: bool
    rows: int
    bytes: int
    seconds: float
    error: str | None = None


class Syncer:
    """Pushes a trainer's deltas to a ranking service; see the module docstring.

    Args:
        trainer: the online trainer whose :meth:`~lifelong.monolith.online.OnlineTrainer.delta` to push.
        serve_url: the service's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout_s: per-push HTTP timeout.
    """

    def __init__(self, trainer: OnlineTrainer, serve_url: str, timeout_s: float = 30.0):
        self.trainer = trainer
        self.url = serve_url.rstrip("/") + SYNC_PATH
        self._http = httpx.Client(timeout=timeout_s)
        self._need_full = True

    def sync(self) -> SyncReply:
        """Take the next delta (full after a failure) and push it; never raises for a failed push."""
        t0 = time.perf_counter()
        delta = self.trainer.delta(full=self._need_full)
        payload = encode_delta(delta, self.trainer.cfg.model)
        error = None
        try:
            r = self._http.post(self.url, content=payload, headers={"content-type": "application/octet-stream"})
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._need_full = error is not None
        return SyncReply(version=delta.version, applied=error is None, full=delta.full, rows=delta.n_rows,
                         bytes=len(payload), seconds=time.perf_counter() - t0, error=error)

    def close(self) -> None:
        self._http.close()
