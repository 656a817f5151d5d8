"""Real-time engagement counters: how often a key was shown, and engaged with, before a time.

A production ranker reads counters that a stream keeps up to date: an item's impressions and
clicks so far (all users), in the last day, the user's own, the user's on this item. They are
what ranks an item no training row has seen (a news article published this morning has no
learned embedding, but by noon it has a click-through rate), and what tells a model that the
evaluation period's rates moved. :class:`EngagementCounters` answers "as of time t" for every
row at once from the event log, counting only events strictly before t, so a row never counts
itself or its request's other candidates.

Each scope (:data:`COUNTER_SCOPES`) gives ``1 + H`` features (:data:`COUNTER_FEATURES`):
``log_shown`` = ``log1p(shown) / log1p(10^4)``, and per head the smoothed rate's log-odds over
the prior, ``logit((pos + A p) / (shown + A)) - logit(p)`` with ``A`` = :data:`SMOOTHING`
pseudo-impressions at the training period's rate ``p``: 0 for a key never shown, and a key
needs about ``A`` impressions before its own rate dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lifelong.data.protocol import DAY_MS
from lifelong.data.schema import HEADS

COUNTER_SCOPES: tuple[str, ...] = ("item", "item_day", "user", "user_item")
"""The counted keys: the item (all users, all time), the item in the last 24 hours, the user
(all items), the user on this item."""

COUNTER_FEATURES: tuple[str, ...] = tuple(f"{scope}_{f}" for scope in COUNTER_SCOPES
                                          for f in ("log_shown", *(f"lift_{h}" for h in HEADS)))
"""The feature columns, scope by scope."""

N_COUNTER_FEATURES = len(COUNTER_FEATURES)

SMOOTHING = 10.0
"""Pseudo-impressions at the prior rate added to every key's counts."""

_LOG_SCALE = float(np.log1p(1e4))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


