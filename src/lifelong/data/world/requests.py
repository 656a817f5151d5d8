"""The request loop: fill every scheduled request with items and sample the user's responses.

Retrieval depends on what the user engaged with before, so requests are simulated in rounds:
round r serves the r-th request of every user who has one, vectorised across users. Users
are ranked by request count (descending) so the users active in round r are a prefix of the
rank order and every per-user state is a contiguous slice.

Per user the loop keeps the state "recent actions" needs, instead of a proxy:

* a ring buffer of the newest ``retrieval.seed_window`` positively engaged items (click,
  repin or long view), which seed the ``recent`` and ``related`` retrieval;
* for every topic, the engagement counter value of the last positive engagement with it, so
  "recently engaged" means "among the last ``retrieval.recent_window`` positive engagements"
  (the real-time sequence), which the ``long_term`` source excludes.

Responses: the affinity of docs/world.md feeds four logistic heads; hide is drawn first and
suppresses the positive heads, so the oracle stores ``p_pos * (1 - p_hide)`` and ``p_hide``,
the exact marginal probabilities of the recorded bits. A long view is exactly a dwell over
the long-view threshold (images: ``dwell.long_view_ms``; videos: a watch ratio of
``dwell.long_view_ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lifelong.data.schema import Action
from lifelong.data.world.catalog import Catalog
from lifelong.data.world.config import SIM_SURFACES, SOURCES, WorldConfig
from lifelong.data.world.population import Interests, Population

RECENT, LONG_TERM, CONTEXT, POPULAR, RANDOM, LONG_TERM_RECENT = range(6)
SOURCE_LABELS: tuple[str, ...] = ("recent", "long_term_not_recent", "context", "popular", "random",
                                  "long_term_recent")
"""Statistics labels of the source codes; ``long_term_recent`` marks long-term slots of users
whose every interest was recently engaged (then drawn from the whole mixture)."""
assert SOURCES == ("recent", "long_term", "context", "popular", "random")

_RELATED = SIM_SURFACES.index("related")
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


@dataclass
class Responses:
    """A chunk's shown items and responses, grouped by user, in time then item order.

    Args:
        item: (Q*n,) shown item ids; request q owns rows ``q*n .. q*n+n-1``.
        action_mask: (Q*n,) impression plus sampled action bits.
        dwell_ms: (Q*n,) dwell times.
        probs: (4, Q*n) true marginal probabilities of the heads click, repin, long_view, hide.
        source_counts: (6,) shown items per source code (see :data:`SOURCE_LABELS`).
    """

    item: np.ndarray
    action_mask: np.ndarray
    dwell_ms: np.ndarray
    probs: np.ndarray
    source_counts: np.ndarray


def slot_layout(cfg: WorldConfig) -> np.ndarray:
    """(surfaces, n) source code of every slot of a request on each surface.

    Shares become slot counts by largest remainder, so a mix is honoured exactly per request.

    Example::

        >>> from lifelong.data.world.config import PRESETS
        >>> slot_layout(PRESETS["small"])[0].tolist()  # homefeed: 4 recent, 7 long-term, 3 popular, 2 random
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 4, 4]
    """
    n = cfg.retrieval.items_per_request
    rows = []
    for surface in SIM_SURFACES:
        mix = getattr(cfg.retrieval, surface)
        share = np.array([getattr(mix, s) for s in SOURCES]) * n
        count = np.floor(share).astype(np.int64)
        # Largest remainders first; ties go to the earlier source, deterministically.
        for i in np.argsort(-(share - count), kind="stable")[: n - count.sum()]:
            count[i] += 1
        rows.append(np.repeat(np.arange(len(SOURCES)), count))
    return np.stack(rows).astype(np.int8)


def user_item_noise(key: np.uint64, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """A standard normal that is a fixed function of (key, user, item): persistent taste.

    Args:
        key: world-specific hash key.
        users: (A,) uint64 user ids.
        items: (A, n) item ids.

    Example::

        >>> import numpy as np
        >>> users, items = np.array([1, 2], dtype=np.uint64), np.array([[5, 6], [5, 6]])
        >>> z = user_item_noise(np.uint64(7), users, items)
        >>> bool((z == user_item_noise(np.uint64(7), users, items)).all()), bool(z[0, 0] != z[1, 0])
        (True, True)
    """
    x = items.astype(np.uint64) * _M1
    x ^= users[:, None] * _M3 + key
    x ^= x >> np.uint64(30)
    x *= _M2
    x ^= x >> np.uint64(27)
    x *= _M3
    x ^= x >> np.uint64(31)
    u1 = ((x >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    u2 = (x & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    return np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(np.float32(2 * np.pi) * u2)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def _unique_sorted_rows(items: np.ndarray, src: np.ndarray, n_items: int,
                        draws: Draws) -> tuple[np.ndarray, np.ndarray]:
    """Sort each request's items by id and replace repeats with random items."""
    while True:
        order = np.argsort(items, axis=1, kind="stable")
        items = np.take_along_axis(items, order, axis=1)
        src = np.take_along_axis(src, order, axis=1)
        dup = np.zeros(items.shape, dtype=bool)
        dup[:, 1:] = items[:, 1:] == items[:, :-1]
        n_dup = int(dup.sum())
        if n_dup == 0:
            return items, src
        items[dup] = draws.items(dup, n_items)
        src[dup] = RANDOM


