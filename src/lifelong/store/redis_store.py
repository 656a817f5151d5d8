"""The multi-host feature store backend: a Redis database (see :mod:`lifelong.store.feature_store`).

Imported by :func:`~lifelong.store.feature_store.open_store` when a URL names Redis, so that only
a process that opens a Redis store loads ``redis``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

from lifelong.store.feature_store import FeatureStore, StoreReader
from lifelong.store.urls import connect_redis

__all__ = ["RedisStore"]


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
        self._client = connect_redis(url, connect_timeout_s)

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