@dataclass
class _Counted:
    """Shown events of one scope sorted by (group, time), with cumulative label counts."""

    keys: np.ndarray  # int64 group * span + time offset, ascending
    cum: np.ndarray  # (n + 1, H) int32 label counts of the first i events (72 B an event over the scopes)

    def before(self, group: np.ndarray, lo: np.ndarray, hi: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
        """Shown count and label counts of each query's group in ``[lo, hi)`` (time offsets)."""
        a = np.searchsorted(self.keys, group * span + lo, side="left")
        b = np.searchsorted(self.keys, group * span + hi, side="left")
        return b - a, self.cum[b] - self.cum[a]


class EngagementCounters:
    """Counters over an event log, queried for many (user, item, time) rows at once.

    Args:
        user_id, item_idx, ts_ms: (n,) of every event.
        shown: (n,) bool, the events that are impressions (each counts as one shown).
        labels: (n, H) bool head labels of each event (counted on shown events only).
        prior: (H,) the rates the smoothing pulls towards (the training period's).

    Example::

        >>> import numpy as np
        >>> c = EngagementCounters(np.array([1, 2, 2]), np.array([0, 0, 0]), np.array([10, 20, 30]),
        ...                        np.ones(3, bool), np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool),
        ...                        np.full(4, 0.5))
        >>> f = c.features(np.array([2]), np.array([0]), np.array([30]))  # two earlier shows, one click
        >>> [round(float(x), 3) for x in f[0, :2]], round(float(f[0, 10]), 3)  # item; the user's own
        ([0.119, 0.0], 0.075)
    """

    def __init__(self, user_id: np.ndarray, item_idx: np.ndarray, ts_ms: np.ndarray, shown: np.ndarray,
                 labels: np.ndarray, prior: np.ndarray):
        if labels.shape != (ts_ms.size, len(HEADS)) or prior.shape != (len(HEADS),):
            raise ValueError(f"labels must be ({ts_ms.size}, {len(HEADS)}) and prior ({len(HEADS)},)")
        self.prior = np.clip(np.asarray(prior, dtype=np.float64), 1e-4, 1 - 1e-4)
        keep = np.flatnonzero(shown)
        user, item = np.asarray(user_id)[keep].astype(np.int64), np.asarray(item_idx)[keep].astype(np.int64)
        ts, lab = np.asarray(ts_ms)[keep].astype(np.int64), np.asarray(labels)[keep]
        self.t0 = int(ts.min()) if ts.size else 0
        self.n_items = int(item.max()) + 1 if item.size else 1
        self.users, uidx = np.unique(user, return_inverse=True)
        self.pairs, pidx = np.unique(uidx * self.n_items + item, return_inverse=True)
        groups = {"item": item, "user": uidx.astype(np.int64), "user_item": pidx.astype(np.int64)}
        n_groups = max(self.n_items, self.users.size, self.pairs.size)
        # Keys are group * span + milliseconds since t0; coarsen time if they would overflow
        # int64 (a later event then ties with an earlier one of its unit, and is not counted).
        millis = int(ts.max()) - self.t0 if ts.size else 0
        self.unit = 1
        while n_groups * (millis // self.unit + 2) >= 2**62:
            self.unit *= 1000
        self.span = millis // self.unit + 2
        offset = (ts - self.t0) // self.unit
        self._counted: dict[str, _Counted] = {}
        for name, g in groups.items():
            keys = g * self.span + offset
            order = np.argsort(keys, kind="stable")
            cum = np.zeros((keys.size + 1, len(HEADS)), dtype=np.int32)
            np.cumsum(lab[order], axis=0, dtype=np.int32, out=cum[1:])
            self._counted[name] = _Counted(keys[order], cum)

    def _user_index(self, user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.minimum(np.searchsorted(self.users, user), max(self.users.size - 1, 0))
        found = self.users[k] == user if self.users.size else np.zeros(user.size, bool)
        return k.astype(np.int64), found

    def _groups(self, user: np.ndarray, item: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Group index of each queried (user, item) in the item, user and user-item scopes, and
        whether the key has any shown event at all (a key without one reads the group it was
        clipped to, and its counts are zeroed)."""
        uidx, ufound = self._user_index(user)
        ifound = (item >= 0) & (item < self.n_items)
        pair = uidx * self.n_items + np.clip(item, 0, self.n_items - 1)
        p = np.minimum(np.searchsorted(self.pairs, pair), max(self.pairs.size - 1, 0))
        pfound = ufound & ifound & (self.pairs[p] == pair if self.pairs.size else False)
        groups = {"item": np.clip(item, 0, self.n_items - 1), "user": uidx, "user_item": p.astype(np.int64)}
        return groups, {"item": ifound, "user": ufound, "user_item": pfound}

    def features(self, user_id: np.ndarray, item_idx: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """``(n, N_COUNTER_FEATURES)`` float32 of each (user, item, time), from shown events strictly
        before the time, in :data:`COUNTER_FEATURES` order."""
        user, item = np.asarray(user_id, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
        t = (np.asarray(ts_ms, dtype=np.int64) - self.t0) // self.unit
        hi = np.clip(t, 0, self.span - 1)
        groups, found = self._groups(user, item)
        day_lo = np.clip(t - DAY_MS // self.unit, 0, self.span - 1)
        windows = {"item": ("item", 0), "item_day": ("item", day_lo), "user": ("user", 0), "user_item": ("user_item", 0)}
        out = np.empty((user.size, N_COUNTER_FEATURES), dtype=np.float32)
        width = 1 + len(HEADS)
        for s, scope in enumerate(COUNTER_SCOPES):
            name, lo = windows[scope]
            shown, pos = self._counted[name].before(groups[name], np.broadcast_to(lo, hi.shape), hi, self.span)
            shown, pos = np.where(found[name], shown, 0), np.where(found[name][:, None], pos, 0)
            rate = (pos + SMOOTHING * self.prior) / (shown[:, None] + SMOOTHING)
            out[:, s * width] = np.log1p(shown) / _LOG_SCALE
            out[:, s * width + 1:(s + 1) * width] = _logit(rate) - _logit(self.prior)
        return out
