"""DV365's recurring job: data -> train -> export -> cache, every interval, on a clock tests can fake.

Cycle ``i`` is due at ``t0 + i * every`` on its :class:`Clock` (``t0``: when the schedule
starts); a cycle that overruns makes the next one start at once, late, never twice. Each cycle:

1. **data**: the cycle's as-of time advances by the interval, ``as_of = first_as_of + i * every``
   (world time, not clock time: a simulated world's events span a past year), and the users
   active at it are found (:func:`~lifelong.dv365.export.active_users`);
2. **train**: a :data:`Trainer` (:class:`TowerTrainer`: the DV365 tower's training) fits a
   tower on the events before ``as_of`` into ``OUT/cycles/NNNN/run``; without one, every cycle
   reuses one run;
3. **export**: the tower embeds the active users and the export switches the store to the new
   version (:func:`~lifelong.dv365.export.export_embeddings`);
4. **cache**: the served version is read back through an
   :class:`~lifelong.dv365.export.EmbeddingReader`, which checks that readers get it whole, and
   kept as ``OUT/cache/vNNNNNNNNNNNN.npz`` (the records as served: int64 words, user ids, as-of
   time): the store keeps the last ``keep`` versions only, the cache every version, so that
   offline jobs (downstream training at past times, staleness studies) read the embedding a
   user had when. :func:`read_cache` decodes one.

A cycle that fails at any step is recorded with its error and the schedule goes on: the store
still serves the previous version (an export switches only once all rows are written). Every
cycle appends one JSON line to ``OUT/schedule.jsonl``.

Example::

    clock = SimulatedClock(now_ms=0)
    records = run_schedule("worlds/lifelong", "lmdb:///srv/emb", "runs/schedule",
                           ScheduleConfig(every_ms=parse_every("6h"), cycles=4), run="runs/dv365",
                           clock=clock)
    [(r.cycle, r.status, r.version) for r in records]  # [(0, 'ok', 1), (1, 'ok', 2), ...]
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lifelong.core.atomic import write_atomic
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.quantization import dequantize_4bit, from_words_4bit
from lifelong.data.protocol import Protocol as DataProtocol
from lifelong.dv365.examples import World, open_world
from lifelong.dv365.export import (
    EmbeddingReader,
    EmbeddingTower,
    ExportConfig,
    active_users,
    default_as_of_ms,
    export_embeddings,
)
from lifelong.dv365.featurize import TimelineSource
from lifelong.dv365.slices import DURATION_UNITS, SliceSpec, parse_duration_ms
from lifelong.dv365.tower import DV365Tower, load_tower
from lifelong.dv365.train import DV365TrainConfig, fit, prepare, save_run

__all__ = [
    "Clock", "CycleRecord", "ScheduleConfig", "SimulatedClock", "SystemClock", "TowerTrainer", "Trainer",
    "parse_every", "read_cache", "run_schedule",
]

Trainer = Callable[[Path, int, Path], Path]
"""``trainer(world_dir, as_of_ms, out_dir) -> run_dir``: fit a tower on the events before ``as_of_ms``."""


def parse_every(text: str) -> int:
    """Milliseconds of an interval such as ``6h``, ``30m`` or ``1d``.

    Raises:
        ConfigError: not a positive ``<integer><unit>``.

    Example::

        >>> parse_every("6h"), parse_every("30m")
        (21600000, 1800000)
        >>> parse_every("6 hours")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: interval '6 hours' is not a positive <integer><unit> with unit one of ms, s, m, h, d, w (e.g. '6h')
    """
    ms = parse_duration_ms(text)
    if ms is None:
        raise ConfigError(f"interval {text!r} is not a positive <integer><unit> with unit one of {DURATION_UNITS} "
                          "(e.g. '6h')")
    return ms


class Clock(Protocol):
    """Where the schedule reads the time and waits."""

    def now_ms(self) -> int:
        """The current time, epoch milliseconds."""

    def sleep_until(self, t_ms: int) -> None:
        """Return at ``t_ms`` (at once when it has passed)."""


class SystemClock:
    """The wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def sleep_until(self, t_ms: int) -> None:
        while (left := t_ms - self.now_ms()) > 0:
            time.sleep(left / 1000)


