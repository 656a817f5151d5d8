"""Online training from an event stream, with exactly-once checkpoints and incremental parameter export.

:class:`OnlineTrainer` is Monolith's training loop (docs/design.md, "Monolith:
training"): read events from a stream offset, join impressions with their actions
(:class:`~lifelong.monolith.joiner.OnlineJoiner`), train the
:class:`~lifelong.monolith.ranker.OnlineRanker` on every emitted example once (dense weights with
``torch.optim``, id rows with each table's own sparse optimizer), and keep going.

**Exactly once.** Everything that consuming an event changes (tables, dense weights, dense
optimizer state, the joiner's open windows, metrics, counters, the audit of applied examples)
is saved in one checkpoint directory together with the stream offset of the next unread event.
The directory is written under a temporary name, fsynced, then renamed into place (a rename is
atomic), so a checkpoint is either entirely there or not at all, and the previous one is
removed only after the new one is complete. A restart loads the newest checkpoint and reads on
from its offset: events consumed after it are consumed again, by a trainer in exactly the
state that first consumed them, so every example is applied once. With the same reads (same
``read_records``, limits on whole reads) the batches are the same too, and the result is
bit-for-bit the uninterrupted run's. One trainer per checkpoint directory (a ``flock``
on ``LOCK``, released by the OS when the process dies).

Checkpoint directory::

    <ckpt_dir>/LOCK                      held by the running trainer
    <ckpt_dir>/published.json            the last delta version handed out and the lineage id (see below)
    <ckpt_dir>/ckpt-000000000042/
        state.json                       config, stream URL, offset, counters, finished metric windows
        state.npz                        joiner state, audit, pending metric rows
        dense.pt                         dense weights and optimizer state (torch.load(weights_only=True))
        tables/<slot>/                   EmbeddingTable.save of each id slot

**Progressive validation.** Each batch's predictions are taken from the forward pass that
trains on it, i.e. before the model has seen those examples. They are aggregated per window of
impression time (``metrics_window_ms``, e.g. an hour): log loss, AUC and positive rate per head
(:class:`WindowMetrics`). A window is reported once the watermark is past its end plus the join
window, when no example of it can still come (a late one is counted in the oldest open window).

**Deltas for serving.** :meth:`OnlineTrainer.delta` returns the rows touched (updated, newly
admitted) and removed (expired) since the previous call, per table, plus the dense weights every
``dense_every`` deltas. Each delta names its ``version`` and the ``base_version`` it applies on
top of; the first delta of a trainer process is a full snapshot (``base_version=None``), since
after a restart the trainer's state is that of its checkpoint, not that of what was published.
Versions increase across restarts: the counter is persisted (``published.json``) on every call,
as a publication cannot be taken back by restoring a checkpoint. Every delta also names its
lineage, a random id made with the checkpoint directory, so that a replica never stacks a delta
of one trainer on a version of another that happens to carry the same number. :class:`ParameterReplica` is the
receiving end: it applies deltas in order and refuses one that does not follow its version.

Example::

    catalog = ItemCatalog.from_dataset("worlds/small")
    with OnlineTrainer(OnlineConfig(), "log:///data/stream", catalog, "runs/online") as trainer:
        trainer.run()                                 # resumes from runs/online if it holds a checkpoint
        replica.apply(trainer.delta())                # push to serving
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lifelong.core.config import build
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.metrics import auc
from lifelong.core.sorted_index import positions_in
from lifelong.data.io import write_json
from lifelong.data.schema import HEADS
from lifelong.modules.heads import ranking_loss
from lifelong.monolith.joiner import JoinerConfig, OnlineJoiner
from lifelong.monolith.ranker import ItemCatalog, OnlineRanker, OnlineRankerConfig
from lifelong.serving.sync import Delta, ParameterReplica, TableDelta
from lifelong.store.stream import EventStream, Offset, open_stream
from lifelong.tables.embedding import CollisionlessEmbedding
from lifelong.tables.table import EmbeddingTable

__all__ = [
    "Delta", "ExampleAudit", "OnlineBatchLike", "OnlineConfig", "OnlineCounters", "OnlineModel", "OnlineTrainer",
    "ParameterReplica", "RunStats", "TableDelta", "WindowMetrics", "latest_checkpoint",
]

FORMAT = "lifelong.monolith.online/1"
DENSE_OPTIMIZERS = ("adagrad", "adam")
DELTA_FORMATS = ("fp32", "fp16")

_CKPT = re.compile(r"ckpt-(\d{12})")
# Config fields that may change between a checkpoint and its restart: they set cadence and
# batching, not the meaning of the saved state.
_FREE_ON_RESUME = frozenset({"read_records", "batch_size", "checkpoint_every", "keep_checkpoints", "delta_format",
                             "dense_every"})
_NO_TIME = np.iinfo(np.int64).min
_K = [np.uint64(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                             0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


@dataclass(frozen=True)
class OnlineConfig:
    """One online training job.

    Args:
        model: the ranker's tables and layers.
        joiner: how long an impression waits for its actions.
        read_records: most events per stream read; the examples a read emits are trained
            before the next read, so this bounds how far training lags the stream.
        batch_size: most examples per optimizer step.
        optimizer: dense optimizer, ``"adagrad"`` or ``"adam"`` (``torch.optim``); the id rows
            use their tables' own optimizers.
        lr: dense learning rate.
        head_weights: BCE weight of each head of :data:`~lifelong.data.schema.HEADS`.
        checkpoint_every: checkpoint once this many examples were trained since the last one
            (checked after each read; :meth:`OnlineTrainer.run` also checkpoints when it returns).
        keep_checkpoints: complete checkpoints kept on disk (the newest ones).
        metrics_window_ms: width of a progressive-validation window, in impression time.
        expire_every_ms: stream time between two expiry passes over the tables (only tables
            with a ``ttl_ms`` lose rows).
        delta_format: dtype of the rows in :meth:`OnlineTrainer.delta`: ``"fp16"`` or ``"fp32"``.
        dense_every: deltas carry the dense weights every this many calls (and always when full).

    Example::

        >>> OnlineConfig(optimizer="sgd")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: optimizer must be one of adagrad, adam, got 'sgd'
        >>> cfg = OnlineConfig(batch_size=256)
        >>> OnlineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        True
    """

    model: OnlineRankerConfig = field(default_factory=OnlineRankerConfig)
    joiner: JoinerConfig = field(default_factory=JoinerConfig)
    read_records: int = 4096
    batch_size: int = 512
    optimizer: str = "adagrad"
    lr: float = 0.01
    head_weights: tuple[float, ...] = (1.0,) * len(HEADS)
    checkpoint_every: int = 100_000
    keep_checkpoints: int = 2
    metrics_window_ms: int = 3_600_000
    expire_every_ms: int = 3_600_000
    delta_format: str = "fp16"
    dense_every: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_weights", tuple(float(w) for w in self.head_weights))
        if self.optimizer not in DENSE_OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(DENSE_OPTIMIZERS)}, got {self.optimizer!r}")
        if self.delta_format not in DELTA_FORMATS:
            raise ConfigError(f"delta_format must be one of {', '.join(DELTA_FORMATS)}, got {self.delta_format!r}")
        if len(self.head_weights) != len(HEADS) or any(w < 0 for w in self.head_weights):
            raise ConfigError(f"head_weights must be {len(HEADS)} non-negative weights ({', '.join(HEADS)}), "
                              f"got {self.head_weights}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("read_records", "batch_size", "checkpoint_every", "keep_checkpoints", "metrics_window_ms",
                     "expire_every_ms", "dense_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnlineConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: unknown or invalid fields.
        """
        return build(cls, d)


