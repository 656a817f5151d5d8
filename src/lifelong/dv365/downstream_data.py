"""The examples of the DV365 downstream experiment: a training window and a later evaluation day.

From a world (or any dataset with a protocol), two splits:

- **train**: the impressions of the ``train_days`` before the protocol's cutoff;
- **eval**: the impressions of the protocol's evaluation day (7 days after the cutoff on the
  simulated worlds).

Each split has an ``as_of_ms``, its first instant: the DV365 embedding of its users is the
one exported then, frozen for the whole split, and the users' count features are computed
from the events strictly before it, so nothing a split's rows are labelled with reaches its
features. A split holds the ranking rows (one per impression, with the action bits of the
``HEADS`` as labels) and the retrieval pairs (each distinct user and item with a positive
engagement). Item popularity comes from the training window only, for both splits.

The events file is read once, as a stream of record batches, keeping only what the splits
need (the 85M events of the ``lifelong`` world: 15–30 s on two busy cores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import iter_parquet_batches, read_meta, read_table
from lifelong.data.protocol import DAY_MS, Protocol
from lifelong.data.schema import EMBED_DIM, HEAD_BITS, HEADS, POSITIVE_BITS

RECENT_MS = 7 * DAY_MS
"""Window of the users' recent count features."""

USER_FEATURES = ("log_impressions", *(f"{h}_rate" for h in HEADS),
                 "log_impressions_7d", *(f"{h}_rate_7d" for h in HEADS))
ITEM_FEATURES = ("is_video", "log_duration_s", "log_train_impressions")
SPARSE_FEATURES = ("item", "author", "topic", "surface", "user")


@dataclass(frozen=True)
class DownstreamDataConfig:
    """Which examples the downstream experiment uses.

    Args:
        train_days: length of the training window, ending at the protocol's cutoff.
        max_train_rows, max_eval_rows: keep a seeded random subset of this many ranking rows
            of each split (None: all); retrieval pairs are never subsampled here.
        seed: seed of the subsets.

    Example::

        >>> DownstreamDataConfig().train_days
        3.0
    """

    train_days: float = 3.0
    max_train_rows: int | None = 300_000
    max_eval_rows: int | None = 150_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_days <= 0:
            raise ConfigError(f"train_days must be positive, got {self.train_days}")
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {value}")


@dataclass
class Split:
    """One split's examples; users and items are row indices into :class:`DownstreamData`.

    Args:
        name: ``train`` or ``eval``.
        as_of_ms: the split's first instant: the embedding's and the count features' time.
        end_ms: end of the split (exclusive).
        user, item, surface: (n,) int64 per ranking row.
        labels: (n, len(HEADS)) float32 0/1.
        pair_user, pair_item: (m,) int64 distinct positively engaged (user, item) pairs.
        user_dense: (U, len(USER_FEATURES)) float32 count features of every user as of ``as_of_ms``.
    """

    name: str
    as_of_ms: int
    end_ms: int
    user: np.ndarray
    item: np.ndarray
    surface: np.ndarray
    labels: np.ndarray
    pair_user: np.ndarray
    pair_item: np.ndarray
    user_dense: np.ndarray

    def __len__(self) -> int:
        return int(self.user.size)


@dataclass
class DownstreamData:
    """Both splits plus the user and item tables they index.

    Args:
        user_ids: (U,) sorted user ids.
        item_ids: (N,) sorted item ids.
        item_content: (N, 32) float32 content embeddings.
        item_dense: (N, len(ITEM_FEATURES)) float32.
        item_author, item_topic: (N,) int64.
        train, eval: the splits.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    item_content: np.ndarray
    item_dense: np.ndarray
    item_author: np.ndarray
    item_topic: np.ndarray
    train: Split
    eval: Split


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each of ``ids`` in ``sorted_ids``, -1 where absent.

    Compact non-negative ids (every world's and ingested dataset's) go through a dense lookup
    table, an order of magnitude faster than a binary search per event.
    """
    if sorted_ids.size and sorted_ids[0] >= 0 and sorted_ids[-1] < 4 * sorted_ids.size + 1024:
        table = np.full(int(sorted_ids[-1]) + 2, -1, dtype=np.int64)
        table[sorted_ids] = np.arange(sorted_ids.size)
        return table[np.clip(ids, -1, sorted_ids[-1] + 1)]
    pos = np.minimum(np.searchsorted(sorted_ids, ids), max(sorted_ids.size - 1, 0))
    return np.where(sorted_ids[pos] == ids, pos, -1)