class SimulatedClock:
    """A clock that jumps instead of sleeping, for tests and dry runs.

    Args:
        now_ms: the starting time.

    Example::

        >>> clock = SimulatedClock(now_ms=1_000)
        >>> clock.sleep_until(5_000); clock.advance(250); clock.now_ms(), clock.waits
        (5250, [4000])
    """

    def __init__(self, now_ms: int = 0):
        self.now = int(now_ms)
        self.waits: list[int] = []
        """How long each :meth:`sleep_until` waited."""

    def now_ms(self) -> int:
        return self.now

    def sleep_until(self, t_ms: int) -> None:
        self.waits.append(max(0, int(t_ms) - self.now))
        self.now = max(self.now, int(t_ms))

    def advance(self, ms: int) -> None:
        """Let ``ms`` pass, as work would (a fake trainer's training time)."""
        self.now += int(ms)


@dataclass(frozen=True)
class ScheduleConfig:
    """How often and how long the job runs.

    Args:
        every_ms: the interval between cycles (:func:`parse_every`).
        cycles: how many cycles to run; None runs until interrupted.
        first_as_of_ms: the data time of the first cycle; default: the world's end (its
            evaluation end) minus ``(cycles - 1) * every_ms``, so that the last cycle sees all
            of it (with ``cycles=None``: the world's end, and later cycles find no new events).
        export: the export's settings (batch size, versions kept, activity window, gap).
    """

    every_ms: int
    cycles: int | None = None
    first_as_of_ms: int | None = None
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.every_ms, int) or self.every_ms <= 0:
            raise ConfigError(f"schedule every_ms must be a positive integer, got {self.every_ms!r}")
        if self.cycles is not None and (not isinstance(self.cycles, int) or self.cycles < 1):
            raise ConfigError(f"schedule cycles must be an integer >= 1 or None, got {self.cycles!r}")


@dataclass(frozen=True)
class CycleRecord:
    """What one cycle did (one line of ``schedule.jsonl``).

    Args:
        cycle: its number, from 0.
        due_ms, started_ms: when it was due and when it started, on the schedule's clock.
        as_of_ms: the data time it used.
        status: ``ok`` or ``failed``.
        step: the step it failed at (``data``, ``train``, ``export``, ``cache``), None if ok.
        error: the failure, one line.
        run: the tower's run directory.
        version: the version it exported (None if it exported none).
        served_version: the version the store serves after the cycle.
        users, compression_ratio: of the export.
        cache: the cache file written.
        seconds: wall time of the cycle.
    """

    cycle: int
    due_ms: int
    started_ms: int
    as_of_ms: int
    status: str
    step: str | None = None
    error: str | None = None
    run: str | None = None
    version: int | None = None
    served_version: int | None = None
    users: int | None = None
    compression_ratio: float | None = None
    cache: str | None = None
    seconds: float = 0.0


class TowerTrainer:
    """The schedule's :data:`Trainer` of the DV365 tower (:mod:`lifelong.dv365.train`).

    Each cycle trains a tower as ``lifelong dv365 train`` does, on the world's protocol moved in
    time so that its evaluation period ends at the cycle's as-of time: the training impressions
    are the ``train_days`` before ``as_of - gap - eval``, and nothing at or after ``as_of`` is
    read. The world is read and indexed once, for every cycle.

    Args:
        config: the training run's settings.
        spec: the slices (default: :meth:`~lifelong.dv365.slices.SliceSpec.default`).
        log: where the training's lines go.
    """

    def __init__(self, config: DV365TrainConfig, spec: SliceSpec | None = None, log: Callable[[str], None] = print):
        self.config, self.spec, self.log = config, spec, log
        self._world: World | None = None

    def __call__(self, world_dir: Path, as_of_ms: int, out_dir: Path) -> Path:
        if self._world is None or self._world.path != Path(world_dir):
            self._world = open_world(world_dir)
        p = self._world.protocol
        shift = int(as_of_ms) - p.eval_end_ms
        moved = replace(self._world, protocol=DataProtocol(p.train_start_ms + shift, p.cutoff_ms + shift,
                                                           p.eval_start_ms + shift, p.eval_end_ms + shift))
        tower, backbone, meta = fit(prepare(moved, self.config, self.spec, out_dir / "tokens"), self.config, self.log)
        meta.update(data=str(Path(world_dir).resolve()), as_of_ms=int(as_of_ms))
        save_run(out_dir, tower, backbone, meta)
        return out_dir

    def load_tower(self, run_dir: Path) -> EmbeddingTower:
        """The tower of ``run_dir``, reading the events this trainer indexed (not indexing them again)."""
        tower = load_tower(run_dir)
        return tower if self._world is None else _IndexedWorldTower(tower, self._world.source)


