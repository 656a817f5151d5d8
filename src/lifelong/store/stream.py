"""Event streams for online training: an embedded append-only log and Redis Streams, one interface.

Monolith trains from a stream (docs/design.md, "Online training"). A producer
appends events (:func:`replay` plays a world's ``events.parquet`` in time order); the online
trainer reads them in batches, joins them into examples (:mod:`lifelong.monolith.joiner`) and
trains. Events travel as numpy structured arrays of :data:`EVENT_DTYPE` (39 packed
little-endian bytes each), appended and read a batch at a time.

Three backends implement :class:`EventStream`:

- :class:`LogStream` (the embedded default): a directory of segment files
  ``<first offset, 20 digits>.log`` of fixed-size records (an event plus a 32-bit checksum).
  Offsets are record numbers. Every append is written straight to the OS (no user-space
  buffer; ``fsync=True`` also forces it to disk). A crash can leave a torn last record, or with
  a power loss zero-filled pages: the log ends at the first record that is incomplete or fails
  its checksum; reads stop there and the next writer cuts it off before appending. One writer
  at a time (a ``flock`` on ``LOCK``); any number of readers, in any process.
- :class:`RedisStream` (multi-host): a Redis stream whose every entry holds one batch of records
  in one field (many events per ``XADD``). Offsets are strings ``"<entry id>"`` (the entry's
  first record) or ``"<entry id>:<k>"`` (its record ``k``), so a read may stop inside an entry.
  Besides offset reads (``XRANGE``) it offers consumer groups (``XREADGROUP``, ``XACK``; entries
  delivered but not acknowledged are delivered again after a consumer restarts).
- :class:`RedisClusterStream` (a Redis Cluster): one Redis stream per partition, hash-tagged to
  spread over the nodes; reads merge the partitions, offsets hold one position per partition.

Exactly-once training: the consumer position is explicit. ``read(offset, n)`` returns the
records and the offset after them; a trainer stores that offset atomically with its model
(and joiner) state and resumes from it after a crash, so every event is applied exactly once.
Consumer groups give at-least-once delivery (an entry applied but not yet acknowledged when the
consumer died comes again): use them to share a stream between consumers, offsets for
exactly-once.

Example::

    with open_stream("log:///data/stream") as stream:
        replay("worlds/small", stream)
    with open_stream("log:///data/stream") as stream:
        offset = checkpoint.get("offset", stream.start_offset())
        for records, offset in stream.batches(offset, 4096):
            train(records)
            save_checkpoint(model, offset)
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import fcntl
import heapq
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import read_table
from lifelong.store.urls import EVENT_STREAM, cluster_unavailable, connect_redis, parse_url, unreachable_errors

__all__ = [
    "DEFAULT_KEY", "EVENT_DTYPE", "Delivery", "EventStream", "LogStream", "Offset", "RedisClusterStream", "RedisStream",
    "ReplayStats", "open_stream", "replay", "to_records",
]

EVENT_DTYPE = np.dtype([
    ("user_id", "<i8"), ("item_id", "<i8"), ("ts_ms", "<i8"), ("action_mask", "<u2"), ("surface", "i1"),
    ("dwell_ms", "<i4"), ("request_id", "<i8"),
])
"""One event as it travels through a stream: the columns of ``EVENT_SCHEMA``, packed, little-endian."""

LOG_DTYPE = np.dtype([("event", EVENT_DTYPE), ("check", "<u4")])
"""One record of a :class:`LogStream` segment file."""

DEFAULT_KEY = "lifelong:events"
"""The Redis key of the stream when a URL names none."""

Offset = int | str
"""A position in a stream: a record number (:class:`LogStream`) or an entry id (:class:`RedisStream`)."""

# splitmix64's finalizer; the seed is nonzero so that an all-zero (never written) record fails.
_SEED = np.uint64(0x243F6A8885A308D3)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)


def _checksum(events: np.ndarray) -> np.ndarray:
    """A 32-bit hash of every field of each record (uint32 array)."""
    h = np.full(len(events), _SEED, dtype=np.uint64)
    for name in EVENT_DTYPE.names:
        h ^= events[name].astype(np.uint64)
        h = (h ^ (h >> _S30)) * _M1
        h = (h ^ (h >> _S27)) * _M2
        h ^= h >> _S31
    return (h >> _S32).astype(np.uint32)


def _valid_prefix(raw: np.ndarray) -> int:
    """How many leading records of a segment slice pass their checksum."""
    bad = np.flatnonzero(raw["check"] != _checksum(raw["event"]))
    return int(bad[0]) if bad.size else len(raw)


def to_records(events: np.ndarray | pa.Table) -> np.ndarray:
    """Events as a contiguous :data:`EVENT_DTYPE` array (no copy when they already are one).

    Args:
        events: a structured array or an Arrow table with (at least) the columns of
            :data:`EVENT_DTYPE`, matched by name.

    Raises:
        ValueError: a column is missing.

    Example::

        >>> t = pa.table({"user_id": [1], "item_id": [2], "ts_ms": [3], "action_mask": [1], "surface": [0],
        ...               "dwell_ms": [0], "request_id": [9]})
        >>> to_records(t)[["item_id", "request_id"]].tolist()
        [(2, 9)]
    """
    if isinstance(events, np.ndarray) and events.dtype == EVENT_DTYPE:
        return np.ascontiguousarray(events)
    names = events.column_names if isinstance(events, pa.Table) else (events.dtype.names or ())
    missing = [n for n in EVENT_DTYPE.names if n not in names]
    if missing:
        raise ValueError(f"events lack the column(s) {', '.join(missing)}; "
                         f"a stream needs {', '.join(EVENT_DTYPE.names)}")
    out = np.empty(len(events), EVENT_DTYPE)
    for name in EVENT_DTYPE.names:
        out[name] = events.column(name).to_numpy() if isinstance(events, pa.Table) else events[name]
    return out


def _check_max_records(max_records: int) -> None:
    if max_records < 1:
        raise ConfigError(f"max_records must be at least 1, got {max_records}")


class EventStream(abc.ABC):
    """An append-only sequence of events, read from explicit offsets.

    Subclasses: :class:`LogStream`, :class:`RedisStream`. Use as a context manager, or call
    :meth:`close`.
    """

    url: str
    """Where the stream lives, for messages."""

    @abc.abstractmethod
    def append(self, records: np.ndarray | pa.Table) -> Offset:
        """Append events (see :func:`to_records`); returns the offset just after them."""

    @abc.abstractmethod
    def read(self, offset: Offset, max_records: int) -> tuple[np.ndarray, Offset]:
        """Up to ``max_records`` events from ``offset`` on, and the offset of the next event.

        Fewer (maybe none) come back at the end of the stream; reading again from the returned
        offset later yields what was appended since.
        """

    @abc.abstractmethod
    def start_offset(self) -> Offset:
        """The offset of the first event."""

    @abc.abstractmethod
    def end_offset(self) -> Offset:
        """The offset after the last event now in the stream (where a reader of new events starts)."""

    def batches(self, offset: Offset, max_records: int) -> Iterator[tuple[np.ndarray, Offset]]:
        """Read from ``offset`` to the current end: ``(records, next offset)`` per non-empty batch."""
        while True:
            records, offset = self.read(offset, max_records)
            if not len(records):
                return
            yield records, offset

    def close(self) -> None:  # noqa: B027 - a stream that holds nothing needs no close
        """Release files, locks and connections (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogStream(EventStream):
    """The embedded backend: an append-only log in a directory of fixed-size-record segments.

    Args:
        path: the log directory (created if missing).
        segment_records: records per segment file before the next one starts (43 bytes each).
        fsync: force every append to disk before returning (survives a power loss, not only a
            process crash; much slower).

    Raises:
        ConfigError: the directory cannot be created.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d, LogStream(d) as log:
        ...     events = np.zeros(5, EVENT_DTYPE)
        ...     events["item_id"] = np.arange(5)
        ...     end = log.append(events)
        ...     records, offset = log.read(3, max_records=10)
        >>> end, records["item_id"].tolist(), offset
        (5, [3, 4], 5)
    """

    SUFFIX = ".log"

    def __init__(self, path: str | os.PathLike[str], segment_records: int = 1 << 20, fsync: bool = False):
        if segment_records < 1:
            raise ConfigError(f"segment_records must be at least 1, got {segment_records}")
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the log directory {self.path}: {exc}") from None
        self.url = f"log://{self.path.resolve()}"
        self.segment_records = segment_records
        self.fsync = fsync
        self.dropped_bytes = 0
        """Bytes of a torn or corrupt tail cut off when this writer opened the log."""
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seg_base = 0
        self._seg_count = 0

    def _segments(self) -> list[int]:
        """First offsets of the segment files, ascending."""
        stems = (name[: -len(self.SUFFIX)] for name in os.listdir(self.path) if name.endswith(self.SUFFIX))
        return sorted(int(s) for s in stems if s.isdigit())

    def _segment_path(self, base: int) -> Path:
        return self.path / f"{base:020d}{self.SUFFIX}"

    def _n_records(self, base: int, next_base: int | None) -> int:
        """Complete records in a segment; every segment but the last must hold exactly its range."""
        size = self._segment_path(base).stat().st_size
        if next_base is not None and size != (next_base - base) * LOG_DTYPE.itemsize:
            raise DataError(self._segment_path(base), f"{size} bytes where {next_base - base} records of "
                                                      f"{LOG_DTYPE.itemsize} bytes belong: the log is corrupted")
        return size // LOG_DTYPE.itemsize

    def start_offset(self) -> int:
        return 0

    def end_offset(self) -> int:
        """Complete records in the log.

        A partial last record is not counted; whole records that fail their checksum (garbage
        left by a power loss, until a writer reopens the log and cuts it off) are, though
        :meth:`read` stops before them.
        """
        bases = self._segments()
        return bases[-1] + self._n_records(bases[-1], None) if bases else 0

    def read(self, offset: Offset, max_records: int) -> tuple[np.ndarray, int]:
        """Up to ``max_records`` events from record ``offset`` on, and the next offset.

        Raises:
            ConfigError: ``offset`` is not a non-negative integer, or ``max_records < 1``.
            DataError: ``offset`` is past the end of the log (a checkpoint of another log?), or
                a segment other than the last is corrupted.
        """
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
            raise ConfigError(f"a log offset is a record number >= 0, got {offset!r}")
        _check_max_records(max_records)
        pos, want, pieces = int(offset), max_records, []
        bases = self._segments()
        i = bisect.bisect_right(bases, pos) - 1
        if not bases or i < 0:
            if pos:
                raise DataError(self.path, f"offset {pos} is past the end of the log (0 records)")
            return np.empty(0, EVENT_DTYPE), 0
        while want and i < len(bases):
            last = i == len(bases) - 1
            base = bases[i]
            n = self._n_records(base, None if last else bases[i + 1])
            if pos > base + n:
                raise DataError(self.path, f"offset {pos} is past the end of the log ({base + n} records): "
                                           "was it saved while reading another log?")
            take = min(want, base + n - pos)
            if take:
                raw = np.fromfile(self._segment_path(base), LOG_DTYPE, count=take,
                                  offset=(pos - base) * LOG_DTYPE.itemsize)
                good = _valid_prefix(raw)
                if good < take and not last:
                    raise DataError(self._segment_path(base), f"record {pos + good} fails its checksum")
                pieces.append(raw["event"][:good])
                pos, want = pos + good, want - good
                if good < take:  # the torn tail: the log ends here
                    break
            i += 1
        return (np.concatenate(pieces) if pieces else np.empty(0, EVENT_DTYPE)), pos

    def _open_writer(self) -> None:
        """Take the writer lock, cut off a torn tail and open the last segment for appending."""
        if self._lock_fd is None:
            lock = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                raise DataError(self.path, "another writer is appending to this log (one writer at a time)") from None
            self._lock_fd = lock
        base = (self._segments() or [0])[-1]
        path = self._segment_path(base)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        good = _valid_prefix(np.fromfile(path, LOG_DTYPE, count=size // LOG_DTYPE.itemsize))
        if good * LOG_DTYPE.itemsize != size:
            os.ftruncate(fd, good * LOG_DTYPE.itemsize)
            self.dropped_bytes = size - good * LOG_DTYPE.itemsize
        self._fd, self._seg_base, self._seg_count = fd, base, good

    def _roll(self) -> None:
        """Start the next segment file."""
        assert self._fd is not None
        if self.fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        base = self._seg_base + self._seg_count
        # O_EXCL: a segment that already exists here was written by someone else.
        self._fd = os.open(self._segment_path(base), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        if self.fsync:
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._seg_base, self._seg_count = base, 0

    def _write(self, chunk: np.ndarray) -> None:
        assert self._fd is not None
        start = self._seg_count * LOG_DTYPE.itemsize
        data = memoryview(chunk.tobytes())
        try:
            while data:
                data = data[os.write(self._fd, data):]
            if self.fsync:
                os.fsync(self._fd)
        except BaseException:
            # A half-written batch would shift every later record: take it back.
            os.ftruncate(self._fd, start)
            raise
        self._seg_count += len(chunk)

    def append(self, records: np.ndarray | pa.Table) -> int:
        """Append events; returns the new end offset.

        The first append of this object takes the writer lock and repairs a torn tail. A batch
        that spans segments is written one segment piece at a time: if writing fails, the
        pieces written before stay.

        Raises:
            DataError: another writer holds the log.
        """
        events = to_records(records)
        if self._fd is None:
            self._open_writer()
        buf = np.empty(len(events), LOG_DTYPE)
        buf["event"], buf["check"] = events, _checksum(events)
        done = 0
        while done < len(buf):
            if self._seg_count >= self.segment_records:
                self._roll()
            k = min(len(buf) - done, self.segment_records - self._seg_count)
            self._write(buf[done:done + k])
            done += k
        return self._seg_base + self._seg_count

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


_ENTRY_OFFSET = re.compile(r"(\d+)-(\d+)(?::(\d+))?")


def _parse_offset(offset: Offset) -> tuple[str, int]:
    """``"ms-seq[:k]"`` -> (entry id, record index within it)."""
    match = _ENTRY_OFFSET.fullmatch(offset) if isinstance(offset, str) else None
    if match is None:
        raise ConfigError(f"a Redis stream offset is '<ms>-<seq>' or '<ms>-<seq>:<k>', got {offset!r}")
    return f"{match[1]}-{match[2]}", int(match[3] or 0)


def _next_id(entry_id: bytes | str) -> str:
    """The smallest entry id after ``entry_id``."""
    ms, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")
    return f"{ms}-{int(seq) + 1}"


@dataclass(frozen=True)
class Delivery:
    """One stream entry delivered to a consumer of a group.

    Args:
        entry_id: acknowledge it with :meth:`RedisStream.ack` once its effect is committed.
        records: its events (read-only, a view of the received bytes).
    """

    entry_id: str
    records: np.ndarray


class RedisStream(EventStream):
    """The multi-host backend: a Redis stream of entries, each one batch of packed events.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://`` for TLS), no query.
        key: the stream's key.
        entry_records: most events per entry; a larger append becomes several entries, added
            in one transaction (readers see all of them or none).
        connect_timeout_s: how long to wait for the server before giving up.

    Raises:
        ConfigError: a malformed URL, a server that does not answer, or a key holding
            something other than a stream.

    Example::

        stream = RedisStream("redis://localhost:6379/0", key="lifelong:events")
        offset = stream.append(events)                  # '1717171717171-1'
        records, offset = stream.read("0-0", 10_000)    # explicit offsets: exactly-once
        stream.create_group("trainers")
        for d in stream.read_group("trainers", "host-1"):   # groups: at-least-once
            train(d.records)
            stream.ack("trainers", [d.entry_id])
    """

    FIELD = b"events"

    def __init__(self, url: str, key: str = DEFAULT_KEY, entry_records: int = 4096, connect_timeout_s: float = 5.0):
        if entry_records < 1:
            raise ConfigError(f"entry_records must be at least 1, got {entry_records}")
        if not key:
            raise ConfigError("the Redis stream key is empty")
        self._client = connect_redis(url, connect_timeout_s)
        self.key = key
        self.url = f"{url}?key={key}"
        self.entry_records = entry_records
        # Per (group, consumer): "0"-based cursor through its pending entries, then ">" for new ones.
        self._cursors: dict[tuple[str, str], str] = {}
        kind = self._client.type(key).decode()
        if kind not in ("none", "stream"):
            self._client.close()
            raise ConfigError(f"Redis key {key!r} at {url} holds a {kind}, not a stream")

    def _decode(self, entry_id: bytes, fields: dict[bytes, Any]) -> np.ndarray:
        data = fields.get(self.FIELD)
        if data is None or len(data) % EVENT_DTYPE.itemsize:
            raise DataError(self.url, f"entry {entry_id.decode()} is not a batch of events (a field "
                                      f"{self.FIELD.decode()!r} of {EVENT_DTYPE.itemsize}-byte records)")
        return np.frombuffer(data, EVENT_DTYPE)

    def append(self, records: np.ndarray | pa.Table) -> str:
        events = to_records(records)
        if not len(events):
            return self.end_offset()
        pipe = self._client.pipeline(transaction=True)
        for start in range(0, len(events), self.entry_records):
            pipe.xadd(self.key, {self.FIELD: events[start:start + self.entry_records].tobytes()})
        return _next_id(pipe.execute()[-1])

    def start_offset(self) -> str:
        return "0-0"

    def end_offset(self) -> str:
        if not self._client.exists(self.key):
            return "0-0"
        # last-generated-id, not the last entry: entries may have been deleted.
        return _next_id(self._client.xinfo_stream(self.key)["last-generated-id"])

    def read(self, offset: Offset, max_records: int) -> tuple[np.ndarray, str]:
        """Up to ``max_records`` events from ``offset`` on (``XRANGE``), and the next offset.

        Raises:
            ConfigError: a malformed offset, or ``max_records < 1``.
            DataError: the offset points inside an entry that no longer exists, or an entry
                is not a batch of events.
        """
        cursor, skip = _parse_offset(offset)
        _check_max_records(max_records)
        pieces, got = [], 0
        while got < max_records:
            # Entries hold up to entry_records events: ask for about enough, loop if short.
            count = (max_records - got + skip) // self.entry_records + 1
            entries = self._client.xrange(self.key, min=cursor, count=count)
            if not entries:
                break
            if skip and entries[0][0].decode() != cursor:
                raise DataError(self.url, f"offset {offset!r} points inside entry {cursor}, which is gone")
            for entry_id, fields in entries:
                records = self._decode(entry_id, fields)
                take = records[skip:skip + max_records - got]
                pieces.append(take)
                got += len(take)
                if skip + len(take) < len(records):  # stopped inside this entry
                    return np.concatenate(pieces), f"{entry_id.decode()}:{skip + len(take)}"
                skip, cursor = 0, _next_id(entry_id)
                if got == max_records:
                    break
        records = np.concatenate(pieces) if pieces else np.empty(0, EVENT_DTYPE)
        return records, (f"{cursor}:{skip}" if skip else cursor)

    def create_group(self, group: str, last_id: str = "0") -> bool:
        """Create a consumer group (and the stream, if missing); False if it already exists.

        Args:
            group: the group's name.
            last_id: the group delivers entries after this id: ``"0"`` everything, ``"$"``
                only entries appended from now on.
        """
        import redis  # loaded already: connect_redis imported it

        try:
            self._client.xgroup_create(self.key, group, id=last_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    def _deliveries(self, group: str, entries: list[tuple[bytes, dict[bytes, Any]]]) -> list[Delivery]:
        # An entry deleted (XDEL, trimming) while pending comes back without fields: nothing to
        # deliver, so acknowledge it to clear it from the pending list.
        gone = [entry_id for entry_id, fields in entries if not fields]
        if gone:
            self.ack(group, [g.decode() for g in gone])
        return [Delivery(entry_id.decode(), self._decode(entry_id, fields)) for entry_id, fields in entries if fields]

    def read_group(self, group: str, consumer: str, max_entries: int = 16,
                   block_ms: int | None = None) -> list[Delivery]:
        """Entries for ``consumer`` of ``group``: first its pending (delivered, unacknowledged)
        entries, then new ones.

        A consumer that restarts under the same name (a new object, e.g. a new process) thus
        first gets again what it had received but not acknowledged.

        Args:
            group: a group made by :meth:`create_group`.
            consumer: this consumer's stable name.
            max_entries: most entries per call.
            block_ms: wait up to this long for new entries when there are none (None: don't wait).

        Raises:
            ConfigError: the group does not exist.
        """
        import redis  # loaded already: connect_redis imported it

        slot = (group, consumer)
        while True:
            cursor = self._cursors.get(slot, "0")
            try:
                reply = self._client.xreadgroup(group, consumer, {self.key: cursor}, count=max_entries,
                                                block=block_ms if cursor == ">" else None)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    raise ConfigError(f"no consumer group {group!r} on {self.url}: call create_group first") from None
                raise
            entries = reply[0][1] if reply else []
            if cursor == ">":
                return self._deliveries(group, entries)
            if not entries:  # no pending entries left: new ones from now on
                self._cursors[slot] = ">"
                continue
            self._cursors[slot] = entries[-1][0].decode()
            deliveries = self._deliveries(group, entries)
            if deliveries:
                return deliveries

    def claim_stale(self, group: str, consumer: str, min_idle_ms: int, max_entries: int = 16) -> list[Delivery]:
        """Take over entries pending at other consumers of ``group`` for ``min_idle_ms`` or more
        (their consumer presumably died), and return them (``XAUTOCLAIM``)."""
        _, entries, *_ = self._client.xautoclaim(self.key, group, consumer, min_idle_ms, start_id="0-0",
                                                 count=max_entries)
        return self._deliveries(group, entries)

    def ack(self, group: str, entry_ids: list[str]) -> int:
        """Acknowledge delivered entries (once their effect is committed); returns how many were pending."""
        return int(self._client.xack(self.key, group, *entry_ids)) if entry_ids else 0

    def close(self) -> None:
        self._client.close()


class RedisClusterStream(EventStream):
    """A stream on a Redis Cluster: ``partitions`` Redis streams, ``KEY{0}``, ``KEY{1}``, …,
    whose hash tags spread them over the nodes; an event goes to partition ``user_id %
    partitions``, so a user's events keep their order.

    Offsets are strings of one :class:`RedisStream` offset per partition joined by ``|``
    (``"1717171717171-1|0-0:3|…"``). :meth:`read` merges the partitions by entry id (the time
    an entry was added, then the partition), and the offset it returns moves each partition past
    what it took, so offset reads stay exactly-once. An append is one transaction per partition
    it touches (a reader sees each partition's part whole, but may see one partition's before
    another's). Consumer groups span every partition: :meth:`create_group` makes the group on
    each, :meth:`read_group` takes each partition's pending entries, then new ones, round robin
    from a rotating first partition, and waits by polling (a blocking read covers one slot
    only). A delivery's ``entry_id`` is ``"<partition>/<entry id>"``.

    The number of partitions is fixed when the stream is first opened and recorded in
    ``KEY:partitions``; later opens read it (giving another number is an error).

    A node that cannot answer makes the operation raise
    :class:`~lifelong.core.errors.StoreUnavailable` naming it.

    Args:
        url: ``redis-cluster://host:port[,host:port...]``, no query.
        key: the streams' key, before the partition's hash tag.
        partitions: the number of partitions (None: the recorded one, else
            :attr:`DEFAULT_PARTITIONS`).
        entry_records: most events per entry.
        connect_timeout_s: how long to wait for the nodes before giving up.

    Raises:
        ConfigError: a malformed URL, an unreachable cluster, a partition key holding
            something other than a stream, or ``partitions`` other than the recorded number.

    Example::

        stream = RedisClusterStream("redis-cluster://10.0.0.5:7000,10.0.0.6:7000", key="lifelong:events")
        offset = stream.append(events)                      # '1717171717171-1|1717171717171-1|...'
        records, offset = stream.read(stream.start_offset(), 10_000)
    """

    FIELD = RedisStream.FIELD
    DEFAULT_PARTITIONS = 8
    MAX_PARTITIONS = 1024
    POLL_S = 0.01
    """How often :meth:`read_group` looks again while it waits for new entries."""

    def __init__(self, url: str, key: str = DEFAULT_KEY, partitions: int | None = None, entry_records: int = 4096,
                 connect_timeout_s: float = 5.0):
        if entry_records < 1:
            raise ConfigError(f"entry_records must be at least 1, got {entry_records}")
        if not key:
            raise ConfigError("the Redis stream key is empty")
        if partitions is not None and not 1 <= partitions <= self.MAX_PARTITIONS:
            raise ConfigError(f"partitions must be from 1 to {self.MAX_PARTITIONS}, got {partitions}")
        self._client = connect_redis(url, connect_timeout_s, socket_timeout_s=max(connect_timeout_s, 10.0))
        self.key = key
        self.url = f"{url}?key={key}"
        self.entry_records = entry_records
        self._cursors: dict[tuple[str, str, int], str] = {}  # as RedisStream's, per partition
        self._first = 0  # read_group's first partition, rotated per call
        try:
            with self._reachable():
                count_key = f"{key}:partitions"
                self._client.set(count_key, partitions or self.DEFAULT_PARTITIONS, nx=True)
                self.partitions = int(self._client.get(count_key))
                if partitions is not None and partitions != self.partitions:
                    raise ConfigError(f"{self.url} has {self.partitions} partitions (recorded in {count_key!r}), "
                                      f"not {partitions}")
                self.keys = [f"{key}{{{p}}}" for p in range(self.partitions)]
                for part_key in self.keys:
                    kind = self._client.type(part_key).decode()
                    if kind not in ("none", "stream"):
                        raise ConfigError(f"Redis key {part_key!r} at {url} holds a {kind}, not a stream")
        except BaseException:
            self._client.close()
            raise

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """A node that cannot answer: :class:`StoreUnavailable`, in one line naming it."""
        try:
            yield
        except unreachable_errors() as exc:
            raise cluster_unavailable(self._client, self.url, exc) from None

    def _decode(self, p: int, entry_id: bytes, fields: dict[bytes, Any]) -> np.ndarray:
        data = fields.get(self.FIELD)
        if data is None or len(data) % EVENT_DTYPE.itemsize:
            raise DataError(self.url, f"entry {entry_id.decode()} of partition {p} is not a batch of events (a field "
                                      f"{self.FIELD.decode()!r} of {EVENT_DTYPE.itemsize}-byte records)")
        return np.frombuffer(data, EVENT_DTYPE)

    def _parse(self, offset: Offset) -> list[tuple[str, int]]:
        parts = offset.split("|") if isinstance(offset, str) else []
        if len(parts) != self.partitions:
            raise ConfigError(f"an offset of {self.url} is {self.partitions} offsets '<ms>-<seq>[:<k>]' joined by "
                              f"'|' (one per partition), got {offset!r}")
        return [_parse_offset(part) for part in parts]

    @staticmethod
    def _format(positions: list[tuple[str, int]]) -> str:
        return "|".join(f"{cursor}:{skip}" if skip else cursor for cursor, skip in positions)

    def append(self, records: np.ndarray | pa.Table) -> str:
        events = to_records(records)
        if not len(events):
            return self.end_offset()
        part = events["user_id"] % self.partitions
        ends = []
        with self._reachable():
            for p, key in enumerate(self.keys):
                chunk = events[part == p]
                if not len(chunk):
                    ends.append(self._end(key))
                    continue
                pipe = self._client.pipeline(transaction=True)  # one slot: MULTI/EXEC on its node
                for start in range(0, len(chunk), self.entry_records):
                    pipe.xadd(key, {self.FIELD: chunk[start:start + self.entry_records].tobytes()})
                ends.append(_next_id(pipe.execute()[-1]))
        return "|".join(ends)

    def start_offset(self) -> str:
        return "|".join(["0-0"] * self.partitions)

    def _end(self, key: str) -> str:
        if not self._client.exists(key):
            return "0-0"
        return _next_id(self._client.xinfo_stream(key)["last-generated-id"])

    def end_offset(self) -> str:
        with self._reachable():
            return "|".join(self._end(key) for key in self.keys)

    def _entries(self, p: int, cursor: str, skip: int,
                 want: int) -> Iterator[tuple[tuple[int, int], int, bytes, np.ndarray]]:
        """Partition ``p``'s entries from ``cursor`` on, fetched about ``want`` records at a time,
        keyed for the merge by (entry id, partition)."""
        first = True
        while True:
            count = (want + skip) // self.entry_records + 1
            with self._reachable():
                entries = self._client.xrange(self.keys[p], min=cursor, count=count)
            if not entries:
                return
            if first and skip and entries[0][0].decode() != cursor:
                raise DataError(self.url, f"offset points inside entry {cursor} of partition {p}, which is gone")
            first, skip = False, 0
            for entry_id, fields in entries:
                ms, seq = entry_id.split(b"-")
                yield (int(ms), int(seq)), p, entry_id, self._decode(p, entry_id, fields)
            if len(entries) < count:
                return
            cursor = _next_id(entries[-1][0])

    def read(self, offset: Offset, max_records: int) -> tuple[np.ndarray, str]:
        """Up to ``max_records`` events from ``offset`` on, the partitions merged by entry id,
        and the next offset.

        Raises:
            ConfigError: a malformed offset, or ``max_records < 1``.
            DataError: the offset points inside an entry that no longer exists, or an entry
                is not a batch of events.
        """
        positions = self._parse(offset)
        _check_max_records(max_records)
        pieces, got = [], 0
        merged = heapq.merge(*(self._entries(p, cursor, skip, max_records)
                               for p, (cursor, skip) in enumerate(positions)))
        for _, p, entry_id, records in merged:
            skip = positions[p][1]
            take = records[skip:skip + max_records - got]
            pieces.append(take)
            got += len(take)
            if skip + len(take) < len(records):  # stopped inside this entry
                positions[p] = (entry_id.decode(), skip + len(take))
                break
            positions[p] = (_next_id(entry_id), 0)
            if got == max_records:
                break
        return (np.concatenate(pieces) if pieces else np.empty(0, EVENT_DTYPE)), self._format(positions)

    def create_group(self, group: str, last_id: str = "0") -> bool:
        """Create a consumer group on every partition (and the streams, if missing); False if it
        existed on all of them already.

        Args:
            group: the group's name.
            last_id: each partition's group delivers entries after this id: ``"0"`` everything,
                ``"$"`` only entries appended from now on.
        """
        import redis  # loaded already: connect_redis imported it

        created = False
        with self._reachable():
            for key in self.keys:
                try:
                    self._client.xgroup_create(key, group, id=last_id, mkstream=True)
                    created = True
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        return created

    def _deliveries(self, group: str, p: int, entries: list[tuple[bytes, dict[bytes, Any]]]) -> list[Delivery]:
        # As RedisStream's: an entry deleted while pending comes back without fields; clear it.
        gone = [f"{p}/{entry_id.decode()}" for entry_id, fields in entries if not fields]
        if gone:
            self.ack(group, gone)
        return [Delivery(f"{p}/{entry_id.decode()}", self._decode(p, entry_id, fields))
                for entry_id, fields in entries if fields]

    def _read_partition(self, group: str, consumer: str, p: int, cursor: str, max_entries: int
                        ) -> list[tuple[bytes, dict[bytes, Any]]]:
        import redis  # loaded already: connect_redis imported it

        try:
            reply = self._client.xreadgroup(group, consumer, {self.keys[p]: cursor}, count=max_entries)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise ConfigError(f"no consumer group {group!r} on {self.url}: call create_group first") from None
            raise
        return reply[0][1] if reply else []

    def _pending(self, group: str, consumer: str, p: int, max_entries: int) -> list[Delivery]:
        """Partition ``p``'s entries delivered to ``consumer`` and not acknowledged, from its
        cursor on; none left moves its cursor to new entries (``">"``)."""
        slot = (group, consumer, p)
        while (cursor := self._cursors.get(slot, "0")) != ">":
            entries = self._read_partition(group, consumer, p, cursor, max_entries)
            if not entries:
                self._cursors[slot] = ">"
                break
            self._cursors[slot] = entries[-1][0].decode()
            deliveries = self._deliveries(group, p, entries)
            if deliveries:
                return deliveries
        return []

    def read_group(self, group: str, consumer: str, max_entries: int = 16,
                   block_ms: int | None = None) -> list[Delivery]:
        """Entries for ``consumer`` of ``group``: first the pending (delivered, unacknowledged)
        entries of any partition, then new ones; see :meth:`RedisStream.read_group`.

        Args:
            block_ms: look again every :attr:`POLL_S` for up to this long while there are none
                (None: don't wait).

        Raises:
            ConfigError: the group does not exist.
        """
        deadline = None if block_ms is None else time.monotonic() + block_ms / 1000
        while True:
            order = [(self._first + i) % self.partitions for i in range(self.partitions)]
            self._first = (self._first + 1) % self.partitions
            out: list[Delivery] = []
            with self._reachable():
                for p in order:
                    if len(out) < max_entries:
                        out += self._pending(group, consumer, p, max_entries - len(out))
                if not out:  # no partition holds pending entries any more: new ones
                    for p in order:
                        if len(out) < max_entries:
                            out += self._deliveries(group, p, self._read_partition(group, consumer, p, ">",
                                                                                    max_entries - len(out)))
            left = 0.0 if deadline is None else deadline - time.monotonic()
            if out or left <= 0:
                return out
            time.sleep(min(self.POLL_S, left))

    def claim_stale(self, group: str, consumer: str, min_idle_ms: int, max_entries: int = 16) -> list[Delivery]:
        """Take over entries of every partition pending at other consumers of ``group`` for
        ``min_idle_ms`` or more, and return them (``XAUTOCLAIM``)."""
        out: list[Delivery] = []
        with self._reachable():
            for p, key in enumerate(self.keys):
                if len(out) >= max_entries:
                    break
                _, entries, *_ = self._client.xautoclaim(key, group, consumer, min_idle_ms, start_id="0-0",
                                                         count=max_entries - len(out))
                out += self._deliveries(group, p, entries)
        return out

    def ack(self, group: str, entry_ids: list[str]) -> int:
        """Acknowledge delivered entries (``"<partition>/<entry id>"``); returns how many were pending."""
        by_partition: dict[int, list[str]] = {}
        for entry in entry_ids:
            p, _, entry_id = entry.partition("/")
            if not p.isdigit() or int(p) >= self.partitions or not _ENTRY_OFFSET.fullmatch(entry_id):
                raise ConfigError(f"a delivery of {self.url} is '<partition>/<ms>-<seq>', got {entry!r}")
            by_partition.setdefault(int(p), []).append(entry_id)
        with self._reachable():
            return sum(int(self._client.xack(self.keys[p], group, *ids)) for p, ids in by_partition.items())

    def close(self) -> None:
        self._client.close()


def open_stream(url: str | os.PathLike[str], **kwargs: Any) -> EventStream:
    """Open the event stream at ``url``.

    Args:
        url: ``redis://host:port/db`` (:class:`RedisStream`; the key comes from a ``?key=``
            query, else :data:`DEFAULT_KEY`), ``redis-cluster://host:port[,host:port...]``
            (:class:`RedisClusterStream`; ``?key=`` as for Redis, ``?partitions=`` when it is
            first made), ``log:///absolute/path`` or a plain path (:class:`LogStream`).
        kwargs: passed to the backend's constructor.

    Raises:
        ConfigError: a malformed or unknown URL, or an unreachable Redis server or cluster.

    Example::

        >>> open_stream("kafka://broker/events")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: unknown event stream URL scheme 'kafka' in 'kafka://broker/events': expected redis://host:port/db[?key=name], log:///absolute/path or a directory path (or redis-cluster://host:port[,host:port...][?key=name&partitions=n])
    """
    target = parse_url(url, EVENT_STREAM)
    if target.scheme == "redis" and target.cluster:
        partitions = target.params.get("partitions")
        if partitions is not None and not partitions.isdigit():
            raise ConfigError(f"bad Redis Cluster event stream URL {url!r}: partitions= is a number")
        return RedisClusterStream(target.location, key=target.params.get("key", DEFAULT_KEY),
                                  partitions=None if partitions is None else int(partitions), **kwargs)
    if target.scheme == "redis":
        return RedisStream(target.location, key=target.params.get("key", DEFAULT_KEY), **kwargs)
    return LogStream(target.location, **kwargs)


@dataclass(frozen=True)
class ReplayStats:
    """What :func:`replay` appended.

    Args:
        events: events appended.
        appends: calls to ``stream.append``.
        first_ts_ms, last_ts_ms: time span of the events (None when there were none).
        end_offset: the stream's offset after the last event.
        wall_s: seconds taken.
    """

    events: int
    appends: int
    first_ts_ms: int | None
    last_ts_ms: int | None
    end_offset: Offset
    wall_s: float


def replay(dataset_dir: str | os.PathLike[str], stream: EventStream, start_ms: int | None = None,
           end_ms: int | None = None, batch: int = 4096, speedup: float | None = None, skip: int = 0) -> ReplayStats:
    """Append a dataset's events to ``stream`` in time order, as a live producer would.

    ``events.parquet`` is sorted by user, then time; the replay order is (ts_ms, user_id, row in
    the file), a stable total order, so two replays of one dataset give the same stream.

    Args:
        dataset_dir: a world or ingested dataset directory.
        stream: where to append.
        start_ms, end_ms: replay only events with ``start_ms <= ts_ms < end_ms`` (None: no bound).
        batch: most events per append.
        speedup: None to append as fast as possible; else pace the events by their
            timestamps, ``speedup`` event-milliseconds per wall millisecond (1.0 = real time):
            no event is appended before its time, events due together go in one append.
        skip: leave out the first ``skip`` events of that order: a producer resuming a replay
            whose first ``skip`` events are already in the stream.

    Raises:
        ConfigError: ``batch < 1``, ``speedup <= 0`` or ``skip < 0``.
        DataError: the events file is missing or invalid.
    """
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    if speedup is not None and not speedup > 0:
        raise ConfigError(f"speedup must be > 0 (or None for as fast as possible), got {speedup}")
    if skip < 0:
        raise ConfigError(f"skip must be >= 0, got {skip}")
    t0 = time.monotonic()
    records = to_records(read_table(Path(dataset_dir) / "events.parquet", "events"))
    ts = records["ts_ms"]
    keep = np.ones(len(records), dtype=bool)
    if start_ms is not None:
        keep &= ts >= start_ms
    if end_ms is not None:
        keep &= ts < end_ms
    records = records[keep]
    records = records[np.lexsort((records["user_id"], records["ts_ms"]))][skip:]  # lexsort is stable: ties keep file order
    ts = records["ts_ms"]
    n, done, appends = len(records), 0, 0
    offset: Offset = stream.end_offset()
    paced_from = time.monotonic()
    while done < n:
        stop = min(done + batch, n)
        if speedup is not None:
            due_ms = ts[0] + (time.monotonic() - paced_from) * 1000.0 * speedup
            stop = min(stop, int(np.searchsorted(ts, due_ms, side="right")))
            if stop == done:
                time.sleep((ts[done] - due_ms) / speedup / 1000.0)
                continue
        offset = stream.append(records[done:stop])
        done, appends = stop, appends + 1
    return ReplayStats(events=n, appends=appends, first_ts_ms=int(ts[0]) if n else None,
                       last_ts_ms=int(ts[-1]) if n else None, end_offset=offset, wall_s=time.monotonic() - t0)
