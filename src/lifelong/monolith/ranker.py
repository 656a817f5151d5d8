"""The ranker trained online by :mod:`lifelong.monolith.online`: collision-less id tables, a dense head.

One :class:`~lifelong.tables.embedding.CollisionlessEmbedding` per id slot (:data:`SLOTS`: user,
item, author, topic), each with its own :class:`~lifelong.tables.table.TableConfig` (counting
admission filter, no expiry by default); plus a learned surface embedding and the item's 32-d
content embedding from the catalog. The concatenation goes through a DCN-v2 cross network and
an MLP (:class:`~lifelong.modules.layers.CrossHead`) to one logit per head of
:data:`~lifelong.data.schema.HEADS`.

The id tables are not ``nn.Parameter`` s (they grow and carry per-row optimizer state, see
:mod:`lifelong.tables.embedding`); everything else lives in :attr:`OnlineRanker.dense`, which a
``torch.optim`` optimizer owns and a checkpoint saves as one ``state_dict``.

Example::

    catalog = ItemCatalog.from_dataset("worlds/tiny")
    model = OnlineRanker(OnlineRankerConfig())
    logits = model(OnlineBatch.from_examples(examples, catalog), now_ms=watermark)   # (B, 4)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from lifelong.core.config import build
from lifelong.core.errors import ConfigError
from lifelong.core.sorted_index import positions_in
from lifelong.data.io import read_table
from lifelong.data.schema import EMBED_DIM, HEADS, SURFACES
from lifelong.modules.layers import CrossHead, HashedEmbedding
from lifelong.tables.embedding import CollisionlessEmbedding
from lifelong.tables.filters import FilterConfig
from lifelong.tables.table import OptimizerConfig, TableConfig

__all__ = ["SLOTS", "ItemCatalog", "OnlineBatch", "OnlineRanker", "OnlineRankerConfig", "build_dense", "default_table",
           "dense_logits"]

SLOTS: tuple[str, ...] = ("user_id", "item_id", "author_id", "topic_id")
"""The id slots, each with its own collision-less table, in the order the features are concatenated."""

UNKNOWN_ID = -1
"""Author and topic of an item missing from the catalog (one shared, learned row per slot)."""


def default_table(seed: int, dim: int = 16) -> TableConfig:
    """A slot's default table: admitted at the 2nd occurrence, kept forever, sparse Adagrad.

    Args:
        seed: seeds the row initialisation and the filter's hashes; give each slot its own, so
            that equal raw ids of two slots (author 5, topic 5) start from different vectors.
        dim: row width.

    Example::

        >>> cfg = default_table(seed=3)
        >>> cfg.filter.kind, cfg.filter.threshold, cfg.ttl_ms, cfg.optimizer.kind
        ('counting', 2, None, 'adagrad')
    """
    return TableConfig(dim=dim, init_scale=0.05, seed=seed,
                       filter=FilterConfig(kind="counting", threshold=2, seed=seed),
                       optimizer=OptimizerConfig(kind="adagrad", lr=0.05))


@dataclass(frozen=True)
class OnlineRankerConfig:
    """Shape of an :class:`OnlineRanker`.

    Args:
        user_id, item_id, author_id, topic_id: the table of each slot.
        surface_dim: width of the learned surface embedding.
        cross_layers: DCN-v2 cross layers before the MLP (0: a plain MLP).
        mlp_dims: hidden widths of the MLP.
        seed: seeds the initial dense weights.

    Example::

        >>> cfg = OnlineRankerConfig(surface_dim=4)
        >>> cfg.in_dim  # 4 slots x 16 + surface 4 + content 32
        100
        >>> OnlineRankerConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    user_id: TableConfig = field(default_factory=lambda: default_table(seed=1))
    item_id: TableConfig = field(default_factory=lambda: default_table(seed=2))
    author_id: TableConfig = field(default_factory=lambda: default_table(seed=3))
    topic_id: TableConfig = field(default_factory=lambda: default_table(seed=4))
    surface_dim: int = 8
    cross_layers: int = 1
    mlp_dims: tuple[int, ...] = (64, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.surface_dim < 1:
            raise ConfigError(f"surface_dim must be >= 1, got {self.surface_dim}")
        if self.cross_layers < 0:
            raise ConfigError(f"cross_layers must be >= 0, got {self.cross_layers}")
        if any(d < 1 for d in self.mlp_dims):
            raise ConfigError(f"mlp_dims must all be >= 1, got {self.mlp_dims}")
        object.__setattr__(self, "mlp_dims", tuple(self.mlp_dims))  # from JSON lists

    @property
    def tables(self) -> dict[str, TableConfig]:
        """Slot -> table configuration, in :data:`SLOTS` order."""
        return {slot: getattr(self, slot) for slot in SLOTS}

    @property
    def in_dim(self) -> int:
        """Width of the concatenated features entering the head."""
        return sum(t.dim for t in self.tables.values()) + self.surface_dim + EMBED_DIM

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnlineRankerConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: unknown or invalid fields.
        """
        return build(cls, d)


class ItemCatalog:
    """Item metadata by item id: author, topic and content embedding (vectorised lookups).

    Items missing from the catalog (published after it was loaded) read author and topic
    :data:`UNKNOWN_ID` and a zero content embedding, so a stale catalog degrades features
    instead of stopping training; :meth:`lookup` says which ids were known.

    Args:
        item_ids: (n,) distinct int64 ids, any order.
        author_ids, topic_ids: (n,) int64.
        embeddings: (n, 32) content embeddings (stored as float32).

    Raises:
        ConfigError: the catalog is empty, lengths or widths disagree, or an id repeats.

    Example::

        >>> cat = ItemCatalog([30, 10], author_ids=[7, 8], topic_ids=[1, 2], embeddings=np.ones((2, 32)))
        >>> author, topic, emb, known = cat.lookup(np.array([10, 99, 30]))
        >>> author.tolist(), topic.tolist(), emb.sum(axis=1).tolist(), known.tolist()
        ([8, -1, 7], [2, -1, 1], [32.0, 0.0, 32.0], [True, False, True])
    """

    def __init__(self, item_ids: object, author_ids: object, topic_ids: object, embeddings: object):
        ids = np.asarray(item_ids, dtype=np.int64)
        emb = np.asarray(embeddings, dtype=np.float32)
        author, topic = np.asarray(author_ids, dtype=np.int64), np.asarray(topic_ids, dtype=np.int64)
        if ids.ndim != 1 or author.shape != ids.shape or topic.shape != ids.shape or emb.shape != (len(ids), EMBED_DIM):
            raise ConfigError(f"catalog: {ids.shape} ids need as many authors {author.shape} and topics {topic.shape} "
                              f"and ({len(ids)}, {EMBED_DIM}) embeddings, got {emb.shape}")
        if not len(ids):
            raise ConfigError("catalog: no items")
        order = np.argsort(ids, kind="stable")
        self.item_ids = ids[order]
        if np.any(self.item_ids[1:] == self.item_ids[:-1]):
            raise ConfigError("catalog: item ids repeat")
        self.author_ids, self.topic_ids, self.embeddings = author[order], topic[order], emb[order]

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_table(cls, items: pa.Table) -> ItemCatalog:
        """From an ``items`` table (:data:`~lifelong.data.schema.ITEMS_SCHEMA`)."""
        emb = items.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return cls(items.column("item_id").to_numpy(), items.column("author_id").to_numpy(),
                   items.column("topic_id").to_numpy(), emb.reshape(-1, EMBED_DIM))

    @classmethod
    def from_dataset(cls, directory: str | os.PathLike[str]) -> ItemCatalog:
        """From a dataset directory's ``items.parquet`` (validated).

        Raises:
            DataError: the file is missing or invalid.
        """
        return cls.from_table(read_table(Path(directory) / "items.parquet", "items",
                                         columns=["item_id", "embedding", "author_id", "topic_id"]))

    def index_of(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(catalog rows, known mask) of each item id; the row of an unknown id is meaningless."""
        return positions_in(self.item_ids, np.asarray(item_ids, dtype=np.int64))

    def lookup(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(author ids, topic ids, (n, 32) float32 embeddings, known mask) of each item id."""
        ids = np.asarray(item_ids, dtype=np.int64)
        pos, known = self.index_of(ids)
        author = np.where(known, self.author_ids[pos], UNKNOWN_ID)
        topic = np.where(known, self.topic_ids[pos], UNKNOWN_ID)
        emb = np.zeros((ids.size, EMBED_DIM), dtype=np.float32)
        emb[known] = self.embeddings[pos[known]]
        return author, topic, emb, known


@dataclass
class OnlineBatch:
    """Model inputs of a batch of joined examples.

    Args:
        ids: slot -> (B,) int64 raw ids, for every slot of :data:`SLOTS`.
        surface: (B,) int64 surface codes.
        content: (B, 32) float32 item content embeddings.
        labels: (B, H) float32 0/1 labels, in :data:`~lifelong.data.schema.HEADS` order.
        known_items: how many of the B items the catalog knew.
    """

    ids: dict[str, torch.Tensor]
    surface: torch.Tensor
    content: torch.Tensor
    labels: torch.Tensor
    known_items: int

    def __len__(self) -> int:
        return len(self.surface)

    @classmethod
    def from_examples(cls, examples: np.ndarray, catalog: ItemCatalog) -> OnlineBatch:
        """Build the batch of :data:`~lifelong.monolith.joiner.EXAMPLE_DTYPE` examples.

        Example::

            >>> from lifelong.monolith.joiner import EXAMPLE_DTYPE
            >>> ex = np.zeros(2, EXAMPLE_DTYPE); ex["item_id"] = [10, 11]; ex["labels"][0, 1] = 1
            >>> cat = ItemCatalog([10], author_ids=[7], topic_ids=[3], embeddings=np.zeros((1, 32)))
            >>> b = OnlineBatch.from_examples(ex, cat)
            >>> b.ids["author_id"].tolist(), b.labels[0].tolist(), b.known_items
            ([7, -1], [0.0, 1.0, 0.0, 0.0], 1)
        """
        # astype copies: a field of a structured array is strided, which torch.from_numpy refuses.
        item = examples["item_id"].astype(np.int64)
        author, topic, content, known = catalog.lookup(item)
        ids = {"user_id": examples["user_id"].astype(np.int64), "item_id": item, "author_id": author,
               "topic_id": topic}
        return cls(ids={slot: torch.from_numpy(ids[slot]) for slot in SLOTS},
                   surface=torch.from_numpy(examples["surface"].astype(np.int64)),
                   content=torch.from_numpy(content),
                   labels=torch.from_numpy(examples["labels"].astype(np.float32)),
                   known_items=int(known.sum()))


class OnlineRanker(nn.Module):
    """Collision-less id embeddings + surface + content embedding -> cross network + MLP -> one logit per head.

    It is an :class:`~lifelong.monolith.online.OnlineModel` (what the online trainer needs):
    :meth:`featurize` reads the item catalog, :meth:`logits` is the forward.

    Args:
        cfg: the tables and layer widths.
        catalog: item metadata for :meth:`featurize` (None: featurize is refused).

    Example::

        >>> from lifelong.monolith.joiner import EXAMPLE_DTYPE
        >>> model = OnlineRanker(OnlineRankerConfig())
        >>> cat = ItemCatalog([5], author_ids=[1], topic_ids=[2], embeddings=np.zeros((1, 32)))
        >>> model(OnlineBatch.from_examples(np.zeros(3, EXAMPLE_DTYPE), cat), now_ms=0).shape
        torch.Size([3, 4])
        >>> sorted(model.tables), sorted(model.dense)
        (['author_id', 'item_id', 'topic_id', 'user_id'], ['head', 'surface'])
    """

    KIND = "monolith.online_ranker"
    """The model kind its deltas name on the wire."""

    def __init__(self, cfg: OnlineRankerConfig, catalog: ItemCatalog | None = None):
        super().__init__()
        self.cfg = cfg
        self.catalog = catalog
        self.tables = nn.ModuleDict({slot: CollisionlessEmbedding(t) for slot, t in cfg.tables.items()})
        self.dense = build_dense(cfg)

    # -- the online trainer's protocol (lifelong.monolith.online.OnlineModel) ----------------------

    def featurize(self, examples: np.ndarray) -> tuple[OnlineBatch, np.ndarray]:
        """The batch of every example (an unknown item reads unknown author and topic)."""
        if self.catalog is None:
            raise ConfigError("OnlineRanker.featurize needs the item catalog (OnlineRanker(cfg, catalog))")
        return OnlineBatch.from_examples(examples, self.catalog), np.arange(len(examples))

    def logits(self, batch: OnlineBatch, now_ms: int) -> torch.Tensor:
        return self(batch, now_ms)

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        return self.dense.parameters()

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        return self.dense.state_dict()

    def load_dense_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.dense.load_state_dict(state)

    def wire_model(self) -> tuple[str, dict[str, Any]]:
        return self.KIND, self.cfg.to_dict()

    def forward(self, batch: OnlineBatch, now_ms: int | None = None) -> torch.Tensor:
        """(B, H) logits.

        Args:
            batch: the inputs.
            now_ms: time stamped on rows that this forward admits (training mode).
        """
        rows = [self.tables[slot](batch.ids[slot], now_ms) for slot in SLOTS]
        return dense_logits(self.dense, rows, batch.surface, batch.content)


def build_dense(cfg: OnlineRankerConfig) -> nn.ModuleDict:
    """The dense part of an :class:`OnlineRanker` (surface embedding and head), seeded by ``cfg.seed``.

    Serving builds it on its own, without the trainer's tables, and loads the synced weights into it.
    """
    # Seeded without touching the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dense = nn.ModuleDict({
            "surface": HashedEmbedding(len(SURFACES), cfg.surface_dim),
            "head": CrossHead(cfg.in_dim, cfg.cross_layers, cfg.mlp_dims, len(HEADS)),
        })
        # Unit-variance surface rows would dwarf the 0.05-scale id rows at the start.
        nn.init.normal_(dense["surface"].weight, std=0.05)
    return dense


def dense_logits(dense: nn.ModuleDict, id_rows: list[torch.Tensor], surface: torch.Tensor,
                 content: torch.Tensor) -> torch.Tensor:
    """(B, H) logits from the id rows of every slot (in :data:`SLOTS` order), surface codes and content.

    The one place the features are put together, for training and for serving alike.
    """
    return dense["head"](torch.cat([*id_rows, dense["surface"](surface), content], dim=-1))
