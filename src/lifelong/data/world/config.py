"""The world simulator's configuration: typed sections, presets and layered loading.

Every number of the generative story (docs/world.md) is a key here. A configuration is built in
three layers, later ones winning: a preset's defaults, an optional YAML/JSON file (which may
name its own ``preset``), and ``key=value`` overrides with dotted keys whose values are parsed
as YAML. :func:`lifelong.core.config.build` checks every key and value against the dataclass
fields, so a typo is a :class:`~lifelong.core.errors.ConfigError` naming the key and the valid
alternatives.

Example::

    >>> cfg = load_config("tiny", overrides=["seed=3", "items.sigma_obs=0.2"])
    >>> cfg.seed, cfg.items.sigma_obs, cfg.users.n_users
    (3, 0.2, 50)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lifelong.core.config import build, load_file, merge, parse_set
from lifelong.core.errors import ConfigError
from lifelong.data.schema import SURFACES

SIM_SURFACES: tuple[str, ...] = ("homefeed", "search", "related")
"""Surfaces the simulator issues requests on (a prefix of :data:`lifelong.data.schema.SURFACES`)."""
assert SURFACES[: len(SIM_SURFACES)] == SIM_SURFACES

FOCUS_KINDS: tuple[str, ...] = ("focus_long_term", "focus_previous", "focus_trending", "focus_next")
"""Where a session's focus comes from (``sessions.*`` shares, summing to 1), in code order."""

SOURCES: tuple[str, ...] = ("recent", "long_term", "context", "popular", "random")
"""Retrieval sources of the production-like candidate mix, in slot order."""


@dataclass(frozen=True)
class TopicsConfig:
    """Topic centroids (unit vectors in R^32) and their Zipf-like popularity.

    The first sketch of the world (docs/world.md, "Departures from the first sketch") had 64 topics; the default is 256 so that users can hold 15–50 interests
    (see :class:`InterestsConfig`) while staying sparse.

    Args:
        n_topics: number of topics T.
        zipf_exponent: topic popularity ∝ 1 / rank^s; drives items per topic, interests and
            trending topics.
    """

    n_topics: int = 256
    zipf_exponent: float = 1.0


@dataclass(frozen=True)
class ItemsConfig:
    """The catalogue.

    Args:
        n_items: number of items (at least ``topics.n_topics``: every topic gets one).
        sigma_item: norm of the noise around the topic centroid in ``v_i = normalize(mu + noise)``.
        sigma_obs: norm of the observation noise in the stored embedding ``e_i = v_i + noise``.
        popularity_sigma: log-normal sigma of item popularity.
        items_per_author: mean catalogue size of an author.
        author_topics_max: authors specialise in 1..this many topics.
        video_share: probability an item is a video.
        duration_median_s: median video duration (log-normal).
        duration_sigma: log-normal sigma of video durations.
        duration_min_s: shortest video.
        duration_max_s: longest video.
    """

    n_items: int = 20_000
    sigma_item: float = 0.5
    sigma_obs: float = 0.3
    popularity_sigma: float = 1.0
    items_per_author: float = 20.0
    author_topics_max: int = 3
    video_share: float = 0.3
    duration_median_s: float = 20.0
    duration_sigma: float = 0.8
    duration_min_s: float = 3.0
    duration_max_s: float = 600.0


@dataclass(frozen=True)
class UsersConfig:
    """Population size and activity.

    Args:
        n_users: number of users.
        activity_sigma: log-normal sigma of a user's activity multiplier (median 1).
        activity_min: lower clip of the multiplier.
        activity_max: upper clip of the multiplier (bounds the longest history).
        bias_std: std of a user's propensity to engage (added to the affinity).
        min_explicit_before_eval: every user must have at least this many explicit events
            before the protocol's evaluation day, or simulation fails (0: no requirement).
    """

    n_users: int = 2_000
    activity_sigma: float = 1.0
    activity_min: float = 0.05
    activity_max: float = 10.0
    bias_std: float = 0.3
    min_explicit_before_eval: int = 0


