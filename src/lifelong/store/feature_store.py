"""The serving feature store: users' sequences, the item table and metadata in a key-value store.

Serving (docs/design.md, "Serving") fetches each user's full stored history once per request and the
item table once at startup. Both live in a key-value store behind one interface,
:class:`FeatureStore`, with two backends:

- :class:`~lifelong.store.lmdb_store.LMDBStore` (the embedded default): a memory-mapped LMDB
  environment; reads inside a read transaction return ``memoryview`` s into the map, so
  decoded arrays are views of the page cache, copied nowhere;
- :class:`~lifelong.store.redis_store.RedisStore` (multi-host): a Redis database; many users
  are fetched in one ``MGET`` round trip and decoded as views over the returned ``bytes``.

Keys (the same in both; Redis prefixes them with ``lifelong:`` so that ``clear`` leaves other
data of a shared database alone):

- ``b"u:" + user_id`` as 8 bytes big-endian: a :class:`UserSequences` record;
- ``b"items"``: the :class:`ItemRecords` blob;
- ``b"meta"``: JSON: caps and layout of the built dataset, int8 scale, counts, provenance.

:func:`load_store` fills a store from a built dataset (``lifelong transact build``) and its source
events; ``meta`` is written last, so a store whose ``meta`` is present holds a complete load.
:func:`open_store` picks the backend from a URL (:mod:`lifelong.store.urls`) and imports only
that backend's module and client library (``lmdb`` or ``redis``).

Example::

    summary = load_store("datasets/small", "lmdb:///srv/store")
    with open_store("lmdb:///srv/store") as store, store.reader() as r:
        meta, [seq] = r.meta(), r.users([42])
        tl = seq.timeline(request_ms, meta["ll_cap"], meta["rt"], meta["imp_cap"])
        ll_emb = seq.emb[tl.ll]  # int8 (|S_LL|, 32), a view into the store's memory map: copy
                                 # what must outlive the reader block (UserSequences.copy)
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

import lifelong
from lifelong.core.errors import DataError
from lifelong.core.progress import progress as progress_bar
from lifelong.core.quantization import INT8_SCALE
from lifelong.data.io import load_dataset
from lifelong.data.schema import EMBED_DIM
from lifelong.data.timelines import EventIndex
from lifelong.store.sequences import (
    FORMAT_VERSION,
    Buffer,
    ItemRecords,
    TimelineRanges,
    UserSequences,
    iter_user_sequences,
)
from lifelong.store.urls import FEATURE_STORE, parse_url

__all__ = [
    "FeatureStore", "ItemRecords", "StoreReader", "TimelineRanges", "UserSequences", "load_store", "open_store",
    "user_key",
]

USER_PREFIX = b"u:"
ITEMS_KEY = b"items"
META_KEY = b"meta"
_USER_KEY = struct.Struct(">q")


def user_key(user_id: int) -> bytes:
    """The store key of a user's record: fixed width, and sorted like the ids (for ids >= 0).

    Example::

        >>> user_key(258)
        b'u:\\x00\\x00\\x00\\x00\\x00\\x00\\x01\\x02'
    """
    return USER_PREFIX + _USER_KEY.pack(int(user_id))


class StoreReader:
    """Reads of a store; made by :meth:`FeatureStore.reader`.

    With LMDB every read sees the snapshot of the reader's transaction; with Redis each call is
    one atomic ``MGET``, but two calls may straddle a reload.

    Arrays it returns are views over the fetched buffers: with LMDB they are valid only until
    the ``reader()`` block ends (copy what must outlive it), with Redis for as long as they live.

    Args:
        get_many: fetches the values of keys, None for a missing key.
        where: the store's URL, for error messages.
    """

    def __init__(self, get_many: Callable[[list[bytes]], list[Buffer | None]], where: str):
        self._get_many = get_many
        self._where = where

    def values(self, keys: list[bytes]) -> list[Buffer | None]:
        """The raw values of ``keys`` (one fetch for all), None for a missing key."""
        return self._get_many(keys)

    def users(self, user_ids: Iterable[int]) -> list[UserSequences | None]:
        """The records of ``user_ids`` (one fetch for all), None for a user the store lacks."""
        values = self._get_many([user_key(u) for u in user_ids])
        return [None if v is None else UserSequences.decode(v) for v in values]

    def _get(self, key: bytes) -> Buffer:
        [value] = self._get_many([key])
        if value is None:
            raise DataError(self._where, f"the store holds no {key.decode()!r}: it was never loaded, or a load "
                                         "was interrupted (run load_store again)")
        return value

    def items(self) -> ItemRecords:
        """The item table (the whole blob: fetch it once, not per request)."""
        return ItemRecords.decode(self._get(ITEMS_KEY))

    def meta(self) -> dict[str, Any]:
        """The JSON metadata written by :func:`load_store`."""
        return json.loads(bytes(self._get(META_KEY)))


class FeatureStore(abc.ABC):
    """A key-value store of user records, the item table and metadata; see the module docstring.

    Backends implement :meth:`reader`, :meth:`put`, :meth:`clear` and :meth:`close`; the record
    encoding and keys are shared. Use as a context manager to close it.

    Args:
        url: where the store lives, for messages.
    """

    snapshot_reads: bool = False
    """Whether the reads of one :meth:`reader` block all see one snapshot (LMDB: one read
    transaction); otherwise each call is atomic on its own (Redis: one ``MGET``)."""

    def __init__(self, url: str):
        self.url = url

    @abc.abstractmethod
    def reader(self) -> contextlib.AbstractContextManager[StoreReader]:
        """A context manager yielding a :class:`StoreReader` (LMDB: one read transaction)."""

    @abc.abstractmethod
    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        """Write one batch of ``(key, value)`` pairs (one LMDB transaction, one Redis pipeline)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Delete every key of the store, so that a load replaces everything."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: bytes) -> int:
        """Delete every key that starts with ``prefix``; returns how many there were."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection or the memory map."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self) -> dict[str, Any]:
        """The store's metadata (a reader of its own)."""
        with self.reader() as r:
            return r.meta()

    def write_users(self, users: Sequence[UserSequences]) -> int:
        """Write a batch of user records; returns the bytes written."""
        pairs = [(user_key(u.user_id), u.encode()) for u in users]
        self.put(pairs)
        return sum(len(v) for _, v in pairs)

    def write_items(self, items: ItemRecords) -> int:
        """Write the item table; returns the bytes written."""
        blob = items.encode()
        self.put([(ITEMS_KEY, blob)])
        return len(blob)

    def write_meta(self, meta: dict[str, Any]) -> int:
        """Write the metadata as sorted JSON; returns the bytes written."""
        blob = json.dumps(meta, sort_keys=True).encode()
        self.put([(META_KEY, blob)])
        return len(blob)


