"""Online metrics of an A/B test, per arm, per day and over the whole test (docs/abtest.md).

Every metric is a ratio of per-user sums, ``sum_u num_u / sum_u den_u`` over an arm's users:

| metric | numerator per user | denominator per user |
|---|---|---|
| ``repin_volume`` | repins | 1 (every user of the arm) |
| ``hide_volume`` | hides | 1 |
| ``click_volume`` | clicks | 1 |
| ``impression_diversity`` | distinct topics among the impressions of each active day, summed | active days |
| ``time_spent`` | minutes of dwell (all logged impressions) | 1 |
| ``requests_per_user`` | requests ranked and shown | 1 |

So the volumes are per user of the arm (arms differ in size), diversity is the mean number of
distinct topics a user is shown per active day, and time spent is minutes per user. The
relative difference of an arm to the baseline comes with a 95% confidence interval from a
user-level bootstrap, seeded, and is marked significant when the interval excludes 0. In a
split test (disjoint arms) each arm's users are resampled independently; in a paired test (the
same users in every arm, ``paired=True``) the users are resampled jointly, one draw of users
for both arms, so the ratio ``mean_u(arm_u) / mean_u(base_u) - 1`` keeps each user's pairing.

Example::

    >>> import numpy as np
    >>> ones = {m: np.ones((1, 4)) for m in METRICS}
    >>> a = ArmTotals(np.arange(4), ones, ones, {m: np.ones(4) for m in METRICS})
    >>> b = ArmTotals(np.arange(4), {m: 2 * np.ones((1, 4)) for m in METRICS}, ones, {m: np.ones(4) for m in METRICS})
    >>> relative_delta(b, a, n_boot=200, seed=0)["repin_volume"][0]["rel"]
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lifelong.data.schema import Action
from lifelong.data.world.interactive import DayOutcome

__all__ = ["ArmTotals", "HIGHER_IS_BETTER", "LIFT_METRICS", "METRICS", "arm_totals", "oracle_lift", "relative_delta",
           "values"]

METRICS: tuple[str, ...] = ("repin_volume", "hide_volume", "click_volume", "impression_diversity", "time_spent",
                            "requests_per_user")
HIGHER_IS_BETTER = {m: m != "hide_volume" for m in METRICS}
LIFT_METRICS: tuple[str, ...] = ("repin_volume", "hide_volume", "click_volume", "time_spent")
"""Metrics whose fraction of the oracle's lift over random is reported."""


@dataclass
class ArmTotals:
    """Per-user numerators and denominators of every metric, per day (columns: the arm's users).

    Args:
        user_ids: (U,) the arm's users.
        num: metric -> (D, U) numerators per day.
        den: metric -> (D, U) denominators per day.
        den_total: metric -> (U,) denominators over the whole test (1 per user for the per-user
            metrics; the active days for diversity).
    """

    user_ids: np.ndarray
    num: dict[str, np.ndarray]
    den: dict[str, np.ndarray]
    den_total: dict[str, np.ndarray]

    @property
    def days(self) -> int:
        return next(iter(self.num.values())).shape[0]


