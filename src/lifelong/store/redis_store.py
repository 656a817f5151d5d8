"""The multi-host feature store backends: a Redis database or a Redis Cluster (see
:mod:`lifelong.store.feature_store`).

Imported by :func:`~lifelong.store.feature_store.open_store` when a URL names Redis, so that only
a process that opens a Redis store loads ``redis``.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from lifelong.core.errors import ConfigError, StoreUnavailable, WriterLocked
from lifelong.store.feature_store import (
    META_KEY,
    POINTER_KEY,
    USER_PREFIX,
    WRITER_KEY,
    FeatureStore,
    StoreReader,
    VersionGone,
    WriterLock,
    holder,
    locked_message,
    parse_pointer,
    split_user_key,
    version_prefix,
)
from lifelong.store.sequences import Buffer
from lifelong.store.urls import cluster_unavailable, connect_redis, unreachable_errors

__all__ = ["RedisClusterStore", "RedisStore"]

# KEYS[1] the lock, ARGV[1] the holder's token. Each runs atomically on the server.
_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# KEYS[2..] and ARGV[2..]: the pairs to write, only while the lock is still the holder's.
_FENCED_SET = """if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #KEYS do redis.call('set', KEYS[i], ARGV[i]) end
return 1"""


class RedisStore(FeatureStore):
    """The multi-host backend: a Redis database, keys prefixed with ``lifelong:``.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://`` for TLS).
        connect_timeout_s: how long to wait for the server before giving up, at start and on
            each read (a server that stops answering is :class:`StoreUnavailable`, not a hang).
        lock_ttl_s: the writer lock's expiry; its holder refreshes it every third of that, so
            it outlives a loader only by this long when the loader is killed.

    Raises:
        ConfigError: the URL is malformed or the server does not answer a PING.
    """

    NAMESPACE = b"lifelong:"
    _UNREACHABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
    """The client's errors that mean the store cannot answer now (:class:`StoreUnavailable`)."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0, lock_ttl_s: float = 30.0):
        super().__init__(url)
        self._client = connect_redis(url, connect_timeout_s, socket_timeout_s=max(connect_timeout_s, 10.0))
        self.lock_ttl_s = lock_ttl_s

    def _key(self, key: bytes) -> bytes:
        """Where the store's ``key`` lives in Redis."""
        return self.NAMESPACE + key

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(self.url, f"cannot reach Redis ({exc})")

    @contextlib.contextmanager
    def reader(self) -> Iterator[StoreReader]:
        yield StoreReader(self._get_many, self.url)

    def _get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        with self._reachable():
            return self._client.mget([self._key(k) for k in keys])

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn a lost connection into :class:`StoreUnavailable` (one line from the CLI, 503 from the service)."""
        try:
            yield
        except self._UNREACHABLE as exc:
            raise self._unavailable(exc) from None

    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        self._set([(self._key(key), value) for key, value in pairs])

    def _set(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        """Write pairs of Redis keys and values in one pipeline."""
        pipe = self._client.pipeline(transaction=False)
        for key, value in pairs:
            pipe.set(key, value)
        with self._reachable():
            pipe.execute()

    def clear(self) -> None:
        self.delete_prefix(b"")

    def delete_prefix(self, prefix: bytes) -> int:
        batch: list[bytes] = []
        deleted = 0
        # Glob metacharacters in the prefix match themselves only when escaped.
        pattern = self.NAMESPACE + re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"
        # SCAN is incremental and safe while keys are deleted; UNLINK frees memory off-thread.
        with self._reachable():
            for key in self._client.scan_iter(match=pattern, count=10_000):
                batch.append(key)
                if len(batch) >= 10_000:
                    deleted += self._client.unlink(*batch)
                    batch.clear()
            if batch:
                deleted += self._client.unlink(*batch)
        return deleted

    @contextlib.contextmanager
    def writer_lock(self, role: str = "load", name: str = "writer") -> Iterator[WriterLock]:
        """``SET NX`` of a random token with an expiry, refreshed by a thread while held and
        released with a compare-and-delete, so a writer never deletes a lock that expired and
        was taken by another."""
        key = self._key(WRITER_KEY if name == "writer" else b"fs:lock:" + name.encode())
        ttl_ms = int(self.lock_ttl_s * 1000)
        token = json.dumps({"token": uuid.uuid4().hex, **holder(role)})
        with self._reachable():
            taken = self._client.set(key, token, nx=True, px=ttl_ms)
            raw = None if taken else self._client.get(key)
        if not taken:
            try:
                held_by = None if raw is None else json.loads(raw)
            except ValueError:
                held_by = None
            raise WriterLocked(locked_message(self.url, held_by, f", or for the lock to expire ({self.lock_ttl_s:g} s "
                                                                 "after its holder stopped)"), held_by) from None
        lock = _RedisLock(self, key, token)
        stop = threading.Event()

        def refresh() -> None:
            while not stop.wait(self.lock_ttl_s / 3):
                try:
                    if not self._client.eval(_REFRESH, 1, key, token, ttl_ms):
                        lock.lost = True
                        return
                except (redis.RedisError, *self._UNREACHABLE):
                    pass  # try again at the next tick; the fenced writes refuse if it expired meanwhile

        thread = threading.Thread(target=refresh, name="store-writer-lock", daemon=True)
        thread.start()
        try:
            yield lock
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(redis.RedisError, *self._UNREACHABLE):
                self._client.eval(_RELEASE, 1, key, token)

    def _fenced_keys(self, pairs: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """The Redis keys of a fenced write's ``pairs`` (see :class:`WriterLock`)."""
        return [self._key(k) for k, _ in pairs]

    def close(self) -> None:
        self._client.close()