class _SplitAccumulator:
    """Collects one split's rows and its users' counts, batch after batch of events."""

    def __init__(self, name: str, as_of_ms: int, end_ms: int, n_users: int):
        self.name, self.as_of_ms, self.end_ms = name, as_of_ms, end_ms
        self.n_users = n_users
        self.counts = np.zeros((2, 1 + len(HEADS), n_users))  # (all, 7d) x (impressions, heads) x users
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, user: np.ndarray, item: np.ndarray, ts: np.ndarray, surface: np.ndarray, mask: np.ndarray) -> None:
        before = ts < self.as_of_ms
        recent = before & (ts >= self.as_of_ms - RECENT_MS)
        bits = np.stack([np.ones_like(mask, dtype=bool)] + [(mask & HEAD_BITS[h]) != 0 for h in HEADS])
        for w, keep in enumerate((before, recent)):
            for k in range(bits.shape[0]):
                self.counts[w, k] += np.bincount(user[keep & bits[k]], minlength=self.n_users)
        inside = (ts >= self.as_of_ms) & (ts < self.end_ms)
        if inside.any():
            self.parts.append((user[inside], item[inside], surface[inside].astype(np.int64), mask[inside]))

    def finish(self, cfg_rows: int | None, rng: np.random.Generator) -> Split:
        if not self.parts:
            raise DataError("<events>", f"no events in the {self.name} split [{self.as_of_ms}, {self.end_ms})")
        user, item, surface, mask = (np.concatenate(c) for c in zip(*self.parts))
        positive = (mask & POSITIVE_BITS) != 0
        pairs = np.unique(np.stack([user[positive], item[positive]]), axis=1)
        if cfg_rows is not None and user.size > cfg_rows:
            keep = np.sort(rng.choice(user.size, cfg_rows, replace=False))
            user, item, surface, mask = user[keep], item[keep], surface[keep], mask[keep]
        labels = np.stack([(mask & HEAD_BITS[h]) != 0 for h in HEADS], axis=1).astype(np.float32)
        n = self.counts[:, :1]
        rates = self.counts[:, 1:] / np.maximum(n, 1.0)
        dense = np.concatenate([np.log1p(n[0]) / 10, rates[0], np.log1p(n[1]) / 10, rates[1]]).T
        return Split(self.name, self.as_of_ms, self.end_ms, user, item, surface, labels, pairs[0], pairs[1],
                     dense.astype(np.float32))


def load_downstream_data(directory: str | os.PathLike[str], cfg: DownstreamDataConfig = DownstreamDataConfig(),
                         batch_rows: int = 1 << 22) -> DownstreamData:
    """Read the two splits of a world or dataset directory (see the module docstring).

    Args:
        directory: a world or dataset directory with a protocol.
        cfg: window length and subsampling.
        batch_rows: events decoded at once.

    Raises:
        DataError: missing files, no protocol, or an empty split.

    Example::

        data = load_downstream_data("worlds/lifelong")
        len(data.train), len(data.eval), data.eval.pair_user.size
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if "protocol" not in meta:
        raise DataError(directory, "no protocol dates in the metadata")
    protocol = Protocol.from_meta(meta)
    train_start = max(protocol.train_start_ms, protocol.cutoff_ms - int(cfg.train_days * DAY_MS))
    users = read_table(directory / "users.parquet", "users", columns=["user_id"])
    user_ids = np.sort(users.column("user_id").to_numpy().astype(np.int64))
    items = read_table(directory / "items.parquet", "items")
    items = items.take(np.argsort(items.column("item_id").to_numpy(), kind="stable"))
    item_ids = items.column("item_id").to_numpy().astype(np.int64)
    splits = (_SplitAccumulator("train", train_start, protocol.cutoff_ms, user_ids.size),
              _SplitAccumulator("eval", protocol.eval_start_ms, protocol.eval_end_ms, user_ids.size))
    train_impressions = np.zeros(item_ids.size)

    columns = ["user_id", "item_id", "ts_ms", "surface", "action_mask"]
    for batch in iter_parquet_batches(directory / "events.parquet", columns, batch_size=batch_rows):
        uid, iid, ts, surface, mask = (batch.column(c).to_numpy() for c in columns)
        user, item = _positions(user_ids, uid), _positions(item_ids, iid)
        if (user < 0).any() or (item < 0).any():
            raise DataError(directory / "events.parquet", "events refer to users or items missing from the tables")
        for split in splits:
            split.add(user, item, ts, surface, mask)
        in_train = (ts >= train_start) & (ts < protocol.cutoff_ms)
        train_impressions += np.bincount(item[in_train], minlength=item_ids.size)

    rng = np.random.default_rng(cfg.seed)
    train = splits[0].finish(cfg.max_train_rows, rng)
    evaluation = splits[1].finish(cfg.max_eval_rows, rng)
    content = np.asarray(items.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(-1, EMBED_DIM)
    duration_s = items.column("duration_ms").to_numpy().astype(np.float64) / 1000
    item_dense = np.stack([items.column("media_type").to_numpy() == 1, np.log1p(duration_s) / 5,
                           np.log1p(train_impressions) / 10], axis=1).astype(np.float32)
    return DownstreamData(user_ids, item_ids, content, item_dense,
                          items.column("author_id").to_numpy().astype(np.int64),
                          items.column("topic_id").to_numpy().astype(np.int64), train, evaluation)