def arm_totals(outcomes: Sequence[DayOutcome], item_topic: np.ndarray) -> ArmTotals:
    """Aggregate an arm's days into per-user sums.

    Args:
        outcomes: the arm's days, in order (all for the same users).
        item_topic: (N,) topic of every item id.
    """
    users = outcomes[0].user_ids
    n_days, n_users = len(outcomes), users.size
    num = {m: np.zeros((n_days, n_users)) for m in METRICS}
    den = {m: np.ones((n_days, n_users)) for m in METRICS}
    for d, out in enumerate(outcomes):
        ev = out.events
        row = np.searchsorted(users, ev.column("user_id").to_numpy())
        mask = ev.column("action_mask").to_numpy()
        for metric, bit in (("repin_volume", Action.REPIN), ("hide_volume", Action.HIDE), ("click_volume", Action.CLICK)):
            num[metric][d] = np.bincount(row, weights=(mask & np.uint16(bit)) != 0, minlength=n_users)
        num["time_spent"][d] = np.bincount(row, weights=ev.column("dwell_ms").to_numpy() / 60_000.0, minlength=n_users)
        num["requests_per_user"][d] = out.requests
        topics = item_topic[ev.column("item_id").to_numpy()]
        pairs = np.unique(row.astype(np.int64) * (int(item_topic.max()) + 1) + topics) if row.size else np.zeros(0, np.int64)
        distinct = np.bincount(pairs // (int(item_topic.max()) + 1), minlength=n_users) if pairs.size else np.zeros(n_users)
        num["impression_diversity"][d] = distinct
        den["impression_diversity"][d] = distinct > 0
    den_total = {m: np.ones(n_users) for m in METRICS}
    den_total["impression_diversity"] = den["impression_diversity"].sum(axis=0)
    return ArmTotals(users, num, den, den_total)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def values(arm: ArmTotals) -> dict[str, dict]:
    """Each metric over the whole test (``total``) and per day (``daily``)."""
    out = {}
    for m in METRICS:
        num, den = arm.num[m], arm.den[m]
        out[m] = {"total": float(_ratio(num.sum(), arm.den_total[m].sum())),
                  "daily": [float(x) for x in _ratio(num.sum(axis=1), den.sum(axis=1))]}
    return out


def _boot_weights(n_users: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(B, U) resampling counts: each row draws U users with replacement."""
    if n_users == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(np.float64)


def _boot(arm: ArmTotals, weights: np.ndarray, metric: str) -> np.ndarray:
    """(B, D + 1) bootstrap replicates of the metric per day, then over the whole test."""
    num = np.concatenate([arm.num[metric], arm.num[metric].sum(axis=0, keepdims=True)])  # (D+1, U)
    den = np.concatenate([arm.den[metric], arm.den_total[metric][None, :]])
    return _ratio(weights @ num.T, weights @ den.T)


def relative_delta(arm: ArmTotals, base: ArmTotals, n_boot: int = 1000, seed: int = 0,
                   paired: bool = False) -> dict[str, list[dict]]:
    """Relative difference ``arm / base - 1`` of every metric with its bootstrap 95% CI.

    Args:
        paired: the two arms hold the same users (in the same order): resample users jointly,
            the same bootstrap weights for both arms. Otherwise each arm is resampled on its own.

    Raises:
        ValueError: ``paired`` with arms of different users.

    Returns:
        metric -> a list of ``{rel, ci: [lo, hi], significant}``: one per day, then the whole test last.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0xAB7E57])))
    w_arm = _boot_weights(arm.user_ids.size, n_boot, rng)
    if paired:
        if not np.array_equal(arm.user_ids, base.user_ids):
            raise ValueError("a paired comparison needs the same users in both arms")
        w_base = w_arm
    else:
        w_base = _boot_weights(base.user_ids.size, n_boot, rng)
    out: dict[str, list[dict]] = {}
    for m in METRICS:
        point = _ratio(np.r_[arm.num[m].sum(axis=1), arm.num[m].sum()],
                       np.r_[arm.den[m].sum(axis=1), arm.den_total[m].sum()])
        ref = _ratio(np.r_[base.num[m].sum(axis=1), base.num[m].sum()],
                     np.r_[base.den[m].sum(axis=1), base.den_total[m].sum()])
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = point / ref - 1.0
            reps = _boot(arm, w_arm, m) / _boot(base, w_base, m) - 1.0
        rows = []
        for j in range(rel.size):
            col = reps[:, j]
            col = col[np.isfinite(col)]
            if not np.isfinite(rel[j]) or col.size < max(10, n_boot // 2):
                rows.append({"rel": None, "ci": [None, None], "significant": False})
                continue
            lo, hi = np.percentile(col, [2.5, 97.5])
            rows.append({"rel": float(rel[j]), "ci": [float(lo), float(hi)], "significant": bool(lo > 0 or hi < 0)})
        out[m] = rows
    return out


def oracle_lift(value: Mapping[str, float], random: Mapping[str, float], oracle: Mapping[str, float]) -> dict[str, float | None]:
    """The fraction of the oracle's online lift over random an arm reaches, per metric of :data:`LIFT_METRICS`:
    ``(arm - random) / (oracle - random)`` (1 = the oracle, 0 = random; for hides too, where
    both differences are negative)."""
    out: dict[str, float | None] = {}
    for m in LIFT_METRICS:
        gap = oracle[m] - random[m]
        out[m] = float((value[m] - random[m]) / gap) + 0.0 if gap and np.isfinite(gap) else None
    return out