def open_store(url: str | os.PathLike[str], writable: bool = False) -> FeatureStore:
    """Open the feature store at ``url``.

    Args:
        url: ``redis://host:port/db`` (:class:`RedisStore`), ``lmdb:///absolute/path`` or a
            plain filesystem path (:class:`LMDBStore`).
        writable: open an LMDB store for loading (Redis stores are always writable).

    Raises:
        ConfigError: a malformed or unknown URL, or an unreachable Redis server.
        DataError: a read-only LMDB path that holds no store.

    Example::

        >>> open_store("ftp://host/x")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: unknown feature store URL scheme 'ftp' in 'ftp://host/x': expected redis://host:port/db, lmdb:///absolute/path or a directory path
    """
    target = parse_url(url, FEATURE_STORE)
    # Each backend's module, and the client library it needs, loads only when a URL names it.
    if target.scheme == "redis":
        from lifelong.store.redis_store import RedisStore

        return RedisStore(target.location)
    from lifelong.store.lmdb_store import LMDBStore

    return LMDBStore(target.location, writable=writable)


def __getattr__(name: str) -> type[FeatureStore]:
    """The backends, imported on first use (``from lifelong.store.feature_store import LMDBStore``)."""
    if name == "LMDBStore":
        from lifelong.store.lmdb_store import LMDBStore

        return LMDBStore
    if name == "RedisStore":
        from lifelong.store.redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_build(data_dir: Path) -> dict[str, Any]:
    """``build.json`` of a built dataset, with the keys the store needs checked."""
    path = data_dir / "build.json"
    if not path.is_file():
        raise DataError(path, "missing: not a built dataset directory (make one with `lifelong transact build`)")
    try:
        build = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON ({exc})") from None
    for key, sub in (("data", None), ("heads", None), ("layout", "rt"), ("config", "ll_cap"), ("config", "imp_cap")):
        if key not in build or (sub is not None and sub not in build[key]):
            raise DataError(path, f"missing key {key if sub is None else f'{key}.{sub}'!r}")
    return build