@dataclass(frozen=True)
class InterestsConfig:
    """Long-term interests: a sparse, slowly drifting topic mixture, and disliked topics.

    The first sketch had 3–10 topics. With that few, the last 100 explicit actions (the
    real-time sequence) cover almost every interest, because the long-term retrieval source
    keeps surfacing them, and a lifelong sequence knows nothing the real-time one lacks. With
    15–50 of 256 topics, about a fifth of shown items come from topics absent from the last
    100 explicit actions yet present in the lifelong history, engaged ~2–3x more than items of
    topics never engaged: the signal a lifelong-sequence model must find.

    Args:
        topics_min: fewest topics in a user's mixture.
        topics_max: most topics in a user's mixture.
        dirichlet_alpha: concentration of the mixture weights.
        disliked_min: fewest disliked topics.
        disliked_max: most disliked topics.
        weekly_step_std: std of the weekly random-walk step of each log weight.
        weekly_swap_prob: weekly probability that an interest is abandoned for a new topic.
        adopted_log_weight: log weight of a newly adopted topic relative to ``log(1/k)``.
    """

    topics_min: int = 15
    topics_max: int = 50
    dirichlet_alpha: float = 1.0
    disliked_min: int = 2
    disliked_max: int = 8
    weekly_step_std: float = 0.15
    weekly_swap_prob: float = 0.02
    adopted_log_weight: float = -1.0


@dataclass(frozen=True)
class PeriodicConfig:
    """Periodic interests: topics a user comes back to on a cycle, and likes only in season.

    DV365 summarises a year of history because some interests recur (seasons, monthly
    routines) and a recent window misses them between seasons. A periodic interest is a topic
    outside the user's long-term mixture and never disliked. It is *in season* for
    ``season_weeks`` consecutive weeks every ``C`` weeks (``C`` uniform in
    ``cycle_weeks_min..cycle_weeks_max``, a random phase per user and topic). In season it
    joins the mixture at log weight ``log(1/k) + log_weight``, so sessions focus on it and the
    affinity likes it; out of season it is neither. Off (0 topics) except in the ``lifelong``
    preset, so the other presets' worlds are unchanged.

    Args:
        topics_min: fewest periodic interests per user.
        topics_max: most periodic interests per user (0: the world has none).
        cycle_weeks_min: shortest cycle, in weeks.
        cycle_weeks_max: longest cycle, in weeks.
        season_weeks: weeks each season lasts (shorter than every cycle).
        log_weight: in-season log weight relative to ``log(1/k)`` of the user's k interests.
    """

    topics_min: int = 0
    topics_max: int = 0
    cycle_weeks_min: int = 4
    cycle_weeks_max: int = 13
    season_weeks: int = 1
    log_weight: float = 1.0


@dataclass(frozen=True)
class DriftConfig:
    """Abrupt concept drift: on ``day`` every user's long-term topics are replaced.

    Args:
        enabled: switch the drift on.
        day: day index (from the world's start) of the shift; ``0 < day < days``.
    """

    enabled: bool = False
    day: int = 300


@dataclass(frozen=True)
class SessionsConfig:
    """Sessions, their focus topic and the requests they issue.

    Args:
        per_day: sessions per day of a median-activity user.
        requests_mean: mean requests (chunks) per session, at least 1.
        request_gap_s: mean seconds between requests of a session.
        focus_long_term: probability the focus is drawn from the long-term mixture.
        focus_previous: probability the focus is the previous session's.
        focus_trending: probability the focus is one of the day's trending topics.
        focus_next: probability the focus is the *next topic* of the previous session's focus:
            the world draws one fixed successor for every topic (a random permutation), so
            the order of a user's sessions carries information that item similarity does not
            (0 by default: the next-action experiment's world in docs/results.md sets it).
        trending_per_day: number of trending topics per day.
    """

    per_day: float = 0.2
    requests_mean: float = 3.0
    request_gap_s: float = 30.0
    focus_long_term: float = 0.6
    focus_previous: float = 0.3
    focus_trending: float = 0.1
    focus_next: float = 0.0
    trending_per_day: int = 3

    def focus_shares(self) -> list[float]:
        """The focus probabilities in :data:`FOCUS_KINDS` order (the simulators' draw)."""
        return [getattr(self, name) for name in FOCUS_KINDS]