class _RedisLock(WriterLock):
    def __init__(self, store: RedisStore, key: bytes, token: str):
        self._store, self._key, self._token = store, key, token
        self.lost = False

    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        keys = [self._key, *self._store._fenced_keys(pairs)]
        with self._store._reachable():
            done = not self.lost and self._store._client.eval(_FENCED_SET, len(keys), *keys, self._token,
                                                              *(v for _, v in pairs))
        if not done:
            raise WriterLocked(f"{self._store.url}: this load lost the writer lock (it stalled for more than "
                               f"{self._store.lock_ttl_s:g} s and the lock expired); nothing was switched, run it again")


class RedisClusterStore(RedisStore):
    """The store on a Redis Cluster (``redis-cluster://host:port[,host:port...]``).

    Keys are the single-server backend's, each followed by a hash tag that picks its slot:

    - every record of a user (:func:`~lifelong.store.feature_store.split_user_key`: its
      sequences in each feature-store version, its DV365 rows) is tagged with the user's
      *bucket*, ``{b<user % BUCKETS>}``, and its binary id is spelled in decimal
      (``lifelong:fs:v:000000000007:u:42{b42}``), so a user's records share a node and the
      users spread over all of them;
    - every other key (pointers, registries, writer locks, each version's ``items``, ``meta``
      and real-time state) is tagged ``{lifelong}``: one slot, so that a fenced write (a Lua
      script, which may touch one slot only) can switch a pointer while holding the lock.

    A read of users is one ``MGET`` per bucket in one pipeline, each carrying the bucket's
    *seal* (``lifelong:fs:v:…:seal{b<k>}``), which a load writes just before ``meta`` and
    garbage collection deletes together with ``meta``, before any record. So an ``MGET`` that
    finds its seal (atomic on its slot) read records of a whole version, though the buckets of
    one read are not one snapshot. A missing seal is :class:`VersionGone` when the pointer has
    moved on (two loads switched while the batch read), and :class:`StoreUnavailable` naming
    the slot and node while the pointer still names the version: that node lost its data.

    A node that cannot answer makes the operation raise :class:`StoreUnavailable` naming it
    (:func:`~lifelong.store.urls.cluster_unavailable`); the next operation after it is back
    succeeds. The real-time follower is refused: its batch writes the records of many users and
    its stream offset in one atomic, fenced write, which a cluster cannot make across slots.

    Args:
        url: ``redis-cluster://host:port[,host:port...]``: the seed nodes.
        connect_timeout_s, lock_ttl_s: as for :class:`RedisStore`.

    Raises:
        ConfigError: the URL is malformed, no seed node answers, or one answers but is not in
            cluster mode.
    """

    BUCKETS = 1024
    """Hash-tag buckets of the users: enough to spread them over any number of nodes, few
    enough that a load's seals (one per bucket) cost nothing."""
    CONTROL_TAG = b"{lifelong}"
    _UNREACHABLE = unreachable_errors()

    def _key(self, key: bytes) -> bytes:
        """The tagged Redis key (see the class docstring). A prefix of the store's keys maps to a
        prefix of their Redis keys as long as it stops before a user's id, which every
        :meth:`delete_prefix` of the store does."""
        user = split_user_key(key)
        if user is None:
            return self.NAMESPACE + key + self.CONTROL_TAG
        prefix, user_id = user
        return self.NAMESPACE + prefix + USER_PREFIX + b"%d{b%d}" % (user_id, user_id % self.BUCKETS)

    def _seal_key(self, prefix: bytes, bucket: int) -> bytes:
        """The Redis key of the seal of ``bucket`` in the version under ``prefix``."""
        return self.NAMESPACE + prefix + b"seal{b%d}" % bucket

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        return cluster_unavailable(self._client, self.url, exc)

    @contextlib.contextmanager
    def reader(self) -> Iterator[StoreReader]:
        yield StoreReader(self._get_many, self.url, get_versioned=self._get_versioned)

    def _get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        with self._reachable():  # one MGET per slot, pipelined: not atomic across slots
            return self._client.mget_nonatomic([self._key(k) for k in keys])

    def _get_versioned(self, name: str, prefix: bytes, keys: list[bytes]) -> list[Buffer | None]:
        """The values of ``keys`` in version ``prefix``: one ``MGET`` per slot, each with its seal."""
        groups: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            user = split_user_key(prefix + key)
            seal = self._key(prefix + META_KEY) if user is None else self._seal_key(prefix, user[1] % self.BUCKETS)
            groups.setdefault(seal, []).append(i)
        pipe = self._client.pipeline(transaction=False)
        for seal, idx in groups.items():
            # The pipeline blocks its mget() (keys may span slots); these share one, so it routes them.
            pipe.execute_command("MGET", seal, *(self._key(prefix + keys[i]) for i in idx))
        with self._reachable():
            replies = pipe.execute()
        values: list[Buffer | None] = [None] * len(keys)
        for (seal, idx), (sealed, *got) in zip(groups.items(), replies):
            if sealed is None:
                raise self._gone(name, prefix, seal)
            for i, value in zip(idx, got):
                values[i] = value
        return values

    def _gone(self, name: str, prefix: bytes, seal: bytes) -> StoreUnavailable:
        """Why a seal of a pinned version is missing. Garbage collection deletes only versions the
        pointer has left, so while it still names this one, its node has lost the records."""
        [raw] = self._get_many([POINTER_KEY])
        if raw is None or version_prefix(int(parse_pointer(raw, self.url)["version"])) != prefix:
            return VersionGone(self.url, f"version {name} was deleted while being read (two loads switched)")
        with self._reachable():
            node = self._client.get_node_from_key(seal).name
        return StoreUnavailable(self.url, f"version {name} has lost its records in slot {self._client.keyslot(seal)} "
                                          f"(node {node} restarted without its data?); run lifelong store load again")

    def write_meta(self, meta: dict[str, Any], prefix: bytes = b"") -> int:
        """The buckets' seals, then ``meta`` (which seals the version for pointer reads)."""
        self._set([(self._seal_key(prefix, bucket), b"1") for bucket in range(self.BUCKETS)])
        return super().write_meta(meta, prefix)

    def delete_prefix(self, prefix: bytes) -> int:
        if prefix.endswith(META_KEY):  # a version's seal: its buckets' seals go with it, before any record
            with self._reachable():
                self._client.unlink(*(self._seal_key(prefix[:-len(META_KEY)], b) for b in range(self.BUCKETS)))
        return super().delete_prefix(prefix)

    def _fenced_keys(self, pairs: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        users = sum(split_user_key(k) is not None for k, _ in pairs)
        if users:
            raise ConfigError(f"{self.url}: a Redis Cluster cannot write {users} users' records and the real-time "
                              "follower's offset in one atomic write (they span slots); follow an LMDB or a "
                              "single-server Redis store")
        return super()._fenced_keys(pairs)
