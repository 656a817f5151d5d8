"""``lifelong abtest``: an online A/B test of rankers in the interactive world (docs/abtest.md).

Two designs (docs/abtest.md, "Designs: split and paired"):

- ``paired`` (the default): every arm serves the **same** users (all of the world's, or the
  ``--users-per-arm`` of lowest hash), each arm in its own copy of the interactive world with the
  same seed, so a user's outcomes in two arms differ only through what the arms showed (common
  random numbers) and the comparison is paired per user: a joint user-level bootstrap;
- ``split``: the users are split into disjoint arms by a seeded hash of the user id, as a real
  A/B test does; the bootstrap resamples each arm on its own.

Every arm runs its own :class:`~lifelong.data.world.interactive.InteractiveWorld` over its users,
day by day, with its policy ranking every feed: a served run (through its real ``POST /rank``),
a running service, ``random`` or ``oracle``. Each day's events go to an event stream when
``--stream`` is given; with ``--store`` too, the real-time consumer
(:class:`~lifelong.store.realtime.RealtimeConsumer`) appends them to the served feature store
between days, so the next day's requests see them. In the paired design the same user acts in
every arm, so each arm has its own stream (``STREAM-NAME``) and each served run arm its own copy of
the store (``STORE-NAME``, an LMDB directory copied at the start) and its own consumer. The report
compares every arm with the first one (the baseline) per day and over the whole test
(:mod:`lifelong.loop.metrics`).

With ``--window-minutes M`` each day runs in windows of M simulated minutes instead of one: after
each window its events go to the stream, the consumer appends them to the store, and every
**online arm** (``online:RUN``) trains on them and pushes to its service, all before the next
window is ranked (docs/abtest.md, "Online arms").
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lifelong.core.errors import ConfigError
from lifelong.core.progress import progress
from lifelong.core.report import Column, Figure, Report, Table, pyplot
from lifelong.data.world.interactive import DayOutcome, Policy, open_world
from lifelong.loop import metrics as M
from lifelong.loop.policies import (
    BUILTIN,
    ONLINE,
    ORACLE,
    RANDOM,
    SERVED,
    ArmSpec,
    HttpPolicy,
    Learner,
    LearnerFactory,
    LearnerSpec,
    ServedArm,
    builtin_policy,
    parse_arm,
    reads_user_tokens,
    start_service,
)

__all__ = ["AbTest", "DESIGNS", "PAIRED", "SPLIT", "assign_arms", "paired_users", "run_abtest"]

PAIRED, SPLIT = "paired", "split"
DESIGNS = (PAIRED, SPLIT)
COPY_MARK = ".abtest-copy"
"""A file in every per-arm store copy: a directory without it is never overwritten."""

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
LABELS = {"repin_volume": "repins / user", "hide_volume": "hides / user", "click_volume": "clicks / user",
          "impression_diversity": "topics / user-day", "time_spent": "minutes / user",
          "requests_per_user": "requests / user"}


def _hash(seed: int, users: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, user): a seeded, well-mixed 64-bit hash per user id."""
    with np.errstate(over="ignore"):
        x = users.astype(np.uint64) + np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def assign_arms(users: np.ndarray, n_arms: int, seed: int, per_arm: int | None = None) -> list[np.ndarray]:
    """Split ``users`` into ``n_arms`` by a seeded hash of the user id; keep ``per_arm`` per arm.

    An arm keeps its users of the lowest secondary hash, so a smaller test is a subset of a larger
    one. Returns each arm's users, sorted.

    Example::

        >>> [a.size for a in assign_arms(np.arange(1000), 2, seed=0)]
        [481, 519]
    """
    h = _hash(seed, np.asarray(users))
    arm = (h % np.uint64(n_arms)).astype(np.int64)
    rank = h // np.uint64(n_arms)
    out = []
    for a in range(n_arms):
        mine = np.flatnonzero(arm == a)
        mine = mine[np.argsort(rank[mine], kind="stable")][:per_arm]
        out.append(np.sort(np.asarray(users)[mine]))
    return out


