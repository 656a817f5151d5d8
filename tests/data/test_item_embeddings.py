"""Item embeddings learned from training-period co-engagement: determinism, no NaN, no leakage,
planted structure recovered, documented fallbacks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lifelong.data.item_embeddings import hashed_unit_vectors, learn_item_embeddings
from lifelong.data.schema import EMBED_DIM, Action

CLICK = int(Action.CLICK)
IMP = int(Action.IMPRESSION)
CUTOFF = 1_000_000


def _planted(n_users: int = 300, n_clusters: int = 6, per_cluster: int = 20, length: int = 30, seed: int = 0):
    """Each user engages with items of one cluster; items ``c * per_cluster + k`` form cluster c."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, n_clusters, n_users)
    users = np.repeat(np.arange(n_users), length)
    items = cluster[users] * per_cluster + rng.integers(0, per_cluster, users.size)
    ts = np.tile(np.arange(length) * 1000, n_users) + rng.integers(0, 500, users.size)
    return users, items, ts, np.full(users.size, CLICK), np.arange(n_clusters * per_cluster), per_cluster


def test_shape_unit_norm_and_determinism():
    users, items, ts, mask, catalogue, _ = _planted()
    a = learn_item_embeddings(users, items, ts, mask, CUTOFF, catalogue, seed=3)
    b = learn_item_embeddings(users, items, ts, mask, CUTOFF, catalogue, seed=3)
    assert a.shape == (catalogue.size, EMBED_DIM) and a.dtype == np.float32
    assert np.isfinite(a).all() and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(a, b)


def test_input_order_does_not_matter():
    users, items, ts, mask, catalogue, _ = _planted()
    perm = np.random.default_rng(1).permutation(users.size)
    a = learn_item_embeddings(users, items, ts, mask, CUTOFF, catalogue)
    b = learn_item_embeddings(users[perm], items[perm], ts[perm], mask[perm], CUTOFF, catalogue[::-1])[::-1]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_co_engaged_items_are_closer_than_random_pairs():
    users, items, ts, mask, catalogue, per = _planted()
    emb = learn_item_embeddings(users, items, ts, mask, CUTOFF, catalogue)
    sims = emb @ emb.T
    same = (catalogue[:, None] // per) == (catalogue[None, :] // per)
    off_diag = ~np.eye(catalogue.size, dtype=bool)
    within, across = sims[same & off_diag].mean(), sims[~same].mean()
    assert within > 0.5 and within - across > 0.4, (within, across)


def test_evaluation_period_events_do_not_leak():
    users, items, ts, mask, catalogue, _ = _planted(length=40)
    cutoff = 20_000  # about half of each user's events fall after it
    base = learn_item_embeddings(users, items, ts, mask, cutoff, catalogue)
    rng = np.random.default_rng(7)
    late = ts >= cutoff
    items2 = items.copy()
    items2[late] = rng.integers(0, catalogue.size, late.sum())  # rewrite every evaluation-period event
    extra = 500  # and add new evaluation-period events, including on items never seen in training
    users3 = np.r_[users, rng.integers(0, 50, extra)]
    items3 = np.r_[items2, rng.integers(0, catalogue.size, extra)]
    ts3 = np.r_[ts, cutoff + rng.integers(0, 10**6, extra)]
    changed = learn_item_embeddings(users3, items3, ts3, np.full(users3.size, CLICK), cutoff, catalogue)
    np.testing.assert_array_equal(base, changed)
    assert not np.array_equal(base, learn_item_embeddings(users3, items3, ts3, np.full(users3.size, CLICK),
                                                          cutoff + 10**6, catalogue))


def test_bare_impressions_are_not_engagement_unless_asked():
    users, items, ts, _, catalogue, per = _planted()
    mask = np.full(users.size, IMP)
    only_imp = learn_item_embeddings(users, items, ts, mask, CUTOFF, catalogue)
    np.testing.assert_allclose(only_imp, hashed_unit_vectors(catalogue), atol=1e-6)  # nothing learned
    with_imp = learn_item_embeddings(users, items, ts, mask, CUTOFF, catalogue, engaged_bits=IMP)
    assert (with_imp[0] @ with_imp[1]) > (with_imp[0] @ with_imp[per])


def test_fallback_topic_mean_then_hashed_vector():
    users, items, ts, mask, catalogue, per = _planted()
    unseen = np.array([1000, 1001, 1002])  # no events at all
    all_items = np.r_[catalogue, unseen]
    topics = np.r_[catalogue // per + 1, 1, 0, 99]  # topic 1 = cluster 0; 0 = unknown; 99 = no learned item
    emb = learn_item_embeddings(users, items, ts, mask, CUTOFF, all_items, topics, seed=5)
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    topic_mean = emb[:per].mean(axis=0)
    topic_mean /= np.linalg.norm(topic_mean)
    assert emb[-3] @ topic_mean > 0.9
    np.testing.assert_allclose(emb[-2:], hashed_unit_vectors(unseen[1:], seed=5), atol=1e-6)
    assert not np.allclose(hashed_unit_vectors(unseen, seed=5), hashed_unit_vectors(unseen, seed=6))


def test_no_events_and_tiny_inputs_never_nan():
    empty = np.array([], dtype=np.int64)
    emb = learn_item_embeddings(empty, empty, empty, empty, CUTOFF, np.arange(4))
    assert emb.shape == (4, EMBED_DIM) and np.isfinite(emb).all()
    # Two items, one pair: fewer items than dimensions.
    emb = learn_item_embeddings(np.array([1, 1]), np.array([0, 1]), np.array([0, 1]), np.full(2, CLICK),
                                CUTOFF, np.arange(3))
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_event_item_missing_from_catalogue_is_an_error():
    with pytest.raises(ValueError, match="missing from all_item_ids"):
        learn_item_embeddings(np.array([1, 1]), np.array([0, 5]), np.array([0, 1]), np.full(2, CLICK),
                              CUTOFF, np.arange(3))


def test_hundred_thousand_events_in_a_few_seconds():
    rng = np.random.default_rng(0)
    n = 100_000
    users = rng.integers(0, 1_000, n)
    items = (rng.zipf(1.3, n) % 20_000).astype(np.int64)
    start = time.perf_counter()
    emb = learn_item_embeddings(users, items, rng.integers(0, 2 * CUTOFF, n), np.full(n, CLICK), CUTOFF,
                                np.arange(20_000))
    assert time.perf_counter() - start < 10  # ~1 s on 2 cores; generous for shared CI machines
    assert np.isfinite(emb).all()
