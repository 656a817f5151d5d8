"""The multi-host feature store backend: a Redis database (see :mod:`lifelong.store.feature_store`).

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

import redis

from lifelong.core.errors import StoreUnavailable, WriterLocked
from lifelong.store.feature_store import (
    WRITER_KEY,
    FeatureStore,
    StoreReader,
    WriterLock,
    holder,
    locked_message,
)
from lifelong.store.urls import connect_redis

__all__ = ["RedisStore"]

# KEYS[1] the lock, ARGV[1] the holder's token. Each runs atomically on the server.
_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# KEYS[2..] and ARGV[2..]: the pairs to write, only while the lock is still the holder's.
_FENCED_SET = """if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #KEYS do redis.call('set', KEYS[i], ARGV[i]) end
return 1"""

_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


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

    def __init__(self, url: str, connect_timeout_s: float = 5.0, lock_ttl_s: float = 30.0):
        super().__init__(url)
        self._client = connect_redis(url, connect_timeout_s, socket_timeout_s=max(connect_timeout_s, 10.0))
        self.lock_ttl_s = lock_ttl_s

    @contextlib.contextmanager
    def reader(self) -> Iterator[StoreReader]:
        yield StoreReader(self._get_many, self.url)

    def _get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            return self._client.mget([self.NAMESPACE + k for k in keys])
        except _UNREACHABLE as exc:
            raise StoreUnavailable(self.url, f"cannot reach Redis ({exc})") from None

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn a lost connection into :class:`StoreUnavailable` (one line from the CLI, 503 from the service)."""
        try:
            yield
        except _UNREACHABLE as exc:
            raise StoreUnavailable(self.url, f"cannot reach Redis ({exc})") from None

    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, value in pairs:
            pipe.set(self.NAMESPACE + key, value)
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
        key = self.NAMESPACE + (WRITER_KEY if name == "writer" else b"fs:lock:" + name.encode())
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
                except redis.RedisError:
                    pass  # try again at the next tick; the fenced writes refuse if it expired meanwhile

        thread = threading.Thread(target=refresh, name="store-writer-lock", daemon=True)
        thread.start()
        try:
            yield lock
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(redis.RedisError):
                self._client.eval(_RELEASE, 1, key, token)

    def close(self) -> None:
        self._client.close()


class _RedisLock(WriterLock):
    def __init__(self, store: RedisStore, key: bytes, token: str):
        self._store, self._key, self._token = store, key, token
        self.lost = False

    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        keys = [self._key, *(self._store.NAMESPACE + k for k, _ in pairs)]
        with self._store._reachable():
            done = not self.lost and self._store._client.eval(_FENCED_SET, len(keys), *keys, self._token,
                                                              *(v for _, v in pairs))
        if not done:
            raise WriterLocked(f"{self._store.url}: this load lost the writer lock (it stalled for more than "
                               f"{self._store.lock_ttl_s:g} s and the lock expired); nothing was switched, run it again")