class _IndexedWorldTower:
    """A tower that embeds from an already indexed :class:`TimelineSource`, whatever directory it is given:
    one index of the world (~5 GB for ``lifelong``) serves both training and export."""

    def __init__(self, tower: DV365Tower, source: TimelineSource):
        self.tower, self.source = tower, source

    def embed_users(self, world_dir: str | os.PathLike[str], user_ids: np.ndarray, as_of_ms: int,
                    gap_ms: int | None = None) -> np.ndarray:
        return self.tower.embed_users(self.source, user_ids, as_of_ms, gap_ms)


def run_schedule(world_dir: str | os.PathLike[str], store_url: str, out_dir: str | os.PathLike[str],
                 config: ScheduleConfig, trainer: Trainer | None = None, run: str | os.PathLike[str] | None = None,
                 tower_loader: Callable[[Path], EmbeddingTower] = load_tower, clock: Clock | None = None,
                 log: Callable[[str], None] = print) -> list[CycleRecord]:
    """Run the data -> train -> export -> cache cycle every ``config.every_ms`` (module docstring).

    Args:
        world_dir: the world (or ingested dataset) the towers train on and embed.
        store_url: the store the embeddings are exported to.
        out_dir: cycles' runs, the cache and ``schedule.jsonl``.
        config: interval, number of cycles, first as-of time, export settings.
        trainer: trains a tower per cycle; None reuses ``run`` in every cycle.
        run: the run directory reused when there is no trainer.
        tower_loader: loads the tower of a run directory (default: the DV365 tower's; with a
            :class:`TowerTrainer`, pass its :meth:`~TowerTrainer.load_tower`). The tower of the
            last run is kept: reusing one run loads it, and indexes the world, once.
        clock: the schedule's clock (default: the wall clock).
        log: where a line per step goes.

    Returns:
        The :class:`CycleRecord` of every cycle, in order.

    Raises:
        ConfigError: neither a trainer nor a run, or both.
    """
    if (trainer is None) == (run is None):
        raise ConfigError("give the schedule a trainer (train every cycle) or a run to reuse, not both")
    clock = clock or SystemClock()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    first_as_of = config.first_as_of_ms
    if first_as_of is None:
        first_as_of = default_as_of_ms(world_dir) - ((config.cycles or 1) - 1) * config.every_ms
    (out_dir / "cache").mkdir(parents=True, exist_ok=True)
    t0 = clock.now_ms()
    records: list[CycleRecord] = []
    loaded: dict[Path, EmbeddingTower] = {}

    def load(run_dir: Path) -> EmbeddingTower:
        if run_dir not in loaded:
            loaded.clear()
            loaded[run_dir] = tower_loader(run_dir)
        return loaded[run_dir]

    cycle = 0
    while config.cycles is None or cycle < config.cycles:
        due = t0 + cycle * config.every_ms
        clock.sleep_until(due)
        record = _run_cycle(cycle, due, clock.now_ms(), first_as_of + cycle * config.every_ms, world_dir, store_url,
                            out_dir, config.export, trainer, run, load, log)
        with open(out_dir / "schedule.jsonl", "a") as f:
            f.write(json.dumps(asdict(record), sort_keys=True) + "\n")
        records.append(record)
        cycle += 1
    return records


