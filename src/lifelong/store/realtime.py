"""Real-time features: a consumer that appends a stream's new events to the served feature store.

A user's record (:class:`~lifelong.store.sequences.UserSequences`) is written by ``lifelong
store load`` from a dataset; the events that happen after that load reach the store through an
event stream (:mod:`lifelong.store.stream`) and this consumer (``lifelong store follow``), so the
next request of a user sees its new actions in S_RT, S_LL and its new impressions in S_imp.

One **batch** (:meth:`RealtimeConsumer.step`) is one short critical section:

1. take the store's writer lock (the one ``store load`` holds for its whole run); when it is
   busy, wait and try again, never fail;
2. read the pointer, then the served version's consumer state ``fs:v:<n>:rt`` (JSON: the stream
   ``offset`` to read next, the version's ``horizon_ms``, counters); a version without one was
   just loaded: its state is made (see *Versions* below);
3. read up to ``batch`` events of the stream from that offset; keep those newer than the
   version's horizon, of an item the version's table holds, that are explicit actions or bare
   impressions (the two kinds a record keeps);
4. group them by user (one ``lexsort``), read each touched user's record once (one ``MGET`` on
   Redis, one read transaction on LMDB), merge its events in by time, cut the record to the
   version's caps and encode it;
5. write every touched record **and the new state (with the stream offset after the batch)** in
   one atomic, fenced write (:meth:`~lifelong.store.feature_store.WriterLock.put`: one LMDB
   write transaction; one Lua script on Redis, which runs atomically like ``MULTI/EXEC`` and
   only while the lock is still this consumer's).

So a reader sees each record before or after a batch, never torn, and a consumer killed at any
point resumes from the offset committed with the records it wrote: no event is lost or applied
twice (exactly once, as long as one follower runs per store; a second one waits for the lock).

**Order.** A record's arrays stay sorted by event time, in the order the builder's timelines
use. The events of a batch are sorted by ``(ts_ms, request_id, item_id)``, the events table's
order. An event older than the record's newest token is inserted at its time (counted in
``late``); one whose time equals stored tokens' goes after them (arrival order).

**Caps.** A touched record keeps the newest ``ll_cap + rt`` explicit actions (S_LL and S_RT of
a request after every stored event, unchanged) and the newest ``imp_cap`` impressions, from the
version's ``meta``; older tokens fall off. Untouched records keep what the load wrote.

**Versions.** Appends go into the served version. A version holds every event up to its
*horizon*: ``meta["source_last_ts_ms"]`` when the loader recorded it, else the newest event
time of the source's ``events.parquet`` (``meta["data"]``; read from its Parquet statistics).
Events at or before the horizon are counted as ``in_load`` and skipped. When a load switches in
a new version, the consumer starts that version's state at the newest stream position known
(from the previous version's state) before which no event is newer than the new horizon, so it
re-applies every event the new version lacks. Each state keeps a few ``marks``
``[offset, newest event time before it]`` for this.

**Counted and skipped**: events naming an item the version's table lacks (``unknown_item``),
events that are neither an explicit action nor a bare impression (``other``), events at or
before the version's horizon (``in_load``).

Example::

    with RealtimeConsumer("lmdb:///srv/store", "log:///srv/events") as consumer:
        consumer.run_until_caught_up()            # what `lifelong store follow --once` does
        print(consumer.state()["offset"])
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from lifelong.core.errors import ConfigError, StoreUnavailable, WriterLocked
from lifelong.data.schema import EXPLICIT_BITS, Action
from lifelong.store.feature_store import (
    META_KEY,
    POINTER_KEY,
    FeatureStore,
    StoreReader,
    VersionGone,
    WriterLock,
    json_record,
    open_store,
    parse_pointer,
    user_key,
    version_name,
    version_prefix,
)
from lifelong.store.sequences import ItemRecords, UserSequences
from lifelong.store.stream import EventStream, Offset, open_stream

__all__ = ["RT_KEY", "BatchStats", "RealtimeConsumer", "merge_user", "version_horizon"]

RT_KEY = b"rt"
"""The consumer's state inside a version: ``fs:v:<n>:rt`` (JSON)."""

MAX_MARKS = 32
"""Most ``[offset, newest event time before it]`` marks a state keeps (older ones are thinned)."""

