"""Point-in-time sequences S_LL, S_RT and S_imp for many (user, request time) pairs at once.

For a request of user ``u`` at time ``t`` (docs/design.md, "Sequences"), using only events with
``ts_ms < t`` (an event *at* ``t`` is never visible):

- ``S_RT``: the newest ``rt_cap`` explicit actions (any bit of ``EXPLICIT_BITS``);
- ``S_LL``: the newest ``ll_cap`` explicit actions *older than* S_RT's oldest token;
- ``S_imp``: the newest ``imp_cap`` bare impressions (``action_mask == IMPRESSION`` exactly).

"Older" is the events table's order, sorted by ``(user_id, ts_ms, ...)``: when several explicit
events share S_RT's oldest timestamp, those before it in the table go to S_LL and the rest to
S_RT, so the two are always disjoint and every S_LL token has ``ts_ms <=`` every S_RT token.
Each sequence is chronological (oldest first), so the paper's ``S_RT[:r]``, "its newest r", is
the *last* r tokens of a row: :meth:`Timelines.rt_newest`.

How it is fast: a user's explicit events are contiguous in the table's order, so every sequence
is one contiguous slice of the array of explicit (or bare-impression) row positions. An
:class:`EventIndex` built once holds those position arrays and each user's segment in them;
:func:`build_timelines` then finds, for all requests at once, the slice bounds by a vectorised
binary search inside each request's own segment, and stores only ``(start, end)`` ranges.
Row indices are materialised as a :class:`Jagged` (values + offsets) only when asked for.

Example::

    >>> import numpy as np
    >>> from lifelong.data.schema import Action
    >>> imp, click = int(Action.IMPRESSION), int(Action.IMPRESSION | Action.CLICK)
    >>> index = EventIndex(user_id=np.array([7, 7, 7, 7]), ts_ms=np.array([10, 20, 30, 40]),
    ...                    action_mask=np.array([click, imp, click, click]))
    >>> tl = build_timelines(index, np.array([7, 7, 8]), np.array([40, 41, 99]),
    ...                      TimelineConfig(ll_cap=10, rt_cap=1, imp_cap=10))
    >>> tl.rt.row(0).tolist(), tl.ll.row(0).tolist(), tl.imp.row(0).tolist()
    ([2], [0], [1])
    >>> tl.rt.row(1).tolist(), tl.ll.row(1).tolist(), len(tl.rt.row(2))
    ([3], [0, 2], 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.schema import EXPLICIT_BITS, Action


@dataclass(frozen=True)
class TimelineConfig:
    """Length caps of the three sequences.

    Args:
        ll_cap: most tokens of S_LL (paper: O(10^4), the 90th percentile of history lengths).
        rt_cap: most tokens of S_RT.
        imp_cap: most tokens of S_imp.

    Example::

        >>> TimelineConfig(rt_cap=50)
        TimelineConfig(ll_cap=10000, rt_cap=50, imp_cap=100)
    """

    ll_cap: int = 10_000
    rt_cap: int = 100
    imp_cap: int = 100

    def __post_init__(self) -> None:
        for name in ("ll_cap", "rt_cap", "imp_cap"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"TimelineConfig.{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True, eq=False)
class Jagged:
    """A batch of variable-length rows stored flat: row ``i`` is ``values[offsets[i]:offsets[i+1]]``.

    The one ragged layout of lifelong: sequences of row indices here, training rows and serving
    batches (each user's sequence once, plus offsets) elsewhere. ``values`` may have any dtype
    and trailing shape (e.g. ``(total, 32)`` embeddings).

    Args:
        values: the rows' elements, concatenated along axis 0.
        offsets: int64, length ``n_rows + 1``, non-decreasing, ``offsets[0] == 0`` and
            ``offsets[-1] == len(values)``.

    Example::

        >>> j = Jagged.from_ranges(np.arange(10, 20), starts=np.array([0, 5, 9]), lengths=np.array([2, 0, 1]))
        >>> j.values.tolist(), j.offsets.tolist(), j.lengths().tolist()
        ([10, 11, 19], [0, 2, 2, 3], [2, 0, 1])
        >>> j.map(np.arange(20) * 2).row(0).tolist(), j.take([2, 0]).values.tolist()
        ([20, 22], [19, 10, 11])
    """

    values: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        offsets = np.asarray(self.offsets)
        if values.ndim == 0:
            raise ValueError("Jagged values must have at least one axis")
        if offsets.ndim != 1 or offsets.size == 0 or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError("Jagged offsets must be a non-empty 1-D integer array")
        if offsets[0] != 0 or offsets[-1] != len(values) or np.any(offsets[1:] < offsets[:-1]):
            raise ValueError(f"Jagged offsets must rise from 0 to len(values)={len(values)}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "offsets", offsets.astype(np.int64, copy=False))

    @classmethod
    def from_ranges(cls, base: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Jagged:
        """Gather row ``i`` = ``base[starts[i]:starts[i] + lengths[i]]`` for all rows, loop-free.

        Args:
            base: the array the slices are taken from (along axis 0).
            starts: first index of each row in ``base``.
            lengths: length of each row (>= 0).

        Example::

            >>> Jagged.from_ranges(np.array([5, 6, 7]), np.array([1, 0]), np.array([2, 1])).values.tolist()
            [6, 7, 5]
        """
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Element k of row i sits at flat position offsets[i] + k and reads base[starts[i] + k]:
        # one arange plus a per-row shift repeated over the row's elements.
        index = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
        return cls(np.asarray(base)[index], offsets)

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray]) -> Jagged:
        """Concatenate a list of arrays (rows) into one Jagged.

        Example::

            >>> Jagged.from_rows([np.array([1, 2]), np.array([], dtype=int)]).offsets.tolist()
            [0, 2, 2]
        """
        arrays = [np.asarray(r) for r in rows]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(values, offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def lengths(self) -> np.ndarray:
        """Length of every row (int64)."""
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        """The elements of row ``i`` (a view)."""
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def take(self, indices: np.ndarray | Sequence[int]) -> Jagged:
        """The rows ``indices`` (any order, repeats allowed) as a new Jagged."""
        indices = np.asarray(indices, dtype=np.int64)
        return Jagged.from_ranges(self.values, self.offsets[indices], self.lengths()[indices])

    def map(self, column: np.ndarray) -> Jagged:
        """Replace each value ``v`` (an index) by ``column[v]``, keeping the offsets.

        With row indices of the events table, ``tl.rt.map(ts_ms)`` gives the tokens' timestamps
        and ``tl.rt.map(embeddings)`` a ``(total, dim)`` Jagged of their embeddings.
        """
        return Jagged(np.asarray(column)[self.values], self.offsets)


def count_before_in_ranges(ts: np.ndarray, lo: np.ndarray, hi: np.ndarray, t: np.ndarray,
                           longest: int) -> np.ndarray:
    """End (exclusive) of each sorted range ``ts[lo:hi]``'s values ``< t``, for all ranges at once.

    A branchless binary search: starting from ``lo``, try to advance by 2^k, 2^(k-1), ..., 1
    while the range holds a value before ``t``. It costs log2(``longest`` range) vector steps,
    each gathering within one range.

    Example::

        >>> count_before_in_ranges(np.array([1, 5, 9, 2, 3]), np.array([0, 3]), np.array([3, 5]),
        ...                        np.array([6, 10]), longest=3).tolist()
        [2, 5]
    """
    pos = np.array(lo, dtype=np.int64, copy=True)
    step = 1 << (longest.bit_length() - 1) if longest else 0
    while step:
        cand = pos + step
        # mode="clip" keeps the gather in bounds for candidates past the range end,
        # which the first condition rejects anyway.
        ok = (cand <= hi) & (ts.take(cand - 1, mode="clip") < t)
        pos = np.where(ok, cand, pos)
        step >>= 1
    return pos


@dataclass(frozen=True, eq=False)
class Segments:
    """Events of one kind (explicit, or bare impression) grouped by user; part of an EventIndex.

    Args:
        rows: int64 row indices into the events table of the events of this kind, table order.
        ts: their ``ts_ms``, contiguous so that the searches stay in cache.
        starts: user rank ``k`` owns ``rows[starts[k]:starts[k + 1]]``; one extra empty
            segment, rank ``n_users``, is where unknown users are sent.
        longest: the most events of this kind of any user.

    Example::

        >>> seg = Segments.select(np.array([True, False, True]), np.array([5, 6, 1]), np.array([0, 2]))
        >>> seg.rows.tolist(), seg.starts.tolist(), seg.count_before(np.array([0, 1, 2]), np.array([9, 1, 9])).tolist()
        ([0, 2], [0, 1, 2, 2], [1, 1, 2])
    """

    rows: np.ndarray
    ts: np.ndarray
    starts: np.ndarray
    longest: int

    @classmethod
    def select(cls, keep: np.ndarray, ts_ms: np.ndarray, user_first_row: np.ndarray) -> Segments:
        """The rows where ``keep`` is true, segmented by the users starting at ``user_first_row``."""
        rows = np.flatnonzero(keep).astype(np.int64)
        before = np.zeros(keep.size + 1, dtype=np.int64)
        np.cumsum(keep, out=before[1:])  # before[i]: how many kept rows precede table row i
        starts = np.r_[before[user_first_row], before[-1], before[-1]]
        longest = int(np.diff(starts).max())
        return cls(rows, ts_ms[rows], starts, longest)

    def count_before(self, rank: np.ndarray, t: np.ndarray) -> np.ndarray:
        """End (exclusive) of each request's events with ``ts < t``, as a position in ``rows``."""
        return count_before_in_ranges(self.ts, self.starts[rank], self.starts[rank + 1], t, self.longest)


class EventIndex:
    """Positions of explicit actions and bare impressions of an events table, per user.

    Built once (a few vector passes over the table); :func:`build_timelines` then answers any
    number of requests against it.

    Args:
        user_id: the events' ``user_id`` column.
        ts_ms: the events' ``ts_ms`` column.
        action_mask: the events' ``action_mask`` column.

    The arrays must be sorted by ``(user_id, ts_ms)``, as every events table is.

    Raises:
        DataError: when the columns differ in length or are not sorted.

    Example::

        >>> from lifelong.data.schema import Action
        >>> index = EventIndex(np.array([1, 1, 2]), np.array([5, 6, 1]),
        ...                    np.array([int(Action.CLICK), int(Action.IMPRESSION), int(Action.LIKE)]))
        >>> index.users.tolist(), index.explicit.rows.tolist(), index.impressions.rows.tolist()
        ([1, 2], [0, 2], [1])
    """

    def __init__(self, user_id: np.ndarray, ts_ms: np.ndarray, action_mask: np.ndarray):
        user_id = np.asarray(user_id, dtype=np.int64)
        ts_ms = np.asarray(ts_ms, dtype=np.int64)
        action_mask = np.asarray(action_mask)
        if not (user_id.ndim == ts_ms.ndim == action_mask.ndim == 1
                and user_id.size == ts_ms.size == action_mask.size):
            raise DataError("<events>", "user_id, ts_ms and action_mask must be 1-D columns of one length")
        new_user = np.r_[True, user_id[1:] != user_id[:-1]]
        backwards = (user_id[1:] < user_id[:-1]) | (~new_user[1:] & (ts_ms[1:] < ts_ms[:-1]))
        if backwards.any():
            raise DataError("<events>", "events must be sorted by (user_id, ts_ms)",
                            row=int(np.flatnonzero(backwards)[0]) + 1)
        first_row = np.flatnonzero(new_user) if user_id.size else np.zeros(0, dtype=np.int64)
        self.n_events: int = int(user_id.size)
        self.users: np.ndarray = user_id[first_row]
        self.explicit: Segments = Segments.select((action_mask & EXPLICIT_BITS) != 0, ts_ms, first_row)
        self.impressions: Segments = Segments.select(action_mask == int(Action.IMPRESSION), ts_ms, first_row)

    @classmethod
    def from_table(cls, events: pa.Table) -> EventIndex:
        """Index an events table (``EVENTS_SCHEMA``; only user_id, ts_ms, action_mask are read)."""
        return cls(*(events.column(name).to_numpy() for name in ("user_id", "ts_ms", "action_mask")))

    def rank(self, user_ids: np.ndarray) -> np.ndarray:
        """Each user's position in :attr:`users`; ``len(users)`` (an empty segment) if unknown."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        n = self.users.size
        if n == 0:
            return np.zeros(user_ids.shape, dtype=np.int64)
        rank = np.searchsorted(self.users, user_ids)
        known = self.users[np.minimum(rank, n - 1)] == user_ids
        return np.where(known, rank, n)


@dataclass(frozen=True, eq=False)
class Timelines:
    """The three sequences of a batch of requests, as ranges; rows are materialised on access.

    ``ranges[name] = (start, end)`` index the position array of the sequence's kind:
    ``index.explicit.rows`` for ``"ll"`` and ``"rt"``, ``index.impressions.rows`` for ``"imp"``.
    ``ll``, ``rt`` and ``imp`` are :class:`Jagged` of events-table row indices, chronological
    within each row, computed on first access and cached.

    Args:
        index: the index the ranges point into.
        ranges: ``{"ll" | "rt" | "imp": (start, end)}``, int64 arrays of one length per request.

    Example::

        >>> index = EventIndex(np.array([1, 1, 1]), np.array([1, 2, 3]), np.array([2, 2, 2]))
        >>> tl = build_timelines(index, np.array([1]), np.array([9]))
        >>> tl.rt.row(0).tolist(), tl.rt_newest(2).row(0).tolist()
        ([0, 1, 2], [1, 2])
    """

    index: EventIndex
    ranges: dict[str, tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return self.ranges["rt"][0].size

    def _jagged(self, name: str, start: np.ndarray | None = None) -> Jagged:
        lo, end = self.ranges[name]
        lo = lo if start is None else start
        rows = self.index.impressions.rows if name == "imp" else self.index.explicit.rows
        return Jagged.from_ranges(rows, lo, end - lo)

    @cached_property
    def ll(self) -> Jagged:
        """S_LL: row indices of each request's lifelong explicit actions, oldest first."""
        return self._jagged("ll")

    @cached_property
    def rt(self) -> Jagged:
        """S_RT: row indices of each request's newest explicit actions, oldest first."""
        return self._jagged("rt")

    @cached_property
    def imp(self) -> Jagged:
        """S_imp: row indices of each request's newest bare impressions, oldest first."""
        return self._jagged("imp")

    def rt_newest(self, r: int) -> Jagged:
        """``S_RT[:r]`` in the paper's notation: the newest ``r`` tokens of S_RT, oldest first.

        Args:
            r: how many of the newest tokens to keep (rows shorter than r are kept whole).
        """
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        start, end = self.ranges["rt"]
        return self._jagged("rt", np.maximum(start, end - r))


def build_timelines(index: EventIndex, user_ids: np.ndarray, request_ts: np.ndarray,
                    config: TimelineConfig = TimelineConfig()) -> Timelines:
    """Find S_LL, S_RT and S_imp of every ``(user_ids[i], request_ts[i])``, all at once.

    Args:
        index: the events' :class:`EventIndex`.
        user_ids: one user id per request (int64); unknown users get empty sequences.
        request_ts: request time per request, epoch ms; only events strictly before it count.
        config: the sequences' length caps.

    Returns:
        :class:`Timelines` holding ranges; the row indices are materialised on access.

    Example::

        >>> index = EventIndex(np.array([3, 3]), np.array([100, 200]), np.array([2, 1]))
        >>> tl = build_timelines(index, np.array([3, 3]), np.array([200, 201]))
        >>> tl.rt.lengths().tolist(), tl.imp.lengths().tolist()
        ([1, 1], [0, 1])
    """
    user_ids = np.asarray(user_ids, dtype=np.int64)
    request_ts = np.asarray(request_ts, dtype=np.int64)
    if user_ids.ndim != 1 or user_ids.shape != request_ts.shape:
        raise ValueError(f"user_ids and request_ts must be 1-D of one length, got {user_ids.shape} and {request_ts.shape}")
    rank = index.rank(user_ids)
    explicit_start = index.explicit.starts[rank]
    rt_end = index.explicit.count_before(rank, request_ts)
    rt_start = np.maximum(explicit_start, rt_end - config.rt_cap)
    ll_start = np.maximum(explicit_start, rt_start - config.ll_cap)
    imp_end = index.impressions.count_before(rank, request_ts)
    imp_start = np.maximum(index.impressions.starts[rank], imp_end - config.imp_cap)
    return Timelines(index, {"ll": (ll_start, rt_start), "rt": (rt_start, rt_end), "imp": (imp_start, imp_end)})
