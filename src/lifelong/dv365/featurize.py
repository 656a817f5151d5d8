"""DV365 slice pooling, vectorised over the unified timelines of many users at once.

Featurisation runs in two stages, so that the first can run in a data loader and the second
inside a model:

1. :meth:`SliceFeaturizer.membership` (numpy, no gradients): which events fall in which slice,
   for every user of a batch at once, encoded as ``embedding_bag`` inputs per embedding table.
2. :func:`pool_slices` (torch, differentiable w.r.t. the tables): one ``embedding_bag`` per
   table, then windows and means. Returns ``(U, n_slices, D)`` pooled embeddings and the mask
   of non-empty slices (an empty slice pools to zeros).

Why it is fast:

- Each distinct rule is evaluated once, as one vector pass over all events of all users; a
  slice's events are the AND of its rules' masks. Slices that differ only in window or id
  type share those events (a *pool*).
- Windows nest ((0, 3d] ⊂ (0, 7d] ⊂ all), so an event is looked up once per pool and id type,
  into the *band* between consecutive window edges that holds its age; a window's sum is a
  cumulative sum of bands, newest first. Events are in time order within each user, so each
  bag ``(pool, user, band)`` is a run of the pool's sorted member positions: its offsets are
  one binary search of the bag starts, not a pass over the members.
- ``embedding_bag(mode="sum", per_sample_weights=...)`` computes ``Σ w_e · E[row_e]`` without
  materialising the gathered rows (FBGEMM on CPU), and its backward scatters into the table.

Ids map to table rows by ``row = id mod n_rows`` (``id_rows`` per id type): collision-free for
the dense ids of simulated worlds and ingested datasets whenever ``n_rows`` covers them;
other ids share rows, as with any hashed table.

Example::

    >>> import torch
    >>> from lifelong.dv365.slices import SliceSpec
    >>> spec = SliceSpec.from_dict({"windows": ["3d", "all"], "id_types": ["topic"], "slices": [
    ...     {"name": "click", "rules": [{"type": "action", "any_of": ["click"]}]}]})
    >>> day = 86_400_000
    >>> tl = UserTimelines.from_rows(t_ms=[10 * day], ts_ms=[[1 * day, 8 * day, 9 * day]],
    ...                              action_mask=[[2, 2, 1]], topic=[[0, 1, 1]])
    >>> featurizer = SliceFeaturizer(spec, id_rows={"topic": 4})
    >>> tables = {"explicit_positive_topic_mean": torch.eye(4)}
    >>> out = pool_slices(featurizer.membership(tl), tables)
    >>> out.embeddings[0].tolist(), out.mask.tolist(), out.weight.tolist()
    ([[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]], [[True, True]], [[1.0, 2.0]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import Dataset
from lifelong.data.timelines import count_before_in_ranges
from lifelong.dv365.slices import ID_TYPES, Rule, SimpleEvents, Slice, SliceSpec

ID_COLUMNS: dict[str, str] = {"media": "item_id", "author": "author_id", "topic": "topic_id"}
"""Items-table column of each id type."""


@dataclass(frozen=True, eq=False)
class UserTimelines:
    """Unified timelines of a batch of users, flat: user ``u`` owns events ``offsets[u]:offsets[u+1]``.

    Events may reach past ``t_ms``: featurisation only reads events strictly before it.

    Args:
        t_ms: (U,) featurisation time of each user, epoch ms.
        offsets: (U + 1,) int64 event offsets (the :class:`~lifelong.data.timelines.Jagged` layout).
        ts_ms: (N,) event times, non-decreasing within each user.
        action_mask: (N,) action bits (:class:`~lifelong.data.schema.Action`).
        dwell_ms: (N,) dwell times.
        media_type: (N,) the item's index in :data:`~lifelong.data.schema.MEDIA_TYPES`.
        duration_ms: (N,) the item's video duration (0 for images).
        ids: id type -> (N,) int64 ids (``media`` = item id, ``author``, ``topic``); only the
            id types a spec pools over are needed.

    Raises:
        DataError: lengths disagree, offsets are malformed or times go backwards in a user.
    """

    t_ms: np.ndarray
    offsets: np.ndarray
    ts_ms: np.ndarray
    action_mask: np.ndarray
    dwell_ms: np.ndarray
    media_type: np.ndarray
    duration_ms: np.ndarray
    ids: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "ids":
                object.__setattr__(self, f.name, np.asarray(getattr(self, f.name)))
        object.__setattr__(self, "ids", {k: np.asarray(v, dtype=np.int64) for k, v in self.ids.items()})
        t, offsets, n = self.t_ms, self.offsets, self.ts_ms.size
        if t.ndim != 1 or offsets.shape != (t.size + 1,) or not np.issubdtype(offsets.dtype, np.integer):
            raise DataError("<timelines>", f"need 1-D t_ms (U,) and integer offsets (U + 1,), got {t.shape} and "
                            f"{offsets.shape}")
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise DataError("<timelines>", f"offsets must rise from 0 to the number of events ({n})")
        for name in ("ts_ms", "action_mask", "dwell_ms", "media_type", "duration_ms"):
            if getattr(self, name).shape != (n,):
                raise DataError("<timelines>", f"must have shape ({n},), got {getattr(self, name).shape}", column=name)
        for id_type, ids in self.ids.items():
            if id_type not in ID_TYPES:
                raise DataError("<timelines>", f"unknown id type {id_type!r}; valid: {', '.join(ID_TYPES)}")
            if ids.shape != (n,):
                raise DataError("<timelines>", f"must have shape ({n},), got {ids.shape}", column=f"ids[{id_type!r}]")
        backwards = np.diff(self.ts_ms) < 0
        backwards[offsets[1:-1][(offsets[1:-1] > 0) & (offsets[1:-1] < n)] - 1] = False  # a new user may start earlier
        if backwards.any():
            raise DataError("<timelines>", "events must be sorted by ts_ms within each user", column="ts_ms",
                            row=int(np.flatnonzero(backwards)[0]) + 1)

    @property
    def n_users(self) -> int:
        return self.t_ms.size

    @classmethod
    def from_rows(cls, t_ms: Sequence[int], ts_ms: Sequence[Sequence[int]], action_mask: Sequence[Sequence[int]],
                  dwell_ms: Sequence[Sequence[int]] | None = None, media_type: Sequence[Sequence[int]] | None = None,
                  duration_ms: Sequence[Sequence[int]] | None = None,
                  **ids: Sequence[Sequence[int]]) -> UserTimelines:
        """Build from one list per user and column (small batches, tests); missing columns are 0.

        Args:
            t_ms: featurisation time per user.
            ts_ms, action_mask, dwell_ms, media_type, duration_ms: per user, per event.
            ids: ``media=``, ``author=``, ``topic=``: per user, per event.

        Example::

            >>> tl = UserTimelines.from_rows([5, 9], ts_ms=[[1, 2], [3]], action_mask=[[1, 2], [2]],
            ...                              media=[[7, 8], [7]])
            >>> tl.offsets.tolist(), tl.ids["media"].tolist(), tl.dwell_ms.tolist()
            ([0, 2, 3], [7, 8, 7], [0, 0, 0])
        """
        lengths = [len(row) for row in ts_ms]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        def flat(rows: Sequence[Sequence[int]] | None) -> np.ndarray:
            if rows is None:
                return np.zeros(offsets[-1], dtype=np.int64)
            if [len(row) for row in rows] != lengths:
                raise DataError("<timelines>", "every column needs one row per user, as long as its ts_ms row")
            return np.fromiter((v for row in rows for v in row), dtype=np.int64, count=int(offsets[-1]))

        return cls(np.asarray(t_ms, dtype=np.int64), offsets, flat(ts_ms), flat(action_mask), flat(dwell_ms),
                   flat(media_type), flat(duration_ms), {k: flat(v) for k, v in ids.items()})


class TimelineSource:
    """An events table and its items, indexed once, to cut :class:`UserTimelines` for any users and times.

    Args:
        events: an ``EVENTS_SCHEMA`` table sorted by ``(user_id, ts_ms)`` (reads user_id,
            item_id, ts_ms, action_mask, dwell_ms).
        items: an ``ITEMS_SCHEMA`` table holding every item the events refer to.

    Raises:
        DataError: events not sorted, or referring to unknown items.

    Example::

        >>> import pyarrow as pa
        >>> events = pa.table({"user_id": [1, 1, 1], "item_id": [20, 10, 20], "ts_ms": [5, 6, 7],
        ...                    "action_mask": [1, 3, 1], "dwell_ms": [100, 200, 300]})
        >>> items = pa.table({"item_id": [10, 20], "author_id": [4, 5], "topic_id": [0, 1],
        ...                   "media_type": [1, 0], "duration_ms": [9000, 0]})
        >>> tl = TimelineSource(events, items).batch(user_ids=[1, 2], t_ms=[7, 7])
        >>> tl.offsets.tolist(), tl.ids["author"].tolist(), tl.duration_ms.tolist()
        ([0, 2, 2], [5, 4], [0, 9000])
    """

    def __init__(self, events: pa.Table, items: pa.Table):
        user_id = events.column("user_id").to_numpy().astype(np.int64, copy=False)
        self._ts = events.column("ts_ms").to_numpy().astype(np.int64, copy=False)
        self._mask = events.column("action_mask").to_numpy()
        self._dwell = events.column("dwell_ms").to_numpy()
        new_user = np.r_[True, user_id[1:] != user_id[:-1]]
        backwards = (user_id[1:] < user_id[:-1]) | (~new_user[1:] & (self._ts[1:] < self._ts[:-1]))
        if backwards.any():
            raise DataError("<events>", "events must be sorted by (user_id, ts_ms)",
                            row=int(np.flatnonzero(backwards)[0]) + 1)
        first_row = np.flatnonzero(new_user) if user_id.size else np.zeros(0, dtype=np.int64)
        self._users = user_id[first_row]
        self._starts = np.r_[first_row, user_id.size].astype(np.int64)
        self._longest = int(np.diff(self._starts).max(initial=0))

        item_id = items.column("item_id").to_numpy().astype(np.int64, copy=False)
        order = np.argsort(item_id, kind="stable")
        ordered = item_id[order]
        event_item = events.column("item_id").to_numpy()
        pos = np.minimum(np.searchsorted(ordered, event_item), max(item_id.size - 1, 0))
        known = ordered[pos] == event_item if item_id.size else np.zeros(event_item.size, dtype=bool)
        if not known.all():
            bad = int(np.flatnonzero(~known)[0])
            raise DataError("<events>", f"unknown item_id {event_item[bad]}", column="item_id", row=bad)
        # The item's row per event, once: per-batch joins then are plain gathers.
        self._item_row = order[pos].astype(np.int32 if item_id.size < 2**31 else np.int64)
        self._item_cols = {name: items.column(name).to_numpy() for name in
                           (*ID_COLUMNS.values(), "media_type", "duration_ms")}

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> TimelineSource:
        """Index a loaded dataset (:func:`lifelong.data.io.load_dataset`)."""
        return cls(dataset.events, dataset.items)

    def batch(self, user_ids: Sequence[int] | np.ndarray, t_ms: Sequence[int] | np.ndarray,
              max_events: int | None = None) -> UserTimelines:
        """The timelines of ``user_ids[i]`` strictly before ``t_ms[i]``, all users at once.

        Args:
            user_ids: users (int64); unknown users get empty timelines.
            t_ms: featurisation time per user, epoch ms.
            max_events: keep only each user's newest ``max_events`` (the paper caps its 40k-mean
                timelines at 70k); None keeps all.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        t_ms = np.asarray(t_ms, dtype=np.int64)
        if user_ids.ndim != 1 or user_ids.shape != t_ms.shape:
            raise ValueError(f"user_ids and t_ms must be 1-D of one length, got {user_ids.shape} and {t_ms.shape}")
        if max_events is not None and max_events < 0:
            raise ValueError(f"max_events must be >= 0 or None, got {max_events}")
        n = self._users.size
        rank = np.minimum(np.searchsorted(self._users, user_ids), max(n - 1, 0))
        known = self._users[rank] == user_ids if n else np.zeros(user_ids.shape, dtype=bool)
        lo = np.where(known, self._starts[rank], 0)
        hi = np.where(known, self._starts[np.minimum(rank + 1, n)], 0)
        end = count_before_in_ranges(self._ts, lo, hi, t_ms, self._longest)
        if max_events is not None:
            lo = np.maximum(lo, end - max_events)
        lengths = end - lo
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rows = np.arange(offsets[-1], dtype=np.int64) + np.repeat(lo - offsets[:-1], lengths)
        item_row = self._item_row[rows]
        cols = {name: col[item_row] for name, col in self._item_cols.items()}
        return UserTimelines(t_ms, offsets, self._ts[rows], self._mask[rows], self._dwell[rows], cols["media_type"],
                             cols["duration_ms"], {t: cols[name] for t, name in ID_COLUMNS.items()})


