"""Cuckoo index: a stateful model check against a dict, growth, free-list reuse, edge ids, state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lifelong.core.errors import ConfigError
from lifelong.tables.cuckoo import CuckooConfig, CuckooIndex

# A small pool makes repeats, re-inserts and removals of present ids common; extremes check
# that no int64 value is special (no sentinel key).
IDS = st.lists(st.one_of(st.integers(-4, 30), st.integers(-2**63, 2**63 - 1),
                         st.sampled_from([0, -1, 2**63 - 1, -2**63])), max_size=24)


class IndexMachine(RuleBasedStateMachine):
    """The index against a dict id -> row, plus the set of freed rows and the row high-water mark."""

    @initialize(buckets=st.integers(1, 3), slots=st.sampled_from([1, 2, 4]), growth=st.sampled_from([1.1, 1.5, 2.0]),
                kicks=st.sampled_from([1, 8, 500]))
    def setup(self, buckets, slots, growth, kicks):
        self.index = CuckooIndex(CuckooConfig(initial_buckets=buckets, slots=slots, growth=growth, max_kicks=kicks))
        self.rows: dict[int, int] = {}
        self.free: set[int] = set()
        self.n_rows = 0

    @rule(ids=IDS)
    def insert(self, ids):
        got = self.index.insert(np.array(ids, dtype=np.int64)).tolist()
        for i, row in zip(ids, got):
            if i not in self.rows:
                if self.free:
                    assert row in self.free, "a freed row must be reused before a new one is handed out"
                    self.free.remove(row)
                else:
                    assert row == self.n_rows
                    self.n_rows += 1
                self.rows[i] = row
            assert row == self.rows[i]

    @rule(ids=IDS)
    def lookup(self, ids):
        assert self.index.lookup(np.array(ids, dtype=np.int64)).tolist() == [self.rows.get(i, -1) for i in ids]

    @rule(ids=IDS)
    def remove(self, ids):
        got = self.index.remove(np.array(ids, dtype=np.int64)).tolist()
        for i, row in zip(ids, got):
            assert row == self.rows.pop(i, -1)
            if row >= 0:
                self.free.add(row)

    @precondition(lambda self: self.index.n_buckets < 4096)  # a run of grows must not exhaust memory
    @rule()
    def grow(self):
        before = self.index.n_buckets
        self.index.grow()
        assert self.index.n_buckets > before

    @invariant()
    def matches_model(self):
        ids, rows = self.index.items()
        assert dict(zip(ids.tolist(), rows.tolist())) == self.rows
        assert len(set(rows.tolist())) == rows.size == len(self.index), "two live ids share a row"
        free = self.index.state_dict()["free"].tolist()
        assert sorted(free) == sorted(self.free) and not self.free & set(rows.tolist())
        assert self.index.n_rows == self.n_rows == len(self.rows) + len(self.free)
        assert self.index.load <= self.index.cfg.max_load


IndexMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestIndexMachine = IndexMachine.TestCase


def test_growth_keeps_every_row_under_heavy_load():
    # Two slots and 4 kicks make walks fail long before max_load: most growths are forced.
    index = CuckooIndex(CuckooConfig(initial_buckets=1, slots=2, max_kicks=4))
    ids = np.random.default_rng(0).integers(-2**63, 2**63 - 1, 50_000)
    rows = index.insert(ids)
    assert rows.tolist() == list(range(ids.size))  # no repeats among 50k random int64
    assert index.load < index.cfg.max_load / index.cfg.growth
    index.reserve(200_000)
    assert (index.lookup(ids) == rows).all()


def test_lookup_keeps_shape_and_bad_dtypes_are_refused():
    index = CuckooIndex()
    index.insert(np.arange(6))
    assert index.lookup(np.arange(6).reshape(2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert index.lookup(np.zeros((0, 3), np.int64)).shape == (0, 3)
    with pytest.raises(ValueError, match="must be integers"):
        index.lookup(np.array([1.5]))


def test_uint64_ids_above_int63_are_distinct_keys():
    index = CuckooIndex()
    rows = index.insert(np.array([2**64 - 1, 2**63, 1], dtype=np.uint64))
    assert index.lookup(np.array([-1, -2**63, 1])).tolist() == rows.tolist() == [0, 1, 2]


def test_state_dict_round_trip_continues_identically():
    a = CuckooIndex(CuckooConfig(initial_buckets=2))
    a.insert(np.arange(100) * 7919)
    a.remove(np.arange(0, 100, 3) * 7919)
    b = CuckooIndex(a.cfg)
    b.load_state_dict(a.state_dict())
    more = np.arange(1000, 1300)
    assert (a.insert(more) == b.insert(more)).all()
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k], err_msg=k)
    with pytest.raises(ValueError, match="slots"):
        CuckooIndex(CuckooConfig(slots=2)).load_state_dict(a.state_dict())


@pytest.mark.parametrize("field, value", [("initial_buckets", 0), ("slots", 0), ("max_load", 1.0),
                                          ("growth", 1.0), ("max_kicks", 0), ("seed", -1)])
def test_bad_config_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        CuckooConfig(**{field: value})
