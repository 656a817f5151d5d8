"""The non-sequence features of a ranking row: id embeddings, the surface, the candidate's
content embedding and, when configured, the row's real-time engagement counters.

Each id slot (user, item, author, topic) reads a modulo-hashed ``nn.Embedding`` (the default),
a collision-less table (:class:`~lifelong.tables.embedding.CollisionlessEmbedding`: admission
filter, expiry, its own sparse optimizer; ``RowFeatureConfig.tables``), or nothing. The
collision-less rows are not ``nn.Parameter`` s: a training loop calls
:func:`~lifelong.tables.embedding.sparse_step` after its dense optimizer's step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lifelong.core.config import check, check_dims
from lifelong.data.counters import N_COUNTER_FEATURES
from lifelong.data.schema import EMBED_DIM, SURFACES
from lifelong.modules.layers import HashedEmbedding
from lifelong.tables.embedding import CollisionlessEmbedding
from lifelong.tables.filters import FilterConfig
from lifelong.tables.table import OptimizerConfig, TableConfig

ID_SLOTS: tuple[str, ...] = ("user", "item", "author", "topic")
"""The id slots of a row, in the order their embeddings are concatenated."""

TABLE_KINDS: tuple[str, ...] = ("hashed", "collisionless", "off")
"""What an id slot reads: a modulo-hashed table, a collision-less table, or nothing."""


def default_collisionless() -> TableConfig:
    """The collision-less table of a slot unless configured: admitted at the 2nd occurrence, kept
    forever, sparse Adagrad (lr 0.05), rows uniform in +-0.05 (as Monolith's online ranker)."""
    return TableConfig(init_scale=0.05, filter=FilterConfig(kind="counting", threshold=2),
                       optimizer=OptimizerConfig(kind="adagrad", lr=0.05))


class RowInputs(Protocol):
    """What :class:`RowFeatures` reads of a batch: one entry per row (``RankBatch`` has them)."""

    user_id: torch.Tensor
    item_id: torch.Tensor
    author_id: torch.Tensor
    topic_id: torch.Tensor
    surface: torch.Tensor
    cand_emb: torch.Tensor
    counters: torch.Tensor | None


@dataclass(frozen=True)
class RowFeatureConfig:
    """Id embeddings plus the candidate content embedding: the non-sequence features.

    Args:
        hash_buckets: rows of each hashed id table (user, item, author, topic); ids are taken modulo it.
        id_dim: width of each id embedding.
        surface_dim: width of the surface embedding (one row per surface code).
        user_id: embed the user id (and, in wide&deep, cross it with topic and author). Off,
            a model knows the user only through the sequences, as at production scale where
            per-user id tables cannot be learned; on, it can memorise each user's training rows.
        tables: slot (:data:`ID_SLOTS`) -> ``"hashed"``, ``"collisionless"`` or ``"off"``
            (:data:`TABLE_KINDS`), e.g. ``{item: collisionless, user: off}``. A slot not named
            keeps the default: hashed, and the user ``"hashed"`` if ``user_id`` else ``"off"``.
        collisionless: the table of every collision-less slot (its ``dim`` is ``id_dim``, its
            ``seed`` offset per slot so that equal raw ids of two slots start apart).
        counters: append the row's engagement counters as of its request (item, item in the
            last day, user, user on this item: shown count and per-head rate;
            :mod:`lifelong.data.counters`). They rank items no training row has seen and follow
            rate shifts; rows built before counters existed lack them (rebuild).

    Example::

        >>> RowFeatureConfig(id_dim=8).out_dim  # 3 ids x 8 + surface 8 + content 32
        64
        >>> RowFeatureConfig(id_dim=8, user_id=True).out_dim
        72
        >>> cfg = RowFeatureConfig(id_dim=8, tables={"item": "collisionless", "user": "collisionless", "topic": "off"})
        >>> cfg.out_dim, cfg.kinds, cfg.collisionless_slots  # 3 ids x 8 + 8 + 32
        (64, {'user': 'collisionless', 'item': 'collisionless', 'author': 'hashed', 'topic': 'off'}, ('user', 'item'))
        >>> RowFeatureConfig(id_dim=8, counters=True).out_dim  # + 4 scopes x (shown + 4 heads)
        84
    """

    hash_buckets: int = 2**16
    id_dim: int = 16
    surface_dim: int = 8
    user_id: bool = False
    tables: dict[str, str] = field(default_factory=dict)
    collisionless: TableConfig = field(default_factory=default_collisionless)
    counters: bool = False

    def __post_init__(self) -> None:
        check_dims("hash_buckets, id_dim, surface_dim", (self.hash_buckets, self.id_dim, self.surface_dim))
        object.__setattr__(self, "tables", dict(self.tables))
        for slot, kind in self.tables.items():
            check(slot in ID_SLOTS, f"tables: unknown id slot {slot!r}; slots are {', '.join(ID_SLOTS)}")
            check(kind in TABLE_KINDS, f"tables.{slot}: {kind!r} is not one of {', '.join(TABLE_KINDS)}")

    @property
    def kinds(self) -> dict[str, str]:
        """Slot -> what it reads, for every slot of :data:`ID_SLOTS` (defaults filled in)."""
        default = {"user": "hashed" if self.user_id else "off"}
        return {slot: self.tables.get(slot, default.get(slot, "hashed")) for slot in ID_SLOTS}

    @property
    def collisionless_slots(self) -> tuple[str, ...]:
        return tuple(slot for slot, kind in self.kinds.items() if kind == "collisionless")

    def table_config(self, slot: str) -> TableConfig:
        """The collision-less table of ``slot``: :attr:`collisionless`, ``id_dim`` wide, seeded per slot."""
        t = self.collisionless
        seed = (t.seed + 1 + ID_SLOTS.index(slot)) % 2**64
        return dataclasses.replace(t, dim=self.id_dim, seed=seed, filter=dataclasses.replace(t.filter, seed=seed))

    @property
    def out_dim(self) -> int:
        used = sum(kind != "off" for kind in self.kinds.values())
        return used * self.id_dim + self.surface_dim + EMBED_DIM + (N_COUNTER_FEATURES if self.counters else 0)



class RowFeatures(nn.Module):
    """Embeddings of a row's ids and surface, concatenated with the candidate content embedding.

    Args:
        cfg: table sizes and widths; the output has ``cfg.out_dim`` columns.

    Example::

        >>> RowFeatures(RowFeatureConfig(id_dim=4, surface_dim=4, user_id=True)).out_dim  # 4 ids x 4 + 4 + 32
        52
        >>> sorted(RowFeatures(RowFeatureConfig(tables={"item": "collisionless"})).tables)
        ['item']
    """

    def __init__(self, cfg: RowFeatureConfig):
        super().__init__()
        self.out_dim = cfg.out_dim
        self.counters = cfg.counters
        kinds = cfg.kinds

        def make(slot: str) -> nn.Module | None:
            if kinds[slot] == "off":
                return None
            if kinds[slot] == "collisionless":
                return CollisionlessEmbedding(cfg.table_config(slot))
            return HashedEmbedding(cfg.hash_buckets, cfg.id_dim)

        # Attribute names (user, item, author, topic) are those of the hashed tables' state_dict keys.
        self.user, self.item, self.author, self.topic = (make(slot) for slot in ID_SLOTS)
        self.surface = HashedEmbedding(len(SURFACES), cfg.surface_dim)

    @property
    def tables(self) -> dict[str, CollisionlessEmbedding]:
        """Slot -> its collision-less table (only the slots configured so)."""
        return {slot: m for slot in ID_SLOTS if isinstance(m := getattr(self, slot), CollisionlessEmbedding)}

    def forward(self, batch: RowInputs) -> torch.Tensor:
        ids = (batch.user_id, batch.item_id, batch.author_id, batch.topic_id)
        parts = [m(i) for m, i in zip((self.user, self.item, self.author, self.topic), ids) if m is not None]
        parts += [self.surface(batch.surface), batch.cand_emb]
        if self.counters:
            if batch.counters is None:
                raise ValueError("the model reads engagement counters (row.counters) and these rows carry none: "
                                 "rebuild them with `lifelong transact build`")
            parts.append(batch.counters)
        return torch.cat(parts, dim=-1)
