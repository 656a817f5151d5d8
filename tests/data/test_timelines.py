"""Point-in-time timelines against a brute-force per-request reference, and the Jagged layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.schema import EVENTS_SCHEMA, EXPLICIT_BITS, KNOWN_ACTION_BITS, Action
from lifelong.data.timelines import EventIndex, Jagged, TimelineConfig, Timelines, build_timelines

IMP = int(Action.IMPRESSION)
CLICK = int(Action.CLICK)


def reference(user, ts, mask, u, t, cfg):
    """The definition, one request at a time: (ll, rt, imp) as lists of table rows."""
    seen = [i for i in range(len(user)) if user[i] == u and ts[i] < t]
    explicit = [i for i in seen if mask[i] & EXPLICIT_BITS]
    rt = explicit[max(0, len(explicit) - cfg.rt_cap):]
    older = explicit[:len(explicit) - len(rt)]
    ll = older[max(0, len(older) - cfg.ll_cap):]
    bare = [i for i in seen if mask[i] == IMP]
    return ll, rt, bare[max(0, len(bare) - cfg.imp_cap):]


@st.composite
def worlds(draw):
    """A sorted events table over a few users with tied timestamps, plus requests and caps."""
    n = draw(st.integers(0, 60))
    # Sparse ids leave unknown users between the known ones; few timestamps force ties.
    user = np.array(draw(st.lists(st.sampled_from([2, 4, 6, 8]), min_size=n, max_size=n)), dtype=np.int64)
    ts = np.array(draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)), dtype=np.int64)
    mask_values = st.one_of(st.just(IMP), st.just(IMP | CLICK), st.integers(1, KNOWN_ACTION_BITS))
    mask = np.array(draw(st.lists(mask_values, min_size=n, max_size=n)), dtype=np.uint16)
    order = np.lexsort((ts, user))
    m = draw(st.integers(0, 30))
    req_user = np.array(draw(st.lists(st.integers(0, 9), min_size=m, max_size=m)), dtype=np.int64)
    req_ts = np.array(draw(st.lists(st.integers(-1, 14), min_size=m, max_size=m)), dtype=np.int64)
    cfg = TimelineConfig(ll_cap=draw(st.integers(0, 6)), rt_cap=draw(st.integers(0, 4)), imp_cap=draw(st.integers(0, 4)))
    return user[order], ts[order], mask[order], req_user, req_ts, cfg


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_matches_bruteforce_and_invariants(world):
    user, ts, mask, req_user, req_ts, cfg = world
    tl = build_timelines(EventIndex(user, ts, mask), req_user, req_ts, cfg)
    assert len(tl) == len(tl.ll) == len(tl.rt) == len(tl.imp) == req_user.size
    for i, (u, t) in enumerate(zip(req_user, req_ts)):
        ll, rt, imp = tl.ll.row(i), tl.rt.row(i), tl.imp.row(i)
        assert (ll.tolist(), rt.tolist(), imp.tolist()) == reference(user, ts, mask, u, t, cfg)
        for seq in (ll, rt, imp):
            assert np.all(user[seq] == u)
            assert np.all(ts[seq] < t), "a token at or after the request time leaked"
            assert np.all(np.diff(seq) > 0) and np.all(np.diff(ts[seq]) >= 0), "not chronological"
        assert np.all(mask[ll] & EXPLICIT_BITS) and np.all(mask[rt] & EXPLICIT_BITS)
        assert np.all(mask[imp] == IMP)
        assert len(ll) <= cfg.ll_cap and len(rt) <= cfg.rt_cap and len(imp) <= cfg.imp_cap
        assert not set(ll.tolist()) & set(rt.tolist())
        if len(ll) and len(rt):
            # Ties at the boundary: LL is older in table order, never newer in time.
            assert ll[-1] < rt[0] and ts[ll[-1]] <= ts[rt[0]]
        if u not in user or t <= ts[user == u].min():
            assert len(ll) == len(rt) == len(imp) == 0
    for r in range(cfg.rt_cap + 2):
        newest = tl.rt_newest(r)
        for i in range(len(tl)):
            row = tl.rt.row(i)
            assert newest.row(i).tolist() == row[max(0, len(row) - r):].tolist()


def _table(user, ts, mask) -> pa.Table:
    n = len(user)
    zeros = np.zeros(n, dtype=np.int64)
    return pa.table({"user_id": user, "item_id": zeros, "ts_ms": ts, "surface": zeros.astype(np.int8),
                     "action_mask": np.asarray(mask, dtype=np.uint16), "dwell_ms": zeros.astype(np.int32),
                     "request_id": zeros}, schema=EVENTS_SCHEMA)


def test_from_table_event_at_request_time_and_tie_boundary():
    # User 5: three clicks at ts=10 (a tie), one bare impression at 10, a like at 20.
    user = np.array([5, 5, 5, 5, 5])
    ts = np.array([10, 10, 10, 10, 20])
    mask = np.array([CLICK, CLICK | IMP, IMP, CLICK, int(Action.LIKE)])
    index = EventIndex.from_table(_table(user, ts, mask))
    tl = build_timelines(index, np.array([5, 5, 5]), np.array([10, 11, 21]), TimelineConfig(rt_cap=2))
    assert tl.rt.row(0).size == tl.ll.row(0).size == tl.imp.row(0).size == 0  # all at t: invisible
    assert tl.rt.row(1).tolist() == [1, 3] and tl.ll.row(1).tolist() == [0]  # the tie splits by row
    assert tl.imp.row(1).tolist() == [2]
    assert tl.rt.row(2).tolist() == [3, 4] and tl.ll.row(2).tolist() == [0, 1]
    assert tl.ranges["rt"][0].tolist() == [0, 1, 2] and tl.ranges["rt"][1].tolist() == [0, 3, 4]
    assert tl.rt.map(ts).row(2).tolist() == [10, 20]


def test_unknown_users_and_empty_index():
    index = EventIndex(np.array([3, 3]), np.array([1, 2]), np.array([CLICK, IMP]))
    tl = build_timelines(index, np.array([1, 4, 3]), np.array([99, 99, 99]))
    assert tl.rt.lengths().tolist() == [0, 0, 1] and tl.imp.lengths().tolist() == [0, 0, 1]
    empty = EventIndex(np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.uint16))
    tl = build_timelines(empty, np.array([1, 2]), np.array([5, 5]))
    assert tl.ll.lengths().tolist() == tl.rt.lengths().tolist() == tl.imp.lengths().tolist() == [0, 0]
    assert len(build_timelines(index, np.zeros(0), np.zeros(0)).rt) == 0


def test_timelines_are_lazy():
    index = EventIndex(np.array([1, 1]), np.array([1, 2]), np.array([CLICK, CLICK]))
    tl = build_timelines(index, np.array([1]), np.array([3]))
    assert "ll" not in tl.__dict__
    assert tl.ll is tl.ll and isinstance(tl, Timelines)


def test_rejects_bad_input():
    with pytest.raises(DataError, match="sorted"):
        EventIndex(np.array([1, 1]), np.array([2, 1]), np.array([CLICK, CLICK]))
    with pytest.raises(DataError, match="sorted"):
        EventIndex(np.array([2, 1]), np.array([1, 2]), np.array([CLICK, CLICK]))
    with pytest.raises(DataError):
        EventIndex(np.array([1, 1]), np.array([1]), np.array([CLICK, CLICK]))
    with pytest.raises(ConfigError):
        TimelineConfig(rt_cap=-1)
    index = EventIndex(np.array([1]), np.array([1]), np.array([CLICK]))
    with pytest.raises(ValueError):
        build_timelines(index, np.array([1, 1]), np.array([1]))
    with pytest.raises(ValueError):
        build_timelines(index, np.array([1]), np.array([1])).rt_newest(-1)


# --- Jagged --------------------------------------------------------------------------------


def test_jagged_from_ranges_trailing_shape_and_map():
    base = np.arange(20, dtype=np.float32).reshape(10, 2)
    j = Jagged.from_ranges(base, np.array([8, 0, 3]), np.array([2, 0, 3]))
    assert len(j) == 3 and j.lengths().tolist() == [2, 0, 3]
    assert j.values.shape == (5, 2) and j.values.dtype == np.float32
    assert j.row(0).tolist() == [[16, 17], [18, 19]] and j.row(1).shape == (0, 2)
    idx = Jagged.from_ranges(np.arange(10), np.array([8, 0, 3]), np.array([2, 0, 3]))
    mapped = idx.map(base)
    assert np.array_equal(mapped.values, j.values) and np.array_equal(mapped.offsets, j.offsets)


def test_jagged_take_from_rows_and_validation():
    j = Jagged.from_rows([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4])])
    assert j.offsets.tolist() == [0, 3, 3, 4] and j.offsets.dtype == np.int64
    t = j.take([2, 0, 0, 1])
    assert [t.row(i).tolist() for i in range(len(t))] == [[4], [1, 2, 3], [1, 2, 3], []]
    assert len(j.take([])) == 0 and len(Jagged.from_rows([])) == 0
    for offsets in ([1, 3], [0, 2], [0, 3, 1, 3], [], [[0, 3]], [0.0, 3.0]):
        with pytest.raises(ValueError):
            Jagged(np.arange(3), np.array(offsets))