class Draws:
    """Where the request loop's random numbers come from, one request per row.

    The offline simulator draws a whole round from the chunk's stream (:class:`StreamDraws`);
    the interactive world (:mod:`lifelong.data.world.interactive`) gives every request its own
    keyed generator, so two A/B arms see common random numbers. Shapes: ``a`` rows (requests)
    of ``n`` slots.
    """

    def uniform(self, k: int, a: int, n: int, dtype: type = np.float64) -> np.ndarray:
        """(k, a, n) uniforms in [0, 1)."""
        raise NotImplementedError

    def normal(self, a: int, n: int, dtype: type = np.float64) -> np.ndarray:
        """(a, n) standard normals."""
        raise NotImplementedError

    def items(self, mask: np.ndarray, n_items: int) -> np.ndarray:
        """Uniform item ids for the True cells of the (a, n) ``mask``, in row-major order."""
        raise NotImplementedError


class StreamDraws(Draws):
    """Every draw from one shared stream (the offline simulator's chunk stream)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def uniform(self, k: int, a: int, n: int, dtype: type = np.float64) -> np.ndarray:
        return self.rng.random((k, a, n), dtype=dtype)

    def normal(self, a: int, n: int, dtype: type = np.float64) -> np.ndarray:
        return self.rng.standard_normal((a, n), dtype=dtype)

    def items(self, mask: np.ndarray, n_items: int) -> np.ndarray:
        return self.rng.integers(0, n_items, int(mask.sum()))


class RowDraws(Draws):
    """Each row (request) draws from its own generator: common random numbers across arms."""

    def __init__(self, rngs: list[np.random.Generator]):
        self.rngs = rngs

    def uniform(self, k: int, a: int, n: int, dtype: type = np.float64) -> np.ndarray:
        if not self.rngs:
            return np.empty((k, 0, n), dtype=dtype)
        return np.stack([g.random((k, n), dtype=dtype) for g in self.rngs], axis=1)

    def normal(self, a: int, n: int, dtype: type = np.float64) -> np.ndarray:
        if not self.rngs:
            return np.empty((0, n), dtype=dtype)
        return np.stack([g.standard_normal(n, dtype=dtype) for g in self.rngs])

    def items(self, mask: np.ndarray, n_items: int) -> np.ndarray:
        parts = [g.integers(0, n_items, int(m.sum())) for g, m in zip(self.rngs, mask) if m.any()]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


@dataclass
class Tastes:
    """Per-user lookups of retrieval and affinity, users in "state row" order.

    Args:
        topics: (U*P, K) interest topics of each (user, period) state, ``u * P + p``.
        weights: (U*P, K) their mixture weights.
        liked: (U*P*T,) tempered affinity weight of every (state, topic), flattened.
        disliked: (U*T,) 1 for a disliked (user, topic), flattened.
        user_key: (U,) global user ids (the persistent-noise key).
        bias: (U,) engagement bias.
        n_periods: P.
    """

    topics: np.ndarray
    weights: np.ndarray
    liked: np.ndarray
    disliked: np.ndarray
    user_key: np.ndarray
    bias: np.ndarray
    n_periods: int

    @classmethod
    def build(cls, ins: Interests, user_ids: np.ndarray, bias: np.ndarray, order: np.ndarray, n_topics: int,
              periods: slice = slice(None)) -> Tastes:
        """The lookups of users ``order`` (indices into ``ins``), restricted to ``periods``."""
        topic = ins.topic[order][:, periods]
        n_users, n_periods, k_max = topic.shape
        topics = topic.reshape(-1, k_max).astype(np.int64)
        weights = ins.weight[order][:, periods].reshape(-1, k_max)
        # Dense (state, topic) tempered weights: the affinity looks up an item's few near topics.
        liked = np.zeros((n_users * n_periods, n_topics), dtype=np.float32)
        np.put_along_axis(liked, topics, ins.affinity_weight[order][:, periods].reshape(-1, k_max), axis=1)
        disliked = np.zeros((n_users, n_topics), dtype=np.float32)
        for col in ins.disliked[order].T:
            disliked[np.flatnonzero(col >= 0), col[col >= 0]] = 1.0
        return cls(topics=topics, weights=weights, liked=liked.ravel(), disliked=disliked.ravel(),
                   user_key=user_ids[order].astype(np.uint64), bias=bias[order].astype(np.float32),
                   n_periods=n_periods)


@dataclass
class Engagement:
    """What "recent" retrieval needs of each user (state rows), kept exactly.

    Args:
        count: (U,) positive engagements so far.
        ring: (U, seed_window) the newest positively engaged items (slot ``seq % seed_window``).
        last: (U*T,) per (user, topic) the ``count`` value of its last positive engagement.
    """

    count: np.ndarray
    ring: np.ndarray
    last: np.ndarray

    @classmethod
    def empty(cls, cfg: WorldConfig, n_users: int, n_topics: int) -> Engagement:
        re_ = cfg.retrieval
        return cls(count=np.zeros(n_users, dtype=np.int64), ring=np.zeros((n_users, re_.seed_window), dtype=np.int64),
                   last=np.full(n_users * n_topics, -(re_.recent_window + 1), dtype=np.int64))

    def record(self, u: np.ndarray, items: np.ndarray, positive: np.ndarray, item_topic: np.ndarray) -> None:
        """Append the positive engagements of one request per row, in column order.

        Args:
            u: (a,) distinct state rows.
            items: (a, n) the items in the order the user met them.
            positive: (a, n) which were positively engaged (click, repin or long view).
            item_topic: (N,) every item's topic.
        """
        n_topics = self.last.size // max(self.count.size, 1)
        er, ec = np.nonzero(positive)
        if er.size:
            seq = self.count[u][er] + (np.cumsum(positive, axis=1) - 1)[er, ec]
            self.ring[u[er], seq % self.ring.shape[1]] = items[er, ec]
            np.maximum.at(self.last, u[er] * n_topics + item_topic[items[er, ec]], seq)
            self.count[u] += positive.sum(axis=1)


@dataclass
class Feedback:
    """A round's sampled responses (rows: requests, columns: the slots in item order).

    Args:
        mask: (a, n) impression plus action bits.
        dwell: (a, n) dwell times.
        probs: (4, a, n) true marginals of click, repin, long view (each times ``1 - p_hide``), hide.
        positive: (a, n) click, repin or long view.
    """

    mask: np.ndarray
    dwell: np.ndarray
    probs: np.ndarray
    positive: np.ndarray


class RequestLoop:
    """One step of the request loop for a set of users: retrieval, then responses.

    The offline simulator (:func:`simulate_requests`) and the interactive world run the same
    steps; they differ only in where the random numbers come from (:class:`Draws`), in which
    users are active, and in the order a feed is shown.

    Args:
        cfg: the world configuration.
        cat: the catalogue.
        tastes: the users' lookups.
        state: their engagement state (updated by :meth:`record`).
        noise_key: key of the persistent user-item noise.
    """

    def __init__(self, cfg: WorldConfig, cat: Catalog, tastes: Tastes, state: Engagement, noise_key: np.uint64):
        self.cfg, self.cat, self.tastes, self.state, self.noise_key = cfg, cat, tastes, state, noise_key
        self.layout = slot_layout(cfg)
        af = cfg.affinity
        self.surface_bias = np.array([0.0, af.search_bias, af.related_bias], dtype=np.float32)
        self.item_topic = cat.topic.astype(np.int64)
        self.near_topic = cat.near_topic.astype(np.int64)
        self.duration = cat.duration_ms.astype(np.float32)
        self.n_topics = cat.centroids.shape[0]

    def retrieve(self, u: np.ndarray, surf: np.ndarray, foc: np.ndarray, period: np.ndarray,
                 draws: Draws) -> tuple[np.ndarray, np.ndarray]:
        """The candidates of one request per row: (a, n) item ids sorted by id, and their sources.

        Args:
            u: (a,) distinct state rows.
            surf: (a,) surface codes.
            foc: (a,) session focus topics.
            period: (a,) interest period of each request (an index into the tastes' periods).
            draws: the random numbers.
        """
        cat, ts, n_topics = self.cat, self.tastes, self.n_topics
        n, seed_window = self.cfg.retrieval.items_per_request, self.cfg.retrieval.seed_window
        recent_window, n_items, k_max = self.cfg.retrieval.recent_window, cat.n_items, ts.topics.shape[1]
        item_topic, f32 = self.item_topic, np.float32
        a_n = u.size
        st = u * ts.n_periods + period
        tk, w = ts.topics[st], ts.weights[st]
        cnt = self.state.count[u]
        has = cnt > 0
        rows = np.arange(a_n)
        uu = draws.uniform(3, a_n, n)

        # "recent": the topic of one of the newest engaged items (the focus before any).
        back = (uu[1] * np.minimum(cnt, seed_window)[:, None]).astype(np.int64)
        ring = self.state.ring
        seed_item = ring[u[:, None], (cnt[:, None] - 1 - back) % seed_window]
        seed_topic = np.where(has[:, None], item_topic[seed_item], foc[:, None])
        newest = item_topic[ring[u, (cnt - 1) % seed_window]]
        context = np.where((surf == _RELATED) & has, newest, foc)

        # "long_term": an interest not among the last recent_window engagements.
        recent = (cnt[:, None] - self.state.last[u[:, None] * n_topics + tk]) < recent_window
        w_free = np.where(recent, f32(0), w)
        fallback = w_free.sum(axis=1) <= 0
        w_free[fallback] = w[fallback]
        cw = np.cumsum(w_free, axis=1)
        cw /= cw[:, -1:]
        slot = np.minimum((uu[2][:, :1] > cw).sum(axis=1), k_max - 1)
        lt_topic = tk[rows, slot][:, None]

        src = self.layout[surf]
        src = np.where((src == LONG_TERM) & fallback[:, None], np.int8(LONG_TERM_RECENT), src)
        topic = np.where(src == RECENT, seed_topic, np.where(src == CONTEXT, context[:, None], lt_topic))
        lo = cat.topic_lo[topic]
        x = lo + uu[0] * (cat.topic_hi[topic] - lo)
        end = cat.topic_end[topic]
        popular = src == POPULAR
        x[popular] = uu[0][popular] * cat.cum_pop[-1]
        end[popular] = n_items
        items = cat.by_topic[np.minimum(np.searchsorted(cat.cum_pop, x, side="right"), end - 1)]
        rnd = src == RANDOM
        if rnd.any():
            items[rnd] = draws.items(rnd, n_items)
        return _unique_sorted_rows(items, src, n_items, draws)

    def respond(self, u: np.ndarray, items: np.ndarray, surf: np.ndarray, foc: np.ndarray, period: np.ndarray,
                draws: Draws) -> Feedback:
        """Sample every shown item's response (the arguments as in :meth:`retrieve`)."""
        cat, ts, n_topics, f32 = self.cat, self.tastes, self.n_topics, np.float32
        af, hd, dw = self.cfg.affinity, self.cfg.heads, self.cfg.dwell
        a_n, n = items.shape
        st = u * ts.n_periods + period

        # Affinity (docs/world.md): long-term mixture, session focus, popularity, surface, user,
        # persistent user-item noise, disliked topics.
        it_topic = self.item_topic[items]
        nt, nk = self.near_topic[items], cat.near_kernel[items]
        lt = (nk * ts.liked[(st * n_topics)[:, None, None] + nt]).sum(axis=2)
        session = (nk * (nt == foc[:, None, None])).sum(axis=2)
        dis = ts.disliked[u[:, None] * n_topics + it_topic]
        aff = (f32(af.w_long_term) * lt + f32(af.w_session) * session
               + f32(af.w_popularity) * cat.pop_z[items]
               + (self.surface_bias[surf] + ts.bias[u])[:, None]
               + f32(af.noise_std) * user_item_noise(self.noise_key, ts.user_key[u], items)
               - f32(af.disliked_penalty) * dis)

        video = cat.is_video[items]
        p_click = _sigmoid(f32(hd.click_bias) + f32(hd.click_slope) * aff)
        p_repin = _sigmoid(f32(hd.repin_bias) + f32(hd.repin_slope) * aff)
        p_long = _sigmoid(f32(hd.long_view_bias) + f32(hd.long_view_slope) * aff
                          + f32(hd.long_view_video_bias) * video)
        p_hide = _sigmoid(f32(hd.hide_bias) - f32(hd.hide_slope) * aff + f32(hd.hide_disliked) * dis)
        v = draws.uniform(5, a_n, n, dtype=np.float32)
        hide = v[0] < p_hide
        keep = ~hide
        click = keep & (v[1] < p_click)
        repin = keep & (v[2] < p_repin)
        long_view = keep & (v[3] < p_long)
        mask = (np.uint16(Action.IMPRESSION) | click * np.uint16(Action.CLICK) | repin * np.uint16(Action.REPIN)
                | long_view * np.uint16(Action.LONG_VIEW) | hide * np.uint16(Action.HIDE))

        # Dwell: bare impressions are short; engaged views stay under the long-view threshold;
        # long views exceed it, stretched by the affinity (videos: by watch ratio).
        dur = self.duration[items]
        threshold = np.where(video, f32(dw.long_view_ratio) * dur, f32(dw.long_view_ms))
        z = draws.normal(a_n, n, dtype=np.float32)
        bare = np.minimum(f32(dw.impression_median_ms) * np.exp(f32(dw.impression_sigma) * z), threshold - 1)
        engaged = threshold * (f32(dw.engaged_min_fraction) + f32(1 - dw.engaged_min_fraction) * v[4])
        stretch = f32(dw.affinity_scale) * aff
        long_image = threshold * (f32(1) - np.log(v[4] + f32(1e-7)) * np.exp(stretch))
        long_video = dur * (f32(dw.long_view_ratio) + f32(dw.max_watch_ratio - dw.long_view_ratio)
                            * _sigmoid(stretch + z))
        dwell = np.where(long_view, np.ceil(np.where(video, long_video, long_image)),
                         np.floor(np.where(click | repin, engaged, bare)))
        dwell = np.clip(dwell, 0, dw.max_dwell_ms)
        keep_f = f32(1) - p_hide
        probs = np.stack([p_click * keep_f, p_repin * keep_f, p_long * keep_f, p_hide])
        return Feedback(mask=mask, dwell=dwell, probs=probs, positive=click | repin | long_view)

    def record(self, u: np.ndarray, items: np.ndarray, positive: np.ndarray) -> None:
        """Feed the positive engagements back into the users' state (see :meth:`Engagement.record`)."""
        self.state.record(u, items, positive, self.item_topic)


def simulate_requests(cfg: WorldConfig, cat: Catalog, pop: Population, noise_key: np.uint64,
                      rng: np.random.Generator) -> Responses:
    """Serve every scheduled request of a chunk and sample the responses.

    Args:
        cfg: the world configuration.
        cat: the catalogue.
        pop: the chunk's users (interests and schedule).
        noise_key: key of the persistent user-item noise.
        rng: the chunk's random stream.
    """
    sch = pop.schedule
    n = cfg.retrieval.items_per_request
    n_users = sch.n_requests.size
    n_topics = cat.centroids.shape[0]

    # Rank users by request count: round r's active users are ranks [0, active[r]).
    rank_user = np.argsort(-sch.n_requests, kind="stable")
    count_desc = sch.n_requests[rank_user]
    n_rounds = int(count_desc[0]) if n_users else 0
    active = n_users - np.searchsorted(count_desc[::-1], np.arange(n_rounds), side="right")
    round_start = np.r_[0, np.cumsum(active)[:-1]].astype(np.int64)
    n_req = int(active.sum())
    rounds = np.repeat(np.arange(n_rounds), active)
    rank = np.arange(n_req) - np.repeat(round_start, active)
    user_first = np.r_[0, np.cumsum(sch.n_requests)[:-1]]
    rm_to_um = user_first[rank_user[rank]] + rounds  # round-major -> user-major request index
    surface = sch.surface[rm_to_um]
    focus = sch.focus[rm_to_um].astype(np.int64)
    period = sch.period[rm_to_um].astype(np.int64)

    tastes = Tastes.build(pop.interests, pop.user_ids, pop.bias, rank_user, n_topics)
    loop = RequestLoop(cfg, cat, tastes, Engagement.empty(cfg, n_users, n_topics), noise_key)
    draws = StreamDraws(rng)

    out_item = np.empty(n_req * n, dtype=np.int64)
    out_mask = np.empty(n_req * n, dtype=np.uint16)
    out_dwell = np.empty(n_req * n, dtype=np.int32)
    out_p = np.empty((4, n_req * n), dtype=np.float32)
    source_counts = np.zeros(len(SOURCE_LABELS), dtype=np.int64)

    for r in range(n_rounds):
        a_n = int(active[r])
        q0 = int(round_start[r])
        sl = slice(q0, q0 + a_n)
        u = np.arange(a_n)
        surf, foc, per = surface[sl], focus[sl], period[sl]
        items, src = loop.retrieve(u, surf, foc, per, draws)
        source_counts += np.bincount(src.ravel(), minlength=len(SOURCE_LABELS))
        fb = loop.respond(u, items, surf, foc, per, draws)

        o = slice(q0 * n, (q0 + a_n) * n)
        out_item[o] = items.ravel()
        out_mask[o] = fb.mask.ravel()
        out_dwell[o] = fb.dwell.ravel()
        out_p[:, o] = fb.probs.reshape(4, -1)
        loop.record(u, items, fb.positive)

    um_to_rm = np.empty(n_req, dtype=np.int64)
    um_to_rm[rm_to_um] = np.arange(n_req)
    gather = (um_to_rm[:, None] * n + np.arange(n)).ravel()
    return Responses(item=out_item[gather], action_mask=out_mask[gather], dwell_ms=out_dwell[gather],
                     probs=out_p[:, gather], source_counts=source_counts)
