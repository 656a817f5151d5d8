"""The DV365 user tower: timelines -> pooled slice tokens -> Funnel Summarization Arch -> (R, C).

Tower input. Each slice of the spec pools, per user, the **content embeddings** of its events'
items (the world's 32-d item embeddings, the "PinSage" role): ``media`` slices the item's own
embedding, ``author`` and ``topic`` slices the mean embedding of the author's or topic's items.
The tables are fixed, not learned, so the pooled tokens of a (user, time) depend on nothing
trained: they are computed once, cached, and every encoder of a comparison trains on the same
ones (learning the slice tables end to end would run the pooling's backward, 45 users/s on two
cores; see docs/benchmarks.md). Each token gets one more column, ``log1p(members) / 10``, so
that the tower sees how active a user is in each slice, which a mean alone forgets. Tokens
are ``(N, D) = (len(spec), 33)``; the FSA (:mod:`lifelong.dv365.fsa`) maps them to ``(R, C)``.

Point in time: a user's tower output *as of* ``t`` reads only events strictly before
``t - gap_ms``, the gap the tower was trained with (the distant-interest objective: 24 h).

Example::

    tower = load_tower("runs/dv365")
    emb = tower.embed_users("worlds/lifelong", np.array([1, 2, 3]), as_of_ms=1_735_516_800_000)
    emb.shape  # (3, R, C) float32; R, C = tower.out_shape, (66, 32) by default
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from lifelong.core.errors import DataError
from lifelong.core.progress import progress
from lifelong.data.io import read_table
from lifelong.data.schema import EMBED_DIM
from lifelong.dv365.featurize import ID_COLUMNS, SliceFeaturizer, TimelineSource, UserTimelines, pool_slices
from lifelong.dv365.fsa import FSAConfig, FunnelSummarizationArch
from lifelong.dv365.slices import SliceSpec

TOKEN_DIM = EMBED_DIM + 1
"""Columns per slice token: the pooled content embedding and the scaled log member count."""

COUNT_SCALE = 10.0
"""``log1p(members) / COUNT_SCALE``: a slice of ~22k members (a year of impressions) maps to 1."""

TIMELINE_COLUMNS = ["user_id", "item_id", "ts_ms", "action_mask", "dwell_ms"]


def content_tables(items: pa.Table) -> dict[str, torch.Tensor]:
    """id type -> (rows, 32) float32 table: an item's embedding, an author's or topic's mean item embedding.

    Rows are indexed by id (ids are dense in simulated worlds and ingested datasets); an id
    without items has a zero row.

    Example::

        >>> items = pa.table({"item_id": [0, 1], "author_id": [0, 0], "topic_id": [1, 1],
        ...                   "embedding": [[1.0] * 32, [3.0] * 32]})
        >>> t = content_tables(items)
        >>> t["author"][0, 0].item(), t["topic"][:, 0].tolist(), tuple(t["media"].shape)
        (2.0, [0.0, 2.0], (2, 32))
    """
    flat = items.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = torch.from_numpy(flat.astype(np.float32).reshape(-1, EMBED_DIM))
    tables = {}
    for id_type, column in ID_COLUMNS.items():
        ids = torch.from_numpy(items.column(column).to_numpy().astype(np.int64))
        if ids.numel() and ids.min() < 0:
            raise DataError("<items>", "ids must be >= 0 to index the DV365 content tables", column=column)
        rows = int(ids.max()) + 1 if ids.numel() else 1
        sums = torch.zeros(rows, EMBED_DIM).index_add_(0, ids, emb)
        counts = torch.zeros(rows).index_add_(0, ids, torch.ones(ids.numel()))
        tables[id_type] = sums / counts.clamp_min(1.0).unsqueeze(1)
    return tables


def load_timeline_source(world_dir: str | os.PathLike[str]) -> TimelineSource:
    """Index a world's (or ingested dataset's) events for cutting timelines (~1 min for 85M events)."""
    world_dir = Path(world_dir)
    events = read_table(world_dir / "events.parquet", "events", columns=TIMELINE_COLUMNS)
    items = read_table(world_dir / "items.parquet", "items")
    return TimelineSource(events, items)


class DV365Tower(nn.Module):
    """The user tower: fixed content tables, slice pooling and the FSA.

    Args:
        spec: the slices.
        content: id type -> (rows, 32) content table (:func:`content_tables`).
        fsa: the summarisation arch.
        gap_ms: the gap the tower is trained and served with (events of the last ``gap_ms``
            before the embedding time are left out).

    Attributes:
        out_shape: ``(R, C)`` of one user's output (see :class:`FunnelSummarizationArch`).

    Example::

        >>> items = pa.table({"item_id": [0, 1], "author_id": [0, 1], "topic_id": [0, 0],
        ...                   "embedding": [[0.1] * 32, [0.2] * 32]})
        >>> tower = DV365Tower(SliceSpec.default(), content_tables(items), FSAConfig(out_cols=8), gap_ms=0)
        >>> tl = UserTimelines.from_rows([100], ts_ms=[[1, 2]], action_mask=[[3, 1]], media=[[0, 1]],
        ...                              author=[[0, 1]], topic=[[0, 0]])
        >>> tokens = tower.tokens(tl)
        >>> tuple(tokens.shape), tower.out_shape, tuple(tower(tokens).shape)
        ((1, 207, 33), (66, 8), (1, 66, 8))
    """

    def __init__(self, spec: SliceSpec, content: Mapping[str, torch.Tensor], fsa: FSAConfig = FSAConfig(),
                 gap_ms: int = 86_400_000):
        super().__init__()
        self.spec = spec
        self.gap_ms = int(gap_ms)
        self.fsa_config = fsa
        id_types = sorted(set(spec.tables.values()))
        for id_type in id_types:
            self.register_buffer(f"content_{id_type}", content[id_type].to(torch.float32), persistent=True)
        self.featurizer = SliceFeaturizer(spec, {t: content[t].shape[0] for t in id_types})
        self.fsa = FunnelSummarizationArch(len(spec), TOKEN_DIM, fsa)
        self.out_shape = self.fsa.out_shape
        self._sources: dict[Path, TimelineSource] = {}

    @torch.no_grad()
    def tokens(self, timelines: UserTimelines) -> torch.Tensor:
        """(U, N, TOKEN_DIM) float32 slice tokens of a batch of timelines (cut at each ``t_ms``)."""
        tables = {key: getattr(self, f"content_{id_type}") for key, id_type in self.spec.tables.items()}
        pooled = pool_slices(self.featurizer.membership(timelines), tables)
        counts = torch.log1p(pooled.weight).unsqueeze(-1) / COUNT_SCALE
        return torch.cat([pooled.embeddings, counts], dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(U, N, TOKEN_DIM) tokens -> (U, R, C) user representations."""
        return self.fsa(tokens)

    def user_tokens(self, source: TimelineSource, user_ids: np.ndarray, cut_ms: np.ndarray,
                    batch_size: int = 32, label: str = "pooling DV365 slices") -> torch.Tensor:
        """(U, N, TOKEN_DIM) float16 tokens of ``user_ids[i]`` from events strictly before ``cut_ms[i]``.

        Batched (``batch_size`` users at a time) with a progress bar. float16 halves the cache
        of many (user, time) pairs; tokens are means of unit-norm vectors and small counts.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        cut_ms = np.broadcast_to(np.asarray(cut_ms, dtype=np.int64), user_ids.shape)
        out = torch.empty(user_ids.size, len(self.spec), TOKEN_DIM, dtype=torch.float16)
        with progress(label, total=user_ids.size) as advance:
            for a in range(0, user_ids.size, batch_size):
                b = min(a + batch_size, user_ids.size)
                out[a:b] = self.tokens(source.batch(user_ids[a:b], cut_ms[a:b])).to(torch.float16)
                advance(b - a)
        return out

    def source(self, world_dir: str | os.PathLike[str]) -> TimelineSource:
        """The indexed events of a world, loaded once per tower and directory."""
        key = Path(world_dir).resolve()
        if key not in self._sources:
            self._sources[key] = load_timeline_source(key)
        return self._sources[key]

    @torch.no_grad()
    def embed_users(self, world_dir: str | os.PathLike[str] | TimelineSource, user_ids: np.ndarray,
                    as_of_ms: int | np.ndarray, gap_ms: int | None = None, batch_size: int = 64) -> np.ndarray:
        """(U, R, C) float32 tower outputs of ``user_ids`` as of ``as_of_ms``.

        Args:
            world_dir: a world or dataset directory (its events are indexed once and kept), or
                an already indexed :class:`TimelineSource`.
            user_ids: (U,) users; unknown ones get the output of an empty timeline.
            as_of_ms: the embedding time (one for all, or one per user).
            gap_ms: events of the last ``gap_ms`` before ``as_of_ms`` are left out; None uses
                the gap the tower was trained with (:attr:`gap_ms`).
            batch_size: users per batch.
        """
        source = world_dir if isinstance(world_dir, TimelineSource) else self.source(world_dir)
        gap = self.gap_ms if gap_ms is None else int(gap_ms)
        user_ids = np.asarray(user_ids, dtype=np.int64)
        cut = np.broadcast_to(np.asarray(as_of_ms, dtype=np.int64) - gap, user_ids.shape)
        was_training = self.training
        self.eval()
        out = np.empty((user_ids.size, *self.out_shape), dtype=np.float32)
        with progress("DV365 user embeddings", total=user_ids.size) as advance:
            for a in range(0, user_ids.size, batch_size):
                b = min(a + batch_size, user_ids.size)
                out[a:b] = self(self.tokens(source.batch(user_ids[a:b], cut[a:b]))).numpy()
                advance(b - a)
        self.train(was_training)
        return out

    def save_state(self) -> dict:
        """What :func:`load_tower` needs: the spec, configs and weights (content tables included)."""
        return {"spec": self.spec, "fsa": self.fsa_config, "gap_ms": self.gap_ms, "state_dict": self.state_dict()}

    @classmethod
    def from_state(cls, state: Mapping) -> DV365Tower:
        sd = state["state_dict"]
        content = {key[len("content_"):]: value for key, value in sd.items() if key.startswith("content_")}
        tower = cls(state["spec"], content, state["fsa"], state["gap_ms"])
        tower.load_state_dict(sd)
        return tower.eval()


def load_tower(run_dir: str | os.PathLike[str]) -> DV365Tower:
    """The trained user tower of a ``lifelong dv365 train`` run directory (in eval mode).

    Raises:
        DataError: the directory holds no finished run.
    """
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise DataError(run_dir, "not a finished DV365 run (no model.pt); run `lifelong dv365 train` first")
    saved = torch.load(path, weights_only=False)
    if saved.get("kind") != "dv365":
        raise DataError(path, "not a DV365 run (its model.pt holds another model)")
    return DV365Tower.from_state(saved["tower"])
