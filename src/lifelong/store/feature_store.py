"""The serving feature store: users' sequences, the item table and metadata in a key-value store.

Serving (docs/design.md, "Serving") fetches each user's full stored history once per request and the
item table once at startup. Both live in a key-value store behind one interface,
:class:`FeatureStore`, with two backends:

- :class:`~lifelong.store.lmdb_store.LMDBStore` (the embedded default): a memory-mapped LMDB
  environment; reads inside a read transaction return ``memoryview`` s into the map, so
  decoded arrays are views of the page cache, copied nowhere;
- :class:`~lifelong.store.redis_store.RedisStore` (multi-host): a Redis database; many users
  are fetched in one ``MGET`` round trip and decoded as views over the returned ``bytes``;
- :class:`~lifelong.store.redis_store.RedisClusterStore`: a Redis Cluster; each user's records
  sit on one node, placed by a hash tag of the user (:func:`split_user_key`), and the users of a
  read are fetched with one ``MGET`` per slot, all in one pipelined round trip per node.

Every load is a *version*: its keys live under the version's prefix, beside the versions
before it, and one pointer key names the served one. Keys (the same in both backends; Redis
prefixes them with ``lifelong:`` so that other data of a shared database is left alone):

- ``b"fs:current"``: the pointer, JSON: the served ``version`` number, ``history`` (the
  versions it superseded and keeps, newest first), ``dataset``, ``users``, ``loaded_at_ms`` and
  a random ``load_id`` (numbers restart at 1 in a wiped store; the id tells such loads apart);
- ``b"fs:versions"``: the registry, JSON: ``next`` version number and the ``versions`` begun
  and not yet deleted (served, kept, or abandoned by a killed loader);
- under ``version_prefix(n)`` (``b"fs:v:" + 12 digits + b":"``):
  ``b"u:" + user_id`` as 8 bytes big-endian: a :class:`UserSequences` record; ``b"items"``: the
  :class:`ItemRecords` blob; ``b"meta"``: JSON: caps and layout of the built dataset, int8
  scale, counts, provenance. ``meta`` is written last and deleted first: it seals the version.
- ``b"fs:writer"`` (Redis only; LMDB uses ``writer.lock`` in its directory): the writer lock;
- ``b"dv365:..."``: DV365 user embeddings (:mod:`lifelong.store.embeddings`), versioned on
  their own; a load keeps them unless told to drop them.

:func:`load_store` takes the store's writer lock (a second writer gets :class:`WriterLocked` at
once), writes a new version, switches the pointer with one fenced ``put`` and deletes every
version but the new one and the ``keep - 1`` it superseded last. A reader (:meth:`FeatureStore.reader`)
reads the pointer once and serves every key from that version (:attr:`StoreReader.version`),
so a batch never mixes two loads. A store written before versions existed (``meta``, ``items``
and ``u:`` keys at the top level) is served as version ``legacy`` until the next load replaces it.
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
import re
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa

import lifelong
from lifelong.core.errors import DataError, StoreUnavailable, WriterLocked
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
    "FeatureStore", "ItemRecords", "StoreReader", "StoreUnavailable", "TimelineRanges", "UserSequences", "VersionGone",
    "WriterLock", "WriterLocked", "collect_versions", "json_record", "load_store", "open_store", "split_user_key",
    "user_key", "version_name", "version_prefix",
]

USER_PREFIX = b"u:"
ITEMS_KEY = b"items"
META_KEY = b"meta"
POINTER_KEY = b"fs:current"
REGISTRY_KEY = b"fs:versions"
WRITER_KEY = b"fs:writer"
EMBEDDINGS_LOCK = "dv365"
"""The lock of the DV365 embedding versions (``lifelong dv365 export``), apart from the loads'."""
EMBEDDINGS_PREFIX = b"dv365:"
"""Every key of the DV365 user embeddings (:mod:`lifelong.store.embeddings`)."""
LEGACY_VERSION = "legacy"
NO_VERSION = "no version loaded; run lifelong store load"
_VERSION_PREFIX = b"fs:v:"
_USER_KEY = struct.Struct(">q")
# A user's record: in a feature-store version, a DV365 export version (``dv365:v:``, see
# lifelong.store.embeddings) or a store loaded before versions existed (no prefix).
_USER_RECORD = re.compile(rb"((?:%s|%sv:)\d{12}:)?%s(.{8})" % (_VERSION_PREFIX, EMBEDDINGS_PREFIX, USER_PREFIX),
                          re.DOTALL)