_IMPRESSION = int(Action.IMPRESSION)
_COUNTERS = ("events", "explicit", "impressions", "late", "in_load", "unknown_item", "other", "batches")
_EXPLICIT = ("ts_ms", "item", "action", "surface", "emb")


@dataclass
class BatchStats:
    """What one :meth:`RealtimeConsumer.step` did.

    Args:
        version: the version appended to (``v7``).
        events: events read from the stream.
        explicit, impressions: tokens appended.
        late: appended tokens older than their record's newest (inserted in time order).
        in_load, unknown_item, other: events skipped (see the module docstring).
        users: records rewritten.
        offset: the stream offset committed with them.
        new_version: the version's state was made in this batch (a load switched in).
        lock_wait_s: seconds spent waiting for the writer lock.
        seconds: the whole batch, lock wait included.
        newest_ms: the newest event time appended (None: none).
    """

    version: str
    events: int = 0
    explicit: int = 0
    impressions: int = 0
    late: int = 0
    in_load: int = 0
    unknown_item: int = 0
    other: int = 0
    users: int = 0
    offset: Offset = 0
    new_version: bool = False
    lock_wait_s: float = 0.0
    seconds: float = 0.0
    newest_ms: int | None = None
    start_offset: Offset = field(default=0, repr=False)


def version_horizon(meta: dict[str, Any], where: str = "<store>") -> int | None:
    """The newest event time a version was loaded from (None: it holds no event).

    ``meta["source_last_ts_ms"]`` when the loader recorded it, else the maximum ``ts_ms`` of the
    source's ``events.parquet`` (``meta["data"]``), from its Parquet statistics.

    Raises:
        ConfigError: neither is available (the source moved): the consumer cannot tell which
            events the version holds.
    """
    if "source_last_ts_ms" in meta:
        value = meta["source_last_ts_ms"]
        return None if value is None else int(value)
    import pyarrow.parquet as pq

    path = Path(str(meta.get("data", ""))) / "events.parquet"
    if not path.is_file():
        raise ConfigError(f"{where}: version {meta.get('store_version', '?')} does not record which events it holds "
                          f"(no source_last_ts_ms) and its source {path} is missing; run the follower where the "
                          "loaded dataset is readable")
    pf = pq.ParquetFile(path)
    column = pf.schema_arrow.get_field_index("ts_ms")
    best: int | None = None
    for g in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(g)
        if not group.num_rows:
            continue
        stats = group.column(column).statistics
        if stats is None or not stats.has_min_max:
            ts = pf.read(columns=["ts_ms"]).column("ts_ms").to_numpy()
            return int(ts.max()) if ts.size else None
        best = int(stats.max) if best is None else max(best, int(stats.max))
    return best


def merge_user(old: UserSequences | None, user_id: int, new: dict[str, np.ndarray], is_explicit: np.ndarray,
               explicit_cap: int, imp_cap: int) -> tuple[UserSequences, int]:
    """A user's record with ``new`` events (sorted by time) merged in, cut to the caps.

    Args:
        old: the stored record (None: the user has none yet).
        user_id: the user.
        new: ``ts_ms``, ``item``, ``action``, ``surface``, ``emb`` of the user's new events, in time order.
        is_explicit: which of them are explicit actions (the others are bare impressions).
        explicit_cap, imp_cap: the newest tokens kept of each kind.

    Returns:
        The new record (owning its arrays) and how many events were older than the record's newest token.

    Example::

        >>> old = UserSequences.from_arrays(1, ts_ms=[5, 9], item=[0, 1], action=[2, 2], surface=[0, 0],
        ...     emb=np.zeros((2, 32)), imp_ts_ms=[], imp_item=[], imp_action=[], imp_surface=[], imp_emb=np.zeros((0, 32)))
        >>> new = {"ts_ms": np.array([7, 12]), "item": np.array([2, 3]), "action": np.array([2, 1]),
        ...        "surface": np.array([0, 0]), "emb": np.zeros((2, 32))}
        >>> rec, late = merge_user(old, 1, new, np.array([True, False]), explicit_cap=2, imp_cap=5)
        >>> rec.ts_ms.tolist(), rec.item.tolist(), rec.imp_ts_ms.tolist(), late
        ([7, 9], [2, 1], [12], 1)
    """
    old = old if old is not None else UserSequences.empty(user_id)
    arrays: dict[str, np.ndarray] = {}
    late = 0
    for prefix, pick, cap in (("", is_explicit, explicit_cap), ("imp_", ~is_explicit, imp_cap)):
        # Only the newest `cap` stored tokens can stay: older ones are older than all of them.
        stored = {name: getattr(old, prefix + name)[max(0, getattr(old, prefix + "ts_ms").size - cap):]
                  for name in _EXPLICIT}
        add = {name: new[name][pick] for name in _EXPLICIT}
        merged = {name: np.concatenate([stored[name], add[name]]) for name in _EXPLICIT}
        if add["ts_ms"].size and stored["ts_ms"].size and add["ts_ms"][0] < stored["ts_ms"][-1]:
            # Late events: a stable sort keeps stored tokens before new ones of the same time.
            late += int(np.count_nonzero(add["ts_ms"] < stored["ts_ms"][-1]))
            order = np.argsort(merged["ts_ms"], kind="stable")
            merged = {name: col[order] for name, col in merged.items()}
        keep = max(0, merged["ts_ms"].size - cap)
        arrays.update({prefix + name: col[keep:] for name, col in merged.items()})
    return UserSequences.from_arrays(user_id, **arrays), late