@dataclass(frozen=True)
class SurfacesConfig:
    """Probability that a request is issued on each surface (sums to 1).

    Args:
        homefeed: the home feed.
        search: search, with the session focus as the query.
        related: related items of the user's latest engaged item.
    """

    homefeed: float = 0.7
    search: float = 0.15
    related: float = 0.15


@dataclass(frozen=True)
class MixConfig:
    """Shares of a request's slots filled by each retrieval source (sums to 1).

    Args:
        recent: items of the topic of one of the user's recently engaged items.
        long_term: items of a long-term interest topic *not* recently engaged.
        context: items of the request's context topic (search: the focus; related: the
            latest engaged item's topic; homefeed: the focus).
        popular: items drawn by global popularity.
        random: uniformly random items.
    """

    recent: float = 0.25
    long_term: float = 0.45
    context: float = 0.0
    popular: float = 0.18
    random: float = 0.12


@dataclass(frozen=True)
class RetrievalConfig:
    """The candidate mix of each request.

    Args:
        items_per_request: items shown per request.
        recent_window: a topic counts as recently engaged while it is among the user's last
            this many positive engagements (the real-time sequence length).
        seed_window: the ``recent`` source seeds from the newest this many engaged items.
        homefeed: the mix on the home feed.
        search: the mix on search.
        related: the mix on related items.
    """

    items_per_request: int = 16
    recent_window: int = 100
    seed_window: int = 20
    homefeed: MixConfig = field(default_factory=MixConfig)
    search: MixConfig = field(default_factory=lambda: MixConfig(
        recent=0.1, long_term=0.35, context=0.35, popular=0.1, random=0.1))
    related: MixConfig = field(default_factory=lambda: MixConfig(
        recent=0.15, long_term=0.35, context=0.3, popular=0.1, random=0.1))


@dataclass(frozen=True)
class AffinityConfig:
    """The affinity ``a`` of a user for a shown item.

    ``a = w_long_term * sum_k w~_k kappa(v_i, mu_k) + w_session * kappa(v_i, mu_focus)
    + w_popularity * z(log pop_i) + surface bias + user bias + noise - disliked_penalty``, with
    the similarity kernel ``kappa(v, mu) = max(0, cos(v, mu) - kernel_floor) / (1 - kernel_floor)``
    (zero for unrelated topics, so a user's number of interests does not shift every item)
    and relative tempered weights ``w~_k = (w_k / max_j w_j) ** long_term_temper``.

    Args:
        w_long_term: weight of the long-term interest similarity.
        w_session: weight of the session-focus similarity.
        w_popularity: weight of the standardised log popularity.
        long_term_temper: exponent flattening the mixture weights; 0 (default) makes every
            interest equally liked, the weights then only set how often sessions focus on it,
            so a minor interest absent from recent actions is still worth recommending.
        kernel_floor: cosine below which an item and a topic are unrelated.
        kernel_topics: an item keeps its kernel for this many nearest topics (the rest are
            below the floor in practice; this bounds work per shown item).
        disliked_penalty: affinity subtracted for items of a disliked topic.
        noise_std: std of the persistent user-item noise.
        search_bias: affinity bonus of search requests (explicit intent).
        related_bias: affinity bonus of related-item requests.
    """

    w_long_term: float = 4.5
    w_session: float = 1.0
    w_popularity: float = 0.3
    long_term_temper: float = 0.0
    kernel_floor: float = 0.3
    kernel_topics: int = 4
    disliked_penalty: float = 2.0
    noise_std: float = 0.5
    search_bias: float = 0.4
    related_bias: float = 0.2