def user_key(user_id: int) -> bytes:
    """The store key of a user's record inside a version: fixed width, and sorted like the ids (for ids >= 0).

    Example::

        >>> user_key(258)
        b'u:\\x00\\x00\\x00\\x00\\x00\\x00\\x01\\x02'
    """
    return USER_PREFIX + _USER_KEY.pack(int(user_id))


def split_user_key(key: bytes) -> tuple[bytes, int] | None:
    """The version prefix and user of a user's record key (:func:`user_key` under a feature-store
    or DV365 version's prefix), None for any other key. A Redis Cluster places every record of a
    user by it, so that they share a node.

    Example::

        >>> split_user_key(version_prefix(7) + user_key(258))
        (b'fs:v:000000000007:', 258)
        >>> split_user_key(version_prefix(7) + b"meta") is None
        True
    """
    match = _USER_RECORD.fullmatch(key)
    return None if match is None else (match[1] or b"", _USER_KEY.unpack(match[2])[0])


def version_prefix(version: int) -> bytes:
    """The key prefix of every record of feature-store version ``version``.

    Example::

        >>> version_prefix(7)
        b'fs:v:000000000007:'
    """
    return _VERSION_PREFIX + b"%012d:" % version


def version_name(version: int) -> str:
    """How a version is named to clients (``RankResult.store_version``, ``/healthz``, messages).

    Example::

        >>> version_name(7)
        'v7'
    """
    return f"v{version}"


def holder(role: str = "load") -> dict[str, Any]:
    """Who is writing: its role (``load`` or ``follower``), host, pid and start time, recorded
    with a writer lock for messages and for :func:`load_store`'s wait on a follower."""
    return {"role": role, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime())}


def locked_message(url: str, held_by: dict[str, Any] | None, extra: str = "") -> str:
    """The one line of a :class:`WriterLocked`."""
    who = "" if not held_by else f" (pid {held_by.get('pid')} on {held_by.get('host')} since {held_by.get('since')})"
    role = (held_by or {}).get("role")
    writer = {"follower": "the real-time follower", "export": "a DV365 export"}.get(role, "another store load")
    return f"{url}: {writer} holds the writer lock{who}; wait for it to finish{extra}"


class VersionGone(StoreUnavailable):
    """The version a reader pinned was deleted while it read (Redis: two loads switched in
    between). Read again with a new reader, which pins the version served now."""