def paired_users(users: np.ndarray, seed: int, per_arm: int | None = None) -> np.ndarray:
    """The users every arm of a paired test serves: all of ``users``, or the ``per_arm`` of
    lowest hash (the order of :func:`assign_arms`' secondary hash), sorted.

    Example::

        >>> paired_users(np.arange(1000), seed=0).size, paired_users(np.arange(1000), seed=0, per_arm=5).size
        (1000, 5)
    """
    users = np.asarray(users)
    keep = np.argsort(_hash(seed, users), kind="stable")[:per_arm]
    return np.sort(users[keep])


@dataclass
class Arm:
    """One arm while the test runs."""

    spec: ArmSpec
    users: np.ndarray
    policy: Policy
    http: HttpPolicy | None = None
    served: ServedArm | None = None
    outcomes: list[DayOutcome] = field(default_factory=list)
    seconds: float = 0.0
    stream: str | None = None
    store: str | None = None
    sink: Callable[[Any], None] | None = None
    catch_ups: list[tuple[str | None, Callable[[], dict]]] = field(default_factory=list)
    learner: Learner | None = None

    def failed(self) -> int:
        return int(sum(o.failed.sum() for o in self.outcomes))

    def describe(self) -> dict[str, Any]:
        requests = int(sum(o.requests.sum() for o in self.outcomes))
        info: dict[str, Any] = {"spec": self.spec.target, "kind": self.spec.kind, "users": int(self.users.size),
                                "requests": requests, "requests_failed": self.failed(),
                                "sessions": int(sum(o.sessions.sum() for o in self.outcomes)),
                                "impressions": int(sum(o.events.num_rows for o in self.outcomes)),
                                "seconds": round(self.seconds, 2)}
        if self.stream is not None:
            info["stream"] = self.stream
        if self.store is not None:
            info["store"] = self.store
        if self.http is not None:
            info["service"] = {"url": self.http.url, **self.http.stats.to_dict()}
        if self.learner is not None:
            info["learner"] = self.learner.describe()
        info["complete"] = info["requests_failed"] == 0 and (self.http is None or self.http.stats.dead is None)
        return info


@dataclass
class AbTest:
    """The settings of ``lifelong abtest`` (see :func:`run_abtest`)."""

    world: Path
    arms: Sequence[str]
    days: int
    out: Path
    users_per_arm: int | None = None
    stream: str | None = None
    store: str | None = None
    follow: bool = True
    seed: int = 0
    start_day: int | None = None
    overrides: Sequence[str] = ()
    workers: int = 8
    n_boot: int = 1000
    design: str = PAIRED
    window_minutes: float | None = None
    user_emb: str | None = None
    learner: LearnerFactory | None = None


def _arm_stream(url: str, name: str) -> str:
    """Arm ``name``'s own event stream in a paired test: ``PATH-NAME``, or the Redis key ``KEY-NAME``."""
    from lifelong.store.stream import DEFAULT_KEY
    from lifelong.store.urls import EVENT_STREAM, parse_url

    parsed = parse_url(url, EVENT_STREAM)
    if parsed.scheme == "redis":
        return f"{parsed.location}?key={parsed.params.get('key', DEFAULT_KEY)}-{name}"
    return f"{parsed.location}-{name}"


def _store_copies(store: str, names: Sequence[str]) -> dict[str, tuple[Path, Path]]:
    """Where each served run arm's copy of the LMDB store goes: ``STORE-NAME`` next to it.

    Raises:
        ConfigError: a Redis store (one clear line: it cannot be copied), a store directory that
            does not exist, or a destination that exists and is not an earlier copy.
    """
    from lifelong.store.urls import FEATURE_STORE, parse_url

    parsed = parse_url(store, FEATURE_STORE)
    if parsed.scheme == "redis":
        raise ConfigError(f"--design paired gives each served arm its own copy of the store, and a Redis store "
                          f"({store}) cannot be copied: use an LMDB store, --no-follow, or --design split")
    src = Path(parsed.location)
    if not src.is_dir():
        raise ConfigError(f"feature store {store}: no such directory")
    out = {}
    for name in names:
        dst = Path(f"{src}-{name}")
        if dst.exists() and not (dst / COPY_MARK).exists():
            raise ConfigError(f"--design paired copies the store to {dst} for arm {name}, which exists and is not "
                              "an earlier copy: move it away")
        out[name] = (src, dst)
    return out