@dataclass(frozen=True)
class HeadsConfig:
    """Logistic heads on the affinity ``a``: ``p = sigmoid(bias + slope * a [+ extras])``.

    A hide suppresses the positive heads, so the oracle stores ``p_pos * (1 - p_hide)``.

    Args:
        click_bias: click/closeup intercept.
        click_slope: click slope.
        repin_bias: repin/save intercept (a stronger threshold than click).
        repin_slope: repin slope.
        long_view_bias: long-dwell intercept.
        long_view_slope: long-dwell slope.
        long_view_video_bias: long-dwell bonus for videos.
        hide_bias: hide intercept.
        hide_slope: hide logit decrease per unit affinity.
        hide_disliked: hide logit bonus for items of a disliked topic.
    """

    click_bias: float = -7.5
    click_slope: float = 1.0
    repin_bias: float = -10.2
    repin_slope: float = 1.3
    long_view_bias: float = -8.5
    long_view_slope: float = 1.0
    long_view_video_bias: float = 1.0
    hide_bias: float = -5.2
    hide_slope: float = 0.8
    hide_disliked: float = 4.0


@dataclass(frozen=True)
class DwellConfig:
    """Dwell times; a long view is exactly a dwell over the long-view threshold.

    Args:
        impression_median_ms: median dwell of a bare impression (log-normal).
        impression_sigma: log-normal sigma of bare-impression dwell.
        long_view_ms: long-view threshold for images.
        long_view_ratio: long-view threshold for videos, as a watch ratio.
        max_watch_ratio: watch ratio approached by the most engaged video views (rewatch > 1).
        engaged_min_fraction: engaged views without a long view dwell between this fraction
            of the threshold and the threshold.
        affinity_scale: how strongly the affinity stretches long dwells.
        max_dwell_ms: upper clip of any dwell.
    """

    impression_median_ms: float = 800.0
    impression_sigma: float = 0.6
    long_view_ms: float = 10_000.0
    long_view_ratio: float = 0.5
    max_watch_ratio: float = 1.5
    engaged_min_fraction: float = 0.15
    affinity_scale: float = 0.3
    max_dwell_ms: float = 1_800_000.0