class StoreReader:
    """Reads of one version of a store; made by :meth:`FeatureStore.reader`.

    The first versioned read (:attr:`version`, :meth:`users`, :meth:`items`, :meth:`meta`)
    reads the pointer; every later one reads that version, so what one reader returns never
    mixes two loads. With LMDB the pointer and the records come from one read transaction (one
    snapshot). With Redis each call is one atomic ``MGET`` that carries the version's ``meta``
    key, which garbage collection deletes first: a call that finds it missing raises
    :class:`VersionGone` instead of answering from a half-deleted version.

    Arrays it returns are views over the fetched buffers: with LMDB they are valid only until
    the ``reader()`` block ends (copy what must outlive it), with Redis for as long as they live.

    Args:
        get_many: fetches the values of keys, None for a missing key.
        where: the store's URL, for error messages.
        snapshot: whether all reads of this reader see one snapshot.
        get_versioned: for a backend whose one fetch is not atomic (Redis Cluster: one ``MGET``
            per slot), how it reads keys of a version and checks that they are all of it:
            ``get_versioned(name, prefix, keys)``, raising :class:`VersionGone`.
    """

    def __init__(self, get_many: Callable[[list[bytes]], list[Buffer | None]], where: str, snapshot: bool = False,
                 get_versioned: Callable[[str, bytes, list[bytes]], list[Buffer | None]] | None = None):
        self._get_many = get_many
        self._where = where
        self._snapshot = snapshot
        self._get_versioned = get_versioned
        self._pinned: tuple[str, bytes, str] | None = None

    def values(self, keys: list[bytes]) -> list[Buffer | None]:
        """The raw values of ``keys``, unversioned (one fetch for all), None for a missing key."""
        return self._get_many(keys)

    @property
    def version(self) -> str:
        """The name of the version this reader serves (``v7``; ``legacy`` for an unversioned store).

        Raises:
            StoreUnavailable: no version is loaded (or the store cannot be reached).
        """
        return self._pin()[0]

    @property
    def version_id(self) -> str:
        """What tells this version from every other, even one of the same name in a store that
        was wiped and loaded again (names restart at ``v1`` there): the name and the load's id."""
        name, _, load_id = self._pin()
        return f"{name}/{load_id}"

    def _pin(self) -> tuple[str, bytes, str]:
        if self._pinned is None:
            [raw] = self._get_many([POINTER_KEY])
            if raw is not None:
                pointer = parse_pointer(raw, self._where)
                number = pointer["version"]
                self._pinned = (version_name(number), version_prefix(number), str(pointer.get("load_id", "")))
            elif self._get_many([META_KEY])[0] is not None:  # a store loaded before versions existed
                self._pinned = (LEGACY_VERSION, b"", "")
            else:
                raise StoreUnavailable(self._where, NO_VERSION)
        return self._pinned

    def _versioned(self, keys: list[bytes]) -> list[Buffer | None]:
        """The values of ``keys`` in the pinned version, checked to be all of one live version."""
        name, prefix, _ = self._pin()
        if self._snapshot:
            return self._get_many([prefix + k for k in keys])
        if self._get_versioned is not None:
            return self._get_versioned(name, prefix, keys)
        seal, *values = self._get_many([prefix + META_KEY, *(prefix + k for k in keys)])
        if seal is None:
            raise VersionGone(self._where, f"version {name} was deleted while being read (two loads switched)")
        return values

    def users(self, user_ids: Iterable[int]) -> list[UserSequences | None]:
        """The records of ``user_ids`` (one fetch for all), None for a user the version lacks."""
        values = self._versioned([user_key(u) for u in user_ids])
        return [None if v is None else UserSequences.decode(v) for v in values]

    def _get(self, key: bytes) -> Buffer:
        [value] = self._versioned([key])
        if value is None:
            raise DataError(self._where, f"version {self.version} holds no {key.decode()!r}: the store is "
                                         "damaged; run lifelong store load again")
        return value

    def items(self) -> ItemRecords:
        """The item table (the whole blob: fetch it once per version, not per request)."""
        return ItemRecords.decode(self._get(ITEMS_KEY))

    def meta(self) -> dict[str, Any]:
        """The JSON metadata written by :func:`load_store`."""
        return json.loads(bytes(self._get(META_KEY)))


def parse_pointer(raw: Buffer, where: str) -> dict[str, Any]:
    """The pointer's JSON, checked to name a version."""
    try:
        pointer = json.loads(bytes(raw))
        int(pointer["version"])
    except (ValueError, KeyError, TypeError):
        raise DataError(where, f"the version pointer {POINTER_KEY.decode()!r} is not valid JSON naming a version: "
                               "the store is damaged; run lifelong store load again") from None
    return pointer


class WriterLock(abc.ABC):
    """The store's writer lock, held by one loader at a time (:meth:`FeatureStore.writer_lock`).

    Writes that decide what readers see (the registry, the pointer) go through :meth:`put`,
    which writes only while the lock is still this writer's (Redis: a lock that expired because
    its holder stalled is not honoured), so a stalled writer can never switch over a newer one.
    """

    @abc.abstractmethod
    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        """Write ``pairs`` atomically if this writer still holds the lock.

        Raises:
            WriterLocked: the lock was lost (it expired and another writer took it).
        """


