"""``lifelong abtest``: an online A/B test of rankers in the interactive world (docs/abtest.md).

Mounted by :mod:`lifelong.cli` as the top-level command ``abtest``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lifelong.core.console import err, out
from lifelong.store.urls import STORE_HELP, STREAM_HELP

if TYPE_CHECKING:
    from lifelong.loop.policies import Learner, LearnerSpec


def _online_learner(spec: LearnerSpec, lr: float, batch_size: int) -> Learner:
    """An online arm's learner: the arm's TransAct run (:class:`~lifelong.transact.online.TransActOnline`,
    rows read from the arm's store) trained by Monolith's online trainer from the arm's stream,
    pushing every step's dense weights (and touched id rows) to the arm's service."""
    from lifelong.monolith.job import StreamLearner
    from lifelong.monolith.online import OnlineConfig
    from lifelong.store.feature_store import open_store
    from lifelong.transact.online import TransActOnline

    # Writable, though it only reads: the consumer that appends to this store runs in the same
    # process, and LMDB gives a process one environment per store, in one mode.
    store = open_store(spec.store, writable=True)
    try:
        model = TransActOnline.from_run(spec.run, store, user_emb=spec.user_emb)
        training = OnlineConfig(optimizer="adam", lr=lr, batch_size=batch_size, dense_every=1)
        return StreamLearner(model, spec.stream, spec.ckpt_dir, spec.serve, training, on_close=store.close)
    except BaseException:
        store.close()
        raise


def abtest(
    world: Annotated[Path, typer.Option("--world", help="A simulated world (lifelong simulate) with its oracle.")],
    arm: Annotated[list[str], typer.Option("--arm", help=(
        "NAME=SPEC, repeatable; the first arm is the baseline. SPEC: a run directory (served with "
        "`lifelong serve --run RUN --store URL` on a free port), online:RUN (the same run served with --accept-sync "
        "and trained online from the arm's stream after every window), http://host:port of a running service, "
        "random, or oracle."))],
    days: Annotated[int, typer.Option("--days", help="Interactive days to run.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory: report.md, report.json, report.png.")],
    design: Annotated[str, typer.Option("--design", help=(
        "paired: every arm serves the same users, each in its own copy of the world (common random numbers, a paired "
        "bootstrap; each arm gets its own stream STREAM-NAME and each followed run arm its own store copy "
        "STORE-NAME); split: disjoint arms by a hash of the user id, like a real A/B test (docs/abtest.md)."))
    ] = "paired",
    users_per_arm: Annotated[int | None, typer.Option("--users-per-arm", help=(
        "Keep at most this many users per arm, the same users in every arm when paired \\[default: every user of "
        "the world; split: divided between the arms].")
    )] = None,
    stream: Annotated[str | None, typer.Option("--stream", help=(
        STREAM_HELP + ". Every day's events are appended there; with --store, the real-time consumer "
        "appends them to the store between days."))] = None,
    store: Annotated[str | None, typer.Option("--store", help=(
        STORE_HELP + " Needed by run arms: loaded from this world's rows (lifelong store load --data ROWS)."))] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help=(
        "With --stream and --store: apply each day's events to the store before the next day."))] = True,
    seed: Annotated[int, typer.Option("--seed", help=(
        "Seeds the choice of users (the arm split), every user's draws and the bootstrap."))] = 0,
    start_day: Annotated[int | None, typer.Option("--start-day", help=(
        "First interactive day, a day index of the world \\[default: the day after its last].")
    )] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=(
        "Override an interactive.* key, e.g. --set interactive.exam_eta=1.0 (docs/world.md)."))] = None,
    workers: Annotated[int, typer.Option("--workers", help="Concurrent /rank requests per HTTP arm.")] = 8,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples of the confidence intervals.")] = 1000,
    window_minutes: Annotated[float | None, typer.Option("--window-minutes", help=(
        "Run each day in windows of this many simulated minutes: after each, its events reach the stream and the "
        "store, and online arms train and push before the next window is ranked \\[default: a day].")
    )] = None,
    user_emb: Annotated[str | None, typer.Option("--user-emb", help=(
        "The DV365 export store served to arms whose run reads user tokens (STORE URL) \\[default: the store in "
        "each run's run.json].")
    )] = None,
    online_lr: Annotated[float, typer.Option("--online-lr", help="Online arms: Adam learning rate of the dense weights.")
                         ] = 1e-4,
    online_batch: Annotated[int, typer.Option("--online-batch", help="Online arms: most examples per step.")] = 512,
) -> None:
    """Online A/B test: arms rank the feeds of the interactive world; repins, hides, diversity, time spent vs the baseline."""
    from lifelong.loop.abtest import AbTest, run_abtest

    test = AbTest(world=world, arms=arm, days=days, out=out_dir, users_per_arm=users_per_arm, stream=stream,
                  store=store, follow=follow, seed=seed, start_day=start_day, overrides=list(set_ or []),
                  workers=workers, n_boot=bootstrap, design=design, window_minutes=window_minutes, user_emb=user_emb,
                  learner=functools.partial(_online_learner, lr=online_lr, batch_size=online_batch))
    data = run_abtest(test, log=lambda line: err.print(line, highlight=False))
    base = data["baseline"]
    out.print(f"design: {data['design']}", highlight=False)
    for name, a in data["arms"].items():
        delta = a.get("delta", {}).get("repin_volume")
        rel = "" if delta is None or delta["rel"] is None else (
            f" ({delta['rel']:+.1%}{'' if delta['significant'] else '*'} "
            f"[{delta['ci'][0]:+.1%}, {delta['ci'][1]:+.1%}] repins vs {base})")
        state = "" if a["complete"] else f"  [red]incomplete: {a['requests_failed']:,} requests failed[/red]"
        out.print(f"{name}: {a['users']:,} users, {a['requests']:,} requests, repins/user {a['repin_volume']:.3f}, "
                  f"hides/user {a['hide_volume']:.3f}, minutes/user {a['time_spent']:.2f}{rel}{state}", highlight=False)
    out.print(f"[green]wrote[/green] {out_dir}/report.md, report.json, report.png in {data['seconds']:.1f} s")