def load_store(data_dir: str | os.PathLike[str], url: str | os.PathLike[str], progress: bool = True) -> dict[str, Any]:
    """Fill the store at ``url`` from a built dataset, replacing what it held.

    Every user of the source events gets a record of their whole history; the item table and
    the metadata (caps and layout from ``build.json``) follow, ``meta`` last.

    Args:
        data_dir: a dataset directory made by ``lifelong transact build`` (``build.json``, ``items/``);
            its ``build.json`` names the source world or ingested directory of the events.
        url: the store (see :func:`open_store`).
        progress: show a progress bar (on a terminal).

    Returns:
        Counts: ``users``, ``items``, ``explicit_tokens``, ``impressions``, ``bytes``
        written, ``seconds``, and the store's ``url``.

    Raises:
        DataError: a missing or malformed ``build.json`` or item file, a source whose events
            name items the build does not know (rebuild), or unsorted events.

    Example::

        summary = load_store("datasets/small", "redis://localhost:6379/0")
        print(f"{summary['users']:,} users, {summary['bytes'] / 2**20:.0f} MiB")
    """
    start = time.perf_counter()
    data_dir = Path(data_dir)
    build = _read_build(data_dir)
    items = ItemRecords.from_dir(data_dir / "items")
    events = load_dataset(build["data"], with_oracle=False).events
    cols = {name: events.column(name).to_numpy() for name in ("user_id", "item_id", "ts_ms", "surface", "action_mask")}
    item, known = items.index_of(cols["item_id"])
    if not known.all():
        bad = int(np.flatnonzero(~known)[0])
        raise DataError(Path(build["data"]) / "events.parquet",
                        f"item_id {int(cols['item_id'][bad])} is not in {data_dir / 'items'}: the source changed "
                        "since the build; rebuild the dataset", column="item_id", row=bad)
    # The events stay in the table's stored order, the one training used (every writer sorts
    # with lifelong.data.users.sort_events): EventIndex checks it and groups the users.
    index = EventIndex(cols["user_id"], cols["ts_ms"], cols["action_mask"])
    meta = {
        "format_version": FORMAT_VERSION, "lifelong_version": lifelong.__version__,
        "dataset": str(data_dir.resolve()), "data": build["data"], "heads": build["heads"],
        "layout": build["layout"], "ll_cap": build["config"]["ll_cap"], "rt": build["layout"]["rt"],
        "imp_cap": build["config"]["imp_cap"], "int8_scale": INT8_SCALE, "emb_dim": EMBED_DIM,
        "n_users": int(index.users.size), "n_items": len(items),
        "n_explicit": int(index.explicit.rows.size), "n_impressions": int(index.impressions.rows.size),
    }
    written = 0
    bar = progress_bar("loading the feature store", total=meta["n_users"]) if progress \
        else contextlib.nullcontext(lambda n=1: None)
    with open_store(url, writable=True) as store:
        store.clear()
        with bar as advance:
            for chunk in iter_user_sequences(index, item, cols["action_mask"], cols["surface"], items.emb_int8):
                written += store.write_users(chunk)
                advance(len(chunk))
        written += store.write_items(items)
        written += store.write_meta(meta)
        url_text = store.url
    return {"url": url_text, "users": meta["n_users"], "items": meta["n_items"], "explicit_tokens": meta["n_explicit"],
            "impressions": meta["n_impressions"], "bytes": written, "seconds": round(time.perf_counter() - start, 3)}