class FeatureStore(abc.ABC):
    """A key-value store of versions of user records, item tables and metadata; see the module docstring.

    Backends implement :meth:`reader`, :meth:`put`, :meth:`clear`, :meth:`delete_prefix`,
    :meth:`writer_lock` and :meth:`close`; the record encoding and keys are shared. Use as a
    context manager to close it.

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
        """A context manager yielding a :class:`StoreReader` pinned to the served version (LMDB:
        one read transaction).

        Raises:
            StoreUnavailable: the store cannot be reached (Redis), when read.
        """

    @abc.abstractmethod
    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        """Write one batch of ``(key, value)`` pairs (one LMDB transaction, one Redis pipeline)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Delete every key of the store, every version and the embeddings included."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: bytes) -> int:
        """Delete every key that starts with ``prefix``; returns how many there were."""

    @abc.abstractmethod
    def writer_lock(self, role: str = "load", name: str = "writer") -> contextlib.AbstractContextManager[WriterLock]:
        """Hold the store's writer lock for the block; ``role`` is recorded for the others to see.

        ``name`` picks the lock: ``writer`` guards the feature store's versions (loads and the
        real-time follower), ``dv365`` the DV365 embedding versions (exports, and a load that
        drops them), so an hour-long export never blocks a load.

        Raises:
            WriterLocked: another writer holds it (at once, without waiting).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection or the memory map."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self) -> dict[str, Any]:
        """The served version's metadata (a reader of its own)."""
        with self.reader() as r:
            return r.meta()

    def current_version(self) -> str:
        """The name of the served version: one pointer read.

        Raises:
            StoreUnavailable: nothing loaded, or the store cannot be reached.
        """
        with self.reader() as r:
            return r.version

    def pointer(self) -> dict[str, Any] | None:
        """The version pointer (see the module docstring), None when nothing is loaded."""
        with self.reader() as r:
            [raw] = r.values([POINTER_KEY])
            return None if raw is None else parse_pointer(raw, self.url)

    def write_users(self, users: Sequence[UserSequences], prefix: bytes = b"") -> int:
        """Write a batch of user records under ``prefix`` (a version's); returns the bytes written."""
        pairs = [(prefix + user_key(u.user_id), u.encode()) for u in users]
        self.put(pairs)
        return sum(len(v) for _, v in pairs)

    def write_items(self, items: ItemRecords, prefix: bytes = b"") -> int:
        """Write the item table under ``prefix``; returns the bytes written."""
        blob = items.encode()
        self.put([(prefix + ITEMS_KEY, blob)])
        return len(blob)

    def write_meta(self, meta: dict[str, Any], prefix: bytes = b"") -> int:
        """Write the metadata as sorted JSON under ``prefix``; returns the bytes written."""
        blob = json.dumps(meta, sort_keys=True).encode()
        self.put([(prefix + META_KEY, blob)])
        return len(blob)


def open_store(url: str | os.PathLike[str], writable: bool = False) -> FeatureStore:
    """Open the feature store at ``url``.

    Args:
        url: ``redis://host:port/db`` (:class:`RedisStore`), ``redis-cluster://host:port[,...]``
            (:class:`RedisClusterStore`), ``lmdb:///absolute/path`` or a plain filesystem path
            (:class:`LMDBStore`).
        writable: open an LMDB store for loading (Redis stores are always writable).

    Raises:
        ConfigError: a malformed or unknown URL, or an unreachable Redis server or cluster.
        DataError: a read-only LMDB path that holds no store.

    Example::

        >>> open_store("ftp://host/x")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: unknown feature store URL scheme 'ftp' in 'ftp://host/x': expected redis://host:port/db, lmdb:///absolute/path or a directory path (or redis-cluster://host:port[,host:port...])
    """
    target = parse_url(url, FEATURE_STORE)
    # Each backend's module, and the client library it needs, loads only when a URL names it.
    if target.scheme == "redis":
        from lifelong.store.redis_store import RedisClusterStore, RedisStore

        return RedisClusterStore(target.location) if target.cluster else RedisStore(target.location)
    from lifelong.store.lmdb_store import LMDBStore

    return LMDBStore(target.location, writable=writable)


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


FOLLOWER_WAIT_S = 10.0
"""How long a load waits for the real-time follower, which holds the writer lock for one short
batch at a time (``lifelong store follow``); another load's lock fails a load at once."""