class OnlineBatchLike(Protocol):
    """What the trainer reads of a featurized batch; everything else only the model reads."""

    labels: torch.Tensor
    """(B, H) float32 0/1 labels, in :data:`~lifelong.data.schema.HEADS` order."""
    known_items: int
    """How many of the B examples' items the model's catalog knew."""

    def __len__(self) -> int: ...


@runtime_checkable
class OnlineModel(Protocol):
    """What :class:`OnlineTrainer` needs of a model, whichever room it comes from.

    Monolith's :class:`~lifelong.monolith.ranker.OnlineRanker` implements it, and so does
    TransAct V2 (``lifelong.transact.online.TransActOnline``, composed by the command line: this
    room never imports another). The model is in training mode while the trainer holds it.
    """

    tables: Mapping[str, CollisionlessEmbedding]
    """Slot -> its collision-less table (checkpointed, expired, and pushed row by row)."""

    def featurize(self, examples: np.ndarray) -> tuple[OnlineBatchLike, np.ndarray]:
        """The batch of joined examples (:data:`~lifelong.monolith.joiner.EXAMPLE_DTYPE`) and the
        ascending indices of the examples it holds (a model may skip examples it cannot featurize)."""

    def logits(self, batch: Any, now_ms: int) -> torch.Tensor:
        """(B, H) logits of a training forward; rows admitted by it are stamped ``now_ms``."""

    def dense_parameters(self) -> Iterable[nn.Parameter]:
        """What the dense ``torch.optim`` optimizer owns (never the tables' rows)."""

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense weights, checkpointed and pushed as :attr:`Delta.dense`."""

    def load_dense_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`dense_state_dict`."""

    def wire_model(self) -> tuple[str, dict[str, Any]]:
        """The model's kind and configuration (plain data), sent with every delta."""


