"""A/B metrics: per-user aggregation, the user-level bootstrap, the oracle lift, the arm split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lifelong.data.schema import EVENTS_SCHEMA, Action
from lifelong.data.world.interactive import DayOutcome
from lifelong.loop.abtest import assign_arms
from lifelong.loop.metrics import METRICS, ArmTotals, arm_totals, oracle_lift, relative_delta, values


def _outcome(rows, users, requests) -> DayOutcome:
    u, item, mask, dwell = (np.array(c) for c in zip(*rows))
    n = len(rows)
    events = pa.Table.from_arrays([pa.array(u, pa.int64()), pa.array(item, pa.int64()), pa.array(np.arange(n), pa.int64()),
                                   pa.array(np.zeros(n), pa.int8()), pa.array(mask, pa.uint16()),
                                   pa.array(dwell, pa.int32()), pa.array(np.arange(n), pa.int64())], schema=EVENTS_SCHEMA)
    return DayOutcome(day=0, events=events, user_ids=np.array(users), requests=np.array(requests),
                      failed=np.zeros(len(users), np.int64), sessions=np.array(requests))


def test_arm_totals_define_the_metrics():
    imp, repin, hide, click = (int(a) for a in (Action.IMPRESSION, Action.REPIN, Action.HIDE, Action.CLICK))
    topic = np.array([0, 0, 1, 2])
    day = _outcome([(10, 0, imp | repin | click, 60_000), (10, 1, imp, 0), (10, 2, imp | hide, 0), (30, 3, imp, 120_000)],
                   users=[10, 20, 30], requests=[2, 0, 1])
    v = values(arm_totals([day, day], topic))
    assert v["repin_volume"]["total"] == 2 / 3 and v["repin_volume"]["daily"] == [1 / 3, 1 / 3]
    assert v["hide_volume"]["total"] == 2 / 3 and v["click_volume"]["total"] == 2 / 3
    assert v["time_spent"]["total"] == 2.0  # (1 + 2 minutes) * 2 days / 3 users
    assert v["requests_per_user"]["total"] == 2.0
    # distinct topics per active user-day: user 10 saw topics {0, 1}, user 30 topic {2}; user 20 was idle
    assert v["impression_diversity"]["total"] == 1.5


def test_bootstrap_delta_and_significance():
    rng = np.random.default_rng(0)
    n = 400

    def arm(scale):
        num = {m: rng.poisson(scale, (2, n)).astype(float) for m in METRICS}
        return ArmTotals(np.arange(n), num, {m: np.ones((2, n)) for m in METRICS}, {m: np.ones(n) for m in METRICS})

    base, same, double = arm(2.0), arm(2.0), arm(4.0)
    d = relative_delta(double, base, n_boot=300, seed=1)["repin_volume"]
    assert len(d) == 3  # two days, then the whole test
    assert d[-1]["significant"] and 0.8 < d[-1]["rel"] < 1.2 and d[-1]["ci"][0] < d[-1]["rel"] < d[-1]["ci"][1]
    s = relative_delta(same, base, n_boot=300, seed=1)["repin_volume"][-1]
    assert not s["significant"] and s["ci"][0] < 0 < s["ci"][1]
    assert relative_delta(double, base, n_boot=300, seed=1) == relative_delta(double, base, n_boot=300, seed=1)


def test_oracle_lift_and_arm_split():
    lift = oracle_lift({m: 1.5 for m in METRICS}, {m: 1.0 for m in METRICS}, {m: 3.0 for m in METRICS})
    assert lift["repin_volume"] == 0.25
    users = np.arange(1000)
    a = assign_arms(users, 3, seed=5)
    assert sorted(np.concatenate(a).tolist()) == users.tolist() and min(x.size for x in a) > 280
    assert all((x == y).all() for x, y in zip(a, assign_arms(users, 3, seed=5)))
    assert [x.tolist() for x in a] != [x.tolist() for x in assign_arms(users, 3, seed=6)]
    small = assign_arms(users, 3, seed=5, per_arm=50)
    assert all(s.size == 50 and np.isin(s, x).all() for s, x in zip(small, a))


def test_paired_bootstrap_resamples_users_jointly():
    rng = np.random.default_rng(0)
    n = 300
    user = rng.gamma(0.5, 4.0, (1, n))  # a large between-user spread, shared by both arms

    def arm(lift):
        num = {m: rng.poisson(user * lift).astype(float) for m in METRICS}
        return ArmTotals(np.arange(n), num, {m: np.ones((1, n)) for m in METRICS}, {m: np.ones(n) for m in METRICS})

    base, better = arm(1.0), arm(1.3)
    paired = relative_delta(better, base, n_boot=300, seed=2, paired=True)["repin_volume"][-1]
    split = relative_delta(better, base, n_boot=300, seed=2)["repin_volume"][-1]
    assert paired["rel"] == split["rel"] and paired["significant"]
    assert paired["ci"][1] - paired["ci"][0] < split["ci"][1] - split["ci"][0]
    same = relative_delta(base, base, n_boot=50, seed=2, paired=True)["repin_volume"][-1]
    assert same == {"rel": 0.0, "ci": [0.0, 0.0], "significant": False}
    other = ArmTotals(np.arange(n) + 1, base.num, base.den, base.den_total)
    with pytest.raises(ValueError, match="same users"):
        relative_delta(other, base, paired=True)