@contextlib.contextmanager
def _load_lock(store: FeatureStore) -> Iterator[WriterLock]:
    deadline = time.monotonic() + FOLLOWER_WAIT_S
    while True:
        with contextlib.ExitStack() as stack:
            try:
                lock = stack.enter_context(store.writer_lock())
            except WriterLocked as exc:
                # No record: the holder released the lock between our try and our read of it.
                waiting_for = "follower" if exc.held_by is None else exc.held_by.get("role")
                if waiting_for != "follower" or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
                continue
            yield lock
            return


def load_store(data_dir: str | os.PathLike[str], url: str | os.PathLike[str], progress: bool = True,
               drop_embeddings: bool = False, keep: int = 2) -> dict[str, Any]:
    """Load a built dataset into the store at ``url`` as a new version, and switch readers to it.

    Under the store's writer lock: every user of the source events gets a record of their whole
    history, then the item table and the metadata (caps and layout from ``build.json``, ``meta``
    last), all under the new version's prefix while readers keep reading the served version;
    then one fenced write of the pointer switches them, and every version but the new one and
    the ``keep - 1`` it superseded last is deleted (one killed half-way included). A loader
    killed before the switch leaves the served version as it was.

    Args:
        data_dir: a dataset directory made by ``lifelong transact build`` (``build.json``, ``items/``);
            its ``build.json`` names the source world or ingested directory of the events.
        url: the store (see :func:`open_store`).
        progress: show a progress bar (on a terminal).
        drop_embeddings: also delete the DV365 user embeddings the store holds (kept otherwise).
        keep: versions kept after the switch (>= 2 lets a reader that pinned the previous
            version just before the switch finish its batch).

    Returns:
        Counts: ``users``, ``items``, ``explicit_tokens``, ``impressions``, ``bytes``
        written, ``seconds``, the store's ``url``, the new ``version``'s name, the ``kept``
        and ``deleted`` versions' names and ``embeddings_dropped`` (keys deleted).

    Raises:
        WriterLocked: another load holds the store's writer lock (raised at once).
        DataError: a missing or malformed ``build.json`` or item file, a source whose events
            name items the build does not know (rebuild), or unsorted events.

    Example::

        summary = load_store("datasets/small", "redis://localhost:6379/0")
        print(f"{summary['version']}: {summary['users']:,} users, {summary['bytes'] / 2**20:.0f} MiB")
    """
    start = time.perf_counter()
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    data_dir = Path(data_dir)
    with open_store(url, writable=True) as store, _load_lock(store) as lock, contextlib.ExitStack() as drop_lock:
        if drop_embeddings:  # taken before anything is written: a running export refuses the load whole
            drop_lock.enter_context(store.writer_lock(role="load", name=EMBEDDINGS_LOCK))
        build = _read_build(data_dir)
        items = ItemRecords.from_dir(data_dir / "items")
        events = load_dataset(build["data"], with_oracle=False).events
        cols = {name: events.column(name).to_numpy() for name in ("user_id", "item_id", "ts_ms", "surface", "action_mask")}
        del events  # one copy of the events in memory, not the table and its columns
        pa.default_memory_pool().release_unused()
        item, known = items.index_of(cols["item_id"])
        if not known.all():
            bad = int(np.flatnonzero(~known)[0])
            raise DataError(Path(build["data"]) / "events.parquet",
                            f"item_id {int(cols['item_id'][bad])} is not in {data_dir / 'items'}: the source changed "
                            "since the build; rebuild the dataset", column="item_id", row=bad)
        # The events stay in the table's stored order, the one training used (every writer sorts
        # with lifelong.data.users.sort_events): EventIndex checks it and groups the users.
        index = EventIndex(cols["user_id"], cols["ts_ms"], cols["action_mask"])
        with store.reader() as r:
            raw_registry, raw_pointer, legacy = r.values([REGISTRY_KEY, POINTER_KEY, META_KEY])
            registry = {"next": 1, "versions": []} if raw_registry is None else json.loads(bytes(raw_registry))
            previous = None if raw_pointer is None else parse_pointer(raw_pointer, store.url)
            legacy = raw_pointer is None and legacy is not None
        number = int(registry["next"])
        # Listed before its first record: a version whose loader dies is still found and deleted.
        lock.put([(REGISTRY_KEY, json_record({"next": number + 1, "versions": [*registry["versions"], number]}))])
        prefix = version_prefix(number)
        meta = {
            "format_version": FORMAT_VERSION, "lifelong_version": lifelong.__version__,
            "dataset": str(data_dir.resolve()), "data": build["data"], "heads": build["heads"],
            "layout": build["layout"], "ll_cap": build["config"]["ll_cap"], "rt": build["layout"]["rt"],
            "imp_cap": build["config"]["imp_cap"], "int8_scale": INT8_SCALE, "emb_dim": EMBED_DIM,
            "n_users": int(index.users.size), "n_items": len(items),
            # The newest event loaded: the real-time follower appends only what is newer.
            "source_last_ts_ms": int(cols["ts_ms"].max()) if cols["ts_ms"].size else None,
            "n_explicit": int(index.explicit.rows.size), "n_impressions": int(index.impressions.rows.size),
            "store_version": version_name(number),
        }
        written = 0
        bar = progress_bar("loading the feature store", total=meta["n_users"]) if progress \
            else contextlib.nullcontext(lambda n=1: None)
        with bar as advance:
            for chunk in iter_user_sequences(index, item, cols["action_mask"], cols["surface"], items.emb_int8):
                written += store.write_users(chunk, prefix)
                advance(len(chunk))
        written += store.write_items(items, prefix)
        written += store.write_meta(meta, prefix)  # the seal: the version is complete
        history = [] if previous is None else [previous["version"], *previous.get("history", [])][:keep - 1]
        # The switch: readers that pin a version from now on read this one.
        lock.put([(POINTER_KEY, json_record({"version": number, "history": history, "dataset": meta["dataset"],
                                       "users": meta["n_users"], "loaded_at_ms": int(time.time() * 1000),
                                       "load_id": uuid.uuid4().hex}))])
        deleted = tuple(version_name(v) for v in collect_versions(store, lock, REGISTRY_KEY, version_prefix,
                                                                     {number, *history}, seal=META_KEY))
        if legacy:  # the unversioned records of a store loaded before versions existed; seal first
            for old in (META_KEY, ITEMS_KEY, USER_PREFIX):
                store.delete_prefix(old)
            deleted = (*deleted, LEGACY_VERSION)
        dropped = store.delete_prefix(EMBEDDINGS_PREFIX) if drop_embeddings else 0
        url_text = store.url
    return {"url": url_text, "version": version_name(number), "kept": [version_name(v) for v in history],
            "deleted": list(deleted), "embeddings_dropped": dropped, "users": meta["n_users"],
            "items": meta["n_items"], "explicit_tokens": meta["n_explicit"], "impressions": meta["n_impressions"],
            "bytes": written, "seconds": round(time.perf_counter() - start, 3)}


