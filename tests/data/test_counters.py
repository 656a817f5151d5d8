"""Engagement counters: the vectorised query equals counting events one by one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.data.counters import COUNTER_SCOPES, N_COUNTER_FEATURES, SMOOTHING, EngagementCounters
from lifelong.data.protocol import DAY_MS
from lifelong.data.schema import HEADS


def _brute_force(user, item, ts, shown, labels, prior, q_user, q_item, q_ts):
    prior = np.clip(prior, 1e-4, 1 - 1e-4)
    out = np.zeros((q_user.size, N_COUNTER_FEATURES))
    for r in range(q_user.size):
        before = shown & (ts < q_ts[r])
        scopes = {"item": before & (item == q_item[r]),
                  "item_day": before & (item == q_item[r]) & (ts >= q_ts[r] - DAY_MS),
                  "user": before & (user == q_user[r]),
                  "user_item": before & (user == q_user[r]) & (item == q_item[r])}
        for s, scope in enumerate(COUNTER_SCOPES):
            n, pos = scopes[scope].sum(), labels[scopes[scope]].sum(axis=0)
            rate = (pos + SMOOTHING * prior) / (n + SMOOTHING)
            lift = np.log(rate / (1 - rate)) - np.log(prior / (1 - prior))
            out[r, s * 5:(s + 1) * 5] = [np.log1p(n) / np.log1p(1e4), *lift]
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**31))
def test_counters_equal_counting_one_by_one(n, seed):
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, 4, n), rng.integers(0, 5, n)
    # Few distinct times (many ties) over three days, so the day window and "strictly before" both bite.
    ts = rng.integers(0, 7, n) * (DAY_MS // 2)
    shown = rng.random(n) < 0.8
    labels = rng.random((n, len(HEADS))) < 0.3
    prior = rng.uniform(0.05, 0.6, len(HEADS))
    counters = EngagementCounters(user, item, ts, shown, labels, prior)
    # Queries: every event, plus a user and an item never seen.
    q_user, q_item, q_ts = np.r_[user, 9], np.r_[item, 9], np.r_[ts, 4 * DAY_MS]
    got = counters.features(q_user, q_item, q_ts)
    assert got.shape == (n + 1, N_COUNTER_FEATURES) and got.dtype == np.float32
    np.testing.assert_allclose(got, _brute_force(user, item, ts, shown, labels, prior, q_user, q_item, q_ts),
                               rtol=1e-5, atol=1e-5)
    assert np.allclose(got[-1], 0.0, atol=1e-6)  # a key never shown reads its prior: lift 0, log count 0


def test_counters_coarsen_time_instead_of_overflowing():
    """Ten million groups over thirty years of milliseconds do not fit int64 keys; the counters
    then count in seconds (or coarser) and still answer."""
    user = np.array([0, 0, 1])
    item = np.array([0, 10_000_000, 0])
    ts = np.array([0, 1_000, 30 * 365 * DAY_MS])
    counters = EngagementCounters(user, item, ts, np.ones(3, bool), np.ones((3, 4), bool), np.full(4, 0.5))
    assert counters.unit > 1
    f = counters.features(np.array([1]), np.array([0]), np.array([30 * 365 * DAY_MS]))
    assert f[0, 0] == pytest.approx(np.log1p(1) / np.log1p(1e4))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="labels must be"):
        EngagementCounters(np.zeros(2), np.zeros(2), np.zeros(2), np.ones(2, bool), np.zeros((2, 3), bool),
                           np.full(4, 0.5))
