"""Users of one chunk: long-term interests over time, disliked topics, and the request schedule.

Everything here is decided before any item is shown: when each user opens sessions, how many
requests each session issues, on which surface, with which focus topic, and which interest
state (a weekly period, split at the drift day) is in force. The request loop
(:mod:`lifelong.data.world.requests`) then fills the requests with items and responses.

Interests are stored per (user, period) as ``k_max`` slots of (topic, weight): unused slots
have weight 0. Between weeks the log weights take a random-walk step and each slot may be
abandoned for a newly adopted topic; on the drift day every slot is redrawn. Periodic
interests (``cfg.periodic``) follow in further slots, weighted only in their season's weeks.

Example::

    >>> import numpy as np
    >>> from lifelong.data.world.config import PRESETS
    >>> cfg, rng = PRESETS["tiny"], np.random.default_rng(0)
    >>> interests = make_interests(cfg, np.full(32, 1 / 32), n_users=3, rng=rng)
    >>> interests.topic.shape  # (users, weekly periods, interest slots)
    (3, 5, 10)
    >>> trending = rng.integers(0, 32, (cfg.days, cfg.sessions.trending_per_day))
    >>> successor = rng.permutation(32)
    >>> schedule = make_schedule(cfg, interests, trending, successor, n_users=3, rng=rng)
    >>> bool((np.diff(schedule.ts_ms)[np.diff(schedule.user) == 0] >= MIN_REQUEST_GAP_MS).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lifelong.data.protocol import DAY_MS
from lifelong.data.world.config import FOCUS_KINDS, SIM_SURFACES, WorldConfig

MIN_REQUEST_GAP_MS = 1_000
"""Requests of one user are at least this far apart, so every request has its own timestamp."""

FOCUS_LONG_TERM, FOCUS_PREVIOUS, FOCUS_TRENDING, FOCUS_NEXT = range(4)
"""Session focus kinds, in the order of :data:`lifelong.data.world.config.FOCUS_KINDS`."""


@dataclass
class Interests:
    """Long-term interests of a chunk's users, per period.

    Args:
        boundaries: (P,) first day of each period (weeks, split at the drift day).
        topic: (U, P, K) slot topics.
        weight: (U, P, K) mixture weights (sum to 1 over active slots).
        affinity_weight: (U, P, K) tempered relative weights used by the affinity.
        disliked: (U, Dmax) disliked topics, -1 padded.
    """

    boundaries: np.ndarray
    topic: np.ndarray
    weight: np.ndarray
    affinity_weight: np.ndarray
    disliked: np.ndarray

    def period_of(self, day: np.ndarray) -> np.ndarray:
        """Period index of each day index."""
        return np.searchsorted(self.boundaries, day, side="right") - 1


@dataclass
class Schedule:
    """A chunk's requests, grouped by user and in time order within a user.

    Args:
        n_requests: (U,) requests per user.
        user: (Q,) local user index of each request.
        ts_ms: (Q,) request time.
        surface: (Q,) surface code.
        focus: (Q,) the session's focus topic.
        period: (Q,) interest period in force.
        activity: (U,) each user's activity multiplier (sessions per day relative to the median).
    """

    n_requests: np.ndarray
    user: np.ndarray
    ts_ms: np.ndarray
    surface: np.ndarray
    focus: np.ndarray
    period: np.ndarray
    activity: np.ndarray


@dataclass
class Population:
    """One chunk of users.

    Args:
        user_ids: (U,) global user ids.
        bias: (U,) engagement propensity added to the affinity.
        interests: their long-term interests over time.
        schedule: their requests.
    """

    user_ids: np.ndarray
    bias: np.ndarray
    interests: Interests
    schedule: Schedule


def period_boundaries(cfg: WorldConfig) -> np.ndarray:
    """First day of each interest period: every 7 days, plus the drift day when enabled."""
    days = set(range(0, cfg.days, 7))
    if cfg.drift.enabled:
        days.add(cfg.drift.day)
    return np.array(sorted(days), dtype=np.int64)


def _gumbel_top(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, k distinct indices sampled without replacement ∝ exp(scores)."""
    keys = scores + rng.gumbel(size=scores.shape)
    return np.argsort(-keys, axis=1, kind="stable")[:, :k]