def json_record(obj: dict[str, Any]) -> bytes:
    """A JSON value as the stores keep it (sorted keys): pointers, registries, follower states."""
    return json.dumps(obj, sort_keys=True).encode()


def collect_versions(store: FeatureStore, lock: WriterLock, registry_key: bytes, prefix_of: Callable[[int], bytes],
                     keep: set[int], seal: bytes | None = None) -> tuple[int, ...]:
    """Delete every version the registry at ``registry_key`` lists and ``keep`` lacks; returns them.

    The feature store's versions and the DV365 exports' both keep such a registry. ``seal`` (the
    feature store's ``meta``) is deleted first, so that a Redis reader still on a version sees
    :class:`VersionGone`, never a half-deleted version. The registry is rewritten through the
    writer's ``lock`` only once the rows are gone: a collector killed half-way leaves the rest
    listed for the next one.
    """
    with store.reader() as r:
        registry = json.loads(bytes(r.values([registry_key])[0]))
    doomed = tuple(v for v in registry["versions"] if v not in keep)
    for number in doomed:
        if seal is not None:
            store.delete_prefix(prefix_of(number) + seal)
        store.delete_prefix(prefix_of(number))
    lock.put([(registry_key, json_record({"next": registry["next"],
                                          "versions": [v for v in registry["versions"] if v in keep]}))])
    return doomed