@dataclass(frozen=True, eq=False)
class TableBags:
    """The lookups into one embedding table for a batch: one bag per (pool, user, band).

    Args:
        table: the table's key (:attr:`lifelong.dv365.slices.Slice.table`).
        rows: the table's expected number of rows.
        indices: (nnz,) table rows of the member events, bag after bag (int32, or int64 when
            the rows or lookups exceed int32).
        offsets: (n_pools * U * n_bands + 1,) bag offsets into ``indices``, of its dtype.
        weights: (nnz,) float32 per-event weights; None for a plain-mean table.
        n_pools: pools read from this table.
        pool: (k,) for each of this table's k slices, its pool (0 .. n_pools - 1).
        window: (k,) for each of this table's k slices, its window (index in ``spec.windows``).
    """

    table: str
    rows: int
    indices: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    n_pools: int
    pool: torch.Tensor
    window: torch.Tensor


@dataclass(frozen=True, eq=False)
class SliceMembership:
    """Which events of a batch fall in which slice: the input of :func:`pool_slices`.

    Args:
        n_users: users in the batch (U).
        n_bands: time bands (one per window of the spec).
        bags: per embedding table, its lookups.
        order: (S,) slice ``s`` is column ``order[s]`` of the tables' outputs concatenated.
        denominators: (U, S) float32 member count (mean) or weight sum (weighted) per slice.
    """

    n_users: int
    n_bands: int
    bags: tuple[TableBags, ...]
    order: torch.Tensor
    denominators: torch.Tensor

    def to(self, device: torch.device | str) -> SliceMembership:
        """The same membership with every tensor on ``device`` (for tables on an accelerator)."""
        bags = tuple(replace(b, indices=b.indices.to(device), offsets=b.offsets.to(device),
                             weights=None if b.weights is None else b.weights.to(device),
                             pool=b.pool.to(device), window=b.window.to(device)) for b in self.bags)
        return replace(self, bags=bags, order=self.order.to(device), denominators=self.denominators.to(device))


