"""The online joiner: windows, attribution of separate actions, negatives, and exact resumption
(any batch split and a checkpoint/restore give what a brute-force join of the whole table gives)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.data.schema import EXPLICIT_BITS, HEAD_BITS, HEADS, Action
from lifelong.data.world import load_config, simulate_to
from lifelong.monolith.joiner import EXAMPLE_DTYPE, JoinerConfig, OnlineJoiner
from lifelong.store.stream import EVENT_DTYPE, LogStream, replay

IMP, CLICK, REPIN, HIDE, LONG = (int(a) for a in (Action.IMPRESSION, Action.CLICK, Action.REPIN, Action.HIDE,
                                                  Action.LONG_VIEW))
W = 1_000


def events(*rows: tuple[int, int, int, int, int]) -> np.ndarray:
    """Rows of (user, item, request, ts_ms, action_mask)."""
    out = np.zeros(len(rows), EVENT_DTYPE)
    if rows:
        cols = np.array(rows, dtype=np.int64).T
        out["user_id"], out["item_id"], out["request_id"], out["ts_ms"], out["action_mask"] = cols
    out["surface"] = 2
    return out


def labels(*heads: str) -> list[int]:
    return [int(h in heads) for h in HEADS]


def join_all(ev: np.ndarray, window_ms: int = W) -> tuple[np.ndarray, OnlineJoiner]:
    joiner = OnlineJoiner(JoinerConfig(window_ms=window_ms))
    return np.concatenate([joiner.push(ev), joiner.flush()]), joiner


def test_engaged_impression_in_one_event():
    out, joiner = join_all(events((1, 7, 0, 0, IMP | CLICK | LONG), (1, 8, 0, 0, IMP)))
    assert out.dtype == EXAMPLE_DTYPE
    assert out["item_id"].tolist() == [7, 8] and out["surface"].tolist() == [2, 2]
    assert out["labels"].tolist() == [labels("click", "long_view"), labels()]
    assert joiner.stats.impressions == 2 and joiner.stats.emitted == 2


def test_separate_actions_inside_the_window_are_or_ed_in():
    out, joiner = join_all(events((1, 7, 3, 0, IMP), (1, 7, 9, 200, CLICK), (1, 7, 9, 999, REPIN | HIDE),
                                  (2, 7, 3, 500, CLICK)))  # another user's click on the item
    assert out["labels"].tolist() == [labels("click", "repin", "hide")]
    assert out["action_mask"].tolist() == [IMP | CLICK | REPIN | HIDE]
    assert joiner.stats.actions == 3 and joiner.stats.attributed == 2 and joiner.stats.unattributed == 1


def test_action_at_or_after_the_window_end_leaves_a_negative():
    joiner = OnlineJoiner(JoinerConfig(window_ms=W))
    assert len(joiner.push(events((1, 7, 0, 10, IMP), (1, 8, 0, 11, IMP), (1, 7, 0, W + 9, REPIN)))) == 0
    out = joiner.push(events((1, 7, 0, W + 10, CLICK)))  # the window is [10, W + 10)
    assert out["item_id"].tolist() == [7] and out["labels"].tolist() == [labels("repin")]
    assert joiner.stats.unattributed == 1 and joiner.n_open == 1 and joiner.watermark == W + 10
    assert joiner.flush()["labels"].tolist() == [labels()]


def test_examples_wait_for_the_watermark():
    joiner = OnlineJoiner(JoinerConfig(window_ms=W))
    assert len(joiner.push(events((1, 7, 0, 0, IMP)))) == 0
    assert len(joiner.push(events((5, 5, 5, W - 1, 0)))) == 0  # an event with no known bit still ticks
    out = joiner.push(events((5, 5, 5, W, 0)))
    assert out["ts_ms"].tolist() == [0] and joiner.stats.events == 3 and joiner.n_open == 0


def test_several_impressions_of_one_item():
    out, _ = join_all(events(
        (1, 7, 1, 0, IMP),
        (1, 7, 2, 100, IMP),
        (1, 7, 0, 150, CLICK),         # no impression of request 0: the latest open one (request 2)
        (1, 7, 1, 200, REPIN),         # request 1 is open: it gets the repin, though request 2 is newer
        (1, 7, 1, W + 50, HIDE),       # request 1 has closed: falls back to request 2
        (1, 7, 3, W + 60, IMP),
        (1, 7, 3, W + 60, LONG),       # same time, after it in the stream: counts
    ))
    assert out["request_id"].tolist() == [1, 2, 3]
    assert out["labels"].tolist() == [labels("repin"), labels("click", "hide"), labels("long_view")]


def test_action_before_its_impression_in_the_stream_does_not_count():
    out, joiner = join_all(events((1, 7, 0, 5, CLICK), (1, 7, 0, 5, IMP)))
    assert out["labels"].tolist() == [labels()] and joiner.stats.unattributed == 1


def test_late_events_are_handled_at_the_watermark():
    out, _ = join_all(events((1, 7, 0, 0, IMP), (1, 9, 0, 5 * W, IMP), (1, 8, 0, 100, IMP),
                             (1, 8, 0, 5 * W + 10, CLICK), (1, 7, 0, 200, CLICK)))
    # Item 8's impression arrived late: its window runs from the watermark then (5 W).
    assert out["item_id"].tolist() == [7, 9, 8]
    assert out["ts_ms"].tolist() == [0, 5 * W, 100]
    assert out["labels"].tolist() == [labels(), labels(), labels("click")]


def test_state_dict_checks():
    joiner = OnlineJoiner(JoinerConfig(window_ms=W))
    joiner.push(events((1, 7, 0, 0, IMP)))
    state = joiner.state_dict()
    with pytest.raises(ValueError, match="window_ms=1000"):
        OnlineJoiner(JoinerConfig(window_ms=2 * W)).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks open.end_ms"):
        OnlineJoiner(JoinerConfig(window_ms=W)).load_state_dict({k: v for k, v in state.items() if k != "open.end_ms"})
    with pytest.raises(ValueError, match="one length"):
        OnlineJoiner(JoinerConfig(window_ms=W)).load_state_dict({**state, "open.surface": np.zeros(2, np.int8)})
    fresh = OnlineJoiner(JoinerConfig(window_ms=W))
    assert fresh.watermark is None
    fresh.load_state_dict(state)
    assert fresh.watermark == 0 and fresh.position == 1 and fresh.n_open == 1 and fresh.stats == joiner.stats


# -- the brute-force reference --------------------------------------------------------------------


def brute_force_join(ev: np.ndarray, window_ms: int) -> np.ndarray:
    """The module's rules, one event and one candidate at a time."""
    u, i, r = ev["user_id"].tolist(), ev["item_id"].tolist(), ev["request_id"].tolist()
    mask = ev["action_mask"].tolist()
    wm = np.maximum.accumulate(ev["ts_ms"]).tolist() if len(ev) else []
    imps = [q for q in range(len(ev)) if mask[q] & IMP]
    end = {q: wm[q] + window_ms for q in imps}
    got = {q: mask[q] for q in imps}
    for p in range(len(ev)):
        if mask[p] & IMP or not mask[p] & EXPLICIT_BITS:
            continue
        exact = [q for q in imps if q < p and end[q] > wm[p] and (u[q], i[q], r[q]) == (u[p], i[p], r[p])]
        any_request = [q for q in imps if q < p and end[q] > wm[p] and (u[q], i[q]) == (u[p], i[p])]
        if exact or any_request:
            got[max(exact or any_request)] |= mask[p]
    order = sorted(imps, key=lambda q: (end[q], q))
    out = np.zeros(len(order), EXAMPLE_DTYPE)
    for k, q in enumerate(order):
        out[k] = (u[q], i[q], r[q], ev["ts_ms"][q], ev["surface"][q], got[q],
                  [int(got[q] & HEAD_BITS[h] != 0) for h in HEADS])
    return out


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and len(a) == len(b)
    for name in EXAMPLE_DTYPE.names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