@dataclass
class _Version:
    """What the consumer caches of the served version: its item table and caps."""

    number: int
    load_id: str
    items: ItemRecords
    explicit_cap: int
    imp_cap: int


class RealtimeConsumer:
    """Appends a stream's events to the served version of a feature store; see the module docstring.

    Args:
        store: a store URL (opened writable) or an open :class:`FeatureStore`.
        stream: a stream URL or an open :class:`EventStream`.
        batch: most stream events per batch (one lock, one read and one write per touched user).
        lock_retry_s: longest pause between two tries of a busy writer lock.
        stop: an event that ends :meth:`run` (and a wait for the lock) when set.

    Raises:
        ConfigError: a bad URL or ``batch < 1``.
    """

    def __init__(self, store: str | FeatureStore, stream: str | EventStream, batch: int = 4096,
                 lock_retry_s: float = 0.2, stop: threading.Event | None = None):
        if batch < 1:
            raise ConfigError(f"batch must be at least 1, got {batch}")
        self._own_store, self._own_stream = isinstance(store, str), isinstance(stream, str)
        self.store = open_store(store, writable=True) if isinstance(store, str) else store
        try:
            self.stream = open_stream(stream) if isinstance(stream, str) else stream
        except BaseException:
            if self._own_store:
                self.store.close()
            raise
        self.batch = batch
        self.lock_retry_s = lock_retry_s
        self.stop = stop or threading.Event()
        self._version: _Version | None = None

    # -- the lock --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[WriterLock, float]]:
        """Hold the store's writer lock, waiting (with backoff) while a load or another writer has it."""
        start, pause = time.perf_counter(), 0.005
        while True:
            with contextlib.ExitStack() as stack:
                try:
                    lock = stack.enter_context(self.store.writer_lock(role="follower"))
                except WriterLocked:
                    if self.stop.wait(pause):
                        raise InterruptedError("stopped while waiting for the store's writer lock") from None
                    pause = min(pause * 2, self.lock_retry_s)
                    continue
                yield lock, time.perf_counter() - start
                return

    # -- versions and state ----------------------------------------------------------------

    def _pin(self, r: StoreReader) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        """The pointer, the served version's meta and its key prefix."""
        [raw] = r.values([POINTER_KEY])
        if raw is None:
            if r.values([META_KEY])[0] is not None:
                raise ConfigError(f"{self.store.url} was loaded before store versions existed: run lifelong store "
                                  "load once before following a stream")
            raise StoreUnavailable(self.store.url, "no version loaded; run lifelong store load")
        pointer = parse_pointer(raw, self.store.url)
        prefix = version_prefix(int(pointer["version"]))
        [raw_meta] = r.values([prefix + META_KEY])
        if raw_meta is None:
            raise VersionGone(self.store.url, f"version {version_name(pointer['version'])} has no meta")
        return pointer, json.loads(bytes(raw_meta)), prefix

    def _cached_version(self, r: StoreReader, pointer: dict[str, Any], meta: dict[str, Any], prefix: bytes) -> _Version:
        number, load_id = int(pointer["version"]), str(pointer.get("load_id", ""))
        if self._version is None or (self._version.number, self._version.load_id) != (number, load_id):
            [raw_items] = r.values([prefix + b"items"])
            if raw_items is None:
                raise VersionGone(self.store.url, f"version {version_name(number)} has no item table")
            self._version = _Version(number, load_id, ItemRecords.decode(raw_items).copy(),
                                     int(meta["ll_cap"]) + int(meta["rt"]), int(meta["imp_cap"]))
        return self._version

    def _new_state(self, r: StoreReader, pointer: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """The state of a version the consumer has not appended to yet: its horizon, and where in
        the stream the first event newer than it may be."""
        horizon = version_horizon(meta, self.store.url)
        start: list[Any] = [self.stream.start_offset(), None]
        marks: list[list[Any]] = []
        for older in pointer.get("history", []):  # the previous version's marks carry over
            [raw] = r.values([version_prefix(int(older)) + RT_KEY])
            if raw is None:
                continue
            prev = json.loads(bytes(raw))
            if prev.get("stream") != self.stream.url:
                continue
            marks = [m for m in [*prev.get("marks", []), [prev["offset"], prev.get("prefix_max_ms")]]
                     if horizon is not None and (m[1] is None or m[1] <= horizon)]
            if marks:
                start = marks[-1]
            break
        state = {"stream": self.stream.url, "version": version_name(int(pointer["version"])),
                 "load_id": pointer.get("load_id", ""), "horizon_ms": horizon, "start_offset": start[0],
                 "offset": start[0], "prefix_max_ms": start[1], "marks": marks[-MAX_MARKS:] or [start],
                 "newest_ms": None, "updated_ms": None, **dict.fromkeys(_COUNTERS, 0)}
        return state

    def state(self) -> dict[str, Any] | None:
        """The served version's consumer state (None: nothing appended to it yet)."""
        with self.store.reader() as r:
            _, _, prefix = self._pin(r)
            [raw] = r.values([prefix + RT_KEY])
            return None if raw is None else json.loads(bytes(raw))

    # -- one batch -------------------------------------------------------------------------

    def step(self) -> BatchStats:
        """Append the next batch of the stream to the served version (see the module docstring).

        Returns:
            What was done; ``events == 0`` when the stream holds nothing new.

        Raises:
            StoreUnavailable: nothing loaded, or Redis unreachable (nothing was written).
            ConfigError: the version's state follows another stream, or its horizon is unknown.
        """
        t0 = time.perf_counter()
        for _ in range(3):
            try:
                with self._locked() as (lock, waited):
                    stats = self._step_locked(lock)
                    stats.lock_wait_s = waited
                    stats.seconds = time.perf_counter() - t0
                    return stats
            except VersionGone:
                self._version = None  # read again: a version was half-deleted (cannot happen under the lock)
            except WriterLocked:
                pass  # the lock expired while this batch stalled (Redis): nothing was written; again
        raise StoreUnavailable(self.store.url, "the served version kept disappearing, or the writer lock kept "
                                               "expiring, while a batch was applied")

    def _step_locked(self, lock: WriterLock) -> BatchStats:
        with self.store.reader() as r:
            pointer, meta, prefix = self._pin(r)
            version = self._cached_version(r, pointer, meta, prefix)
            [raw_state] = r.values([prefix + RT_KEY])
            new_version = raw_state is None
            state = self._new_state(r, pointer, meta) if new_version else json.loads(bytes(raw_state))
            if state.get("stream") != self.stream.url:
                raise ConfigError(f"{self.store.url} version {version_name(version.number)} follows the stream "
                                  f"{state.get('stream')}, not {self.stream.url}; a store follows one stream")
            events, offset = self.stream.read(state["offset"], self.batch)
            stats = BatchStats(version_name(version.number), events=len(events), offset=offset,
                               new_version=new_version, start_offset=state["offset"])
            pairs = self._apply(r, prefix, version, state, events, stats) if len(events) else []
        if not len(events):
            if new_version:  # record the horizon and start now: the marks carry to the next version
                lock.put([(prefix + RT_KEY, json_record(state))])
            return stats
        state["offset"] = offset
        batch_max = int(events["ts_ms"].max())
        pmax = state.get("prefix_max_ms")
        state["prefix_max_ms"] = batch_max if pmax is None else max(int(pmax), batch_max)
        marks = [*state.get("marks", []), [offset, state["prefix_max_ms"]]]
        state["marks"] = (marks[:-1][::2] + marks[-1:]) if len(marks) > MAX_MARKS else marks
        for name in ("events", "explicit", "impressions", "late", "in_load", "unknown_item", "other"):
            state[name] += getattr(stats, name)
        state["batches"] += 1
        if stats.newest_ms is not None:
            state["newest_ms"] = max(stats.newest_ms, state["newest_ms"] or stats.newest_ms)
        state["updated_ms"] = int(time.time() * 1000)
        # One atomic, fenced write: the records and the offset after them commit together.
        lock.put([*pairs, (prefix + RT_KEY, json_record(state))])
        return stats

    def _apply(self, r: StoreReader, prefix: bytes, version: _Version, state: dict[str, Any], events: np.ndarray,
               stats: BatchStats) -> list[tuple[bytes, bytes]]:
        """The new records of the users a batch touches, encoded (read inside ``r``)."""
        mask = events["action_mask"]
        explicit = (mask & EXPLICIT_BITS) != 0
        kept_kind = explicit | (mask == _IMPRESSION)
        horizon = state.get("horizon_ms")
        newer = kept_kind if horizon is None else kept_kind & (events["ts_ms"] > horizon)
        rows, known = version.items.index_of(events["item_id"])
        take = newer & known
        stats.other = int(np.count_nonzero(~kept_kind))
        stats.in_load = int(np.count_nonzero(kept_kind & ~newer))
        stats.unknown_item = int(np.count_nonzero(newer & ~known))
        sel = np.flatnonzero(take)
        if not sel.size:
            return []
        ev = events[sel]
        # Group by user; inside a user the events table's order: time, request, item.
        order = np.lexsort((ev["item_id"], ev["request_id"], ev["ts_ms"], ev["user_id"]))
        ev, rows, explicit = ev[order], rows[sel][order], explicit[sel][order]
        users, starts = np.unique(ev["user_id"], return_index=True)
        bounds = np.append(starts, len(ev))
        cols = {"ts_ms": ev["ts_ms"], "item": rows.astype(np.int32), "action": ev["action_mask"],
                "surface": ev["surface"], "emb": version.items.emb_int8[rows]}
        pairs = []
        for k, (user, old) in enumerate(zip(users.tolist(), r.users(users.tolist()))):
            seg = slice(int(bounds[k]), int(bounds[k + 1]))
            record, late = merge_user(old, user, {n: c[seg] for n, c in cols.items()}, explicit[seg],
                                      version.explicit_cap, version.imp_cap)
            stats.late += late
            pairs.append((prefix + user_key(user), record.encode()))
        stats.users = len(pairs)
        stats.explicit = int(np.count_nonzero(explicit))
        stats.impressions = len(ev) - stats.explicit
        stats.newest_ms = int(ev["ts_ms"].max())
        return pairs

    # -- loops -----------------------------------------------------------------------------

    def run_until_caught_up(self, on_batch: Callable[[BatchStats], None] | None = None) -> list[BatchStats]:
        """Apply batches until the stream holds nothing new (``lifelong store follow --once``)."""
        done = []
        while not self.stop.is_set():
            stats = self.step()
            if on_batch is not None:
                on_batch(stats)
            done.append(stats)
            if stats.events < self.batch:
                break
        return done

    def run(self, poll_s: float = 0.05, on_batch: Callable[[BatchStats], None] | None = None,
            on_error: Callable[[Exception], None] | None = None) -> None:
        """Follow the stream until :attr:`stop` is set: batches back to back while events wait,
        a ``poll_s`` pause when caught up; an unreachable or empty store is waited for."""
        while not self.stop.is_set():
            try:
                stats = self.step()
            except StoreUnavailable as exc:
                if on_error is not None:
                    on_error(exc)
                self.stop.wait(1.0)
                continue
            except InterruptedError:
                return
            if on_batch is not None and (stats.events or stats.new_version):
                on_batch(stats)
            if stats.events < self.batch:
                self.stop.wait(poll_s)

    def close(self) -> None:
        if self._own_stream:
            self.stream.close()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