def _dirichlet_log_weights(n_active: np.ndarray, k_max: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Log of Dirichlet(alpha) weights over each row's first n_active slots (-inf elsewhere)."""
    g = rng.gamma(alpha, size=(n_active.size, k_max))
    active = np.arange(k_max)[None, :] < n_active[:, None]
    g = np.where(active, np.maximum(g, 1e-12), 0.0)
    with np.errstate(divide="ignore"):
        return np.log(g / g.sum(axis=1, keepdims=True))


@dataclass
class _PeriodicSlots:
    """Each user's periodic interests (``cfg.periodic``): topics, cycles and phases, in weeks.

    Args:
        topic: (U, M) topics, distinct from every other topic the user holds or dislikes.
        cycle: (U, M) weeks between the starts of two seasons.
        phase: (U, M) a season starts in the weeks ``w`` with ``(w + phase) % cycle == 0``.
        active: (U, M) whether the slot is one of the user's (fewer than M for some users).
        season_weeks: weeks a season lasts.
        log_weight: in-season log weight relative to ``log(1/k)``.
    """

    topic: np.ndarray
    cycle: np.ndarray
    phase: np.ndarray
    active: np.ndarray
    season_weeks: int
    log_weight: float

    @classmethod
    def draw(cls, cfg: WorldConfig, log_pop: np.ndarray, excluded: np.ndarray,
             rng: np.random.Generator) -> _PeriodicSlots:
        """Draw them by topic popularity among the topics not ``excluded``, then exclude them.

        Draws nothing from ``rng`` when the world has no periodic interests, so worlds without
        them are the same as before the option existed.
        """
        per, n_users = cfg.periodic, excluded.shape[0]
        if not per.topics_max:
            empty = np.zeros((n_users, 0), dtype=np.int64)
            return cls(empty, empty, empty, empty.astype(bool), per.season_weeks, per.log_weight)
        n = rng.integers(per.topics_min, per.topics_max + 1, n_users)
        topic = _gumbel_top(np.where(excluded, -np.inf, log_pop), per.topics_max, rng)
        cycle = rng.integers(per.cycle_weeks_min, per.cycle_weeks_max + 1, topic.shape)
        phase = rng.integers(0, cycle)
        # Every slot's topic is excluded (unused ones too): a long-term slot sharing a topic
        # with a zero-weight periodic slot would lose its affinity in the dense lookup.
        excluded[np.arange(n_users)[:, None], topic] = True
        return cls(topic, cycle, phase, np.arange(per.topics_max)[None, :] < n[:, None], per.season_weeks,
                   per.log_weight)

    def log_weights(self, week: int, n_interests: np.ndarray) -> np.ndarray:
        """(U, M) log mixture weights in ``week``: ``log(1/k) + log_weight`` in season, else -inf."""
        in_season = self.active & ((week + self.phase) % self.cycle < self.season_weeks)
        return np.where(in_season, np.log(1.0 / n_interests)[:, None] + self.log_weight, -np.inf)


def make_interests(cfg: WorldConfig, topic_pop: np.ndarray, n_users: int, rng: np.random.Generator) -> Interests:
    """Draw each user's interest mixture, evolve it week by week, apply the drift.

    Args:
        cfg: the world configuration (``interests``, ``drift``, ``affinity``).
        topic_pop: (T,) topic popularity; popular topics are more often someone's interest.
        n_users: users in the chunk.
        rng: the chunk's random stream.
    """
    ins = cfg.interests
    n_topics, k_max = topic_pop.size, ins.topics_max
    log_pop = np.log(topic_pop)[None, :].repeat(n_users, axis=0)
    n_dis = rng.integers(ins.disliked_min, ins.disliked_max + 1, n_users)
    dis_rank = _gumbel_top(np.zeros((n_users, n_topics)), max(ins.disliked_max, 1), rng)
    disliked = np.where(np.arange(dis_rank.shape[1])[None, :] < n_dis[:, None], dis_rank, -1)
    excluded = np.zeros((n_users, n_topics), dtype=bool)
    rows = np.arange(n_users)[:, None]
    for col in disliked.T:
        excluded[np.flatnonzero(col >= 0), col[col >= 0]] = True

    periodic = _PeriodicSlots.draw(cfg, log_pop, excluded, rng)

    n_active = rng.integers(ins.topics_min, ins.topics_max + 1, n_users)
    active = np.arange(k_max)[None, :] < n_active[:, None]
    topic = _gumbel_top(np.where(excluded, -np.inf, log_pop), k_max, rng)
    log_w = _dirichlet_log_weights(n_active, k_max, ins.dirichlet_alpha, rng)

    bounds = period_boundaries(cfg)
    n_periods, n_slots = bounds.size, k_max + periodic.topic.shape[1]
    topics = np.empty((n_users, n_periods, n_slots), dtype=np.int32)
    log_ws = np.empty((n_users, n_periods, n_slots), dtype=np.float64)
    topics[:, :, k_max:] = periodic.topic[:, None, :]
    for p in range(n_periods):
        if p > 0 and cfg.drift.enabled and bounds[p] == cfg.drift.day:
            held = excluded.copy()
            held[rows, topic] |= active
            topic = _gumbel_top(np.where(held, -np.inf, log_pop), k_max, rng)
            log_w = _dirichlet_log_weights(n_active, k_max, ins.dirichlet_alpha, rng)
        elif p > 0:
            log_w = log_w + rng.normal(0.0, ins.weekly_step_std, log_w.shape)
            swap = active & (rng.random(log_w.shape) < ins.weekly_swap_prob)
            for k in np.flatnonzero(swap.any(axis=0)):
                cand = rng.choice(n_topics, n_users, p=topic_pop)
                taken = excluded[np.arange(n_users), cand] | (topic == cand[:, None]).any(axis=1)
                ok = swap[:, k] & ~taken
                topic[ok, k] = cand[ok]
                log_w[ok, k] = np.log(1.0 / n_active[ok]) + ins.adopted_log_weight
        topics[:, p, :k_max] = topic
        log_ws[:, p, :k_max] = np.where(active, log_w, -np.inf)
        log_ws[:, p, k_max:] = periodic.log_weights(int(bounds[p]) // 7, n_active)
    weight = np.exp(log_ws - log_ws.max(axis=2, keepdims=True))
    weight /= weight.sum(axis=2, keepdims=True)
    rel = weight / weight.max(axis=2, keepdims=True)
    affinity_weight = np.where(weight > 0, rel ** cfg.affinity.long_term_temper, 0.0)
    return Interests(boundaries=bounds, topic=topics, weight=weight.astype(np.float32),
                     affinity_weight=affinity_weight.astype(np.float32), disliked=disliked.astype(np.int32))


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    return np.r_[0, np.cumsum(counts)[:-1]]


def _sample_slots(weight: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row of ``weight`` (n, K), the slot index chosen by the uniform ``u`` (n,)."""
    cw = np.cumsum(weight, axis=1)
    cw /= cw[:, -1:]
    return np.minimum((u[:, None] > cw).sum(axis=1), weight.shape[1] - 1)


def make_schedule(cfg: WorldConfig, interests: Interests, trending: np.ndarray, successor: np.ndarray,
                  n_users: int, rng: np.random.Generator) -> Schedule:
    """Draw sessions and requests of a chunk's users.

    Args:
        cfg: the world configuration (``users``, ``sessions``, ``surfaces``).
        interests: the chunk's interests (the focus is drawn from the mixture in force).
        trending: (days, trending_per_day) trending topics of each day.
        successor: (T,) the next topic of each topic (``sessions.focus_next``).
        n_users: users in the chunk.
        rng: the chunk's random stream.
    """
    se, us = cfg.sessions, cfg.users
    start, end = cfg.start_ms, cfg.end_ms
    activity = np.clip(np.exp(us.activity_sigma * rng.standard_normal(n_users)), us.activity_min, us.activity_max)
    n_sessions = rng.poisson(se.per_day * cfg.days * activity)
    sess_user = np.repeat(np.arange(n_users), n_sessions)
    # Sorting user * span + offset orders sessions by user, then time, in one pass.
    span = end - start
    offset = np.sort(sess_user * span + rng.integers(0, span, sess_user.size))
    sess_ts = start + offset - sess_user * span
    n_sess_total = sess_user.size

    first = np.zeros(n_sess_total, dtype=bool)
    first[_segment_starts(n_sessions)[n_sessions > 0]] = True
    sess_day = (sess_ts - start) // DAY_MS
    sess_period = interests.period_of(sess_day)
    # A zero-probability last kind leaves the draws of worlds without "next" sessions unchanged.
    kind = rng.choice(len(FOCUS_KINDS), n_sess_total, p=se.focus_shares())
    follows = (kind == FOCUS_PREVIOUS) | (kind == FOCUS_NEXT)
    kind[first & follows] = FOCUS_LONG_TERM
    follows &= ~first
    slots = _sample_slots(interests.weight[sess_user, sess_period], rng.random(n_sess_total))
    focus = interests.topic[sess_user, sess_period, slots]
    trend = trending[sess_day, rng.integers(0, trending.shape[1], n_sess_total)]
    focus = np.where(kind == FOCUS_TRENDING, trend, focus)
    if n_sess_total:
        # "Previous" and "next" sessions follow the last session that drew its own focus (a
        # forward fill), a "next" one step further along the successor chain for each "next"
        # session since then.
        own = np.maximum.accumulate(np.where(follows, 0, np.arange(n_sess_total)))
        n_next = np.cumsum(kind == FOCUS_NEXT)
        steps = n_next - n_next[own]
        focus = focus[own]
        for step in range(int(steps.max())):
            ahead = steps > step
            focus[ahead] = successor[focus[ahead]]

    n_req_sess = 1 + rng.poisson(se.requests_mean - 1.0, n_sess_total)
    req_sess = np.repeat(np.arange(n_sess_total), n_req_sess)
    gaps = rng.exponential(se.request_gap_s * 1000.0, req_sess.size).astype(np.int64)
    gaps[_segment_starts(n_req_sess)] = 0
    csum = np.cumsum(gaps)
    ts = sess_ts[req_sess] + csum - (csum - gaps)[_segment_starts(n_req_sess)][req_sess]
    # Sessions may overlap; push each request at least MIN_REQUEST_GAP_MS after the previous
    # one of its user: a running max of (ts - gap * j), per user via a large user offset.
    req_user = sess_user[req_sess]
    per_user = np.bincount(req_user, minlength=n_users)
    j = np.arange(req_user.size) - _segment_starts(per_user)[req_user]
    big = np.int64(1) << np.int64(44)
    shifted = ts - MIN_REQUEST_GAP_MS * j + req_user.astype(np.int64) * big
    ts = np.maximum.accumulate(shifted) - req_user.astype(np.int64) * big + MIN_REQUEST_GAP_MS * j if ts.size else ts
    keep = ts < end
    req_sess, req_user, ts = req_sess[keep], req_user[keep], ts[keep]

    surface_p = [getattr(cfg.surfaces, s) for s in SIM_SURFACES]
    surface = rng.choice(len(SIM_SURFACES), req_sess.size, p=surface_p).astype(np.int8)
    period = interests.period_of((ts - start) // DAY_MS).astype(np.int32)
    return Schedule(n_requests=np.bincount(req_user, minlength=n_users).astype(np.int64), user=req_user,
                    ts_ms=ts.astype(np.int64), surface=surface, focus=focus[req_sess].astype(np.int32),
                    period=period, activity=activity)