MASKS = [IMP, IMP, IMP | CLICK, IMP | REPIN | LONG, IMP | HIDE, CLICK, REPIN, HIDE, LONG | CLICK,
         int(Action.LIKE), 0]


@st.composite
def event_streams(draw):
    n = draw(st.integers(0, 50))
    small = st.lists(st.integers(0, 2), min_size=n, max_size=n)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["user_id"], ev["item_id"], ev["request_id"] = draw(small), draw(small), draw(small)
    # Mostly in time order, with a few late events; on a 100 ms grid, so that times often fall
    # exactly on window ends.
    steps = draw(st.lists(st.integers(-3, 7), min_size=n, max_size=n))
    ev["ts_ms"] = 10_000 + 100 * np.cumsum(steps, dtype=np.int64)
    ev["action_mask"] = draw(st.lists(st.sampled_from(MASKS), min_size=n, max_size=n))
    ev["surface"] = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    restart_after = draw(st.integers(0, len(cuts) + 1))
    window_ms = draw(st.sampled_from([300, W, 3 * W]))
    return ev, cuts, restart_after, window_ms


def restarted(joiner: OnlineJoiner) -> OnlineJoiner:
    """A new joiner from the old one's state, saved to and loaded from an .npz file."""
    buf = io.BytesIO()
    np.savez(buf, **joiner.state_dict())
    buf.seek(0)
    fresh = OnlineJoiner(joiner.cfg)
    fresh.load_state_dict(dict(np.load(buf)))
    return fresh


