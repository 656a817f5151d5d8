"""The serving feature store: users' sequences, the item table and metadata in a key-value store.

Serving (DESIGN.md, "Serving") fetches each user's full stored history once per request and the
item table once at startup. Both live in a key-value store behind one interface,
:class:`FeatureStore`, with two backends:

- :class:`LMDBStore` (the embedded default): a memory-mapped LMDB environment; reads inside a
  read transaction return ``memoryview`` s into the map, so decoded arrays are views of the
  page cache, copied nowhere;
- :class:`RedisStore` (multi-host): a Redis database; many users are fetched in one ``MGET``
  round trip and decoded as views over the returned ``bytes``.

Keys (the same in both; Redis prefixes them with ``lifelong:`` so that ``clear`` leaves other
data of a shared database alone):

- ``b"u:" + user_id`` as 8 bytes big-endian: a :class:`UserSequences` record;
- ``b"items"``: the :class:`ItemRecords` blob;
- ``b"meta"``: JSON: caps and layout of the built dataset, int8 scale, counts, provenance.

:func:`load_store` fills a store from a built dataset (``lifelong transact build``) and its source
events; ``meta`` is written last, so a store whose ``meta`` is present holds a complete load.
:func:`open_store` picks the backend from a URL.

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
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlparse

import lmdb
import numpy as np
import redis

import lifelong
from lifelong.core.errors import ConfigError, DataError
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

__all__ = [
    "FeatureStore", "ItemRecords", "LMDBStore", "RedisStore", "StoreReader", "TimelineRanges",
    "UserSequences", "load_store", "open_store", "user_key",
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


_OPEN_ENVS: dict[str, tuple[lmdb.Environment, bool, int]] = {}
_OPEN_LOCK = threading.Lock()


class LMDBStore(FeatureStore):
    """The embedded backend: an LMDB environment (a directory holding ``data.mdb``).

    Args:
        path: the environment's directory.
        writable: open for loading (created if missing); otherwise read-only, for serving.
        map_size: the most bytes the store may hold. The map is reserved address space, not
            disk: the file grows only as data is written, so a generous size costs nothing.

    Raises:
        DataError: a read-only open of a path that holds no store, or LMDB refuses to open it.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d, LMDBStore(d, writable=True) as store:
        ...     _ = store.write_users([UserSequences.empty(5)])
        ...     with store.reader() as r:
        ...         [u.n_explicit for u in r.users([5])], r.users([6])
        ([0], [None])
    """

    def __init__(self, path: str | os.PathLike[str], writable: bool = False, map_size: int = 64 << 30):
        self.path = Path(path)
        super().__init__(f"lmdb://{self.path.resolve()}")
        self.writable = writable
        if writable:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").is_file():
            raise DataError(self.path, "no LMDB feature store here (fill one with load_store first)")
        self._key = str(self.path.resolve())
        with _OPEN_LOCK:
            # LMDB allows one environment per file and process: stores opened twice share it.
            if self._key in _OPEN_ENVS:
                env, was_writable, count = _OPEN_ENVS[self._key]
                if was_writable != writable:
                    raise DataError(self.path, "already open in this process in another mode (read-only vs writable)")
            else:
                try:
                    # readahead=False: serving reads scattered users, and readahead would fill the
                    # page cache with neighbours nobody asked for once the store outgrows memory.
                    env = lmdb.open(str(self.path), map_size=map_size, readonly=not writable, readahead=False)
                except lmdb.Error as exc:
                    raise DataError(self.path, f"cannot open the LMDB store ({exc})") from None
                count = 0
            _OPEN_ENVS[self._key] = (env, writable, count + 1)
        self._env = env

    @contextlib.contextmanager
    def reader(self) -> Iterator[StoreReader]:
        # buffers=True: values are memoryviews into the map, valid while the transaction is.
        with self._env.begin(buffers=True) as txn:
            yield StoreReader(lambda keys: [txn.get(k) for k in keys], self.url)

    def _require_writable(self) -> None:
        if not self.writable:
            raise ConfigError(f"{self.url} was opened read-only; open it with writable=True to change it")

    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        self._require_writable()
        try:
            with self._env.begin(write=True) as txn:
                txn.cursor().putmulti(pairs)
        except lmdb.MapFullError:
            raise DataError(self.path, f"the store is full (map_size {self._env.info()['map_size']:,} bytes); "
                                       "open it with a larger map_size") from None

    def clear(self) -> None:
        self._require_writable()
        with self._env.begin(write=True) as txn:
            txn.drop(self._env.open_db(txn=txn), delete=False)

    def delete_prefix(self, prefix: bytes) -> int:
        self._require_writable()
        deleted = 0
        with self._env.begin(write=True) as txn, txn.cursor() as cursor:
            # Keys are sorted, so a prefix's keys are one run from its first key on.
            found = cursor.set_range(prefix)
            while found and bytes(cursor.key()).startswith(prefix):
                found = cursor.delete()  # moves to the next key
                deleted += 1
        return deleted

    def close(self) -> None:
        with _OPEN_LOCK:
            if self._key not in _OPEN_ENVS:
                return  # closed already
            env, writable, count = _OPEN_ENVS.pop(self._key)
            if count > 1:
                _OPEN_ENVS[self._key] = (env, writable, count - 1)
            else:
                env.close()


class RedisStore(FeatureStore):
    """The multi-host backend: a Redis database, keys prefixed with ``lifelong:``.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://`` for TLS).
        connect_timeout_s: how long to wait for the server before giving up.

    Raises:
        ConfigError: the URL is malformed or the server does not answer a PING.
    """

    NAMESPACE = b"lifelong:"

    def __init__(self, url: str, connect_timeout_s: float = 5.0):
        super().__init__(url)
        parsed = urlparse(url)
        db = parsed.path.lstrip("/")
        try:  # .port raises on a non-numeric port
            valid = (parsed.scheme in ("redis", "rediss") and bool(parsed.hostname)
                     and parsed.port != 0 and (db == "" or db.isdigit()))
        except ValueError:
            valid = False
        if not valid:
            # redis-py would accept some of these and silently use another database.
            raise ConfigError(f"bad Redis URL {url!r}: expected redis://host:port/db with db a number")
        try:
            self._client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s)
            self._client.ping()
        except (redis.RedisError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot reach Redis at {url}: {exc}") from None

    @contextlib.contextmanager
    def reader(self) -> Iterator[StoreReader]:
        yield StoreReader(self._get_many, self.url)

    def _get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return self._client.mget([self.NAMESPACE + k for k in keys]) if keys else []

    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, value in pairs:
            pipe.set(self.NAMESPACE + key, value)
        pipe.execute()

    def clear(self) -> None:
        self.delete_prefix(b"")

    def delete_prefix(self, prefix: bytes) -> int:
        batch: list[bytes] = []
        deleted = 0
        # Glob metacharacters in the prefix match themselves only when escaped.
        pattern = self.NAMESPACE + re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"
        # SCAN is incremental and safe while keys are deleted; UNLINK frees memory off-thread.
        for key in self._client.scan_iter(match=pattern, count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                deleted += self._client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += self._client.unlink(*batch)
        return deleted

    def close(self) -> None:
        self._client.close()


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
    text = os.fspath(url)
    if not text:
        raise ConfigError("empty feature store URL: expected redis://host:port/db, lmdb:///absolute/path "
                          "or a directory path")
    scheme = urlparse(text).scheme if "://" in text else ""
    if scheme in ("redis", "rediss"):
        return RedisStore(text)
    if scheme == "lmdb":
        parsed = urlparse(text)
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigError(f"bad LMDB URL {text!r}: expected lmdb:///absolute/path (three slashes)")
        return LMDBStore(unquote(parsed.path), writable=writable)
    if scheme:
        raise ConfigError(f"unknown feature store URL scheme {scheme!r} in {text!r}: expected "
                          "redis://host:port/db, lmdb:///absolute/path or a directory path")
    return LMDBStore(text, writable=writable)


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
