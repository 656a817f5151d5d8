"""The interactive world: determinism, common random numbers, position bias, continuation, feedback
that reuses the offline loop, and the oracle beating random."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.schema import EVENTS_SCHEMA, POSITIVE_BITS, Action
from lifelong.data.world import load_config, simulate, write_world
from lifelong.data.world import requests as R
from lifelong.data.world.interactive import (
    REQUEST_ID_BASE,
    _initial_state,
    examination_probs,
    identity_policy,
    open_world,
    oracle_policy,
    random_policy,
)
from lifelong.data.world.simulate import chunk_population, simulate_requests


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return write_world(simulate(load_config("tiny")), tmp_path_factory.mktemp("interactive") / "w")


def _run(source, policy, users=None, seed=0, days=None, sink=None):
    world = source.world(source.user_ids if users is None else users, seed=seed)
    return world.run(policy, days, sink)


def _events(outcomes) -> pa.Table:
    return pa.concat_tables([o.events for o in outcomes])


def _per_user(outcomes, bit: int) -> dict[int, int]:
    ev = _events(outcomes)
    hit = (ev.column("action_mask").to_numpy() & bit) != 0
    users = ev.column("user_id").to_numpy()
    return {int(u): int(hit[users == u].sum()) for u in np.unique(users)}


def test_same_seed_and_policy_give_identical_events(tiny_world):
    source = open_world(tiny_world, days=2)
    sunk: list[pa.Table] = []
    a = _run(source, random_policy(3), sink=sunk.append)
    b = _run(open_world(tiny_world, days=2), random_policy(3))
    assert all(x.events.equals(y.events) for x, y in zip(a, b))
    assert [t.num_rows for t in sunk] == [o.events.num_rows for o in a] and sunk[0].schema == EVENTS_SCHEMA
    assert all((x.requests == y.requests).all() and (x.sessions == y.sessions).all() for x, y in zip(a, b))
    ev = _events(a)
    assert ev.num_rows > 0 and (ev.column("request_id").to_numpy() >= REQUEST_ID_BASE).all()
    ts = ev.column("ts_ms").to_numpy()
    assert (np.diff(ts) >= 0).all() and ts.min() >= source.start_ms  # time order, after the world's end
    c = _run(source, random_policy(3), seed=1)
    assert not _events(c).equals(ev)  # another seed, other draws


def test_common_random_numbers(tiny_world):
    """A user's outcomes depend on their own keyed draws and the policy only: not on the other
    users of the arm, and two arms with the same policy agree user by user."""
    source = open_world(tiny_world, days=2)
    everyone = _run(source, oracle_policy())
    half = source.user_ids[::2]
    alone = _run(source, oracle_policy(), users=half)
    ev_all, ev_half = _events(everyone), _events(alone)
    keep = np.isin(ev_all.column("user_id").to_numpy(), half)
    assert ev_all.filter(pa.array(keep)).equals(ev_half)
    assert (everyone[0].requests[::2] == alone[0].requests).all()
    # Another policy: the same sessions (drawn before any feed), different responses.
    other = _run(source, random_policy(0))
    assert all((x.sessions == y.sessions).all() for x, y in zip(everyone, other))
    assert _per_user(everyone, Action.REPIN) != _per_user(other, Action.REPIN)


def test_windows_of_time_change_what_the_policy_sees_not_the_outcomes(tiny_world):
    """A day in one-hour windows: every round's requests lie in one window, windows come in time
    order, each is sunk before the callback runs, and a fixed policy's outcomes are the day's."""
    source = open_world(tiny_world, days=2)
    whole = _run(source, oracle_policy())
    oracle = oracle_policy()
    rounds: list[np.ndarray] = []

    def policy(batch):
        rounds.append(np.array([r.request_time for r in batch]))
        return oracle(batch)

    sunk: list[pa.Table] = []
    marks: list[tuple[int, int]] = []  # (window end, tables sunk by then)
    world = source.world(source.user_ids, seed=0)
    hour = 3_600_000
    windowed = [world.step(policy, sunk.append, window_ms=hour,
                           after_window=lambda end: marks.append((end, len(sunk)))) for _ in range(2)]
    for x, y in zip(whole, windowed):
        assert x.events.equals(y.events)
        assert (x.requests == y.requests).all() and (x.sessions == y.sessions).all()
    assert all((t // hour == t[0] // hour).all() for t in rounds)  # a round never spans two windows
    ends = [e for e, _ in marks]
    assert ends == sorted(ends) and len(set(ends)) == len(ends) > 2
    assert [n for _, n in marks] == list(range(1, len(sunk) + 1))  # sink first, then the callback
    for table, (end, _) in zip(sunk, marks):
        ts = table.column("ts_ms").to_numpy()
        assert ts.size and ts.max() < end and ts.min() >= end - hour
    assert pa.concat_tables(sunk).equals(_events(windowed))
    with pytest.raises(ConfigError, match="window_ms"):
        source.world(source.user_ids, seed=0).step(oracle, window_ms=0)


def test_oracle_beats_random_on_the_same_users(tiny_world):
    source = open_world(tiny_world, days=3)
    oracle, random = _run(source, oracle_policy()), _run(source, random_policy(0))
    count = {name: {bit: int(((_events(o).column("action_mask").to_numpy() & bit) != 0).sum())
                    for bit in (Action.REPIN, Action.HIDE, Action.CLICK)} for name, o in (("o", oracle), ("r", random))}
    assert count["o"][Action.REPIN] > 1.3 * count["r"][Action.REPIN]
    assert count["o"][Action.HIDE] < count["r"][Action.HIDE]
    assert count["o"][Action.CLICK] > count["r"][Action.CLICK]


def test_position_bias(tiny_world):
    """Under a random order, positions near the top get more impressions and more responses."""
    source = open_world(tiny_world, days=4, overrides=["interactive.exam_eta=1.0"])
    ev = _events(_run(source, random_policy(1)))
    rid = ev.column("request_id").to_numpy()
    # Rows of a request are logged in feed order, and examination is a top-down prefix.
    start = np.r_[0, np.flatnonzero(rid[1:] != rid[:-1]) + 1]
    pos = np.arange(rid.size) - np.repeat(start, np.diff(np.r_[start, rid.size]))
    acted = (ev.column("action_mask").to_numpy() & ~np.uint16(Action.IMPRESSION)) != 0
    shown = np.bincount(pos, minlength=16)
    responses = np.bincount(pos, weights=acted, minlength=16)
    assert shown[0] == start.size  # the top item is always examined (exam[0] = 1)
    assert (np.diff(shown) <= 0).all() and shown[8:].sum() < 0.5 * shown[:8].sum()
    assert responses[:4].sum() > 2 * responses[8:12].sum()
    exam = examination_probs(source.cfg)
    assert abs(shown[3] / shown[0] - exam[3]) < 0.06  # the logged prefix follows exam[k]


def test_explicit_examination_list_limits_the_feed(tiny_world):
    source = open_world(tiny_world, days=1, overrides=["interactive.exam_probs=[1.0, 1.0, 0.5]"])
    ev = _events(_run(source, identity_policy()))
    _, per_request = np.unique(ev.column("request_id").to_numpy(), return_counts=True)
    assert per_request.max() == 3 and per_request.min() == 2


def test_continuation_follows_satisfaction(tiny_world):
    one = open_world(tiny_world, days=2, overrides=["interactive.continue_bias=-50", "interactive.continue_engagement=0"])
    outs = _run(one, oracle_policy())
    assert all((o.requests == o.sessions).all() for o in outs)  # never continues: one request per session
    capped = open_world(tiny_world, days=1, overrides=["interactive.continue_bias=50",
                                                        "interactive.max_session_requests=4"])
    out = _run(capped, oracle_policy())[0]
    assert (out.requests <= 4 * out.sessions).all() and out.requests.sum() > 2 * out.sessions.sum()
    # Engagement keeps a session going: with a strong engagement weight the oracle's users stay longer.
    eager = open_world(tiny_world, days=2, overrides=["interactive.continue_bias=-1",
                                                      "interactive.continue_engagement=2"])
    assert (sum(o.requests.sum() for o in _run(eager, oracle_policy()))
            > sum(o.requests.sum() for o in _run(eager, random_policy(0))))


def test_failed_requests_show_nothing_and_are_counted(tiny_world):
    source = open_world(tiny_world, days=1)
    flaky = lambda reqs: [None if r.user_id % 2 else r.candidates for r in reqs]  # noqa: E731
    out = _run(source, flaky)[0]
    odd = out.user_ids % 2 == 1
    assert out.failed[odd].sum() > 0 and out.requests[odd].sum() == 0 and out.failed[~odd].sum() == 0
    assert (out.events.column("user_id").to_numpy() % 2 == 0).all()
    with pytest.raises(ValueError, match="not a permutation"):
        _run(source, lambda reqs: [r.candidates[:-1] for r in reqs])


def test_state_at_the_end_is_the_offline_loops(tiny_world):
    """The engagement state rebuilt from events.parquet equals the offline loop's final state, and
    the interests drawn past the world's end leave the world's own periods unchanged."""
    source = open_world(tiny_world, days=40)
    cfg, draws = source.cfg, source.draws
    captured = {}
    empty = R.Engagement.empty

    def capture(*args):
        captured["state"] = empty(*args)
        return captured["state"]

    pop, rng, extended = chunk_population(cfg, draws, 0, interest_days=cfg.days + 40)
    try:
        R.Engagement.empty = capture
        simulate_requests(cfg, draws.catalog, pop, draws.noise_key, rng)
    finally:
        R.Engagement.empty = empty
    offline = captured["state"]
    rank_user = np.argsort(-pop.schedule.n_requests, kind="stable")
    n_topics = draws.catalog.centroids.shape[0]
    mine = _initial_state(source, pop.user_ids, n_topics, draws.catalog.topic.astype(np.int64))
    assert (mine.count[rank_user] == offline.count).all() and offline.count.sum() > 0
    assert (mine.ring[rank_user] == offline.ring).all()
    assert (mine.last.reshape(-1, n_topics)[rank_user] == offline.last.reshape(-1, n_topics)).all()
    periods = pop.interests.topic.shape[1]
    assert extended.topic.shape[1] > periods
    assert (extended.topic[:, :periods] == pop.interests.topic).all()
    assert (extended.weight[:, :periods] == pop.interests.weight).all()
    # Positives counted from the events: the state counts every positive engagement.
    ev = source.history()
    assert offline.count.sum() == int(((ev.column("action_mask").to_numpy() & POSITIVE_BITS) != 0).sum())


def test_cutoff_day_and_bad_ranges(tiny_world, tiny_dataset):
    source = open_world(tiny_world, days=2, start_day=20)
    out = _run(source, oracle_policy())
    assert [o.day for o in out] == [20, 21]
    assert source.history().column("ts_ms").to_numpy().max() < source.start_ms
    with pytest.raises(ConfigError, match="start day 0"):
        open_world(tiny_world, days=1, start_day=0)
    with pytest.raises(ConfigError, match="can be simulated up to day"):
        open_world(tiny_world, days=366)
    with pytest.raises(ConfigError, match="only interactive"):
        open_world(tiny_world, days=1, overrides=["heads.click_bias=0"])
    with pytest.raises(DataError, match="not a simulated world"):
        open_world(tiny_dataset, days=1)
    world = open_world(tiny_world, days=1).world([0, 1])
    world.step(identity_policy())
    with pytest.raises(ConfigError, match="opened for days"):
        world.step(identity_policy())


def test_interactive_next_sessions_follow_the_topic_successor(tmp_path):
    """``sessions.focus_next`` holds in the interactive world too (its own per-user session loop)."""

    def successor_share(focus_next: float) -> float:
        cfg = load_config("tiny", overrides=["users.n_users=60", "days=3", f"sessions.focus_next={focus_next}",
                                             f"sessions.focus_long_term={0.6 - focus_next}"])
        source = open_world(write_world(simulate(cfg), tmp_path / f"w{focus_next}"), days=4)
        world = source.world(source.user_ids)
        follows = changed = 0
        for day in range(4):
            for focus in world._sessions(day, 0)[1]:
                new = focus[1:] != focus[:-1]
                changed += int(new.sum())
                follows += int((new & (source.draws.successor[focus[:-1]] == focus[1:])).sum())
        return follows / changed

    assert successor_share(0.0) < 0.1
    assert successor_share(0.4) > 0.4