def _run_cycle(cycle: int, due_ms: int, started_ms: int, as_of_ms: int, world_dir: Path, store_url: str,
               out_dir: Path, export_config: ExportConfig, trainer: Trainer | None,
               run: str | os.PathLike[str] | None, tower_loader: Callable[[Path], EmbeddingTower],
               log: Callable[[str], None]) -> CycleRecord:
    start = time.perf_counter()
    done: dict[str, Any] = {}
    step = "data"
    try:
        users = active_users(world_dir, as_of_ms, export_config.active_window_ms)
        log(f"cycle {cycle}: data as of {as_of_ms}: {users.size:,} active users")
        step = "train"
        if trainer is None:
            run_dir = Path(run)
        else:
            run_dir = Path(trainer(world_dir, as_of_ms, out_dir / "cycles" / f"{cycle:04d}" / "run"))
        done["run"] = str(run_dir)
        log(f"cycle {cycle}: tower {run_dir}")
        step = "export"
        summary = export_embeddings(tower_loader(run_dir), world_dir, store_url, as_of_ms, export_config,
                                    user_ids=users, run=str(run_dir))
        done.update(version=summary.version, users=summary.users, compression_ratio=round(summary.compression_ratio, 4))
        log(f"cycle {cycle}: exported version {summary.version} ({summary.users:,} users, "
            f"{summary.compression_ratio:.2f}x smaller than fp32)")
        step = "cache"
        done["cache"] = str(_cache(store_url, users, out_dir / "cache", summary.version))
        log(f"cycle {cycle}: cached {done['cache']}")
        status, error, step = "ok", None, None
    except Exception as exc:  # noqa: BLE001 (a recurring job outlives a bad cycle; the record keeps the error)
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        log(f"cycle {cycle}: FAILED at {step}: {error}")
        if not isinstance(exc, (ConfigError, DataError)):
            log(traceback.format_exc().rstrip())
    return CycleRecord(cycle, due_ms, started_ms, as_of_ms, status, step, error, served_version=_served(store_url),
                       seconds=round(time.perf_counter() - start, 3), **done)


def _cache(store_url: str, users: np.ndarray, cache_dir: Path, version: int, batch: int = 4096) -> Path:
    """Read ``version`` back through a reader and keep its records in ``cache_dir``."""
    with EmbeddingReader(store_url) as reader:
        parts = [reader.get_words(users[a:a + batch]) for a in range(0, users.size, batch)]
    pointers = {p["version"] for _, _, p in parts}
    if pointers != {version} or not all(found.all() for _, found, _ in parts):
        raise DataError(store_url, f"read back versions {sorted(pointers)} with users missing, not version {version} "
                                   "whole (another exporter writes to this store?)")
    pointer = parts[0][2]
    path = cache_dir / f"v{version:012d}.npz"
    words = np.concatenate([w for w, _, _ in parts])
    write_atomic(path, lambda f: np.savez(f, user_ids=users, words=words, version=version,  # whole or absent
                                          as_of_ms=pointer["as_of_ms"], rows=pointer["rows"], dim=pointer["dim"]))
    return path


def _served(store_url: str) -> int | None:
    """The version the store serves now, None if none or the store cannot be read."""
    try:
        with EmbeddingReader(store_url) as reader:
            pointer = reader.current()
    except (ConfigError, DataError):
        return None
    return None if pointer is None else int(pointer["version"])


def read_cache(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A cached version: user ids ``(U,)``, dequantized float32 embeddings ``(U, rows, dim)``, and
    its ``version``, ``as_of_ms``, ``rows`` and ``dim``.

    Raises:
        DataError: not a cache file.
    """
    try:
        with np.load(path) as f:
            meta = {key: int(f[key]) for key in ("version", "as_of_ms", "rows", "dim")}
            users, words = f["user_ids"], f["words"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(path, f"not a DV365 embedding cache file ({exc})") from None
    return users, dequantize_4bit(from_words_4bit(words, meta["dim"])), meta
