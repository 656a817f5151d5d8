"""DV365 export: the user tower's embeddings, 4-bit quantized, as versions in the key-value store.

Every refresh the user tower embeds all active users; the embeddings go to the serving store
(:mod:`lifelong.store.feature_store`, LMDB or Redis, same URLs) as a new *version*, and readers are
switched to it atomically: a reader sees the previous version whole or the new one whole, never
a mix, and an exporter killed mid-write leaves the previous version served.

Keys (inside the feature store, beside its own; Redis prefixes them with ``lifelong:``):

- ``b"dv365:current"``: the pointer, JSON: the served ``version``, its ``rows``, ``dim``,
  ``as_of_ms``, ``users``, ``run`` and ``history`` (previously served versions, newest first);
- ``b"dv365:versions"``: the registry, JSON: ``next`` version number and ``versions`` begun and
  not yet deleted (served, superseded or abandoned by a killed exporter);
- ``b"dv365:v:" + 12-digit version + b":" + user_key(user_id)``: a user's record, the
  :func:`~lifelong.core.quantization.to_words_4bit` int64 words ``(rows, ceil(dim/16) + 1)``
  (little-endian: codes, 16 nibbles a word, then the row's float32 scale and offset).

An export of version ``v``: (1) lists ``v`` in the registry, so that a version its exporter dies
inside is known; (2) writes all rows of ``v`` batch by batch; (3) switches: one ``put`` of the
pointer (one LMDB write transaction, one Redis ``SET``); (4) deletes every listed version except
the pointer's and the ``keep - 1`` it superseded last. Readers resolve the pointer once per
:meth:`EmbeddingReader.get` and read that version's rows: with LMDB pointer and rows come from one
read transaction (one snapshot); with Redis they are two round trips, so a version stays readable
until ``keep - 1`` further switches have passed (a read that finds rows missing re-resolves).

One exporter at a time per store (the scheduler runs them in sequence). ``lifelong store load``
keeps the exported embeddings (its own records are versioned under other keys) unless it is
given ``--drop-embeddings``.

Example::

    summary = export_embeddings(load_tower("runs/dv365"), "worlds/lifelong", "lmdb:///srv/emb",
                                as_of_ms=1_735_603_200_000)
    print(f"v{summary.version}: {summary.users:,} users, {summary.compression_ratio:.2f}x vs fp32")
    with EmbeddingReader("lmdb:///srv/emb") as reader:
        emb, version = reader.get([3, 5])  # float32 (2, rows, dim), dequantized
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.dataset as pads

from lifelong.core.engines import ShardMap, map_local
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.quantization import (
    quantize_4bit,
    to_words_4bit,
)
from lifelong.data.io import open_dataset, read_meta
from lifelong.data.protocol import DAY_MS
from lifelong.data.protocol import Protocol as DataProtocol
from lifelong.store.embeddings import (
    POINTER_KEY,
    REGISTRY_KEY,
    EmbeddingReader,
    decode_records,
    read_json,
    version_prefix,
)
from lifelong.store.feature_store import (
    EMBEDDINGS_LOCK,
    FeatureStore,
    WriterLock,
    collect_versions,
    json_record,
    open_store,
    user_key,
)

__all__ = [
    "EmbeddingReader", "EmbeddingTower", "decode_records", "ExportConfig", "ExportSummary", "active_users", "default_as_of_ms",
    "export_embeddings", "version_prefix",
]

class EmbeddingTower(Protocol):
    """What the exporter needs of a user tower (``lifelong.dv365`` towers, or a test's fake)."""

    def embed_users(self, world_dir: str | os.PathLike[str], user_ids: np.ndarray, as_of_ms: int,
                    gap_ms: int | None = None) -> np.ndarray:
        """float32 ``(len(user_ids), rows, dim)`` embeddings from the events before ``as_of_ms``."""


@dataclass(frozen=True)
class ExportConfig:
    """How an export runs.

    Args:
        batch_users: users embedded, quantized and written per batch (one store write each;
            4,096 users of a (66, 32) tower are 35 MB of fp32).
        keep: versions kept after the switch: the new one and the ``keep - 1`` it superseded
            last (so that a reader that resolved the pointer just before the switch still
            finds its rows); older and abandoned versions are deleted.
        active_window_ms: a user is active when they have an event in
            ``[as_of - active_window_ms, as_of)``.
        gap_ms: passed to the tower (its distant-interest gap); None for the tower's default.
    """

    batch_users: int = 4096
    keep: int = 2
    active_window_ms: int = 30 * DAY_MS
    gap_ms: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("batch_users", 1), ("keep", 1), ("active_window_ms", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"export {name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote.

    Args:
        url: the store.
        version: the version now served.
        users: users exported.
        rows, dim: each user's embedding shape.
        as_of_ms: the embeddings use the events before this time.
        bytes_written: bytes of the version's records (codes, scales and offsets).
        deleted: versions garbage-collected after the switch.
        seconds: wall time of the export, tower included.
    """

    url: str
    version: int
    users: int
    rows: int
    dim: int
    as_of_ms: int
    bytes_written: int
    deleted: tuple[int, ...]
    seconds: float

    @property
    def bytes_per_user(self) -> int:
        return self.bytes_written // self.users

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes of a user's embedding over the bytes stored for it."""
        return 4 * self.rows * self.dim / self.bytes_per_user


def default_as_of_ms(world_dir: str | os.PathLike[str]) -> int:
    """The dataset's "now": the end of its evaluation period (its last event time, exclusive)."""
    meta = read_meta(world_dir)
    try:
        return DataProtocol.from_meta(meta).eval_end_ms
    except (KeyError, TypeError, ValueError):
        raise DataError(world_dir, "its metadata has no protocol dates: give the export time (--as-of)") from None


def active_users(world_dir: str | os.PathLike[str], as_of_ms: int, window_ms: int = 30 * DAY_MS) -> np.ndarray:
    """Sorted ids of the users with an event in ``[as_of_ms - window_ms, as_of_ms)``.

    One filtered scan of ``events.parquet`` (two columns; 85M events in about 1.5 s).

    Raises:
        DataError: the events file is missing or unreadable.
    """
    path = Path(world_dir) / "events.parquet"
    if not path.is_file():
        raise DataError(path, "missing: not a dataset directory")
    ts = pads.field("ts_ms")
    try:
        table = open_dataset(path).to_table(columns=["user_id"],
                                           filter=(ts >= int(as_of_ms) - int(window_ms)) & (ts < int(as_of_ms)))
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot scan the events ({exc})") from None
    return np.unique(table.column("user_id").to_numpy()).astype(np.int64)


@contextmanager
def _opened(store: str | os.PathLike[str] | FeatureStore, writable: bool) -> Iterator[FeatureStore]:
    """``store`` itself when it is open already (left open), else the store its URL names (closed after)."""
    if isinstance(store, FeatureStore):
        yield store
        return
    with open_store(store, writable=writable) as opened:
        yield opened


def _put_json(lock: WriterLock, key: bytes, obj: dict[str, Any]) -> None:
    """A registry or pointer write, fenced: only while this exporter still holds its lock (Redis:
    an exporter that stalled past the lock's expiry never overwrites a newer export's pointer)."""
    lock.put([(key, json_record(obj))])


def export_embeddings(tower: EmbeddingTower, world_dir: str | os.PathLike[str],
                      store: str | os.PathLike[str] | FeatureStore, as_of_ms: int,
                      config: ExportConfig = ExportConfig(), user_ids: np.ndarray | None = None,
                      run: str | None = None, on_batch: Callable[[int], None] | None = None,
                      shard_map: ShardMap = map_local) -> ExportSummary:
    """Embed users with ``tower``, write them as a new version of ``store`` and switch to it.

    Args:
        tower: anything with ``embed_users`` (:class:`EmbeddingTower`).
        world_dir: the dataset the tower reads.
        store: a store URL (see :func:`~lifelong.store.feature_store.open_store`), or a writable open store.
        as_of_ms: embeddings use the events before this time.
        config: batch size, versions kept, activity window, tower gap.
        user_ids: the users to export; default: :func:`active_users` at ``as_of_ms``.
        run: provenance recorded in the pointer (e.g. the tower's run directory).
        on_batch: called with the number of users written so far after each batch.
        shard_map: the engine that embeds the batches (:mod:`lifelong.core.engines`): here, or one
            Ray task per batch (the tower and ``world_dir`` must then reach the workers). Batches
            are written here, in order, either way.

    Returns:
        :class:`ExportSummary`, with the compression ratio against fp32.

    Raises:
        DataError: no users to export, or the tower returned embeddings of the wrong shape or
            non-finite values (nothing is switched: the previous version stays served).
    """
    start = time.perf_counter()
    users = active_users(world_dir, as_of_ms, config.active_window_ms) if user_ids is None \
        else np.unique(np.asarray(user_ids, dtype=np.int64))
    if users.size == 0:
        raise DataError(world_dir, f"no active users to export at as_of_ms={as_of_ms}")
    with _opened(store, writable=True) as opened, opened.writer_lock(role="export", name=EMBEDDINGS_LOCK) as lock:
        registry = read_json(opened, REGISTRY_KEY) or {"next": 1, "versions": []}
        version = int(registry["next"])
        # Listed before its first row: a version whose exporter dies is still found and deleted.
        _put_json(lock, REGISTRY_KEY, {"next": version + 1, "versions": [*registry["versions"], version]})
        prefix = version_prefix(version)
        shape: tuple[int, int] | None = None
        written = 0
        # No bar of its own: the tower shows one per batch (rich allows one live display at a time).
        batches = [users[lo:lo + config.batch_users] for lo in range(0, users.size, config.batch_users)]
        embedded = shard_map(_embed_batch, (tower, world_dir, int(as_of_ms), config.gap_ms), [(b,) for b in batches])
        for lo, batch, emb in zip(range(0, users.size, config.batch_users), batches, embedded):
            shape = _check_embeddings(emb, batch.size, shape, world_dir)
            records = to_words_4bit(quantize_4bit(emb)).reshape(batch.size, -1).tobytes()
            step = len(records) // batch.size
            opened.put([(prefix + user_key(u), records[i * step:(i + 1) * step]) for i, u in enumerate(batch.tolist())])
            written += len(records)
            if on_batch is not None:
                on_batch(lo + batch.size)
        rows, dim = shape
        previous = read_json(opened, POINTER_KEY)
        history = [] if previous is None else [previous["version"], *previous["history"]][:config.keep - 1]
        _put_json(lock, POINTER_KEY, {"version": version, "rows": rows, "dim": dim, "as_of_ms": int(as_of_ms),
                                        "users": int(users.size), "run": run, "history": history})
        deleted = collect_versions(opened, lock, REGISTRY_KEY, version_prefix, keep={version, *history})
        url = opened.url
    return ExportSummary(url, version, int(users.size), rows, dim, int(as_of_ms), written, deleted,
                         round(time.perf_counter() - start, 3))


def _embed_batch(tower: EmbeddingTower, world_dir: str | os.PathLike[str], as_of_ms: int, gap_ms: int | None,
                 batch: np.ndarray) -> np.ndarray:
    """One shard of an export: the tower's embeddings of a batch of users (checked and written by the caller)."""
    return np.asarray(tower.embed_users(world_dir, batch, as_of_ms, gap_ms))


def _check_embeddings(emb: np.ndarray, n_users: int, shape: tuple[int, int] | None,
                      world_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """The ``(rows, dim)`` of a batch from the tower, checked against the batches before it."""
    if emb.ndim != 3 or emb.shape[0] != n_users or 0 in emb.shape or not np.issubdtype(emb.dtype, np.floating):
        raise DataError(world_dir, f"the tower returned {emb.dtype} {emb.shape} for {n_users} users; expected "
                                   "float (users, rows, dim)")
    if shape is not None and emb.shape[1:] != shape:
        raise DataError(world_dir, f"the tower returned rows x dim {emb.shape[1:]} after {shape}")
    if not np.isfinite(emb).all():
        raise DataError(world_dir, "the tower returned NaN or infinite embedding values")
    return emb.shape[1], emb.shape[2]