@dataclass(frozen=True)
class InteractiveConfig:
    """The interactive world (docs/world.md, "Interactive mode"): feeds ranked by a policy.

    Used only when the world is run forward by :mod:`lifelong.data.world.interactive`
    (``lifelong abtest``); the offline simulator ignores this section.

    Examination: the user scrolls a feed top-down and stops at a random depth; position ``k``
    (0-based) is examined with probability ``exam[k] = 1 / (1 + k) ** exam_eta``, or
    ``exam_probs[k]`` when that list is given (non-increasing, in [0, 1]; positions past its end
    are never examined). Only examined items are logged and can be acted on.

    Continuation: after each request the session goes on with probability
    ``sigmoid(continue_bias + continue_engagement * positives - continue_hide * hides)``,
    counting the request's examined positive engagements (click, repin or long view) and hides,
    up to ``max_session_requests`` requests.

    Args:
        exam_eta: exponent of the position-bias curve.
        exam_probs: explicit examination probability per position (empty: use ``exam_eta``).
        continue_bias: logit of continuing after a request with no engagement and no hide.
        continue_engagement: logit added per examined positive engagement.
        continue_hide: logit subtracted per hide.
        max_session_requests: the most requests one session issues.
        horizon_days: the world can be run at most this many days past its end (interests keep
            their weekly random walk that far).
    """

    exam_eta: float = 0.5
    exam_probs: tuple[float, ...] = ()
    continue_bias: float = 0.4
    continue_engagement: float = 0.6
    continue_hide: float = 1.0
    max_session_requests: int = 20
    horizon_days: int = 365


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a simulated world: same config and seed, same files.

    Args:
        preset: the preset this configuration was layered on (informational).
        seed: the root of every random stream.
        start_date: first day of the world (UTC, ISO ``YYYY-MM-DD``).
        days: length of the world in whole days; the evaluation day is the last.
        topics, items, users, interests, periodic, drift, sessions, surfaces, retrieval, affinity,
            heads, dwell: the sections of the generative story.
        interactive: how a user meets a ranked feed when the world is run interactively.

    Example::

        >>> cfg = PRESETS["tiny"]
        >>> cfg.to_dict()["users"]["n_users"]
        50
    """

    preset: str = "small"
    seed: int = 0
    start_date: str = "2024-01-01"
    days: int = 365
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    items: ItemsConfig = field(default_factory=ItemsConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    interests: InterestsConfig = field(default_factory=InterestsConfig)
    periodic: PeriodicConfig = field(default_factory=PeriodicConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    surfaces: SurfacesConfig = field(default_factory=SurfacesConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    dwell: DwellConfig = field(default_factory=DwellConfig)
    interactive: InteractiveConfig = field(default_factory=InteractiveConfig)

    def to_dict(self) -> dict[str, Any]:
        """The full nested configuration as plain JSON-able values (tuples as lists)."""
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

        return plain(dataclasses.asdict(self))

    @property
    def start_ms(self) -> int:
        """Epoch milliseconds of ``start_date`` at 00:00 UTC."""
        day = dt.date.fromisoformat(self.start_date)
        return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()) * 1000

    @property
    def end_ms(self) -> int:
        """Exclusive end of the world (midnight after the last day)."""
        return self.start_ms + self.days * 86_400_000


# Presets are layered on the dataclass defaults; only what differs is listed.
_PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "tiny": {
        "days": 30,
        "users": {"n_users": 50, "activity_sigma": 0.6, "activity_max": 6.0},
        "items": {"n_items": 500},
        "topics": {"n_topics": 32},
        "interests": {"topics_min": 3, "topics_max": 10, "disliked_min": 1, "disliked_max": 3},
        "sessions": {"per_day": 1.0},
        "drift": {"day": 15},
    },
    "small": {},
    "bench": {
        "days": 28,
        # Equal activity and high engagement: every user clears 10,100 explicit events before
        # the evaluation day with a wide margin (checked at generation).
        "users": {"n_users": 2_000, "activity_sigma": 0.0, "bias_std": 0.1, "min_explicit_before_eval": 10_100},
        "items": {"n_items": 1_000_000},
        "sessions": {"per_day": 6.0, "requests_mean": 4.0},
        "retrieval": {"items_per_request": 32, "seed_window": 32},
        "heads": {"click_bias": -2.0, "repin_bias": -3.5, "long_view_bias": -3.0, "hide_bias": -4.0},
        "drift": {"day": 14},
    },
    "lifelong": {
        "users": {"n_users": 2_000, "activity_sigma": 0.25, "activity_min": 0.3, "activity_max": 1.7},
        "items": {"n_items": 200_000, "video_share": 0.5},
        "sessions": {"per_day": 2.0, "requests_mean": 3.5},
        # Recurring interests are what a year-long user embedding can see and a recent window
        # cannot: 2-4 per user, back for one week every 4-13 weeks.
        "periodic": {"topics_min": 2, "topics_max": 4},
    },
}


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r}: {message}")


def _sums_to_one(values: Mapping[str, float], key: str) -> None:
    total = sum(values.values())
    _check(abs(total - 1.0) < 1e-6, key, f"shares must sum to 1, got {total:.6g} ({values})")


def validate(cfg: WorldConfig) -> WorldConfig:
    """Check value ranges and cross-field constraints; return ``cfg`` unchanged.

    Raises:
        ConfigError: naming the offending key.

    Example::

        >>> import dataclasses
        >>> validate(dataclasses.replace(PRESETS["tiny"], days=1))
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: config key 'days': must be at least 2
    """
    try:
        dt.date.fromisoformat(cfg.start_date)
    except ValueError:
        raise ConfigError(f"config key 'start_date': not an ISO date (YYYY-MM-DD): {cfg.start_date!r}") from None
    _check(cfg.days >= 2, "days", "must be at least 2")
    _check(0 <= cfg.seed < 2**63, "seed", "must be a non-negative 63-bit integer")
    _check(cfg.topics.n_topics >= 2, "topics.n_topics", "must be at least 2")
    _check(cfg.topics.zipf_exponent >= 0, "topics.zipf_exponent", "must be >= 0")
    it = cfg.items
    _check(it.n_items >= cfg.topics.n_topics, "items.n_items", "must be at least topics.n_topics")
    _check(it.n_items >= 2 * cfg.retrieval.items_per_request, "items.n_items",
           "must be at least twice retrieval.items_per_request")
    for name in ("sigma_item", "sigma_obs", "popularity_sigma", "duration_sigma"):
        _check(getattr(it, name) >= 0, f"items.{name}", "must be >= 0")
    _check(it.items_per_author >= 1, "items.items_per_author", "must be >= 1")
    _check(it.author_topics_max >= 1, "items.author_topics_max", "must be >= 1")
    _check(0 <= it.video_share <= 1, "items.video_share", "must be in [0, 1]")
    _check(0 < it.duration_min_s <= it.duration_median_s <= it.duration_max_s, "items.duration_median_s",
           "need 0 < duration_min_s <= duration_median_s <= duration_max_s")
    us = cfg.users
    _check(us.n_users >= 1, "users.n_users", "must be >= 1")
    _check(us.activity_sigma >= 0, "users.activity_sigma", "must be >= 0")
    _check(0 < us.activity_min <= 1 <= us.activity_max, "users.activity_min",
           "need 0 < activity_min <= 1 <= activity_max (multiples of the median)")
    _check(us.bias_std >= 0, "users.bias_std", "must be >= 0")
    _check(us.min_explicit_before_eval >= 0, "users.min_explicit_before_eval", "must be >= 0")
    ins = cfg.interests
    _check(1 <= ins.topics_min <= ins.topics_max, "interests.topics_min", "need 1 <= topics_min <= topics_max")
    _check(0 <= ins.disliked_min <= ins.disliked_max, "interests.disliked_min",
           "need 0 <= disliked_min <= disliked_max")
    per = cfg.periodic
    _check(0 <= per.topics_min <= per.topics_max, "periodic.topics_min", "need 0 <= topics_min <= topics_max")
    _check(2 * ins.topics_max + ins.disliked_max + per.topics_max <= cfg.topics.n_topics, "interests.topics_max",
           "2 * topics_max + disliked_max + periodic.topics_max must not exceed topics.n_topics (drift draws "
           "fresh topics)")
    _check(1 <= per.season_weeks < per.cycle_weeks_min <= per.cycle_weeks_max, "periodic.season_weeks",
           "need 1 <= season_weeks < cycle_weeks_min <= cycle_weeks_max")
    _check(ins.dirichlet_alpha > 0, "interests.dirichlet_alpha", "must be > 0")
    _check(ins.weekly_step_std >= 0, "interests.weekly_step_std", "must be >= 0")
    _check(0 <= ins.weekly_swap_prob <= 1, "interests.weekly_swap_prob", "must be in [0, 1]")
    if cfg.drift.enabled:
        _check(0 < cfg.drift.day < cfg.days, "drift.day", f"must be in 1..{cfg.days - 1} (days={cfg.days})")
    se = cfg.sessions
    _check(se.per_day > 0, "sessions.per_day", "must be > 0")
    _check(se.requests_mean >= 1, "sessions.requests_mean", "must be >= 1")
    _check(se.request_gap_s > 0, "sessions.request_gap_s", "must be > 0")
    for name in FOCUS_KINDS:
        _check(getattr(se, name) >= 0, f"sessions.{name}", "must be >= 0")
    _sums_to_one(dict(zip(FOCUS_KINDS, se.focus_shares())), "sessions.focus_long_term")
    _check(1 <= se.trending_per_day <= cfg.topics.n_topics, "sessions.trending_per_day",
           "must be in 1..topics.n_topics")
    surf = dataclasses.asdict(cfg.surfaces)
    for name, share in surf.items():
        _check(share >= 0, f"surfaces.{name}", "must be >= 0")
    _sums_to_one(surf, "surfaces")
    re_ = cfg.retrieval
    _check(re_.items_per_request >= 1, "retrieval.items_per_request", "must be >= 1")
    _check(re_.recent_window >= 1, "retrieval.recent_window", "must be >= 1")
    _check(re_.seed_window >= re_.items_per_request, "retrieval.seed_window",
           "must be >= retrieval.items_per_request")
    for surface in SIM_SURFACES:
        mix = dataclasses.asdict(getattr(re_, surface))
        for name, share in mix.items():
            _check(share >= 0, f"retrieval.{surface}.{name}", "must be >= 0")
        _sums_to_one(mix, f"retrieval.{surface}")
    af = cfg.affinity
    for name in ("noise_std", "long_term_temper"):
        _check(getattr(af, name) >= 0, f"affinity.{name}", "must be >= 0")
    _check(-1 <= af.kernel_floor < 1, "affinity.kernel_floor", "must be in [-1, 1)")
    _check(1 <= af.kernel_topics <= cfg.topics.n_topics, "affinity.kernel_topics", "must be in 1..topics.n_topics")
    dw = cfg.dwell
    for name in ("impression_median_ms", "long_view_ms", "long_view_ratio", "max_dwell_ms"):
        _check(getattr(dw, name) > 0, f"dwell.{name}", "must be > 0")
    _check(dw.impression_sigma >= 0, "dwell.impression_sigma", "must be >= 0")
    _check(dw.max_watch_ratio > dw.long_view_ratio, "dwell.max_watch_ratio", "must exceed dwell.long_view_ratio")
    _check(0 < dw.engaged_min_fraction < 1, "dwell.engaged_min_fraction", "must be in (0, 1)")
    _check(dw.max_dwell_ms > dw.long_view_ms, "dwell.max_dwell_ms", "must exceed dwell.long_view_ms")
    ia = cfg.interactive
    _check(ia.exam_eta >= 0, "interactive.exam_eta", "must be >= 0")
    _check(all(0 <= p <= 1 for p in ia.exam_probs), "interactive.exam_probs", "every probability must be in [0, 1]")
    _check(all(a >= b for a, b in zip(ia.exam_probs, ia.exam_probs[1:])), "interactive.exam_probs",
           "must be non-increasing (the user scrolls top-down)")
    _check(ia.continue_engagement >= 0, "interactive.continue_engagement", "must be >= 0")
    _check(ia.continue_hide >= 0, "interactive.continue_hide", "must be >= 0")
    _check(ia.max_session_requests >= 1, "interactive.max_session_requests", "must be >= 1")
    _check(ia.horizon_days >= 1, "interactive.horizon_days", "must be >= 1")
    return cfg


def _preset(name: str) -> WorldConfig:
    return validate(build(WorldConfig, {"preset": name, **_PRESET_OVERRIDES[name]}))


PRESETS: Mapping[str, WorldConfig] = types.MappingProxyType({name: _preset(name) for name in _PRESET_OVERRIDES})
"""Named starting points (docs/world.md, "Presets"): ``tiny``, ``small``, ``bench``, ``lifelong``."""


def load_config(preset: str | None = None, config_file: str | os.PathLike[str] | None = None,
                overrides: Iterable[str] = ()) -> WorldConfig:
    """Build a validated configuration: preset ← config file ← ``key=value`` overrides.

    Args:
        preset: a name in :data:`PRESETS` (default ``small``). A ``preset`` key in the config
            file, being a later layer, replaces it.
        config_file: optional YAML or JSON file of nested keys (``items: {n_items: 1000}``).
        overrides: ``dotted.key=value`` strings; values are parsed as YAML (``a.b=[1, 2]``).

    Raises:
        ConfigError: unknown preset or key (naming it and the valid ones), a value of the
            wrong type or out of range, an unreadable file.

    Example::

        >>> load_config("tiny", overrides=["drift.enabled=true", "drift.day=20"]).drift.day
        20
    """
    layer = load_file(config_file) if config_file is not None else {}
    name = layer.pop("preset", None) or preset or "small"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    sets = [parse_set(text) for text in overrides]
    if any(key == "preset" for key, _ in sets):
        raise ConfigError("'preset' cannot be overridden with --set; choose the preset itself")
    return validate(build(WorldConfig, merge(PRESETS[name].to_dict(), layer), sets))
