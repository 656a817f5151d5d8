"""The Monolith experiments (``lifelong monolith experiment``): collisions, concept drift, sync interval.

All three replay a world's events in stream order through an online trainer (the
:class:`~lifelong.monolith.ranker.OnlineRanker`, trained on every example the
:class:`~lifelong.monolith.joiner.OnlineJoiner` emits, as :class:`~lifelong.monolith.online.OnlineTrainer`
does) while one or more *served* copies of the model score every impression at its own time,
before its labels exist: :func:`serve_and_train`. A served copy is a snapshot of the trainer,
taken again every ``sync interval`` of stream time (or never), which is what a parameter sync
from the trainer to serving does. Predictions are then matched to the labels the joiner gives
the impressions and scored with the project's metrics (AUC per head, log loss, HIT@3 by request).

- :func:`hashing_experiment`: collision-less tables vs modulo-hashed ones
  (:class:`~lifelong.tables.hashed.ModuloEmbedding`) with 10%..100% buckets per distinct id,
  trained on the stream up to a held-out tail, evaluated frozen on the tail.
- :func:`drift_experiment`: on a world with the drift switch on, the model kept training and
  synced every minute vs the same model frozen a few days before the drift; quality per day.
- :func:`sync_experiment`: one trainer, several served copies synced every 1 min .. 1 day or never.

Time runs on a grid (one minute by default): the events of a grid cell are scored together by
the snapshots current at the cell's start, then trained on; sync intervals are multiples of the
grid. :func:`write_report` writes each experiment's JSON, markdown table and plot.

Example::

    world = load_stream("worlds/mono_drift")
    report = drift_experiment(world)
    write_report(report, "reports/monolith")       # drift.json, drift.md, drift.png
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lifelong.core.errors import ConfigError
from lifelong.core.metrics import auc, final_score, hit_at_k, hit_at_k_random
from lifelong.core.report import Column, Figure, Report, Table, pyplot
from lifelong.data.io import read_meta
from lifelong.data.protocol import DAY_MS
from lifelong.data.schema import HEADS
from lifelong.modules.heads import ranking_loss
from lifelong.monolith.joiner import OnlineJoiner
from lifelong.monolith.online import OnlineConfig, WindowMetrics
from lifelong.monolith.ranker import (
    SLOTS,
    ItemCatalog,
    OnlineBatch,
    OnlineRanker,
    OnlineRankerConfig,
    default_table,
)
from lifelong.store.stream import LogStream, replay
from lifelong.tables.embedding import sparse_step
from lifelong.tables.hashed import ModuloEmbedding

__all__ = ["EXPERIMENTS", "SYNC_INTERVALS", "Quality", "ServedPredictions", "StreamWorld", "build_model",
           "drift_experiment", "hashing_experiment", "load_stream", "quality", "render_markdown", "seeded_config",
           "serve_and_train", "sync_experiment", "window_metrics", "write_report"]

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
SYNC_INTERVALS: dict[str, int | None] = {"1 min": MINUTE_MS, "10 min": 10 * MINUTE_MS, "1 h": HOUR_MS,
                                         "6 h": 6 * HOUR_MS, "1 day": DAY_MS, "never": None}
"""The sync intervals of :func:`sync_experiment` (None: the served model never changes)."""
_HIT_HEADS = ("repin", "hide")  # the heads the project reports HIT@3 for (hide: lower is better)


@dataclass(frozen=True)
class StreamWorld:
    """A world's events in stream order, with what the experiments need to know about it.

    Args:
        records: :data:`~lifelong.store.stream.EVENT_DTYPE` events, in replay order.
        catalog: item metadata.
        start_ms: midnight of the world's first day.
        days: days covered by ``records``.
        drift_day: day of the world's abrupt interest shift (None when the switch is off).
        users: distinct users in ``records``.
    """

    records: np.ndarray
    catalog: ItemCatalog
    start_ms: int
    days: int
    drift_day: int | None
    users: int

    def day_ms(self, day: float) -> int:
        """Stream time of the start of ``day`` (0 = the first day)."""
        return self.start_ms + int(day * DAY_MS)


def load_stream(world_dir: str | os.PathLike[str], days: int | None = None, users: int | None = None) -> StreamWorld:
    """Replay a simulated world into a temporary log and read it back in stream order.

    Args:
        world_dir: a ``lifelong simulate`` output directory.
        days: keep the world's first ``days`` days only (None: all).
        users: keep the events of the ``users`` smallest user ids only (None: all).

    Raises:
        ConfigError: ``days`` or ``users`` below 1, or more days than the world has.
        DataError: not a world directory.
    """
    meta = read_meta(world_dir)
    start_ms, world_days = int(meta["start_ms"]), int(meta["config"]["days"])
    if days is not None and not 1 <= days <= world_days:
        raise ConfigError(f"days must be in 1..{world_days} (the world's length), got {days}")
    if users is not None and users < 1:
        raise ConfigError(f"users must be >= 1, got {users}")
    days = world_days if days is None else days
    with tempfile.TemporaryDirectory(prefix="lifelong-experiment-") as tmp:
        log = LogStream(Path(tmp) / "log")
        try:
            replay(world_dir, log, end_ms=start_ms + days * DAY_MS)
            records, _ = log.read(log.start_offset(), 2**62)
        finally:
            log.close()
    if users is not None:
        keep_ids = np.unique(records["user_id"])[:users]
        records = records[np.isin(records["user_id"], keep_ids)]
    drift = meta["config"].get("drift", {})
    drift_day = int(drift["day"]) if drift.get("enabled") and int(drift["day"]) < days else None
    return StreamWorld(records=records, catalog=ItemCatalog.from_dataset(world_dir), start_ms=start_ms, days=days,
                       drift_day=drift_day, users=int(np.unique(records["user_id"]).size))


@dataclass(frozen=True)
class ServedPredictions:
    """What the served models of :func:`serve_and_train` predicted.

    Args:
        examples: the scored impressions as joined examples (labels included), by impression time.
        probs: served model name -> (n, H) probabilities, rows matching ``examples``.
        trained: examples the trainer trained on.
        seconds: wall time of the run.
    """

    examples: np.ndarray
    probs: dict[str, np.ndarray]
    trained: int
    seconds: float


def seeded_config(seed: int = 0) -> OnlineConfig:
    """The default online job with the dense weights and every table (row init, filter) seeded from ``seed``.

    Example::

        >>> seeded_config(0) == OnlineConfig(), seeded_config(1).model.item_id.seed
        (True, 6)
    """
    tables = {slot: default_table(seed=len(SLOTS) * seed + i + 1) for i, slot in enumerate(SLOTS)}
    return OnlineConfig(model=OnlineRankerConfig(seed=seed, **tables))


def build_model(cfg: OnlineConfig, buckets: Mapping[str, int] | None = None) -> OnlineRanker:
    """An :class:`OnlineRanker` whose slots in ``buckets`` are modulo-hashed with that many rows.

    Example::

        >>> model = build_model(OnlineConfig(), buckets={"item_id": 100})
        >>> type(model.tables["item_id"]).__name__, type(model.tables["user_id"]).__name__
        ('ModuloEmbedding', 'CollisionlessEmbedding')
    """
    model = OnlineRanker(cfg.model)
    for slot, n in (buckets or {}).items():
        if slot not in SLOTS:
            raise ConfigError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        model.tables[slot] = ModuloEmbedding(cfg.model.tables[slot], n)
    return model


class _Trainer:
    """The trainer of :func:`serve_and_train`: the :class:`~lifelong.monolith.online.OnlineTrainer`'s
    model, joiner and optimizers, trained on every emitted example once, without checkpoints."""

    def __init__(self, cfg: OnlineConfig, catalog: ItemCatalog, buckets: Mapping[str, int] | None):
        self.cfg, self.catalog = cfg, catalog
        self.model = build_model(cfg, buckets)
        params = self.model.dense.parameters()
        self.optimizer = (torch.optim.Adagrad(params, lr=cfg.lr) if cfg.optimizer == "adagrad"
                          else torch.optim.Adam(params, lr=cfg.lr))
        self.head_weights = torch.tensor(cfg.head_weights)
        self.joiner = OnlineJoiner(cfg.joiner)
        self.steps = 0
        self._snapshot: tuple[int, OnlineRanker] | None = None

    def consume(self, records: np.ndarray) -> int:
        """Join the events and take one step per ``batch_size`` emitted examples; returns the examples."""
        examples = self.joiner.push(records)
        now = self.joiner.watermark
        for b in range(0, len(examples), self.cfg.batch_size):
            batch = OnlineBatch.from_examples(examples[b:b + self.cfg.batch_size], self.catalog)
            loss = ranking_loss(self.model(batch, now), batch.labels, self.head_weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            sparse_step(self.model, now)
            self.steps += 1
        return len(examples)

    def snapshot(self) -> OnlineRanker:
        """A frozen copy of the model in eval mode (one copy per trained state, shared by every sync)."""
        if self._snapshot is None or self._snapshot[0] != self.steps:
            self._snapshot = (self.steps, copy.deepcopy(self.model).eval())
        return self._snapshot[1]


def serve_and_train(world: StreamWorld, cfg: OnlineConfig, syncs: Mapping[str, int | None], eval_from_ms: int,
                    train_until_ms: int | None = None, buckets: Mapping[str, int] | None = None,
                    grid_ms: int = MINUTE_MS) -> ServedPredictions:
    """Train online through the stream while served snapshots score every impression from ``eval_from_ms`` on.

    For each grid cell of stream time that holds events, in order: every served model whose
    sync interval has a boundary since its last snapshot takes a new snapshot of the trainer;
    the served models score the impressions of the cell; the trainer consumes the cell's events
    (the joiner emits the examples whose 30-minute window closed) and takes one optimizer step
    per ``cfg.batch_size`` emitted examples. A served model with interval None takes its only
    snapshot at ``eval_from_ms``.

    Args:
        world: the stream.
        cfg: the trainer (model, joiner, dense optimizer, batch size).
        syncs: served model name -> sync interval in ms (a multiple of ``grid_ms``), or None.
        eval_from_ms: impressions before this time are not scored.
        train_until_ms: the trainer stops consuming events here (None: at the end).
        buckets: slots to hash modulo this many buckets (see :func:`build_model`).
        grid_ms: the time step.

    Raises:
        ConfigError: no served model, or an interval that is not a positive multiple of ``grid_ms``.

    Example::

        run = serve_and_train(world, OnlineConfig(), {"1 h": HOUR_MS, "never": None}, eval_from_ms=world.day_ms(30))
        quality(run.examples, run.probs["1 h"]).auc["click"]
    """
    if not syncs:
        raise ConfigError("serve_and_train needs at least one served model")
    for name, interval in syncs.items():
        if interval is not None and (interval < grid_ms or interval % grid_ms):
            raise ConfigError(f"sync interval of {name!r} must be a positive multiple of {grid_ms} ms, got {interval}")
    t0 = time.perf_counter()
    # The labels of every impression, from one join of the whole stream (the joiner's output does
    # not depend on how the stream is split): predictions are made before they exist.
    reference = OnlineJoiner(cfg.joiner)
    labelled = np.concatenate([reference.push(world.records), reference.flush()])
    labelled = labelled[np.argsort(labelled["ts_ms"], kind="stable")]
    scored = labelled[labelled["ts_ms"] >= eval_from_ms]
    probs = {name: np.zeros((len(scored), len(HEADS)), np.float32) for name in syncs}
    trainer = _Trainer(cfg, world.catalog, buckets)
    served: dict[str, tuple[int, OnlineRanker]] = {}  # name -> (time of its snapshot, the snapshot)
    cell = world.records["ts_ms"] // grid_ms
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    trained = 0
    for start, end in zip(starts, np.r_[starts[1:], len(cell)]):
        t = int(cell[start]) * grid_ms
        if t + grid_ms > eval_from_ms:
            for name, interval in syncs.items():
                if name not in served or (interval is not None and t // interval != served[name][0] // interval):
                    served[name] = (t, trainer.snapshot())
            lo, hi = np.searchsorted(scored["ts_ms"], [t, t + grid_ms])
            if hi > lo:
                batch = OnlineBatch.from_examples(scored[lo:hi], world.catalog)
                by_copy: dict[int, np.ndarray] = {}
                with torch.no_grad():
                    for name, (_, snap) in served.items():
                        if id(snap) not in by_copy:
                            by_copy[id(snap)] = torch.sigmoid(snap(batch)).numpy()
                        probs[name][lo:hi] = by_copy[id(snap)]
        if train_until_ms is None or t < train_until_ms:
            trained += trainer.consume(world.records[start:end])
    return ServedPredictions(examples=scored, probs=probs, trained=trained, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class Quality:
    """Quality of predictions over a set of examples.

    Args:
        examples: how many.
        loss: mean over examples of the log loss summed over heads.
        auc: head -> AUC (None with one class only).
        hit3: head -> HIT@3 by request (the final score ranks each request's items).
        hit3_random: head -> HIT@3 of a random order of each request.
    """

    examples: int
    loss: float
    auc: dict[str, float | None]
    hit3: dict[str, float]
    hit3_random: dict[str, float]


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(n,) log loss of each example, summed over heads (the trainer's progressive-validation loss)."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(axis=1)


def _aucs(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    out = {h: auc(labels[:, i], probs[:, i]) for i, h in enumerate(HEADS)}
    return {h: None if np.isnan(a) else float(a) for h, a in out.items()}


def quality(examples: np.ndarray, probs: np.ndarray) -> Quality:
    """AUC, log loss and HIT@3 of ``probs`` (n, H) for joined ``examples``.

    Example::

        >>> from lifelong.monolith.joiner import EXAMPLE_DTYPE
        >>> ex = np.zeros(4, EXAMPLE_DTYPE); ex["request_id"] = [1, 1, 1, 1]; ex["labels"][:2, 1] = 1
        >>> q = quality(ex, np.array([[0, .9, 0, 0], [0, .8, 0, 0], [0, .1, 0, 0], [0, .2, 0, 0]]))
        >>> q.auc["repin"], q.hit3["repin"], q.hit3_random["repin"]
        (1.0, 2.0, 1.5)
    """
    labels = examples["labels"]
    score = final_score(dict(zip(HEADS, probs.T)))
    heads = {h: HEADS.index(h) for h in _HIT_HEADS}
    req, users = examples["request_id"], examples["user_id"]
    return Quality(examples=len(examples), loss=float(_log_loss(labels, probs).mean()), auc=_aucs(labels, probs),
                   hit3={h: hit_at_k(req, users, score, labels[:, i]) for h, i in heads.items()},
                   hit3_random={h: hit_at_k_random(req, users, labels[:, i]) for h, i in heads.items()})


def window_metrics(examples: np.ndarray, probs: np.ndarray, window_ms: int = DAY_MS) -> list[WindowMetrics]:
    """Quality per window of impression time (the trainer's progressive-validation layout)."""
    bucket = examples["ts_ms"] // window_ms
    labels = examples["labels"]
    loss = _log_loss(labels, probs)
    out = []
    for b in np.unique(bucket):
        sel = bucket == b
        out.append(WindowMetrics(start_ms=int(b) * window_ms, end_ms=(int(b) + 1) * window_ms,
                                 examples=int(sel.sum()), loss=float(loss[sel].mean()),
                                 auc=_aucs(labels[sel], probs[sel]),
                                 positive_rate={h: float(labels[sel, i].mean()) for i, h in enumerate(HEADS)}))
    return out


def _world_info(world: StreamWorld, cfg: OnlineConfig) -> dict[str, Any]:
    return {"seed": cfg.model.seed, "start_ms": world.start_ms, "days": world.days, "users": world.users, "events": len(world.records), "items": len(world.catalog),
            "drift_day": world.drift_day}


def hashing_experiment(world: StreamWorld, fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0), eval_days: int = 7,
                       cfg: OnlineConfig | None = None, grid_ms: int = HOUR_MS) -> dict[str, Any]:
    """Collision-less tables vs modulo-hashed tables with ``fraction`` x distinct ids buckets per slot.

    Every variant trains online on the stream up to the last ``eval_days`` days, then is
    evaluated frozen on them (AUC, log loss, HIT@3). The distinct ids are counted per slot
    over the training days; every slot of a modulo variant gets ``round(fraction * distinct)``
    buckets (at least 1).

    Args:
        world: the stream.
        fractions: buckets per distinct id of each modulo variant.
        eval_days: the held-out tail.
        cfg: the trainer (default: :class:`OnlineConfig`'s defaults).
        grid_ms: the time step (training batches close at its boundaries).

    Returns:
        The report: one row per table (its buckets, examples trained, seconds, :class:`Quality`).

    Raises:
        ConfigError: ``eval_days`` not in ``1..days-1``, or a fraction not in ``(0, 10]``.

    Example::

        report = hashing_experiment(load_stream("worlds/mono_small"), fractions=(0.5, 1.0))
        [(r["table"], r["quality"]["auc"]["click"]) for r in report["rows"]]
    """
    cfg = cfg or OnlineConfig()
    if not 1 <= eval_days < world.days:
        raise ConfigError(f"eval_days must be in 1..{world.days - 1}, got {eval_days}")
    if any(not 0 < f <= 10 for f in fractions):
        raise ConfigError(f"fractions must be in (0, 10], got {list(fractions)}")
    eval_from = world.day_ms(world.days - eval_days)
    train = world.records[world.records["ts_ms"] < eval_from]
    author, topic, _, _ = world.catalog.lookup(train["item_id"])
    distinct = {"user_id": np.unique(train["user_id"]).size, "item_id": np.unique(train["item_id"]).size,
                "author_id": np.unique(author).size, "topic_id": np.unique(topic).size}
    variants: list[tuple[str, float | None, dict[str, int] | None]] = [("collision-less", None, None)]
    variants += [(f"modulo {f:.0%}", f, {s: max(1, round(f * n)) for s, n in distinct.items()}) for f in fractions]
    rows = []
    for name, fraction, buckets in variants:
        run = serve_and_train(world, cfg, {"frozen": None}, eval_from_ms=eval_from, train_until_ms=eval_from,
                              buckets=buckets, grid_ms=grid_ms)
        rows.append({"table": name, "fraction": fraction, "buckets": buckets, "trained": run.trained,
                     "seconds": run.seconds, "quality": asdict(quality(run.examples, run.probs["frozen"]))})
    return {"experiment": "hashing", "world": _world_info(world, cfg), "eval_days": eval_days, "distinct_ids": distinct,
            "rows": rows}


def drift_experiment(world: StreamWorld, freeze_days_before: int = 5, sync_ms: int = MINUTE_MS,
                     cfg: OnlineConfig | None = None) -> dict[str, Any]:
    """Online (synced every ``sync_ms``) vs frozen ``freeze_days_before`` days before the drift: quality per day.

    Both are one trainer's model: the frozen one is its snapshot at the freeze time, i.e. trained
    on everything before it (one pass in time order), and never updated again.

    Args:
        world: a stream with a drift (:attr:`StreamWorld.drift_day`).
        freeze_days_before: the frozen snapshot is taken this many days before the drift.
        sync_ms: the online model's sync interval.
        cfg: the trainer (default: :class:`OnlineConfig`'s defaults).

    Returns:
        The report: :class:`Quality` of both models before and after the drift, and one row per
        day from the freeze with each model's :class:`~lifelong.monolith.online.WindowMetrics`.

    Raises:
        ConfigError: the world has no drift inside its days, or the freeze falls before day 1.
    """
    cfg = cfg or OnlineConfig()
    if world.drift_day is None:
        raise ConfigError("the drift experiment needs a world simulated with drift.enabled=true "
                          "(and drift.day inside the days kept)")
    freeze_day = world.drift_day - freeze_days_before
    if freeze_day < 1:
        raise ConfigError(f"the freeze ({freeze_days_before} days before the drift on day {world.drift_day}) "
                          "must leave at least one day of training")
    run = serve_and_train(world, cfg, {"online": sync_ms, "frozen": None}, eval_from_ms=world.day_ms(freeze_day),
                          grid_ms=sync_ms)
    windows = {name: window_metrics(run.examples, p) for name, p in run.probs.items()}
    rows = [{"day": (w.start_ms - world.start_ms) / DAY_MS, **{name: asdict(ws[i]) for name, ws in windows.items()}}
            for i, w in enumerate(windows["online"])]
    after = run.examples["ts_ms"] >= world.day_ms(world.drift_day)
    periods = {"before drift": ~after, "after drift": after}
    overall = {period: {name: asdict(quality(run.examples[sel], p[sel])) for name, p in run.probs.items()}
               for period, sel in periods.items()}
    return {"experiment": "drift", "world": _world_info(world, cfg), "freeze_day": freeze_day, "sync_ms": sync_ms,
            "trained": run.trained, "seconds": run.seconds, "overall": overall, "rows": rows}


def sync_experiment(world: StreamWorld, eval_from_day: int | None = None,
                    intervals: Mapping[str, int | None] | None = None, cfg: OnlineConfig | None = None
                    ) -> dict[str, Any]:
    """Quality of served models synced from one trainer every interval of ``intervals`` (default :data:`SYNC_INTERVALS`).

    Scored from ``eval_from_day`` (default: 5 days before the drift, or the second half of a
    world without one); with a drift, the first 3 days after it are also reported apart.

    Args:
        world: the stream.
        eval_from_day: first day scored.
        intervals: served model name -> sync interval in ms (None: never synced).
        cfg: the trainer (default: :class:`OnlineConfig`'s defaults).

    Returns:
        The report: one row per interval with its :class:`Quality` per period, and every served
        model's quality per day.

    Raises:
        ConfigError: ``eval_from_day`` not in ``1..days-1``.
    """
    cfg = cfg or OnlineConfig()
    intervals = dict(SYNC_INTERVALS if intervals is None else intervals)
    if eval_from_day is None:
        eval_from_day = world.drift_day - 5 if world.drift_day is not None and world.drift_day > 5 else world.days // 2
    if not 1 <= eval_from_day < world.days:
        raise ConfigError(f"eval_from_day must be in 1..{world.days - 1}, got {eval_from_day}")
    finite = [v for v in intervals.values() if v is not None]
    grid = int(np.gcd.reduce(finite)) if finite else HOUR_MS
    run = serve_and_train(world, cfg, intervals, eval_from_ms=world.day_ms(eval_from_day), grid_ms=grid)
    periods = {"all": np.ones(len(run.examples), bool)}
    if world.drift_day is not None and world.drift_day >= eval_from_day:
        ts = run.examples["ts_ms"]
        periods["3 days after drift"] = (ts >= world.day_ms(world.drift_day)) & (ts < world.day_ms(world.drift_day + 3))
    rows = [{"sync": name, "interval_ms": interval,
             **{period: asdict(quality(run.examples[sel], run.probs[name][sel])) for period, sel in periods.items()}}
            for name, interval in intervals.items()]
    windows = {name: [asdict(w) for w in window_metrics(run.examples, p)] for name, p in run.probs.items()}
    return {"experiment": "sync", "world": _world_info(world, cfg), "eval_from_day": eval_from_day, "grid_ms": grid,
            "trained": run.trained, "seconds": run.seconds, "periods": list(periods), "rows": rows,
            "windows": windows}


# -- reports ---------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


_QUALITY = [Column("AUC click", "q", lambda q: _fmt(q["auc"]["click"])),
            Column("AUC repin", "q", lambda q: _fmt(q["auc"]["repin"])), Column("log loss", "q", lambda q: _fmt(q["loss"])),
            Column("HIT@3 repin", "q", lambda q: _fmt(q["hit3"]["repin"])),
            Column("HIT@3 hide", "q", lambda q: _fmt(q["hit3"]["hide"])),
            Column("examples", "q", lambda q: f"{q['examples']:,}")]
"""The quality columns of every table; a row's ``q`` is a :class:`Quality` as a dict."""


def _world_line(r: dict[str, Any]) -> str:
    w = r["world"]
    drift = f", drift on day {w['drift_day']}" if w["drift_day"] is not None else ""
    return (f"World: {w['users']:,} users, {w['items']:,} items, {w['days']} days, {w['events']:,} events{drift}; "
            f"model seed {w['seed']}.")


def build_report(report: dict[str, Any]) -> Report:
    """One experiment's report: ``KIND.md``, ``KIND.json`` (``report``) and ``KIND.png``."""
    kind = report["experiment"]
    blocks: list[str | Table] = [_world_line(report)]
    if kind == "hashing":
        d = report["distinct_ids"]
        blocks += [f"Trained online on days 0..{report['world']['days'] - report['eval_days'] - 1}, evaluated frozen on "
                   f"the last {report['eval_days']} days. Distinct ids in training: "
                   + ", ".join(f"{s} {n:,}" for s, n in d.items()) + ".",
                   Table([Column("table", "table"), Column("buckets (user / item / author / topic)", "buckets",
                                                           lambda b: " / ".join(f"{b[s]:,}" for s in SLOTS)), *_QUALITY],
                         [{"table": r["table"], "q": r["quality"],
                           **({"buckets": "one row per id"} if r["buckets"] is None else {"buckets": r["buckets"]})}
                          for r in report["rows"]])]
        q = report["rows"][0]["quality"]
        blocks.append(f"Random order: HIT@3 repin {q['hit3_random']['repin']:.4f}, hide {q['hit3_random']['hide']:.4f}.")
    elif kind == "drift":
        blocks += [(f"Frozen: the trainer's model on day {report['freeze_day']}, never updated again. Online: the "
                    f"same trainer continuing, served with a {report['sync_ms'] // MINUTE_MS}-minute sync."),
                   Table([Column("period", "period"), Column("model", "model"), *_QUALITY],
                         [{"period": period, "model": name, "q": q}
                          for period, models in report["overall"].items() for name, q in models.items()]),
                   Table([Column("day", "day", "{:.0f}"),
                          Column("AUC click online", "online", lambda w: _fmt(w["auc"]["click"])),
                          Column("AUC click frozen", "frozen", lambda w: _fmt(w["auc"]["click"])),
                          Column("log loss online", "online", lambda w: f"{w['loss']:.4f}"),
                          Column("log loss frozen", "frozen", lambda w: f"{w['loss']:.4f}"),
                          Column("examples", "online", lambda w: f"{w['examples']:,}")], report["rows"])]
    else:
        blocks += [f"Scored from day {report['eval_from_day']}; one trainer, one served copy per sync interval.",
                   Table([Column("sync interval", "sync"), Column("period", "period"), *_QUALITY],
                         [{"sync": r["sync"], "period": period, "q": r[period]}
                          for period in report["periods"] for r in report["rows"]])]
    return Report(kind, data=report, blocks=blocks, figures=[Figure(lambda: _plot(report))])


def render_markdown(report: dict[str, Any]) -> str:
    """One experiment's report as markdown."""
    return build_report(report).markdown()


def _plot(report: dict[str, Any]):
    kind = report["experiment"]
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 3.8))
    if kind == "hashing":
        rows = report["rows"]
        base, mod = rows[0]["quality"], [r for r in rows if r["fraction"] is not None]
        x = [r["fraction"] for r in mod]
        for ax, (metric, head, label) in zip(axes, (("auc", "click", "AUC click"), ("hit3", "repin", "HIT@3 repin"))):
            ax.plot(x, [r["quality"][metric][head] for r in mod], "o-", label="modulo-hashed")
            ax.axhline(base[metric][head], color="#27ae60", linestyle="--", label="collision-less")
            ax.set_xlabel("buckets per distinct id")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        fig.suptitle("Collision-less vs modulo-hashed id tables (held-out tail)", fontsize=11)
    elif kind == "drift":
        days = [r["day"] for r in report["rows"]]
        for ax, (key, label) in zip(axes, ((lambda w: w["auc"]["click"], "AUC click"), (lambda w: w["loss"], "log loss"))):
            for name in ("online", "frozen"):
                ax.plot(days, [key(r[name]) if key(r[name]) is not None else np.nan for r in report["rows"]], "o-",
                        ms=3, label=name)
            ax.axvline(report["world"]["drift_day"], color="#c0392b", linestyle=":", label="drift")
            ax.set_xlabel("day")
            ax.set_ylabel(f"{label} (per day)")
            ax.legend(fontsize=8)
        fig.suptitle("Online training vs a frozen model through a concept drift", fontsize=11)
    else:
        for name, ws in report["windows"].items():
            days = [(w["start_ms"] - report["world"]["start_ms"]) / DAY_MS for w in ws]
            axes[0].plot(days, [w["auc"]["click"] if w["auc"]["click"] is not None else np.nan for w in ws], ms=3,
                         marker="o", label=name)
        axes[0].set_xlabel("day")
        axes[0].set_ylabel("AUC click (per day)")
        axes[0].legend(fontsize=8)
        for period in report["periods"]:
            axes[1].plot([r["sync"] for r in report["rows"]], [r[period]["auc"]["click"] for r in report["rows"]],
                         "o-", label=period)
        axes[1].set_xlabel("sync interval")
        axes[1].set_ylabel("AUC click")
        axes[1].legend(fontsize=8)
        fig.suptitle("Sync interval of the served model vs quality", fontsize=11)
    fig.tight_layout()
    return fig


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``<experiment>.json``, ``.md`` and ``.png`` into ``out_dir``; returns the paths."""
    return build_report(report).write(out_dir)


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "hashing": hashing_experiment, "drift": drift_experiment, "sync": sync_experiment,
}
"""Experiment name -> function of a :class:`StreamWorld` returning its report."""
