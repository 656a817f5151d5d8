"""The interactive world: run a simulated world forward, day by day, with feeds ranked by a policy.

The offline simulator decides every feed itself (the retrieval mix, ordered by item id). Here
the same users continue from the world's end (or from a cutoff day) with the same retrieval,
affinity and responses (:class:`~lifelong.data.world.requests.RequestLoop`, the offline code
itself), but each request's candidates are *ranked by a policy*, the user examines the feed
top-down under a position-bias model and acts only on what they examined, and sessions go on
or stop with the user's satisfaction. See docs/world.md, "Interactive mode".

- **Policy**: a callable taking a batch of :class:`FeedRequest` (user id, request time,
  surface, candidate item ids) and returning, per request, the candidates' item ids in the
  order shown, or None when it could not rank it (the request then fails: nothing is shown and
  the session ends; :class:`DayOutcome` counts it).
- **Examination** (``interactive.exam_*``): the user stops scrolling at a random depth; position
  ``k`` is examined with probability ``exam[k]``. Only examined items are logged (as events)
  and can be clicked, repinned, long-viewed or hidden, with the oracle's true probabilities.
- **Continuation** (``interactive.continue_*``): after a request the session continues with
  probability ``sigmoid(bias + engagement * positives - hide * hides)``; sessions start as in
  the offline world (``sessions.per_day`` times the user's activity, Poisson per day).
- **Feedback**: positive engagements update the user's recent-engagement state exactly as the
  offline loop does, so they steer later retrieval.
- **Common random numbers**: every draw is keyed by (seeds, user, day, request index, purpose),
  never taken from a shared stream. Two worlds given the same policy outputs produce identical
  outcomes per user; two policies differ only through what they rank.
- **Windows of time**: a day runs in rounds of requests (one policy call per round). By default a
  round holds every user's next request of the day, whatever its time. With ``window_ms`` a
  round holds only requests inside the current window of simulated time, and after each window
  its events go to the sink and a callback runs: a trainer can learn from minute 10's feedback
  and push before minute 11 is ranked. A user's state is their own, so the windows change only
  what the policy sees together and when; a fixed policy gives the same outcomes either way.

Example::

    >>> import tempfile
    >>> from lifelong.data.world import load_config, simulate, write_world
    >>> d = write_world(simulate(load_config("tiny")), tempfile.mkdtemp() + "/w")
    >>> source = open_world(d, days=1)
    >>> world = source.world(source.user_ids[:10], seed=0)
    >>> out = world.step(oracle_policy())
    >>> out.events.num_rows > 0, int(out.requests.sum()) > 0
    (True, True)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lifelong.core.config import build
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.metrics import DEFAULT_HEAD_WEIGHTS, final_score
from lifelong.data.io import read_meta, read_table
from lifelong.data.protocol import DAY_MS
from lifelong.data.schema import EVENTS_SCHEMA, HEADS, POSITIVE_BITS, SURFACES, Action
from lifelong.data.world.config import FOCUS_KINDS, SIM_SURFACES, WorldConfig, validate
from lifelong.data.world.population import FOCUS_LONG_TERM, FOCUS_NEXT, FOCUS_TRENDING, MIN_REQUEST_GAP_MS, Interests
from lifelong.data.world.requests import Engagement, RequestLoop, RowDraws, Tastes
from lifelong.data.world.simulate import chunk_population, world_draws

__all__ = [
    "DayOutcome", "FeedRequest", "InteractiveWorld", "Policy", "REQUEST_ID_BASE", "Sink", "WorldSource",
    "examination_probs", "identity_policy", "open_world", "oracle_policy", "random_policy",
]

REQUEST_ID_BASE = 1 << 62
"""Interactive request ids are ``REQUEST_ID_BASE | day << 40 | user << 12 | k`` (k: the user's
k-th request of the day): above every offline id, and equal in every arm for the same request."""
_MAX_DAY_REQUESTS = (1 << 12) - 1
_MAX_USER = 1 << 28

# Purposes of the keyed generators (part of the key, so streams never overlap).
_SESSIONS, _RETRIEVE, _RESPOND, _BEHAVE, _TRENDING, _RANDOM_POLICY = range(6)


@dataclass(frozen=True)
class FeedRequest:
    """One request to rank.

    Args:
        user_id: the user.
        request_time: epoch milliseconds.
        surface: ``homefeed``, ``search`` or ``related``.
        candidates: (n,) item ids of the retrieval mix, sorted by id.
        request_id: the events' ``request_id`` (the same in every arm for the same request).
        oracle: (4, n) the true probabilities of click, repin, long view and hide of each
            candidate (as ``oracle.parquet`` stores them); for built-in policies only.
    """

    user_id: int
    request_time: int
    surface: str
    candidates: np.ndarray
    request_id: int
    oracle: np.ndarray


Policy = Callable[[Sequence[FeedRequest]], Sequence[np.ndarray | None]]
"""Ranks a batch of requests: per request the candidates in the order shown, or None (failed)."""

Sink = Callable[[pa.Table], None]
"""Receives the logged events (:data:`~lifelong.data.schema.EVENTS_SCHEMA`, in time order) of
each day, or of each window of a day (:meth:`InteractiveWorld.step`'s ``window_ms``)."""


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def identity_policy() -> Policy:
    """Shows the candidates in retrieval order (by item id), as the offline world does."""
    return lambda requests: [r.candidates for r in requests]


def random_policy(seed: int = 0) -> Policy:
    """A uniformly random order per request, keyed by (seed, request id): the same in every arm."""
    def rank(requests: Sequence[FeedRequest]) -> list[np.ndarray]:
        return [r.candidates[_rng(seed, _RANDOM_POLICY, r.request_id).permutation(r.candidates.size)]
                for r in requests]
    return rank


def oracle_policy(weights: dict[str, float] | None = None) -> Policy:
    """Ranks by the final score on the true probabilities (``core.metrics.final_score``): the ceiling."""
    w = dict(DEFAULT_HEAD_WEIGHTS if weights is None else weights)

    def rank(requests: Sequence[FeedRequest]) -> list[np.ndarray]:
        out = []
        for r in requests:
            score = final_score({h: r.oracle[i] for i, h in enumerate(HEADS)}, w)
            out.append(r.candidates[np.argsort(-score, kind="stable")])
        return out
    return rank


def examination_probs(cfg: WorldConfig) -> np.ndarray:
    """(n,) probability that each feed position (0 = top) is examined (``interactive.exam_*``).

    Example::

        >>> from lifelong.data.world.config import PRESETS
        >>> examination_probs(PRESETS["tiny"])[:4].round(3).tolist()
        [1.0, 0.707, 0.577, 0.5]
    """
    n, ia = cfg.retrieval.items_per_request, cfg.interactive
    if ia.exam_probs:
        probs = np.zeros(n)
        m = min(n, len(ia.exam_probs))
        probs[:m] = ia.exam_probs[:m]
        return probs
    return 1.0 / (1.0 + np.arange(n)) ** ia.exam_eta


@dataclass
class DayOutcome:
    """What one interactive day produced.

    Args:
        day: the world day index (0 = the world's first day).
        events: the logged (examined) impressions with their actions and dwell, in time order.
        user_ids: (U,) the world's users, the order of the arrays below.
        requests: (U,) requests each user issued that were ranked and shown.
        failed: (U,) requests the policy failed to rank (nothing was shown).
        sessions: (U,) sessions each user opened.
    """

    day: int
    events: pa.Table
    user_ids: np.ndarray
    requests: np.ndarray
    failed: np.ndarray
    sessions: np.ndarray


def _concat_interests(parts: list[Interests]) -> Interests:
    d = max(p.disliked.shape[1] for p in parts)
    disliked = [np.pad(p.disliked, ((0, 0), (0, d - p.disliked.shape[1])), constant_values=-1) for p in parts]
    return Interests(boundaries=parts[0].boundaries, topic=np.concatenate([p.topic for p in parts]),
                     weight=np.concatenate([p.weight for p in parts]),
                     affinity_weight=np.concatenate([p.affinity_weight for p in parts]),
                     disliked=np.concatenate(disliked))


class WorldSource:
    """A simulated world opened for interactive days ``start_day .. start_day + days - 1``.

    Built by :func:`open_world`. Holds the configuration, the catalogue and every user's
    interests, bias and activity (redrawn from the world's seed, identical to the offline run,
    and continued past the world's end), and each user's engagement state at ``start_day``
    (rebuilt from ``events.parquet``). :meth:`world` makes an independent world for a subset of
    users (one per A/B arm).
    """

    def __init__(self, path: Path, cfg: WorldConfig, start_day: int, days: int):
        self.path, self.cfg, self.start_day, self.days = path, cfg, start_day, days
        self.end_day = start_day + days
        self.draws = world_draws(cfg)
        cat = self.draws.catalog
        items = read_table(path / "items.parquet", "items", columns=["item_id", "topic_id"])
        if (items.num_rows != cat.n_items
                or not np.array_equal(items.column("topic_id").to_numpy(), cat.topic)):
            raise DataError(path / "items.parquet", "does not match the catalogue its world.json config draws "
                            "(made by another version of the simulator?); simulate the world again")
        self.items = items
        pops, interests = [], []
        for c in range(len(self.draws.chunk_seqs)):
            pop, _, ext = chunk_population(cfg, self.draws, c, interest_days=self.end_day)
            pops.append(pop)
            interests.append(ext)
        self.user_ids = np.concatenate([p.user_ids for p in pops])
        self.bias = np.concatenate([p.bias for p in pops])
        self.activity = np.concatenate([p.schedule.activity for p in pops])
        self.interests = _concat_interests(interests)
        self._events: pa.Table | None = None

    @property
    def start_ms(self) -> int:
        """Epoch ms of the first interactive day's midnight."""
        return self.cfg.start_ms + self.start_day * DAY_MS

    def history(self) -> pa.Table:
        """The world's events before ``start_day`` (user, item, time, action mask), read once."""
        if self._events is None:
            import pyarrow.compute as pc

            ev = read_table(self.path / "events.parquet", "events",
                            columns=["user_id", "item_id", "ts_ms", "action_mask"])
            self._events = ev.filter(pc.less(ev.column("ts_ms"), self.start_ms))
        return self._events

    def world(self, users: np.ndarray, seed: int = 0) -> InteractiveWorld:
        """An interactive world of ``users`` (global ids), starting at ``start_day``.

        Args:
            users: the world's users (a subset of :attr:`user_ids`, any order; kept sorted).
            seed: keys every random draw with the world's seed (common random numbers: the
                same seed gives two worlds of the same users the same draws).
        """
        users = np.unique(np.asarray(users, dtype=np.int64))
        if users.size and (users[0] < 0 or users[-1] >= self.user_ids.size):
            raise ConfigError(f"users must be in 0..{self.user_ids.size - 1}")
        return InteractiveWorld(self, users, seed)


def open_world(world_dir: str | os.PathLike[str], days: int, start_day: int | None = None,
               overrides: Sequence[str] = ()) -> WorldSource:
    """Open a simulated world to run ``days`` interactive days from ``start_day``.

    Args:
        world_dir: a directory written by ``lifelong simulate`` (it must hold ``oracle.parquet``).
        days: how many days to run (at least 1).
        start_day: the first interactive day, as a day index of the world (its history is the
            world's events before it); default the day after the world's last (its end).
        overrides: ``interactive.key=value`` settings layered over the world's configuration.

    Raises:
        DataError: not a simulated world (no oracle), or its files do not match its config.
        ConfigError: an override outside ``interactive.*``, or days the world cannot simulate
            (before day 1, or more than ``interactive.horizon_days`` past its end).
    """
    path = Path(world_dir)
    meta = read_meta(path)
    if meta.get("kind") != "world" or "config" not in meta or not (path / "oracle.parquet").is_file():
        raise DataError(path, "not a simulated world with an oracle (no oracle.parquet / world.json config): "
                        "the interactive world needs a world made by `lifelong simulate`")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not key.startswith("interactive."):
            raise ConfigError(f"{key}: only interactive.* keys can be set on an existing world")
    cfg = validate(build(WorldConfig, meta["config"], list(overrides)))
    start = cfg.days if start_day is None else int(start_day)
    if not 1 <= start <= cfg.days:
        raise ConfigError(f"start day {start}: must be in 1..{cfg.days} (the world has days 0..{cfg.days - 1}; "
                          f"day {cfg.days} starts right after its end)")
    last = cfg.days + cfg.interactive.horizon_days
    if days < 1 or start + days > last:
        raise ConfigError(f"{days} days from day {start}: the world can be simulated up to day {last - 1} "
                          f"(interactive.horizon_days={cfg.interactive.horizon_days} past its end on day "
                          f"{cfg.days - 1}); ask for 1..{last - start} days")
    return WorldSource(path, cfg, start, days)


def _initial_state(source: WorldSource, users: np.ndarray, n_topics: int, item_topic: np.ndarray) -> Engagement:
    """The engagement state of ``users`` at ``source.start_day``, from the world's events.

    Events are in (user, time, item) order, which is the order the offline loop recorded the
    positive engagements in, so this is the state the offline loop had at that time.
    """
    state = Engagement.empty(source.cfg, users.size, n_topics)
    ev = source.history()
    uid = ev.column("user_id").to_numpy()
    pos = (ev.column("action_mask").to_numpy() & POSITIVE_BITS) != 0
    keep = pos & np.isin(uid, users)
    uid, item = uid[keep], ev.column("item_id").to_numpy()[keep]
    if uid.size == 0:
        return state
    row = np.searchsorted(users, uid)
    counts = np.bincount(row, minlength=users.size)
    seq = np.arange(uid.size) - np.r_[0, np.cumsum(counts)[:-1]][row]
    state.count[:] = counts
    window = state.ring.shape[1]
    newest = seq >= counts[row] - window
    state.ring[row[newest], seq[newest] % window] = item[newest]
    np.maximum.at(state.last, row * n_topics + item_topic[item], seq)
    return state


def _time_ordered(events: pa.Table) -> pa.Table:
    """Events sorted by time, then user, then the order they were logged in."""
    if not events.num_rows:
        return events
    return events.take(np.lexsort((np.arange(events.num_rows), events.column("user_id").to_numpy(),
                                   events.column("ts_ms").to_numpy())))


class InteractiveWorld:
    """Some users of a world, run forward one day at a time (made by :meth:`WorldSource.world`).

    Each :meth:`step` runs the next day: every user's sessions (drawn per (user, day)), their
    requests in rounds (round r: every user's r-th request of the day, one policy call for the
    whole round), responses, examination, continuation, and the feedback into the state.
    """

    def __init__(self, source: WorldSource, users: np.ndarray, seed: int):
        cfg, cat = source.cfg, source.draws.catalog
        if users.size and users[-1] >= _MAX_USER:
            raise ConfigError(f"interactive request ids hold user ids below {_MAX_USER}")
        self.source, self.cfg, self.users, self.seed = source, cfg, users, int(seed)
        self.day = source.start_day
        ins = source.interests
        p_lo = int(ins.period_of(np.array([source.start_day]))[0])
        p_hi = int(ins.period_of(np.array([source.end_day - 1]))[0])
        self._p_lo = p_lo
        n_topics = cat.centroids.shape[0]
        tastes = Tastes.build(ins, source.user_ids, source.bias, users, n_topics, slice(p_lo, p_hi + 1))
        state = _initial_state(source, users, n_topics, cat.topic.astype(np.int64))
        self.loop = RequestLoop(cfg, cat, tastes, state, source.draws.noise_key)
        self.activity = source.activity[users]
        self.last_focus = np.full(users.size, -1, dtype=np.int64)
        self.exam = examination_probs(cfg)
        self._key = (cfg.seed, self.seed)

    # -- per (user, day) draws -----------------------------------------------------------------

    def _trending(self, day: int) -> np.ndarray:
        tr = self.source.draws.trending
        if day < tr.shape[0]:
            return tr[day]
        cat = self.source.draws.catalog
        return _rng(*self._key, _TRENDING, day).choice(cat.topic_pop.size, tr.shape[1], p=cat.topic_pop)

    def _sessions(self, day: int, period: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per user: session start offsets in the day (sorted, ms) and each session's focus topic."""
        se, ins = self.cfg.sessions, self.source.interests
        trending = self._trending(day)
        p_focus = se.focus_shares()
        successor = self.source.draws.successor
        starts, foci = [], []
        for i, user in enumerate(self.users):
            g = _rng(*self._key, _SESSIONS, user, day)
            k = int(g.poisson(se.per_day * self.activity[i]))
            start = np.sort(g.integers(0, DAY_MS, k))
            kind = g.choice(len(FOCUS_KINDS), k, p=p_focus)
            slot_u = g.random(k)
            trend = trending[g.integers(0, trending.size, k)]
            w = ins.weight[user, period]
            cw = np.cumsum(w) / w.sum()
            slots = np.minimum((slot_u[:, None] > cw[None, :]).sum(axis=1), w.size - 1)
            long_term = ins.topic[user, period, slots].astype(np.int64)
            focus = np.empty(k, dtype=np.int64)
            prev = int(self.last_focus[i])
            for j in range(k):
                if kind[j] == FOCUS_TRENDING:
                    prev = int(trend[j])
                elif kind[j] == FOCUS_LONG_TERM or prev < 0:
                    prev = int(long_term[j])
                elif kind[j] == FOCUS_NEXT:
                    prev = int(successor[prev])
                focus[j] = prev
            if k:
                self.last_focus[i] = prev
            starts.append(start)
            foci.append(focus)
        return starts, foci

    # -- one day -------------------------------------------------------------------------------

    def step(self, policy: Policy, sink: Sink | None = None, window_ms: int | None = None,
             after_window: Callable[[int], None] | None = None) -> DayOutcome:
        """Run the next day with ``policy`` ranking every feed; ``sink`` gets the day's events.

        Args:
            policy: ranks every feed.
            sink: gets the events of each window, in time order (without ``window_ms``: the day's).
            window_ms: run the day in windows of this much simulated time (from midnight): every
                request of a window is ranked before any of the next one (docs/world.md,
                "Interactive mode"). None: the whole day is one window.
            after_window: called after each window that held a request, after ``sink``, with the
                window's end (epoch ms): e.g. train on its events and push to the policy's service.

        Raises:
            ConfigError: the day is past the range the world was opened for, or ``window_ms`` < 1.
            ValueError: the policy returned an order that is not a permutation of a request's
                candidates (a bug in the policy; a ranker that fails returns None instead).
        """
        source, cfg, loop = self.source, self.cfg, self.loop
        day = self.day
        if day >= source.end_day:
            raise ConfigError(f"day {day}: the world was opened for days {source.start_day}..{source.end_day - 1}")
        if window_ms is not None and window_ms < 1:
            raise ConfigError(f"window_ms must be at least 1, got {window_ms}")
        n_users = self.users.size
        n = cfg.retrieval.items_per_request
        ia, se = cfg.interactive, cfg.sessions
        day_start = cfg.start_ms + day * DAY_MS
        day_end = day_start + DAY_MS
        period = int(source.interests.period_of(np.array([day]))[0])
        starts, foci = self._sessions(day, period)
        surface_p = np.array([getattr(cfg.surfaces, s) for s in SIM_SURFACES])
        surface_cdf = np.cumsum(surface_p) / surface_p.sum()

        sessions = np.array([s.size for s in starts], dtype=np.int64)
        requests = np.zeros(n_users, dtype=np.int64)
        failed = np.zeros(n_users, dtype=np.int64)
        # The pending request of each user: its time, session and index in the session (-1: none).
        session = np.zeros(n_users, dtype=np.int64)
        in_session = np.zeros(n_users, dtype=np.int64)
        k_day = np.zeros(n_users, dtype=np.int64)
        when = np.full(n_users, -1, dtype=np.int64)
        for i in range(n_users):
            if sessions[i]:
                when[i] = day_start + int(starts[i][0])

        def next_session(i: int, after_ms: int) -> None:
            """Move user i to their next session starting after ``after_ms`` (or to none)."""
            j = session[i] + 1
            session[i], in_session[i] = j, 0
            t = day_start + int(starts[i][j]) if j < sessions[i] else day_end
            t = max(t, after_ms + MIN_REQUEST_GAP_MS)
            when[i] = t if (j < sessions[i] and t < day_end and k_day[i] < _MAX_DAY_REQUESTS) else -1

        width = DAY_MS if window_ms is None else int(window_ms)
        window_end = day_start + width
        parts: list[pa.Table] = []
        days_parts: list[pa.Table] = []

        def close_window() -> None:
            if not parts:
                return
            events = _time_ordered(pa.concat_tables(parts))
            days_parts.append(events)
            parts.clear()
            if sink is not None:
                sink(events)
            if after_window is not None:
                after_window(min(window_end, day_end))

        while True:
            pending = when >= 0
            if not pending.any():
                break
            u = np.flatnonzero(pending & (when < window_end))
            if u.size == 0:  # the window is done: publish it, then jump to the next one that has a request
                close_window()
                first = int(when[pending].min())
                window_end = day_start + ((first - day_start) // width + 1) * width
                continue
            users = self.users[u]
            ts_ms = when[u].copy()
            rid = (REQUEST_ID_BASE | (day << 40)) + (users << 12) + k_day[u]
            behave = [_rng(*self._key, _BEHAVE, user, day, k) for user, k in zip(users, k_day[u])]
            b = np.array([g.random(3) for g in behave])  # surface, depth, continuation
            gap = np.array([g.exponential(se.request_gap_s * 1000.0) for g in behave])
            surf = np.minimum(np.searchsorted(surface_cdf, b[:, 0], side="right"), len(SIM_SURFACES) - 1).astype(np.int8)
            foc = np.array([foci[i][session[i]] for i in u], dtype=np.int64)
            per = np.full(u.size, period - self._p_lo, dtype=np.int64)
            keys = list(zip(users, k_day[u]))
            items, _ = loop.retrieve(u, surf, foc, per, RowDraws([_rng(*self._key, _RETRIEVE, us, day, k)
                                                                 for us, k in keys]))
            fb = loop.respond(u, items, surf, foc, per, RowDraws([_rng(*self._key, _RESPOND, us, day, k)
                                                                 for us, k in keys]))
            batch = [FeedRequest(user_id=int(users[r]), request_time=int(ts_ms[r]), surface=SURFACES[surf[r]],
                                 candidates=items[r], request_id=int(rid[r]), oracle=fb.probs[:, r])
                     for r in range(u.size)]
            orders = list(policy(batch))
            if len(orders) != len(batch):
                raise ValueError(f"the policy returned {len(orders)} orders for {len(batch)} requests")
            ok = np.array([o is not None for o in orders], dtype=bool)
            perm = np.tile(np.arange(n), (u.size, 1))
            for r in np.flatnonzero(ok):
                order = np.asarray(orders[r], dtype=np.int64)
                pos = np.searchsorted(items[r], order)
                if (order.size != n or (pos >= n).any() or not np.array_equal(items[r][np.minimum(pos, n - 1)], order)
                        or np.unique(pos).size != n):
                    raise ValueError(f"request {int(rid[r])}: the policy's order is not a permutation of its "
                                     f"{n} candidates")
                perm[r] = pos
            shown = np.take_along_axis(items, perm, axis=1)
            mask = np.take_along_axis(fb.mask, perm, axis=1)
            dwell = np.take_along_axis(fb.dwell, perm, axis=1)
            positive = np.take_along_axis(fb.positive, perm, axis=1)
            examined = (b[:, 1:2] < self.exam[None, :]) & ok[:, None]
            engaged = positive & examined
            hides = examined & ((mask & np.uint16(Action.HIDE)) != 0)
            loop.record(u[ok], shown[ok], engaged[ok])
            er, ec = np.nonzero(examined)
            parts.append(pa.Table.from_arrays(
                [pa.array(users[er]), pa.array(shown[er, ec]), pa.array(ts_ms[er]), pa.array(surf[er]),
                 pa.array(mask[er, ec]), pa.array(dwell[er, ec].astype(np.int32)), pa.array(rid[er])],
                schema=EVENTS_SCHEMA))

            requests[u[ok]] += 1
            failed[u[~ok]] += 1
            k_day[u] += 1
            logit = ia.continue_bias + ia.continue_engagement * engaged.sum(axis=1) - ia.continue_hide * hides.sum(axis=1)
            go_on = ok & (b[:, 2] < 1.0 / (1.0 + np.exp(-logit))) & (in_session[u] + 1 < ia.max_session_requests)
            for r, i in enumerate(u):
                if go_on[r]:
                    t = int(ts_ms[r]) + max(MIN_REQUEST_GAP_MS, int(gap[r]))
                    in_session[i] += 1
                    when[i] = t if (t < day_end and k_day[i] < _MAX_DAY_REQUESTS) else -1
                else:
                    next_session(i, int(ts_ms[r]))

        close_window()
        events = pa.concat_tables(days_parts) if days_parts else EVENTS_SCHEMA.empty_table()
        self.day += 1
        if sink is not None and not days_parts:
            sink(events)  # a day without a request still reaches the sink, empty
        return DayOutcome(day=day, events=events, user_ids=self.users.copy(), requests=requests, failed=failed,
                          sessions=sessions)

    def run(self, policy: Policy, days: int | None = None, sink: Sink | None = None) -> list[DayOutcome]:
        """Run ``days`` days (default: every day left in the opened range)."""
        left = self.source.end_day - self.day
        return [self.step(policy, sink) for _ in range(left if days is None else days)]