@dataclass(frozen=True)
class WindowMetrics:
    """Progressive validation over the examples whose impression fell in ``[start_ms, end_ms)``.

    Args:
        start_ms, end_ms: the window.
        examples: examples trained.
        loss: mean over examples of the BCE summed over heads, before training on them.
        auc: head -> AUC of the predictions (None when the window has one class only).
        positive_rate: head -> share of positive labels.
    """

    start_ms: int
    end_ms: int
    examples: int
    loss: float
    auc: dict[str, float | None]
    positive_rate: dict[str, float]


class _Windows:
    """Predictions and labels of the windows not yet reported; see the module docstring."""

    def __init__(self, window_ms: int, join_ms: int):
        self.window_ms, self.join_ms = window_ms, join_ms
        self.floor = int(_NO_TIME)  # the oldest window not yet reported
        self.done: list[WindowMetrics] = []
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._pending = (np.zeros(0, np.int64), np.zeros((0, len(HEADS)), np.float32),
                         np.zeros((0, len(HEADS)), np.uint8), np.zeros(0, np.float32))

    def add(self, ts_ms: np.ndarray, probs: np.ndarray, labels: np.ndarray, loss: np.ndarray) -> None:
        self._parts.append((np.maximum(ts_ms // self.window_ms, self.floor), probs, labels, loss))

    def _fold(self) -> None:
        if self._parts:
            self._pending = tuple(np.concatenate(cols) for cols in zip(self._pending, *self._parts))
            self._parts = []

    def close(self, watermark_ms: int) -> list[WindowMetrics]:
        """Report every window that no later example can fall in."""
        self._fold()
        bucket, probs, labels, loss = self._pending
        limit = (watermark_ms - self.join_ms) // self.window_ms
        ready = bucket < limit
        out = []
        for b in np.unique(bucket[ready]):
            sel = bucket == b
            y, p = labels[sel], probs[sel]
            aucs = [auc(y[:, h], p[:, h]) for h in range(len(HEADS))]
            out.append(WindowMetrics(
                start_ms=int(b) * self.window_ms, end_ms=(int(b) + 1) * self.window_ms, examples=int(sel.sum()),
                loss=float(loss[sel].mean()), auc={h: None if np.isnan(a) else a for h, a in zip(HEADS, aucs)},
                positive_rate={h: float(y[:, i].mean()) for i, h in enumerate(HEADS)}))
        self._pending = tuple(col[~ready] for col in self._pending)
        self.floor = max(self.floor, int(limit))
        self.done.extend(out)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._fold()
        names = ("bucket", "probs", "labels", "loss")
        return {"floor": np.array(self.floor, np.int64)} | {n: a for n, a in zip(names, self._pending)}

    def load_state_dict(self, state: dict[str, np.ndarray], done: list[WindowMetrics]) -> None:
        self.floor, self.done, self._parts = int(state["floor"]), done, []
        self._pending = tuple(np.array(state[n]) for n in ("bucket", "probs", "labels", "loss"))


def _example_hashes(examples: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each example's identity and labels (impression key, time, action mask)."""
    h = np.zeros(len(examples), np.uint64)
    for name, k in zip(("user_id", "item_id", "request_id", "ts_ms", "action_mask"), _K):
        h ^= examples[name].astype(np.uint64) * k
        h = (h ^ (h >> np.uint64(31))) * _K[5]
    return h ^ (h >> np.uint64(29))


class ExampleAudit:
    """Which examples were applied: a count per item id, and an order-independent fingerprint.

    The fingerprint is the sum (mod 2**64) of a hash of every example, so two audits are equal
    when the same multiset of examples was applied, whatever the order or batching: an example
    applied twice or lost changes it. Saved with each checkpoint.

    Example::

        >>> from lifelong.monolith.joiner import EXAMPLE_DTYPE
        >>> ex = np.zeros(3, EXAMPLE_DTYPE); ex["item_id"] = [4, 9, 4]; ex["user_id"] = [1, 2, 3]
        >>> a, b = ExampleAudit(), ExampleAudit()
        >>> a.add(ex); b.add(ex[2:]); b.add(ex[:2])
        >>> a == b, a.examples, a.counts([4, 9, 5]).tolist()
        (True, 3, [2, 1, 0])
        >>> b.add(ex[:1]); a == b
        False
    """

    def __init__(self) -> None:
        self._ids = np.zeros(0, np.int64)
        self._counts = np.zeros(0, np.int64)
        self._new: list[np.ndarray] = []  # item ids of examples added since the last fold
        self._fingerprint = np.zeros(1, np.uint64)  # an array: numpy scalars warn on wrap-around

    @property
    def item_ids(self) -> np.ndarray:
        """Ids of the items with applied examples, ascending."""
        self._fold()
        return self._ids

    @property
    def item_counts(self) -> np.ndarray:
        """Examples applied per item of :attr:`item_ids`."""
        self._fold()
        return self._counts

    @property
    def examples(self) -> int:
        return int(self.item_counts.sum())

    @property
    def fingerprint(self) -> int:
        return int(self._fingerprint[0])

    def add(self, examples: np.ndarray) -> None:
        """Record examples of :data:`~lifelong.monolith.joiner.EXAMPLE_DTYPE` as applied."""
        self._new.append(np.asarray(examples["item_id"], dtype=np.int64))
        self._fingerprint += _example_hashes(examples).sum(dtype=np.uint64)
        if len(self._new) >= 256:  # merging costs O(items): do it now and then, not every batch
            self._fold()

    def _fold(self) -> None:
        if not self._new:
            return
        n_old = len(self._ids)
        ids, inv = np.unique(np.concatenate([self._ids, *self._new]), return_inverse=True)
        counts = np.zeros(len(ids), np.int64)
        counts[inv[:n_old]] = self._counts
        np.add.at(counts, inv[n_old:], 1)
        self._ids, self._counts, self._new = ids, counts, []

    def counts(self, item_ids: object) -> np.ndarray:
        """Examples applied per item id (0 for ids never seen)."""
        pos, found = positions_in(self.item_ids, np.asarray(item_ids, dtype=np.int64))
        if not len(self.item_ids):
            return np.zeros(found.shape, np.int64)
        return np.where(found, self.item_counts[pos], 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExampleAudit):
            return NotImplemented
        return (self.fingerprint == other.fingerprint and np.array_equal(self.item_ids, other.item_ids)
                and np.array_equal(self.item_counts, other.item_counts))

    def __repr__(self) -> str:
        return f"ExampleAudit(examples={self.examples}, items={len(self.item_ids)}, fingerprint={self.fingerprint:#x})"

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"item_ids": self.item_ids, "item_counts": self.item_counts, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._ids, self._counts, self._new = np.array(state["item_ids"]), np.array(state["item_counts"]), []
        self._fingerprint = np.array(state["fingerprint"], dtype=np.uint64).reshape(1)


@dataclass
class OnlineCounters:
    """Totals over the trainer's whole lineage (restored with each checkpoint).

    Args:
        events: events consumed.
        examples: examples trained.
        steps: optimizer steps.
        unknown_items: examples whose item the catalog did not know.
        expired_rows: rows dropped by expiry.
        checkpoints: checkpoints written (the sequence number of the newest).
        train_seconds: wall time spent consuming events (reading, joining, training).
    """

    events: int = 0
    examples: int = 0
    steps: int = 0
    unknown_items: int = 0
    expired_rows: int = 0
    checkpoints: int = 0
    train_seconds: float = 0.0


@dataclass(frozen=True)
class RunStats:
    """What one :meth:`OnlineTrainer.run` call did.

    Args:
        events, examples, steps: consumed / trained in this call.
        seconds: wall time of the call (checkpoints included).
        offset: the stream offset of the next unread event.
        caught_up: the call stopped because the stream had nothing more (rather than at a limit).
    """

    events: int
    examples: int
    steps: int
    seconds: float
    offset: Offset
    caught_up: bool

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``ckpt_dir`` (None when there is none).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for name in ("ckpt-000000000002", "ckpt-000000000010", ".tmp-000000000011-77"):
        ...         os.mkdir(os.path.join(d, name))
        ...     latest_checkpoint(d).name
        'ckpt-000000000010'
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if _CKPT.fullmatch(p.name))
    return found[-1] if found else None


class OnlineTrainer:
    """Trains an :class:`OnlineModel` (by default an :class:`~lifelong.monolith.ranker.OnlineRanker`) from a
    stream, resumably; see the module docstring.

    Opening a trainer on a directory that holds a checkpoint restores it (and its offset);
    otherwise training starts from ``start_offset``. Leftovers of a checkpoint being written
    when a previous trainer died are removed.

    Args:
        cfg: the job; on restore it must match the checkpoint's, except for ``read_records``,
            ``batch_size``, ``checkpoint_every``, ``keep_checkpoints``, ``delta_format`` and
            ``dense_every``.
        stream: an open stream, or a URL for :func:`~lifelong.store.stream.open_stream`
            (then the trainer closes it).
        catalog: item metadata of the default model (unused with ``model``).
        ckpt_dir: the checkpoint directory (created if missing).
        start_offset: where a fresh trainer starts reading (default: the stream's start).
        log: called with a line per checkpoint and per finished metric window.
        model: the model to train (None: an ``OnlineRanker(cfg.model, catalog)``); a
            checkpoint in ``ckpt_dir`` replaces its tables and dense weights.

    Raises:
        ConfigError: another trainer holds ``ckpt_dir``, or the checkpoint was made with
            another configuration or stream.
        DataError: the newest checkpoint is unreadable.

    Example::

        >>> import tempfile
        >>> from lifelong.store.stream import EVENT_DTYPE, LogStream
        >>> ev = np.zeros(3, EVENT_DTYPE); ev["item_id"] = [1, 2, 1]; ev["action_mask"] = [1, 3, 1]
        >>> ev["ts_ms"] = [0, 10, 5_000]  # the last event closes the first two windows
        >>> cat = ItemCatalog([1, 2], author_ids=[7, 7], topic_ids=[0, 1], embeddings=np.zeros((2, 32)))
        >>> cfg = OnlineConfig(joiner=JoinerConfig(window_ms=1_000))
        >>> with tempfile.TemporaryDirectory() as d, LogStream(f"{d}/log") as log:
        ...     _ = log.append(ev)
        ...     with OnlineTrainer(cfg, log, cat, f"{d}/ckpt") as trainer:
        ...         stats = trainer.run()
        ...     with OnlineTrainer(cfg, log, cat, f"{d}/ckpt") as restored:
        ...         state = restored.offset, restored.counters.examples, restored.audit.counts([1, 2]).tolist()
        >>> stats.events, stats.examples, stats.offset, state
        (3, 2, 3, (3, 2, [1, 1]))
    """

    def __init__(self, cfg: OnlineConfig, stream: EventStream | str | os.PathLike[str], catalog: ItemCatalog | None,
                 ckpt_dir: str | os.PathLike[str], start_offset: Offset | None = None,
                 log: Callable[[str], None] | None = None, model: OnlineModel | None = None):
        self.cfg = cfg
        self.catalog = catalog
        self.ckpt_dir = Path(ckpt_dir)
        self._log = log or (lambda _: None)
        self._lock_fd = self._lock(self.ckpt_dir)
        self._owns_stream = not isinstance(stream, EventStream)
        try:
            self.stream = open_stream(stream) if self._owns_stream else stream
            self.model: OnlineModel = OnlineRanker(cfg.model, catalog) if model is None else model
            self.slots: tuple[str, ...] = tuple(self.model.tables)
            params = self.model.dense_parameters()
            self.optimizer = (torch.optim.Adagrad(params, lr=cfg.lr) if cfg.optimizer == "adagrad"
                              else torch.optim.Adam(params, lr=cfg.lr))
            self.joiner = OnlineJoiner(cfg.joiner)
            self.audit = ExampleAudit()
            self.counters = OnlineCounters()
            self._windows = _Windows(cfg.metrics_window_ms, cfg.joiner.window_ms)
            self._head_weights = torch.tensor(cfg.head_weights)
            self._next_expire_ms: int | None = None
            self._unsaved_events = self._unsaved_examples = 0
            # Delta bookkeeping is per process: the first delta is full, so none of it is saved.
            self._touched: dict[str, list[np.ndarray]] = {slot: [] for slot in self.slots}
            self._expired: dict[str, list[np.ndarray]] = {slot: [] for slot in self.slots}
            self._last_delta: int | None = None
            self._deltas_since_dense = 0
            for stale in self.ckpt_dir.glob(".tmp-*"):  # a checkpoint that was being written when its writer died
                shutil.rmtree(stale, ignore_errors=True)
            latest = latest_checkpoint(self.ckpt_dir)
            if latest is None:
                self.offset: Offset = self.stream.start_offset() if start_offset is None else start_offset
            else:
                self._restore(latest)
        except BaseException:
            self.close()
            raise

    # -- public API ------------------------------------------------------------------------------

    @property
    def watermark_ms(self) -> int | None:
        """Event time: the largest ``ts_ms`` consumed (None before any event)."""
        return self.joiner.watermark

    @property
    def metrics(self) -> list[WindowMetrics]:
        """Every finished progressive-validation window, oldest first."""
        return list(self._windows.done)

    def run(self, max_events: int | None = None, until_offset: int | None = None,
            max_seconds: float | None = None, checkpoint: bool = True) -> RunStats:
        """Consume the stream from :attr:`offset` until it has nothing more or a limit is reached,
        then checkpoint (if anything was consumed since the last checkpoint and ``checkpoint``).

        Call again to continue from where it stopped (e.g. to follow a live stream).

        Args:
            max_events: consume at most this many events.
            until_offset: stop at this offset (record-number offsets, i.e. a
                :class:`~lifelong.store.stream.LogStream`, only).
            max_seconds: stop after the first read that ends this long after the call began
                (a sync cadence: train, checkpoint, push the delta, go on).
            checkpoint: checkpoint when returning; False for a caller that calls often (each
                minute of an A/B test) and checkpoints itself (``checkpoint_every`` still applies).

        Raises:
            ConfigError: a negative limit, or ``until_offset`` on a stream whose offsets are not
                record numbers.
        """
        if max_events is not None and max_events < 0:
            raise ConfigError(f"max_events must be >= 0, got {max_events}")
        if max_seconds is not None and max_seconds < 0:
            raise ConfigError(f"max_seconds must be >= 0, got {max_seconds}")
        if until_offset is not None and not isinstance(self.offset, int):
            raise ConfigError(f"until_offset needs record-number offsets; {self.stream.url} has offsets like "
                              f"{self.offset!r} (use max_events)")
        t0 = time.perf_counter()
        events = examples = steps = 0
        caught_up = False
        while True:
            want = self.cfg.read_records
            if max_events is not None:
                want = min(want, max_events - events)
            if until_offset is not None:
                want = min(want, until_offset - self.offset)
            if want <= 0:
                break
            records, next_offset = self.stream.read(self.offset, want)
            if not len(records):
                caught_up = True
                break
            before = self.counters.steps, self.counters.examples
            self._consume(records, next_offset)
            events += len(records)
            steps += self.counters.steps - before[0]
            examples += self.counters.examples - before[1]
            if self._unsaved_examples >= self.cfg.checkpoint_every:
                self.checkpoint()
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                break
        if checkpoint and self._unsaved_events:
            self.checkpoint()
        return RunStats(events=events, examples=examples, steps=steps, seconds=time.perf_counter() - t0,
                        offset=self.offset, caught_up=caught_up)

    def checkpoint(self) -> Path:
        """Write a checkpoint of everything consumed so far; returns its directory.

        Written to a temporary directory, fsynced, renamed into place; then all but the newest
        ``keep_checkpoints`` are removed.
        """
        seq = self.counters.checkpoints + 1
        final = self.ckpt_dir / f"ckpt-{seq:012d}"
        tmp = self.ckpt_dir / f".tmp-{seq:012d}-{os.getpid()}"
        counters = dataclasses.replace(self.counters, checkpoints=seq)
        try:
            tmp.mkdir()
            for slot, emb in self.model.tables.items():
                emb.table.save(tmp / "tables" / slot)
            torch.save({"dense": self.model.dense_state_dict(), "optimizer": self.optimizer.state_dict()},
                       tmp / "dense.pt")
            arrays = {f"joiner.{k}": v for k, v in self.joiner.state_dict().items()}
            arrays |= {f"audit.{k}": v for k, v in self.audit.state_dict().items()}
            arrays |= {f"windows.{k}": v for k, v in self._windows.state_dict().items()}
            np.savez(tmp / "state.npz", **arrays)
            kind, model = self.model.wire_model()
            write_json({"format": FORMAT, "config": self.cfg.to_dict(), "model_kind": kind, "model": model,
                        "stream": self.stream.url,
                        "offset": self.offset, "counters": asdict(counters), "next_expire_ms": self._next_expire_ms,
                        "metrics": [asdict(w) for w in self._windows.done]}, tmp / "state.json")
            _fsync_tree(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(self.ckpt_dir)  # the rename itself
        self.counters = counters
        self._unsaved_events = self._unsaved_examples = 0
        old = sorted(p for p in self.ckpt_dir.iterdir() if _CKPT.fullmatch(p.name))[: -self.cfg.keep_checkpoints]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        self._log(f"checkpoint {seq}: offset {self.offset}, {self.counters.events} events, "
                  f"{self.counters.examples} examples, watermark {self.watermark_ms}")
        return final

    def delta(self, full: bool = False, dense: bool = False) -> Delta:
        """Rows touched and removed since the previous delta, with the next version number.

        The first delta of a trainer object is a full snapshot, as is any with ``full=True``
        (e.g. when serving lost track). Dense weights come with full snapshots and every
        ``dense_every``-th delta.

        Args:
            full: export every row instead of the change.
            dense: carry the dense weights whatever ``dense_every`` says (a job's last push, so
                that serving ends with the checkpoint's parameters).
        """
        full = full or self._last_delta is None
        fmt = self.cfg.delta_format
        tables = {}
        for slot, emb in self.model.tables.items():
            table = emb.table
            if full:
                rows = table.export(fmt)
                tables[slot] = TableDelta(rows.ids, rows.values, np.zeros(0, np.int64), rows.default)
                continue
            touched = self._merged(self._touched[slot])
            rows = table.lookup(touched)
            ids = touched[rows >= 0]
            expired = self._merged(self._expired[slot])
            values = table.weights[rows[rows >= 0]].astype(np.float16 if fmt == "fp16" else np.float32)
            tables[slot] = TableDelta(ids, values, expired[table.lookup(expired) < 0], table.default.copy())
        self._deltas_since_dense = 0 if full else self._deltas_since_dense + 1
        with_dense = full or dense or self._deltas_since_dense >= self.cfg.dense_every
        if with_dense:
            self._deltas_since_dense = 0
        version, lineage = self._next_version()
        out = Delta(version=version, base_version=None if full else self._last_delta, watermark_ms=self.watermark_ms,
                    offset=self.offset, tables=tables, lineage=lineage,
                    dense={k: v.detach().cpu().numpy().copy() for k, v in self.model.dense_state_dict().items()}
                    if with_dense else None)
        self._last_delta = version
        self._touched = {slot: [] for slot in self.slots}
        self._expired = {slot: [] for slot in self.slots}
        return out

    def close(self) -> None:
        """Release the checkpoint directory (and the stream, if the trainer opened it); idempotent.

        Nothing is saved: call :meth:`checkpoint` (or let :meth:`run` return) first.
        """
        if self._owns_stream and getattr(self, "stream", None) is not None:
            self.stream.close()
            self.stream = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------------------

    def _consume(self, records: np.ndarray, next_offset: Offset) -> None:
        """Join a read's events and train on every example it emits; move the offset past them."""
        t0 = time.perf_counter()
        examples = self.joiner.push(records)
        now = self.joiner.watermark
        for start in range(0, len(examples), self.cfg.batch_size):
            self._train_batch(examples[start:start + self.cfg.batch_size], now)
        self._expire(now)
        for w in self._windows.close(now):
            aucs = ", ".join(f"{h} {a:.3f}" for h, a in w.auc.items() if a is not None)
            self._log(f"window [{w.start_ms}, {w.end_ms}): {w.examples} examples, loss {w.loss:.4f}, auc {aucs}")
        self.offset = next_offset
        self.counters.events += len(records)
        self.counters.train_seconds += time.perf_counter() - t0
        self._unsaved_events += len(records)
        self._unsaved_examples += len(examples)

    def _train_batch(self, examples: np.ndarray, now_ms: int) -> None:
        """One step on a batch of examples: progressive predictions first, then dense and sparse updates."""
        batch, kept = self.model.featurize(examples)
        if len(kept):
            logits = self.model.logits(batch, now_ms)
            loss = ranking_loss(logits, batch.labels, self._head_weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for slot, emb in self.model.tables.items():  # every id read by this step, before sparse_step forgets them
                self._track(self._touched[slot], np.unique(emb.pending_ids()))
            for emb in self.model.tables.values():
                emb.step(now_ms)
            with torch.no_grad():
                per_row = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none").sum(dim=1)
                self._windows.add(examples["ts_ms"][kept], torch.sigmoid(logits).detach().cpu().numpy(),
                                  examples["labels"][kept], per_row.cpu().numpy())
            self.counters.steps += 1
        self.audit.add(examples)
        self.counters.examples += len(examples)
        self.counters.unknown_items += len(examples) - batch.known_items

    def _expire(self, now_ms: int) -> None:
        if all(emb.table.cfg.ttl_ms is None for emb in self.model.tables.values()):
            return
        if self._next_expire_ms is not None and now_ms < self._next_expire_ms:
            return
        for slot, emb in self.model.tables.items():
            gone = emb.table.expire(now_ms)
            self.counters.expired_rows += len(gone)
            self._track(self._expired[slot], gone)
        self._next_expire_ms = now_ms + self.cfg.expire_every_ms

    @staticmethod
    def _track(parts: list[np.ndarray], ids: np.ndarray) -> None:
        """Remember ids for the next delta; merged now and then so the list stays short between deltas."""
        parts.append(ids)
        if len(parts) >= 64:
            parts[:] = [np.unique(np.concatenate(parts))]

    @staticmethod
    def _merged(parts: list[np.ndarray]) -> np.ndarray:
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    # -- persistence -------------------------------------------------------------------------------

    @staticmethod
    def _lock(ckpt_dir: Path) -> int:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the checkpoint directory {ckpt_dir}: {exc}") from None
        fd = os.open(ckpt_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another online trainer is using {ckpt_dir} "
                              "(one trainer per checkpoint directory)") from None
        return fd

    def _next_version(self) -> tuple[int, str]:
        path = self.ckpt_dir / "published.json"
        try:
            state = json.loads(path.read_text()) if path.exists() else {"version": 0}
            last, lineage = state["version"], state.get("lineage") or uuid.uuid4().hex
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise DataError(path, f"unreadable delta version counter: {exc}") from exc
        write_json({"version": last + 1, "lineage": lineage}, path)
        _fsync(path)
        _fsync(self.ckpt_dir)
        return last + 1, lineage

    def _restore(self, path: Path) -> None:
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(path, f"not an online-training checkpoint: {exc}") from exc
        if state.get("format") != FORMAT:
            raise DataError(path, f"format {state.get('format')!r} is not {FORMAT!r}")
        mine = json.loads(json.dumps(self.cfg.to_dict()))
        differ = sorted(k for k in mine.keys() | state["config"].keys()
                        if k not in _FREE_ON_RESUME and mine.get(k) != state["config"].get(k))
        kind, model = self.model.wire_model()
        if state.get("model_kind", kind) != kind or state.get("model", model) != json.loads(json.dumps(model)):
            differ.append("model")
        if differ:
            raise ConfigError(f"checkpoint {path} was made with another configuration ({', '.join(differ)} differ): "
                              "resume with its configuration or use a new checkpoint directory")
        if state["stream"] != self.stream.url:
            raise ConfigError(f"checkpoint {path} consumed {state['stream']}, not {self.stream.url}: its offset "
                              "means nothing in another stream")
        try:
            for slot, emb in self.model.tables.items():
                emb.table = EmbeddingTable.load(path / "tables" / slot)
            dense = torch.load(path / "dense.pt", weights_only=True)
            self.model.load_dense_state_dict(dense["dense"])
            self.optimizer.load_state_dict(dense["optimizer"])
            parts: dict[str, dict[str, np.ndarray]] = {"joiner": {}, "audit": {}, "windows": {}}
            with np.load(path / "state.npz") as npz:
                for key in npz.files:
                    owner, name = key.split(".", 1)
                    parts[owner][name] = npz[key]
            self.joiner.load_state_dict(parts["joiner"])
            self.audit.load_state_dict(parts["audit"])
            self._windows.load_state_dict(parts["windows"], [WindowMetrics(**w) for w in state["metrics"]])
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise DataError(path, f"cannot restore the checkpoint: {exc}") from exc
        self.offset = state["offset"]
        self.counters = OnlineCounters(**state["counters"])
        self._next_expire_ms = state["next_expire_ms"]