@dataclass(frozen=True, eq=False)
class PooledSlices:
    """Pooled slice embeddings of a batch.

    Args:
        embeddings: (U, S, D) mean or weighted mean per user and slice; zeros where empty.
        mask: (U, S) bool, True where the slice has members (with a positive weight sum).
        weight: (U, S) member count (mean slices) or weight sum (weighted slices).
    """

    embeddings: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class _TablePlan:
    key: str
    id_type: str
    pools: tuple[int, ...]
    slices: np.ndarray  # positions in the spec of this table's slices
    pool: np.ndarray  # their pool, as an index into ``pools``
    window: np.ndarray  # their window, as an index into ``spec.windows``


@dataclass(frozen=True, eq=False)
class _Members:
    idx: np.ndarray  # sorted positions of a pool's member events
    bound: np.ndarray  # (n_bags + 1,) bag b's members are idx[bound[b]:bound[b + 1]]
    weights: np.ndarray | None  # float32 weight per member; None for a plain mean
    window_totals: np.ndarray  # (U, n_windows) member count or weight sum per user and window


class SliceFeaturizer:
    """Computes the slice membership of batches of timelines for one spec.

    Args:
        spec: the slices.
        id_rows: rows of the embedding tables of each id type the spec pools over; ids map to
            ``id mod n_rows``.

    Raises:
        ConfigError: an id type of the spec has no row count, or a count is not positive.

    Attributes:
        pools: one slice per *pool* (a distinct pair of rules and weight), standing for the
            slices that share its events and differ only in window or id type.
        n_bands: time bands, one per window of the spec.

    Example::

        >>> featurizer = SliceFeaturizer(SliceSpec.default(), {"media": 1000, "author": 100, "topic": 16})
        >>> featurizer.n_bands, len(featurizer.pools)
        (3, 23)
    """

    def __init__(self, spec: SliceSpec, id_rows: Mapping[str, int]):
        self.spec = spec
        self.id_rows = dict(id_rows)
        for id_type in sorted(set(spec.tables.values())):
            rows = self.id_rows.get(id_type)
            if not isinstance(rows, (int, np.integer)) or isinstance(rows, bool) or rows < 1:
                raise ConfigError(f"id_rows[{id_type!r}] must be a positive integer (the spec pools over "
                                  f"{id_type} ids), got {rows!r}")
        windows = spec.windows
        self._edges = [w.ms for w in windows if w.ms is not None]
        self._open = windows[-1].ms is None
        self.n_bands = len(windows)
        window_index = {w: j for j, w in enumerate(windows)}

        # A pool is a (rules, weight) pair: the events and weights that several slices share.
        pool_index: dict[tuple[tuple[Rule, ...], str | None], int] = {}
        pools: list[Slice] = []
        by_table: dict[str, list[tuple[int, int, int]]] = {}
        for position, s in enumerate(spec.slices):
            key = (s.rules, s.weight)
            if key not in pool_index:
                pool_index[key] = len(pools)
                pools.append(s)
            by_table.setdefault(s.table, []).append((position, pool_index[key], window_index[s.window]))
        self.pools: tuple[Slice, ...] = tuple(pools)
        plans = []
        for table, id_type in spec.tables.items():
            positions, pools, wins = (np.array(c, dtype=np.int64) for c in zip(*by_table[table]))
            used, local = np.unique(pools, return_inverse=True)
            plans.append(_TablePlan(table, id_type, tuple(used.tolist()), positions, local, wins))
        self._plans = tuple(plans)
        concatenated = np.concatenate([p.slices for p in plans])
        self._order = np.empty(len(spec), dtype=np.int64)
        self._order[concatenated] = np.arange(len(spec))

    def membership(self, timelines: UserTimelines) -> SliceMembership:
        """Which events of every user fall in which slice, for all users at once.

        Args:
            timelines: the batch; only events strictly before each user's ``t_ms`` count.

        Raises:
            DataError: the timelines lack the ids of an id type the spec pools over.
        """
        tl = timelines
        for id_type in {p.id_type for p in self._plans}:
            if id_type not in tl.ids:
                raise DataError("<timelines>", f"no {id_type!r} ids, which the slice spec pools over")
        valid, bag_start = self._bags(tl)
        rule_masks: dict[Rule, np.ndarray] = {}
        members = [self._members(tl, pool, valid, bag_start, rule_masks) for pool in self.pools]

        n_bags = bag_start.size - 1
        id_types = {p.id_type for p in self._plans}
        nnz = max(sum(members[p].idx.size for p in plan.pools) for plan in self._plans)
        # int32 halves the bytes gathered and held, and embedding_bag takes it.
        dtype = np.int32 if max(nnz, *(self.id_rows[t] for t in id_types)) < 2**31 else np.int64
        rows = {t: _table_rows(tl.ids[t], self.id_rows[t], dtype) for t in id_types}
        table_bags = []
        denominators = np.zeros((tl.n_users, len(self.spec)), dtype=np.float32)
        for plan in self._plans:
            offsets = np.empty(len(plan.pools) * n_bags + 1, dtype=dtype)
            indices = np.empty(sum(members[p].idx.size for p in plan.pools), dtype=dtype)
            start = 0
            for k, p in enumerate(plan.pools):
                m = members[p]
                offsets[k * n_bags:(k + 1) * n_bags] = m.bound[:-1] + start
                np.take(rows[plan.id_type], m.idx, out=indices[start:start + m.idx.size])
                start += m.idx.size
            offsets[-1] = start
            weighted = self.pools[plan.pools[0]].weight is not None  # the table key holds the pooling
            w = torch.from_numpy(np.concatenate([members[p].weights for p in plan.pools])) if weighted else None
            table_bags.append(TableBags(plan.key, self.id_rows[plan.id_type], torch.from_numpy(indices),
                                        torch.from_numpy(offsets), w, len(plan.pools),
                                        torch.from_numpy(plan.pool), torch.from_numpy(plan.window)))
            for position, local, window in zip(plan.slices, plan.pool, plan.window):
                denominators[:, position] = members[plan.pools[local]].window_totals[:, window]
        return SliceMembership(tl.n_users, self.n_bands, tuple(table_bags), torch.from_numpy(self._order),
                               torch.from_numpy(denominators))

    def _bags(self, tl: UserTimelines) -> tuple[np.ndarray, np.ndarray]:
        """(valid, bag_start): which events lie in some window, and where each bag's events start.

        Bag ``user * n_bands + band`` holds a user's events of one band, bands oldest first, so
        that bags never decrease along the events and each bag is one run of them.
        """
        n_users, n_bands = tl.n_users, self.n_bands
        user = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(tl.offsets))
        age = tl.t_ms[user] - tl.ts_ms
        valid = age > 0
        band = np.full(age.shape, n_bands - 1, dtype=np.int64)
        for edge in self._edges:
            band -= age > edge
        if not self._open:
            # Events older than the longest window: out, but kept in their user's first bag.
            valid &= age <= self._edges[-1]
            np.maximum(band, 0, out=band)
        return valid, np.searchsorted(user * n_bands + band, np.arange(n_users * n_bands + 1))

    def _members(self, tl: UserTimelines, pool: Slice, valid: np.ndarray, bag_start: np.ndarray,
                 rule_masks: dict[Rule, np.ndarray]) -> _Members:
        mask = valid.copy()
        for rule in pool.rules:
            if rule not in rule_masks:  # rules shared by pools are evaluated once
                rule_masks[rule] = rule.mask(tl)
            mask &= rule_masks[rule]
        idx = np.flatnonzero(mask)
        # idx is sorted and each bag is a run of events, so each bag's members are a run of idx.
        bound = np.searchsorted(idx, bag_start)
        weights = None
        if pool.weight is None:
            totals = np.diff(bound).astype(np.float64)
        else:
            w = pool.weights(SimpleEvents(dwell_ms=tl.dwell_ms[idx], duration_ms=tl.duration_ms[idx]))
            running = np.concatenate([[0.0], np.cumsum(w)])
            totals = running[bound[1:]] - running[bound[:-1]]
            weights = w.astype(np.float32)
        # Window j holds the newest j + 1 bands: a cumulative sum from the newest band back.
        window_totals = np.cumsum(totals.reshape(tl.n_users, self.n_bands)[:, ::-1], axis=1)
        return _Members(idx, bound, weights, window_totals)


