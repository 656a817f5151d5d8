"""DV365 training and evaluation examples, and the tower tokens they read.

An **example** is one impression event: its labels are the action bits of the tasks
(:data:`~lifelong.dv365.backbone.TASKS`) and its watch-time target ``log1p(dwell_s)``.
Examples are grouped by **(user, day)**; the group's *anchor* is the day's first millisecond
(days counted from the window's start). Every example of a group reads the same tower input:
the user's timeline strictly before ``anchor - gap``. With the paper's 24 h gap that input is
24 to 48 h older than each example; with gap 0 it ends at the day's start, so it is still
point-in-time correct. Computing the tower input once per (user, day) rather than per
example is what makes training on 40k-event timelines affordable: a user sees ~115
impressions a day on the ``lifelong`` world, and at most ``per_group`` of them (drawn at
random) are kept.

Splits follow the dataset's protocol (``world.json``): ``train`` is the ``train_days`` days
before the cutoff, ``eval`` the protocol's evaluation window (the last day; 7 days after the
cutoff on simulated worlds).

Tokens (:class:`TokenCache`) are computed per *cut time* for all users of the experiment at
once and reused by every group, gap and staleness that asks for that cut.

Example::

    world = open_world("worlds/lifelong")
    train = sample_examples(world, world.train_window(4), per_group=64, users=world.users[:500])
    cache = TokenCache(tower, world.source, users=world.users[:500])
    tokens = cache.tokens(train.group_user, train.group_anchor_ms - DAY_MS)  # (G, N, 33) float16
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lifelong.core.checkpoint import save_atomic
from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import read_meta, read_table
from lifelong.data.protocol import DAY_MS, Protocol
from lifelong.data.schema import EMBED_DIM, Action
from lifelong.dv365.backbone import N_DENSE, TASKS, ExampleFeatures
from lifelong.dv365.featurize import TimelineSource
from lifelong.dv365.tower import TIMELINE_COLUMNS, DV365Tower

TASK_BITS = np.array([int(Action[t.upper()]) for t in TASKS], dtype=np.uint16)


@dataclass(frozen=True, eq=False)
class World:
    """A dataset directory's events (the columns DV365 reads), items and protocol, indexed once.

    Args:
        path: the directory.
        protocol: its protocol dates.
        events: events table (user_id, item_id, ts_ms, action_mask, dwell_ms, surface).
        items: items table.
        source: the events indexed for cutting timelines.
    """

    path: Path
    protocol: Protocol
    events: pa.Table
    items: pa.Table
    source: TimelineSource

    @property
    def users(self) -> np.ndarray:
        """Every user with events, ascending."""
        return np.unique(self.events.column("user_id").to_numpy())

    def train_window(self, days: int) -> tuple[int, int]:
        """``(start_ms, n_days)``: the ``days`` days before the protocol's cutoff."""
        return self.protocol.cutoff_ms - days * DAY_MS, days

    def eval_window(self) -> tuple[int, int]:
        """``(start_ms, n_days)``: the protocol's evaluation window, in whole days (at least one)."""
        p = self.protocol
        return p.eval_start_ms, max(1, (p.eval_end_ms - p.eval_start_ms) // DAY_MS)


def open_world(directory: str | os.PathLike[str]) -> World:
    """Read and index a world or dataset directory (about a minute for 85M events).

    Raises:
        DataError: a file is missing or invalid, or the metadata has no protocol.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if "protocol" not in meta:
        raise DataError(directory, "metadata has no protocol dates (simulate or ingest the dataset again)")
    events = read_table(directory / "events.parquet", "events", columns=[*TIMELINE_COLUMNS, "surface"])
    items = read_table(directory / "items.parquet", "items")
    return World(directory, Protocol.from_meta(meta), events, items, TimelineSource(events, items))


@dataclass(frozen=True, eq=False)
class ExampleSet:
    """Examples grouped by (user, day); group ``g`` owns examples ``offsets[g]:offsets[g + 1]``.

    Args:
        group_user: (G,) user of each group.
        group_anchor_ms: (G,) first millisecond of each group's day.
        offsets: (G + 1,) example offsets.
        dense: (E, N_DENSE) float32 dense features.
        sparse: (E, 4) int64 item, author, topic, surface.
        labels: (E, len(TASKS)) uint8 labels.
        watch: (E,) float32 ``log1p(dwell_s)``.
    """

    group_user: np.ndarray
    group_anchor_ms: np.ndarray
    offsets: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    watch: np.ndarray

    @property
    def n_groups(self) -> int:
        return self.group_user.size

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, groups: np.ndarray) -> tuple[ExampleFeatures, torch.Tensor, torch.Tensor]:
        """The examples of ``groups``: features (``group`` indexes into ``groups``), labels, watch."""
        groups = np.asarray(groups, dtype=np.int64)
        lengths = self.offsets[groups + 1] - self.offsets[groups]
        starts = np.repeat(self.offsets[groups] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        rows = np.arange(int(lengths.sum()), dtype=np.int64) + starts
        local = np.repeat(np.arange(groups.size, dtype=np.int64), lengths)
        features = ExampleFeatures(torch.from_numpy(local), torch.from_numpy(self.dense[rows]),
                                   torch.from_numpy(self.sparse[rows]))
        return features, torch.from_numpy(self.labels[rows]), torch.from_numpy(self.watch[rows])


def sample_examples(world: World, window: tuple[int, int], per_group: int, users: np.ndarray | None = None,
                    seed: int = 0) -> ExampleSet:
    """The impressions of ``window`` (``(start_ms, n_days)``), at most ``per_group`` per (user, day).

    Args:
        world: the data.
        window: start and length in days.
        per_group: impressions kept per (user, day), drawn uniformly without replacement.
        users: keep only these users (None: all).
        seed: seeds the draw.

    Raises:
        ConfigError: ``per_group`` < 1.
        DataError: no impression in the window.
    """
    if per_group < 1:
        raise ConfigError(f"examples per (user, day) must be >= 1, got {per_group}")
    start, n_days = window
    ev = world.events
    ts = ev.column("ts_ms").to_numpy()
    user = ev.column("user_id").to_numpy()
    mask = ev.column("action_mask").to_numpy()
    keep = (ts >= start) & (ts < start + n_days * DAY_MS) & ((mask & int(Action.IMPRESSION)) != 0)
    if users is not None:
        keep &= np.isin(user, np.asarray(users, dtype=np.int64))
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise DataError(world.path, f"no impressions between {start} and {start + n_days * DAY_MS} ms")
    key = user[idx].astype(np.int64) * n_days + (ts[idx] - start) // DAY_MS
    order = np.lexsort((np.random.default_rng(seed).random(idx.size), key))
    sorted_key = key[order]
    first = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    rank = np.arange(idx.size) - np.repeat(first, np.diff(np.r_[first, idx.size]))
    idx = np.sort(idx[order[rank < per_group]])  # events are sorted by (user, ts): groups stay contiguous
    key = user[idx].astype(np.int64) * n_days + (ts[idx] - start) // DAY_MS
    group_key, counts = np.unique(key, return_counts=True)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)

    items = world.items
    item_ids = items.column("item_id").to_numpy()
    item_order = np.argsort(item_ids, kind="stable")
    row = item_order[np.searchsorted(item_ids[item_order], ev.column("item_id").to_numpy()[idx])]
    flat = items.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    content = flat.reshape(-1, EMBED_DIM)[row].astype(np.float32)
    duration_s = items.column("duration_ms").to_numpy()[row].astype(np.float32) / 1000
    dense = np.empty((idx.size, N_DENSE), dtype=np.float32)
    dense[:, :EMBED_DIM] = content
    dense[:, EMBED_DIM] = items.column("media_type").to_numpy()[row]
    dense[:, EMBED_DIM + 1] = np.log1p(duration_s)
    sparse = np.stack([item_ids[row], items.column("author_id").to_numpy()[row],
                       items.column("topic_id").to_numpy()[row], ev.column("surface").to_numpy()[idx]],
                      axis=1).astype(np.int64)
    labels = ((mask[idx, None] & TASK_BITS) != 0).astype(np.uint8)
    watch = np.log1p(ev.column("dwell_ms").to_numpy()[idx].astype(np.float32) / 1000)
    return ExampleSet(group_key // n_days, start + (group_key % n_days) * DAY_MS, offsets, dense, sparse, labels, watch)


class TokenCache:
    """Tower tokens per cut time for a fixed set of users, computed on first use and kept.

    The tokens of a (user, cut) do not depend on trained weights (:mod:`lifelong.dv365.tower`),
    so one cache serves every encoder, gap and staleness of an experiment.

    Args:
        tower: any tower of the spec (only its slice pooling is used).
        source: the indexed events.
        users: the users tokens are computed for.
        directory: where to keep each cut's tokens (``cut_<ms>.pt``) so that another run or
            process reuses them; None keeps them in memory only. A file written for other
            users or another spec is computed again.
    """

    def __init__(self, tower: DV365Tower, source: TimelineSource, users: np.ndarray,
                 directory: str | os.PathLike[str] | None = None):
        self.tower = tower
        self.source = source
        self.users = np.unique(np.asarray(users, dtype=np.int64))
        self.directory = None if directory is None else Path(directory)
        self._by_cut: dict[int, torch.Tensor] = {}

    def _cut(self, cut: int) -> torch.Tensor:
        if cut in self._by_cut:
            return self._by_cut[cut]
        key = {"users": self.users, "slices": self.tower.spec.names}
        path = None if self.directory is None else self.directory / f"cut_{cut}.pt"
        if path is not None and path.is_file():
            saved = torch.load(path, weights_only=False)
            if np.array_equal(saved["users"], key["users"]) and saved["slices"] == key["slices"]:
                self._by_cut[cut] = saved["tokens"]
                return saved["tokens"]
        tokens = self.tower.user_tokens(self.source, self.users, np.full(self.users.size, cut),
                                        label=f"DV365 slice tokens, cut {cut}")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic({**key, "tokens": tokens}, path)
        self._by_cut[cut] = tokens
        return tokens

    def tokens(self, user: np.ndarray, cut_ms: np.ndarray) -> torch.Tensor:
        """(len(user), N, TOKEN_DIM) float16 tokens of ``user[i]`` from events before ``cut_ms[i]``."""
        user = np.asarray(user, dtype=np.int64)
        cut_ms = np.broadcast_to(np.asarray(cut_ms, dtype=np.int64), user.shape)
        pos = np.searchsorted(self.users, user)
        if np.any(pos >= self.users.size) or np.any(self.users[np.minimum(pos, self.users.size - 1)] != user):
            raise ValueError("the token cache was built for other users")
        cuts, which = np.unique(cut_ms, return_inverse=True)
        stacked = torch.stack([self._cut(c) for c in cuts.tolist()])
        return stacked[torch.from_numpy(which.reshape(-1)), torch.from_numpy(pos)]
