"""The embedded feature store backend: an LMDB environment (see :mod:`lifelong.store.feature_store`).

Imported by :func:`~lifelong.store.feature_store.open_store` when a URL names LMDB, so that only
a process that opens an LMDB store loads ``lmdb``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import lmdb

from lifelong.core.errors import ConfigError, DataError, WriterLocked
from lifelong.store.feature_store import FeatureStore, StoreReader, WriterLock, holder, locked_message

__all__ = ["LOCK_FILE", "LMDBStore"]

LOCK_FILE = "writer.lock"  # the lock named "writer": loads and the real-time follower
LOCK_RECORD_BYTES = 512
"""The writer lock's file, in the environment's directory next to ``data.mdb``."""

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
        ...     store.put([(b"k", b"v")])
        ...     with store.writer_lock() as lock, store.reader() as r:
        ...         [None if v is None else bytes(v) for v in r.values([b"k", b"x"])]
        [b'v', None]
    """

    snapshot_reads = True

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
            yield StoreReader(lambda keys: [txn.get(k) for k in keys], self.url, snapshot=True)

    @contextlib.contextmanager
    def writer_lock(self, role: str = "load", name: str = "writer") -> Iterator[WriterLock]:
        """An exclusive ``flock`` on ``writer.lock`` in the store's directory, taken without
        waiting. The kernel drops it when its holder exits, however it exits, so a killed
        loader never leaves the store locked. (``flock``, unlike ``fcntl``'s record locks, also
        refuses a second holder inside the same process.)"""
        self._require_writable()
        path = self.path / f"{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    held_by = json.loads(os.pread(fd, 4096, 0) or b"null")
                except ValueError:
                    held_by = None
                raise WriterLocked(locked_message(self.url, held_by), held_by) from None
            # Overwritten, never emptied: a writer refused at any moment reads a whole record (the
            # last holder's while the lock is free), which tells a load to wait for a follower.
            # One write of a fixed width (JSON padded with spaces), so no reader sees a record half
            # replaced by the next holder's.
            record = json.dumps(holder(role)).encode().ljust(LOCK_RECORD_BYTES)
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
            try:
                yield _FileLock(self)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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


class _FileLock(WriterLock):
    """A held ``flock``: it cannot be lost while its holder lives, so a write needs no fence."""

    def __init__(self, store: LMDBStore):
        self._store = store

    def put(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        self._store.put(pairs)