def _table_rows(ids: np.ndarray, n_rows: int, dtype: type) -> np.ndarray:
    """``ids mod n_rows``; int64 division is the slow part, and dense ids in range need none."""
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        ids = ids % n_rows
    return ids.astype(dtype)


def pool_slices(membership: SliceMembership, tables: Mapping[str, torch.Tensor]) -> PooledSlices:
    """Pool every slice of a batch: differentiable with respect to the tables.

    Args:
        membership: from :meth:`SliceFeaturizer.membership` (on the tables' device).
        tables: table key -> (rows, D) weights (e.g. an ``nn.Embedding``'s ``weight``), one
            per key of ``spec.tables``, all of one width D and dtype.

    Returns:
        :class:`PooledSlices`: ``(U, S, D)`` means, weighted means for weighted slices; zeros
        and ``mask`` False for empty slices.

    Raises:
        ConfigError: a table is missing or has the wrong shape.
    """
    parts = []
    dims = set()
    for bags in membership.bags:
        table = tables.get(bags.table)
        if table is None:
            raise ConfigError(f"no embedding table {bags.table!r}; the slice spec reads "
                              f"{', '.join(b.table for b in membership.bags)}")
        if table.ndim != 2 or table.shape[0] != bags.rows:
            raise ConfigError(f"embedding table {bags.table!r} must have shape ({bags.rows}, D), "
                              f"got {tuple(table.shape)}")
        dims.add(table.shape[1])
        weights = None if bags.weights is None else bags.weights.to(table.dtype)
        sums = F.embedding_bag(bags.indices, table, bags.offsets, mode="sum", per_sample_weights=weights,
                               include_last_offset=True)
        # Bags run oldest band first; window j sums the newest j + 1 bands.
        bands = sums.view(bags.n_pools, membership.n_users, membership.n_bands, table.shape[1])
        windows = bands.flip(2).cumsum(2)
        parts.append(windows[bags.pool, :, bags.window].transpose(0, 1))
    if len(dims) > 1:
        raise ConfigError(f"embedding tables must share one width D, got {sorted(dims)}")
    sums = torch.cat(parts, dim=1)[:, membership.order]
    weight = membership.denominators.to(sums.dtype)
    mask = weight > 0
    embeddings = sums / torch.where(mask, weight, torch.ones_like(weight)).unsqueeze(-1)
    return PooledSlices(embeddings, mask, weight)


