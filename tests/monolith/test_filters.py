"""Admission filters: count-min bounds, 4-bit saturation and packing, thresholds, probabilistic rate."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.tables.filters import CountingFilter, FilterConfig, ProbabilisticFilter, make_filter


def counting(width: int = 2**16, threshold: int = 3, n_hashes: int = 3) -> CountingFilter:
    return CountingFilter(FilterConfig(kind="counting", threshold=threshold, width=width, n_hashes=n_hashes))


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.integers(-50, 50), max_size=40), max_size=8),
       width=st.integers(1, 16), n_hashes=st.integers(1, 4))
def test_counts_never_undercount_and_saturate_at_15(batches, width, n_hashes):
    # A sketch far narrower than the id pool forces shared counters.
    f, truth = counting(width, n_hashes=n_hashes), Counter()
    for batch in batches:
        after = f.add(batch)
        for i, est in zip(batch, after.tolist()):
            truth[i] += 1
            assert min(truth[i], 15) <= est <= 15
        ids = np.array(list(truth), dtype=np.int64)
        est = f.count(ids)
        assert (est >= np.minimum([truth[i] for i in ids.tolist()], 15)).all() and (est <= 15).all()


def test_wide_sketch_counts_exactly_and_saturates():
    f = counting()
    ids = np.repeat(np.arange(10), np.arange(10) * 3)  # id k occurs 3k times
    f.add(np.random.default_rng(0).permutation(ids))
    assert f.count(np.arange(10)).tolist() == [min(3 * k, 15) for k in range(10)]
    f.add(np.full(100, 9))
    assert f.count([9]).tolist() == [15]


def test_two_counters_packed_in_one_byte_do_not_bleed():
    f = counting(width=2, n_hashes=1)
    candidates = np.arange(100)
    f.add(candidates[:1])
    first = candidates[f.count(candidates) == 1]  # ids on the same counter as id 0
    other = np.setdiff1d(candidates, first)[0]
    f.add(np.full(40, first[0]))
    assert f.count([first[0], other]).tolist() == [15, 0]
    f.add([other])
    assert f.count([first[0], other]).tolist() == [15, 1]
    assert f.state_dict()["counters"].tolist() == [0x1F]  # counter 0 in the low nibble


@pytest.mark.parametrize("threshold", [1, 2, 5, 15])
def test_admission_from_the_threshold_th_occurrence(threshold):
    f = counting(threshold=threshold)
    assert f.admit(np.full(20, 42)).tolist() == [k + 1 >= threshold for k in range(20)]


def test_probabilistic_rate_determinism_and_state():
    cfg = FilterConfig(kind="probabilistic", probability=0.2, seed=3)
    f = ProbabilisticFilter(cfg)
    draws = f.admit(np.zeros(20_000, np.int64))
    assert abs(draws.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / draws.size)
    g = ProbabilisticFilter(cfg)
    g.load_state_dict(f.state_dict())
    assert (f.admit(np.arange(50)) == g.admit(np.arange(50))).all()
    assert (ProbabilisticFilter(cfg).admit(np.arange(99)) == draws[:99]).all()


def test_make_filter_and_config_errors():
    assert make_filter(FilterConfig()) is None
    assert isinstance(make_filter(FilterConfig(kind="probabilistic")), ProbabilisticFilter)
    with pytest.raises(ConfigError, match="kind"):
        FilterConfig(kind="bloom")
    with pytest.raises(ConfigError, match="probability"):
        FilterConfig(probability=0.0)
    with pytest.raises(ValueError, match="counters"):
        counting(width=8).load_state_dict({"counters": np.zeros(3, np.uint8)})
