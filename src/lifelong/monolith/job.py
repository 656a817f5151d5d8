"""``lifelong monolith online``: replay a world into a stream, train on it continuously, sync serving.

Three parts run together in one process:

1. **The producer** (a thread) appends the world's events to the stream in time order
   (:func:`~lifelong.store.stream.replay`), as fast as possible or paced by ``speedup``.
   Restarted on a stream that already holds some of them, it appends only the rest, so a
   killed job resumed with the same arguments neither loses nor repeats an event.
2. **The trainer** (:class:`~lifelong.monolith.online.OnlineTrainer`) reads the stream, joins,
   trains, and checkpoints with its offset; a checkpoint directory that holds a checkpoint is
   resumed from it.
3. **The syncer** (:class:`~lifelong.monolith.sync.Syncer`): every ``sync_every_s`` seconds the
   trainer stops after its current read, checkpoints, and pushes the rows touched since the
   previous push (dense weights every ``dense_every`` pushes) to a running
   ``lifelong serve --online``.

The job ends when the producer is done and the trainer has caught up, with a last checkpoint
and a last push.

Example::

    summary = run_online_job(OnlineJob(data="worlds/small", stream="stream/small",
                                       ckpt_dir="runs/online", serve="http://127.0.0.1:8000"))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lifelong.core.errors import ConfigError, LifelongError
from lifelong.data.io import read_parquet
from lifelong.data.protocol import DAY_MS
from lifelong.monolith.online import OnlineConfig, OnlineModel, OnlineTrainer
from lifelong.monolith.ranker import ItemCatalog
from lifelong.monolith.sync import Syncer, SyncReply
from lifelong.store.stream import EventStream, open_stream, replay

__all__ = ["JobSummary", "OnlineJob", "StreamLearner", "run_online_job", "stream_records"]


@dataclass(frozen=True)
class OnlineJob:
    """One ``lifelong monolith online`` run.

    Args:
        data: the world (or ingested dataset) directory whose events are replayed.
        stream: the event stream URL (a path or ``log:///path``: the embedded log; ``redis://``).
        ckpt_dir: the trainer's checkpoint directory (resumed when it holds a checkpoint).
        serve: base URL of a running ``lifelong serve --online`` (None: train without syncing).
        sync_every_s: wall seconds between two pushes.
        last_days: replay only the events of the world's last this many days (None: all).
        speedup: pace the replay at this many event-ms per wall-ms (None: as fast as possible).
        replay_events: run the producer; False trains on what the stream holds or receives
            from another producer, until it has been idle for ``idle_exit_s``.
        idle_exit_s: with ``replay_events=False``, stop after the stream has had nothing new
            for this long.
        training: the trainer's configuration.
    """

    data: str | Path
    stream: str
    ckpt_dir: str | Path
    serve: str | None = None
    sync_every_s: float = 10.0
    last_days: float | None = None
    speedup: float | None = None
    replay_events: bool = True
    idle_exit_s: float = 5.0
    training: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self) -> None:
        if not self.sync_every_s > 0:
            raise ConfigError(f"sync_every_s must be > 0, got {self.sync_every_s}")
        if self.last_days is not None and not self.last_days > 0:
            raise ConfigError(f"last_days must be > 0, got {self.last_days}")
        if self.idle_exit_s < 0:
            raise ConfigError(f"idle_exit_s must be >= 0, got {self.idle_exit_s}")
        if not (Path(self.data) / "events.parquet").is_file():
            raise ConfigError(f"{self.data} has no events.parquet: pass a world (lifelong simulate) or an ingested "
                              "dataset directory")


@dataclass
class JobSummary:
    """What a job did.

    Args:
        replayed: events the producer appended in this run.
        skipped: events already in the stream when the producer started.
        events, examples: consumed / trained by the trainer in this run.
        syncs: every push's reply, in order.
        checkpoint_offset: the stream offset of the last checkpoint.
        seconds: wall time.
    """

    replayed: int = 0
    skipped: int = 0
    events: int = 0
    examples: int = 0
    syncs: list[SyncReply] = field(default_factory=list)
    checkpoint_offset: object = None
    seconds: float = 0.0

    @property
    def failed_syncs(self) -> int:
        return sum(not s.applied for s in self.syncs)


class StreamLearner:
    """The online job's trainer and syncer, driven by a caller instead of a clock.

    Each :meth:`learn` trains on everything the stream holds that it has not consumed yet and
    pushes the change (touched rows and the dense weights) to the service. ``lifelong abtest``
    calls it after each window of simulated time, so every push lands before the next window is
    ranked however long training takes in wall time (docs/abtest.md, "Online arms").

    Args:
        model: the model to train (e.g. a TransAct run's :class:`~lifelong.transact.online.TransActOnline`).
        stream: the event stream it learns from.
        ckpt_dir: its checkpoint directory (written by :meth:`close`; resumed when it holds one).
        serve: base URL of the service that takes its pushes (``lifelong serve --accept-sync``).
        training: the trainer's configuration.
        on_close: also called by :meth:`close` (e.g. closing the store the model reads).
    """

    def __init__(self, model: OnlineModel, stream: str, ckpt_dir: str | Path, serve: str, training: OnlineConfig,
                 on_close: Callable[[], None] | None = None):
        self.trainer = OnlineTrainer(training, stream, None, ckpt_dir, model=model)
        self.syncer = Syncer(self.trainer, serve)
        self.summary = JobSummary()
        self._on_close = on_close

    def learn(self) -> SyncReply | None:
        """Train on what is new in the stream; push when a step changed the parameters.

        Returns the push's reply (a failed push is counted, not raised: the next one is a full
        snapshot), or None when nothing was trained.
        """
        stats = self.trainer.run(checkpoint=False)
        self.summary.events += stats.events
        self.summary.examples += stats.examples
        if not stats.steps:
            return None
        reply = self.syncer.sync(dense=True)
        self.summary.syncs.append(reply)
        return reply

    def describe(self) -> dict:
        """Events and examples trained, pushes made and applied, their mean size and time."""
        syncs = self.summary.syncs
        applied = [s for s in syncs if s.applied]
        return {"events": self.summary.events, "examples": self.summary.examples, "pushes": len(syncs),
                "pushes_applied": len(applied), "last_version": applied[-1].version if applied else None,
                "mean_push_kib": round(float(np.mean([s.bytes for s in syncs])) / 2**10, 1) if syncs else 0.0,
                "mean_push_ms": round(float(np.mean([s.seconds for s in syncs])) * 1000, 2) if syncs else 0.0}

    def close(self) -> None:
        """Checkpoint what was trained since the last checkpoint, release the stream and the service."""
        try:
            self.trainer.checkpoint()
        finally:
            self.syncer.close()
            self.trainer.close()
            if self._on_close is not None:
                self._on_close()


def stream_records(stream: EventStream) -> int:
    """Events a stream holds (record-number offsets: its end; Redis: counted by reading through)."""
    end = stream.end_offset()
    if isinstance(end, int):
        return end
    n, offset = 0, stream.start_offset()
    while True:
        records, offset = stream.read(offset, 1 << 16)
        if not len(records):
            return n
        n += len(records)


def _window(data: Path, last_days: float | None) -> tuple[int | None, int]:
    """(start_ms of the replay, events in it)."""
    ts = read_parquet(data / "events.parquet", columns=["ts_ms"]).column("ts_ms").to_numpy()
    if last_days is None or not len(ts):
        return None, len(ts)
    start = int(ts.max()) + 1 - int(last_days * DAY_MS)
    return start, int(np.count_nonzero(ts >= start))


def run_online_job(job: OnlineJob, log: Callable[[str], None] = lambda _: None,
                   progress: Callable[[int, int, JobSummary], None] | None = None,
                   model: OnlineModel | None = None) -> JobSummary:
    """Run the job to its end; see the module docstring.

    Args:
        job: what to run.
        model: the model to train (default: Monolith's online ranker over the world's item
            catalog); e.g. a TransAct run, composed by ``lifelong monolith online --model-run``.
        log: called with a line per push and per notable event.
        progress: called after every training slice with (events consumed in this run,
            events the stream will hold in all, the summary so far).

    Raises:
        ConfigError: a bad stream URL, a checkpoint of another configuration or stream.
        LifelongError: the producer failed (raised once the trainer has checkpointed).
    """
    t0 = time.monotonic()
    data = Path(job.data)
    summary = JobSummary()
    start_ms, total = _window(data, job.last_days)
    catalog = ItemCatalog.from_dataset(data) if model is None else None
    producer_error: list[BaseException] = []
    done = threading.Event()
    producer: threading.Thread | None = None
    if job.replay_events:
        writer = open_stream(job.stream)
        summary.skipped = held = stream_records(writer)
        if held > total:
            writer.close()
            raise ConfigError(f"{job.stream} holds {held:,} events, more than the {total:,} to replay: it is another "
                              "replay's stream (use a new --stream, or --no-replay to train on it as it is)")

        def produce() -> None:
            try:
                summary.replayed = replay(data, writer, start_ms=start_ms, speedup=job.speedup, skip=held).events
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                producer_error.append(exc)
            finally:
                writer.close()
                done.set()

        producer = threading.Thread(target=produce, name="lifelong-producer", daemon=True)
        producer.start()
    else:
        done.set()
    trainer = OnlineTrainer(job.training, job.stream, catalog, job.ckpt_dir, model=model)
    syncer = Syncer(trainer, job.serve) if job.serve else None
    consumed_before = trainer.counters.events
    try:
        idle_since = time.monotonic()
        while True:
            finished = done.is_set()  # read before the slice: events appended after it are in the next
            stats = trainer.run(max_seconds=job.sync_every_s)
            summary.events += stats.events
            summary.examples += stats.examples
            if stats.events:
                idle_since = time.monotonic()
            last = stats.caught_up and (finished if job.replay_events
                                        else time.monotonic() - idle_since >= job.idle_exit_s)
            if syncer is not None and (stats.events or last or not summary.syncs):
                reply = syncer.sync(dense=last)  # the last push leaves serving on the checkpoint's weights
                summary.syncs.append(reply)
                log(f"sync v{reply.version}: {'full, ' if reply.full else ''}{reply.rows:,} rows, "
                    f"{reply.bytes / 2**10:,.0f} KiB, {reply.seconds * 1000:.0f} ms"
                    + ("" if reply.applied else f"  NOT APPLIED ({reply.error}); next push is full"))
            if progress is not None:
                progress(trainer.counters.events - consumed_before, total - summary.skipped, summary)
            if last:
                break
            if stats.caught_up:  # the producer is behind (paced): wait for it instead of spinning
                done.wait(min(job.sync_every_s, 0.5))
        summary.checkpoint_offset = trainer.offset
    finally:
        # On an error the producer (a daemon thread) is left to die with the process: replay
        # cannot be interrupted, and a resumed job appends only what is missing anyway.
        if syncer is not None:
            syncer.close()
        trainer.close()
    if producer is not None:
        producer.join()
    if producer_error:
        exc = producer_error[0]
        if isinstance(exc, LifelongError):
            raise exc
        raise ConfigError(f"the producer failed: {type(exc).__name__}: {exc}") from exc
    summary.seconds = time.monotonic() - t0
    return summary