class SliceEmbeddings(nn.Module):
    """The embedding tables of a spec and the pooling over them, as a module.

    Args:
        spec: the slices.
        dim: embedding width D.
        id_rows: rows per id type (see :class:`SliceFeaturizer`).

    Tables are ``nn.Parameter`` in :attr:`tables`, one per key of ``spec.tables``, initialised
    N(0, 1/D). Compute memberships with :attr:`featurizer` (e.g. in a data loader), then call
    the module on them.

    Example::

        >>> module = SliceEmbeddings(SliceSpec.default(), dim=8, id_rows={"media": 50, "author": 10, "topic": 4})
        >>> tl = UserTimelines.from_rows([100], ts_ms=[[1, 2]], action_mask=[[3, 1]], dwell_ms=[[5000, 10]],
        ...                              media=[[3, 4]], author=[[1, 1]], topic=[[0, 2]])
        >>> out = module(module.featurizer.membership(tl))
        >>> tuple(out.embeddings.shape), int(out.mask.sum())
        ((1, 207, 8), 63)
        >>> out.embeddings.sum().backward()
    """

    def __init__(self, spec: SliceSpec, dim: int, id_rows: Mapping[str, int]):
        super().__init__()
        self.featurizer = SliceFeaturizer(spec, id_rows)
        self.tables = nn.ParameterDict({key: nn.Parameter(torch.randn(id_rows[id_type], dim) * dim**-0.5)
                                        for key, id_type in spec.tables.items()})

    def forward(self, membership: SliceMembership) -> PooledSlices:
        return pool_slices(membership, self.tables)
