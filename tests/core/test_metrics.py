"""Ranking metrics against brute-force per-request references."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.metrics import auc, gauc, hit_at_k, hit_at_k_random, normalized_entropy


def _requests(draw_sizes, seed):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(draw_sizes)), draw_sizes)
    users = groups // 2  # two requests per user
    score = rng.random(groups.size)
    labels = (rng.random(groups.size) < 0.3).astype(int)
    return groups, users, score, labels


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=20), st.integers(1, 5), st.integers(0, 10_000))
def test_hit_at_k_matches_brute_force(sizes, k, seed):
    groups, users, score, labels = _requests(sizes, seed)
    expected = 0
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        top = rows[np.argsort(-score[rows], kind="stable")[:k]]
        expected += labels[top].sum()
    assert np.isclose(hit_at_k(groups, users, score, labels, k), expected / np.unique(users).size)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.integers(1, 4), st.integers(0, 10_000))
def test_random_expectation_is_the_mean_over_permutations(sizes, k, seed):
    groups, users, _, labels = _requests(sizes, seed)
    expected = 0.0
    for g in np.unique(groups):
        lab = labels[groups == g]
        perms = list(itertools.permutations(range(lab.size)))
        expected += np.mean([lab[list(p[:k])].sum() for p in perms])
    assert np.isclose(hit_at_k_random(groups, users, labels, k), expected / np.unique(users).size)


def test_auc_and_gauc_against_pairwise_counts():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20, 400)
    labels = (rng.random(400) < 0.4).astype(int)
    score = np.round(rng.random(400) + 0.3 * labels, 2)  # rounding creates ties

    def pairwise(y, s):
        pos, neg = s[y == 1], s[y == 0]
        return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)

    assert np.isclose(auc(labels, score), pairwise(labels, score))
    per_user, weights = [], []
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            per_user.append(pairwise(labels[m], score[m]))
            weights.append(m.sum())
    assert np.isclose(gauc(users, labels, score), np.average(per_user, weights=weights))


def test_normalized_entropy_prefers_informative_predictions():
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0])
    assert np.isclose(normalized_entropy(y, np.full(8, 0.25)), 1.0)
    assert normalized_entropy(y, np.where(y == 1, 0.9, 0.05)) < 0.5
