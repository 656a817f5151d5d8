"""Ranking metrics of the TransAct V2 paper (§4.2.1) and the oracle lift.

HIT@K per head: group rows by request, order each request by the final score
``S = Σ_h w_h f_h``, count the top-K items whose label for head h is 1, sum over requests and
divide by the number of distinct users. Everything is vectorised over rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_HEAD_WEIGHTS: dict[str, float] = {"repin": 1.0, "click": 0.5, "long_view": 0.25, "hide": -1.0}
"""Weights ``w_h`` of the final score; hide counts against an item."""


def final_score(probs: Mapping[str, np.ndarray], weights: Mapping[str, float] = DEFAULT_HEAD_WEIGHTS) -> np.ndarray:
    """``S = Σ_h w_h f_h`` over the heads present in both ``probs`` and ``weights``.

    Example::

        >>> final_score({"repin": np.array([0.5]), "hide": np.array([0.1])}).round(2)
        array([0.4])
    """
    heads = [h for h in weights if h in probs]
    if not heads:
        raise ValueError(f"no head of {sorted(weights)} among {sorted(probs)}")
    return sum(weights[h] * np.asarray(probs[h], dtype=np.float64) for h in heads)


def _group_ranks(groups: np.ndarray, score: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each row within its group by descending score; ties broken at random.

    Returns (order, rank) where ``rank[j]`` belongs to row ``order[j]``.
    """
    tiebreak = np.random.default_rng(seed).random(score.size)
    order = np.lexsort((tiebreak, -score, groups))
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, g.size])
    rank = np.arange(g.size) - np.repeat(starts, sizes)
    return order, rank


def hit_at_k(groups: np.ndarray, users: np.ndarray, score: np.ndarray, labels: np.ndarray,
             k: int = 3, seed: int = 0) -> float:
    """HIT@K as in the TransAct V2 paper.

    Args:
        groups: request id of each row (rows of one request share it).
        users: user id of each row, to count distinct users.
        score: the ranking score of each row (higher first).
        labels: 0/1 label of the head being measured.
        k: cut-off.
        seed: seed of the random tie-break.

    Example::

        >>> hit_at_k(np.array([1, 1, 1, 1]), np.array([7, 7, 7, 7]), np.array([.9, .1, .8, .2]),
        ...          np.array([1, 1, 0, 0]), k=2)
        1.0
    """
    groups, users, score, labels = map(np.asarray, (groups, users, score, labels))
    if not (groups.shape == users.shape == score.shape == labels.shape):
        raise ValueError("groups, users, score and labels must have the same shape")
    if groups.size == 0:
        return float("nan")
    order, rank = _group_ranks(groups, score, seed)
    hits = (labels[order] != 0) & (rank < k)
    return float(hits.sum() / np.unique(users).size)


def hit_at_k_random(groups: np.ndarray, users: np.ndarray, labels: np.ndarray, k: int = 3) -> float:
    """Expected HIT@K under a uniformly random order of each request.

    A request with n rows and m positives expects ``min(k, n) · m / n`` hits.
    """
    groups, users, labels = map(np.asarray, (groups, users, labels))
    if groups.size == 0:
        return float("nan")
    _, inverse, n = np.unique(groups, return_inverse=True, return_counts=True)
    m = np.bincount(inverse, weights=(labels != 0).astype(np.float64), minlength=n.size)
    return float((np.minimum(k, n) * m / n).sum() / np.unique(users).size)


def oracle_lift_fraction(hit_model: float, hit_random: float, hit_oracle: float) -> float:
    """``(HIT_model − HIT_random) / (HIT_oracle − HIT_random)``: the share of the oracle's lift."""
    denom = hit_oracle - hit_random
    return float("nan") if denom == 0 else float((hit_model - hit_random) / denom)


def normalized_entropy(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """NE (DV365 eq. 12): the log loss divided by the entropy of the average label.

    Example::

        >>> round(normalized_entropy(np.array([0, 1, 0, 0]), np.full(4, 0.25)), 6)
        1.0
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    base = np.clip(y.mean(), eps, 1 - eps)
    log_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(log_loss / -(base * np.log(base) + (1 - base) * np.log(1 - base)))


def head_ne(labels: np.ndarray, probs: np.ndarray) -> float:
    """:func:`normalized_entropy` of one head, or NaN when its labels are all one class: the
    entropy of the average label is then 0 and NE has no meaning (MIND's rows have no saves),
    where the plain formula would divide by a clipped epsilon.

    Example::

        >>> import math
        >>> math.isnan(head_ne(np.zeros(4), np.full(4, 0.01)))
        True
    """
    y = np.asarray(labels)
    return float("nan") if y.size == 0 or y.min() == y.max() else normalized_entropy(y, probs)


def _average_ranks(groups: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of score within each group, ties averaged; returns (order, ranks)."""
    order = np.lexsort((score, groups))
    g, s = groups[order], score[order]
    n = g.size
    group_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    pos_in_group = np.arange(n) - np.repeat(group_start, np.diff(np.r_[group_start, n])) + 1
    tie_start = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])])
    tie_len = np.diff(np.r_[tie_start, n])
    first = pos_in_group[tie_start]
    ranks = np.repeat(first + (tie_len - 1) / 2.0, tie_len)
    return order, ranks


def group_auc(groups: np.ndarray, labels: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC of each group with both classes: (group ids, aucs, rows per group)."""
    groups, labels, score = np.asarray(groups), np.asarray(labels) != 0, np.asarray(score, dtype=np.float64)
    order, ranks = _average_ranks(groups, score)
    ids, inverse, counts = np.unique(groups[order], return_inverse=True, return_counts=True)
    y = labels[order]
    n_pos = np.bincount(inverse, weights=y, minlength=ids.size)
    pos_rank_sum = np.bincount(inverse, weights=ranks * y, minlength=ids.size)
    n_neg = counts - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    auc = (pos_rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return ids[ok], auc, counts[ok]


def auc(labels: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (ties count one half); NaN when only one class is present.

    Example::

        >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
    """
    _, aucs, _ = group_auc(np.zeros(len(labels), dtype=np.int64), labels, score)
    return float(aucs[0]) if aucs.size else float("nan")


def gauc(users: np.ndarray, labels: np.ndarray, score: np.ndarray) -> float:
    """Group AUC: per-user AUC weighted by the user's rows, over users with both classes."""
    _, aucs, counts = group_auc(users, labels, score)
    return float(np.average(aucs, weights=counts)) if aucs.size else float("nan")


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of per-seed figures.

    Example::

        >>> mean_std([1.0, 3.0]), mean_std([2.0])
        ((2.0, 1.4142135623730951), (2.0, 0.0))
    """
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