def _copy_store(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock.mdb"))
    (dst / COPY_MARK).write_text(f"a copy of {src} made by lifelong abtest --design paired; replaced on the next run\n")


def _publisher(url: str) -> tuple[Callable[[Any], None], Callable[[], None]]:
    from lifelong.store.stream import open_stream, to_records

    stream = open_stream(url)
    return (lambda events: stream.append(to_records(events)) if events.num_rows else None), stream.close


def _follower(store: str, stream: str) -> tuple[Callable[[], dict], Callable[[], None]]:
    """The real-time consumer, run to catch-up between days: appends the stream to the store."""
    from lifelong.store.realtime import RealtimeConsumer

    consumer = RealtimeConsumer(store, stream)
    if consumer.state() is not None:
        # Its served version already holds a follower's appends (an earlier test's, or another
        # stream's): this test's users would read events it never showed them.
        consumer.close()
        raise ConfigError(f"{store} already holds real-time appends from a stream; reload it for a new test "
                          "(lifelong store load --data ROWS --store URL)")

    def catch_up() -> dict:
        done = consumer.run_until_caught_up()
        return {"events": int(sum(s.events for s in done)), "explicit": int(sum(s.explicit for s in done)),
                "impressions": int(sum(s.impressions for s in done)), "version": done[-1].version if done else None}

    return catch_up, consumer.close


def _after_window(arm: Arm, day: int, followed: dict[tuple[str | None, int], dict]) -> Callable[[int], None] | None:
    """What runs after each window of ``arm``'s day: its consumers append the window's events
    to its store (summed per day into ``followed``), then its learner trains and pushes."""
    if not arm.catch_ups and arm.learner is None:
        return None

    def after_window(_end_ms: int) -> None:
        for name, catch_up in arm.catch_ups:
            done = catch_up()
            entry = followed.setdefault((name, day), {"day": day, **({"arm": name} if name else {}), "events": 0,
                                                      "explicit": 0, "impressions": 0, "version": None})
            for key in ("events", "explicit", "impressions"):
                entry[key] += done[key]
            if done["version"] is not None:
                entry["version"] = done["version"]
        if arm.learner is not None:
            arm.learner.learn()

    return after_window


def run_abtest(test: AbTest, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run the A/B test and write its report (``report.json``, ``report.md``, ``report.png``).

    Raises:
        ConfigError: fewer than two arms, a repeated name, an unknown SPEC, a run arm without
            ``--store``, an online arm without a paired, followed test or a learner, days the
            world cannot simulate, a service that does not start.
        DataError: not a simulated world with an oracle.
    """
    specs = [parse_arm(a) for a in test.arms]
    if len(specs) < 2:
        raise ConfigError("an A/B test needs at least two --arm NAME=SPEC (the first is the baseline)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"arm names must differ: {', '.join(names)}")
    if test.design not in DESIGNS:
        raise ConfigError(f"--design must be one of {', '.join(DESIGNS)}, got {test.design!r}")
    paired = test.design == PAIRED
    if test.users_per_arm is not None and test.users_per_arm < 1:
        raise ConfigError(f"--users-per-arm must be at least 1, got {test.users_per_arm}")
    if test.store is None and any(s.kind in SERVED for s in specs):
        run_arm = next(s.name for s in specs if s.kind in SERVED)
        raise ConfigError(f"arm {run_arm} serves a run: give --store URL, a feature store loaded from this world's "
                          "rows (lifelong store load --data ROWS --store URL)")
    if test.window_minutes is not None and not 0 < test.window_minutes <= 24 * 60:
        raise ConfigError(f"--window-minutes must be in (0, 1440], got {test.window_minutes}")
    # Paired: the same users act in every arm, so each arm gets its own stream and, when the
    # consumer follows, each served run arm its own copy of the store.
    follow = test.stream is not None and test.store is not None and test.follow
    online = [s.name for s in specs if s.kind == ONLINE]
    if online:
        if not (paired and follow):
            raise ConfigError(f"arm {online[0]} learns online from its own users' events: it needs --design paired, "
                              "--stream and --store with --follow (its stream and its copy of the store)")
        if test.learner is None:
            raise ConfigError(f"arm {online[0]} learns online, and nothing was given to train it with")
    copies = (_store_copies(test.store, [s.name for s in specs if s.kind in SERVED])
              if paired and follow and any(s.kind in SERVED for s in specs) else {})
    source = open_world(test.world, test.days, test.start_day, test.overrides)
    if paired:
        splits = [paired_users(source.user_ids, test.seed, test.users_per_arm)] * len(specs)
    else:
        splits = assign_arms(source.user_ids, len(specs), test.seed, test.users_per_arm)
    item_topic = np.zeros(int(source.items.column("item_id").to_numpy().max()) + 1, dtype=np.int64)
    item_topic[source.items.column("item_id").to_numpy()] = source.items.column("topic_id").to_numpy()
    out = Path(test.out)
    out.mkdir(parents=True, exist_ok=True)

    arms: list[Arm] = []
    closers: list[Callable[[], None]] = []
    started = time.perf_counter()
    follow_log: list[dict] = []
    try:
        for name, (src, dst) in copies.items():
            log(f"copying the store {src} to {dst} for arm {name}")
            _copy_store(src, dst)
        for spec, users in zip(specs, splits):
            stream = test.stream if test.stream is None or not paired else _arm_stream(test.stream, spec.name)
            store = str(copies[spec.name][1]) if spec.name in copies else (test.store if spec.kind in SERVED else None)
            if spec.kind in BUILTIN:
                arms.append(Arm(spec, users, builtin_policy(spec.kind, test.seed), stream=stream))
                continue
            served = None
            url = spec.target
            if spec.kind in SERVED:
                extra = (["--accept-sync"] if spec.kind == ONLINE else []) + (
                    ["--user-emb", test.user_emb] if test.user_emb and reads_user_tokens(spec.target) else [])
                log(f"starting `lifelong serve --run {spec.target} --store {store} {' '.join(extra)}` "
                    f"for arm {spec.name}")
                served = start_service(spec.target, store, out / f"serve-{spec.name}.log", extra=extra)
                closers.append(served.stop)
                url = served.url
            http = HttpPolicy(url, workers=test.workers, proc=served.proc if served else None)
            closers.append(http.close)
            arm = Arm(spec, users, http, http=http, served=served, stream=stream, store=store)
            if spec.kind == ONLINE:
                ckpt = out / f"online-{spec.name}"
                if ckpt.exists():  # an earlier test's: this one starts from the run, as its service does
                    shutil.rmtree(ckpt)
                arm.learner = test.learner(LearnerSpec(
                    run=spec.target, store=store, stream=stream, serve=url, ckpt_dir=ckpt,
                    user_emb=test.user_emb if reads_user_tokens(spec.target) else None))
                closers.append(arm.learner.close)
            arms.append(arm)
        worlds = [source.world(arm.users, seed=test.seed) for arm in arms]
        if test.stream is not None and not paired:
            sink, close = _publisher(test.stream)
            closers.append(close)
            for arm in arms:
                arm.sink = sink
            if follow:  # one consumer of the shared stream, run after every arm's window
                catch_up, close = _follower(test.store, test.stream)
                closers.append(close)
                for arm in arms:
                    arm.catch_ups.append((None, catch_up))
        elif test.stream is not None:
            for arm in arms:
                arm.sink, close = _publisher(arm.stream)
                closers.append(close)
                if follow and arm.spec.kind in SERVED:
                    catch_up, close = _follower(arm.store, arm.stream)
                    closers.append(close)
                    arm.catch_ups.append((arm.spec.name, catch_up))
        window_ms = None if test.window_minutes is None else max(1, round(test.window_minutes * 60_000))
        followed: dict[tuple[str | None, int], dict] = {}
        with progress("abtest days", total=test.days) as advance:
            for d in range(test.days):
                day = source.start_day + d
                for arm, world in zip(arms, worlds):
                    t0 = time.perf_counter()
                    hook = _after_window(arm, day, followed)
                    arm.outcomes.append(world.step(arm.policy, arm.sink, window_ms, hook))
                    arm.seconds += time.perf_counter() - t0
                log(f"day {source.start_day + d}: " + ", ".join(
                    f"{a.spec.name} {int(a.outcomes[-1].requests.sum()):,} requests"
                    + (f" ({int(a.outcomes[-1].failed.sum()):,} failed)" if a.outcomes[-1].failed.sum() else "")
                    for a in arms))
                advance(1)
        follow_log = list(followed.values())
    finally:
        for close in reversed(closers):
            close()

    data = _summarize(test, source, arms, item_topic, follow_log, time.perf_counter() - started, paired)
    _report(data).write(out)
    return data


def _summarize(test: AbTest, source, arms: list[Arm], item_topic: np.ndarray, follow_log: list[dict],
               seconds: float, paired: bool) -> dict[str, Any]:
    totals = [M.arm_totals(a.outcomes, item_topic) for a in arms]
    vals = [M.values(t) for t in totals]
    base = arms[0].spec.name
    days = list(range(source.start_day, source.start_day + test.days))
    data: dict[str, Any] = {
        "world": str(test.world), "design": test.design, "baseline": base, "arm_names": [a.spec.name for a in arms], "seed": test.seed,
        "days": days,
        "users_per_arm": test.users_per_arm, "stream": test.stream, "store": test.store,
        "window_minutes": test.window_minutes, "user_emb": test.user_emb,
        "followed": follow_log, "interactive": dataclasses.asdict(source.cfg.interactive),
        "metrics": list(M.METRICS), "bootstrap": {"resamples": test.n_boot, "level": 0.95, "unit": "user",
                                                       "resampling": "joint" if paired else "per arm"},
        "seconds": round(seconds, 2), "arms": {},
    }
    by_kind = {a.spec.kind: v for a, v in zip(arms, vals)}
    for i, (arm, total, v) in enumerate(zip(arms, totals, vals)):
        entry = arm.describe()
        for m in M.METRICS:
            entry[m] = v[m]["total"]
        entry["daily"] = [{"day": day, **{m: v[m]["daily"][j] for m in M.METRICS}} for j, day in enumerate(days)]
        if i > 0:
            delta = M.relative_delta(total, totals[0], n_boot=test.n_boot, seed=test.seed, paired=paired)
            entry["delta"] = {m: delta[m][-1] for m in M.METRICS}
            entry["daily_delta"] = [{"day": day, **{m: delta[m][j] for m in M.METRICS}} for j, day in enumerate(days)]
        if RANDOM in by_kind and ORACLE in by_kind:
            flat = {m: v[m]["total"] for m in M.METRICS}
            entry["oracle_lift_fraction"] = M.oracle_lift(
                flat, {m: by_kind[RANDOM][m]["total"] for m in M.METRICS},
                {m: by_kind[ORACLE][m]["total"] for m in M.METRICS})
        data["arms"][arm.spec.name] = entry
    return data


def _delta_cell(d: dict | None) -> str:
    if d is None or d.get("rel") is None:
        return ""
    lo, hi = d["ci"]
    star = "" if d["significant"] else "*"
    return f"{d['rel']:+.1%}{star} [{lo:+.1%}, {hi:+.1%}]"


def _report(data: dict[str, Any]) -> Report:
    names = data["arm_names"]
    rows = []
    for name in names:
        a = data["arms"][name]
        rows.append({"arm": name + (" (baseline)" if name == data["baseline"] else ""), "spec": a["spec"],
                     "users": a["users"], "requests": a["requests"], "failed": a["requests_failed"],
                     "complete": "yes" if a["complete"] else "**no (incomplete)**",
                     **{m: a[m] for m in M.METRICS}})
    values = Table([Column("arm", "arm"), Column("spec", "spec"), Column("users", "users", "{:,}", right=True),
                    Column("requests", "requests", "{:,}", right=True), Column("failed", "failed", "{:,}", right=True),
                    Column("complete", "complete")]
                   + [Column(LABELS[m], m, "{:.4g}", right=True) for m in M.METRICS], rows)
    deltas = Table([Column("arm", "arm")] + [Column(m.replace("_", " "), m, _delta_cell) for m in M.METRICS],
                   [{"arm": n, **data["arms"][n]["delta"]} for n in names[1:]])
    daily_rows = []
    for n in names[1:]:
        for d in data["arms"][n]["daily_delta"]:
            daily_rows.append({"arm": n, "day": d["day"], **{m: d[m] for m in M.METRICS}})
    daily = Table([Column("arm", "arm"), Column("day", "day", right=True)]
                  + [Column(m.replace("_", " "), m, _delta_cell) for m in M.METRICS], daily_rows)
    paired = data["design"] == PAIRED
    users = ("**paired design**: every arm serves the same users, each arm in its own copy of the world with the same "
             "seed (common random numbers), so outcomes are paired per user" if paired else
             "**split design**: users split into disjoint arms by a seeded hash of the user id")
    boot = ("users resampled jointly for both arms" if paired else "each arm's users resampled on their own")
    blocks: list[str | Table] = [
        f"World `{data['world']}`, days {data['days'][0]}..{data['days'][-1]}, seed {data['seed']}; {users}; "
        f"baseline **{data['baseline']}**. Volumes and time spent are per user of "
        "the arm, impression diversity is distinct topics shown per active user-day (docs/abtest.md).",
        values,
        f"Relative difference to {data['baseline']} over the whole test, with the 95% confidence interval of a "
        f"user-level bootstrap ({data['bootstrap']['resamples']} resamples, {boot}); * marks a difference that is "
        "not significant (the interval includes 0).",
        deltas,
    ]
    incomplete = [n for n in names if not data["arms"][n]["complete"]]
    if incomplete:
        blocks.append("**Incomplete arms**: " + "; ".join(
            f"{n}: {data['arms'][n]['requests_failed']:,} requests failed"
            + (f" ({data['arms'][n]['service']['dead']})" if data["arms"][n].get("service", {}).get("dead") else "")
            for n in incomplete) + ". Their metrics count the failed requests as feeds never shown.")
    lift = [n for n in names if "oracle_lift_fraction" in data["arms"][n]]
    if lift:
        blocks.append("Fraction of the oracle's online lift over random, `(arm - random) / (oracle - random)`:")
        blocks.append(Table([Column("arm", "arm")] + [Column(m.replace("_", " "), m, "{:.3f}", right=True)
                                                      for m in M.LIFT_METRICS],
                            [{"arm": n, **{k: v for k, v in data["arms"][n]["oracle_lift_fraction"].items()
                                           if v is not None}} for n in lift]))
    learners = [n for n in names if "learner" in data["arms"][n]]
    if learners:
        window = data.get("window_minutes")
        blocks.append(f"Online arms: after each window of {'a day' if window is None else f'{window:g} simulated minutes'}, "
                      "the arm's learner trained on the window's joined events and pushed its parameters to the arm's "
                      "service before the next window was ranked.")
        blocks.append(Table([Column("arm", "arm"), Column("events", "events", "{:,}", right=True),
                             Column("examples trained", "examples", "{:,}", right=True),
                             Column("pushes applied", "pushes_applied", "{:,}", right=True),
                             Column("pushes", "pushes", "{:,}", right=True),
                             Column("KiB / push", "mean_push_kib", "{:,.1f}", right=True),
                             Column("ms / push", "mean_push_ms", "{:,.1f}", right=True)],
                            [{"arm": n, **data["arms"][n]["learner"]} for n in learners]))
    blocks += ["Per day:", daily]
    if data["followed"]:
        between = "days" if data.get("window_minutes") is None else f"windows of {data['window_minutes']:g} minutes"
        blocks.append(f"Real-time store updates between {between}, per day: " + ", ".join(
            (f"{f['arm']} " if f.get("arm") else "") + f"day {f['day']}: {f['events']:,} events"
            for f in data["followed"]) + "." + (" Each served arm follows its own stream into its own copy of the "
                                                "store." if paired else ""))

    def draw():
        plt = pyplot()
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
        for ax, m in zip(axes.ravel(), M.METRICS):
            for n in names:
                daily_values = [d[m] for d in data["arms"][n]["daily"]]
                ax.plot(data["days"], daily_values, marker="o", label=n)
            ax.set_title(LABELS[m], fontsize=10)
            ax.set_xlabel("day")
        axes.ravel()[0].legend(fontsize=8)
        fig.suptitle(f"A/B test: daily metrics per arm (baseline {data['baseline']})")
        fig.tight_layout()
        return fig

    return Report("report", data=data, blocks=blocks, title="A/B test", figures=[Figure(draw)])