@settings(max_examples=150, deadline=None)
@given(case=event_streams())
def test_streaming_with_restart_equals_a_brute_force_join(case):
    ev, cuts, restart_after, window_ms = case
    joiner = OnlineJoiner(JoinerConfig(window_ms=window_ms))
    out, emitted, pos = [], 0, 0
    wm = np.maximum.accumulate(ev["ts_ms"]) if len(ev) else ev["ts_ms"]
    imp_end = np.where(ev["action_mask"] & IMP, wm + window_ms, np.iinfo(np.int64).max)
    for k, batch in enumerate(np.split(ev, cuts)):
        if k == restart_after:
            joiner = restarted(joiner)
        out.append(joiner.push(batch))
        pos += len(batch)
        # Each example comes out in the first batch after which the watermark reaches its end.
        emitted += len(out[-1])
        if pos:
            assert emitted == int((imp_end[:pos] <= wm[pos - 1]).sum()) and joiner.watermark == wm[pos - 1]
    out.append(joiner.flush())
    assert_same(np.concatenate(out), brute_force_join(ev, window_ms))
    assert joiner.stats.events == len(ev) and joiner.stats.emitted == int((ev["action_mask"] & IMP != 0).sum())


# -- on a simulated world, through a stream ---------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world") / "tiny"
    simulate_to(load_config("tiny", overrides=["users.n_users=10"]), d)
    return d


def test_world_stream_joins_and_resumes_from_a_checkpoint(world, tmp_path):
    cfg = JoinerConfig(window_ms=30 * 60_000)
    with LogStream(tmp_path) as log:
        replay(world, log)
        everything, _ = log.read(0, 10**6)
        expected, _ = join_all(everything, cfg.window_ms)
        # A trainer commits (joiner state, stream offset) after batch 2, trains on batch 3 and
        # crashes before its next commit; it restarts from the commit.
        out, joiner = [], OnlineJoiner(cfg)
        for k, (records, offset) in enumerate(log.batches(0, 2_500)):
            examples = joiner.push(records)
            if k == 3:
                break
            out.append(examples)
            committed = (joiner.state_dict(), offset)
        state, offset = committed
        joiner = OnlineJoiner(cfg)
        joiner.load_state_dict(state)
        for records, _ in log.batches(offset, 2_500):
            out.append(joiner.push(records))
        out.append(joiner.flush())
    assert_same(np.concatenate(out), expected)
    # The simulator records engagement in the impression event itself: labels are its own bits.
    imps = everything[everything["action_mask"] & IMP != 0]
    assert len(expected) == len(imps) and joiner.stats.actions == 0
    for h, head in enumerate(HEADS):
        assert expected["labels"][:, h].sum() == (imps["action_mask"] & HEAD_BITS[head] != 0).sum() > 0
