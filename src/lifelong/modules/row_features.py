"""The non-sequence features of a ranking row: hashed id embeddings, the surface and the
candidate's content embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lifelong.core.config import check_dims
from lifelong.data.schema import EMBED_DIM, SURFACES
from lifelong.modules.layers import HashedEmbedding


class RowInputs(Protocol):
    """What :class:`RowFeatures` reads of a batch: one entry per row (``RankBatch`` has them)."""

    user_id: torch.Tensor
    item_id: torch.Tensor
    author_id: torch.Tensor
    topic_id: torch.Tensor
    surface: torch.Tensor
    cand_emb: torch.Tensor


@dataclass(frozen=True)
class RowFeatureConfig:
    """Hashed id embeddings plus the candidate content embedding: the non-sequence features.

    Args:
        hash_buckets: rows of each id table (user, item, author, topic); ids are taken modulo it.
        id_dim: width of each id embedding.
        surface_dim: width of the surface embedding (one row per surface code).
        user_id: embed the user id (and, in wide&deep, cross it with topic and author). Off,
            a model knows the user only through the sequences, as at production scale where
            per-user id tables cannot be learned; on, it can memorise each user's training rows.

    Example::

        >>> RowFeatureConfig(id_dim=8).out_dim  # 3 ids x 8 + surface 8 + content 32
        64
        >>> RowFeatureConfig(id_dim=8, user_id=True).out_dim
        72
    """

    hash_buckets: int = 2**16
    id_dim: int = 16
    surface_dim: int = 8
    user_id: bool = False

    def __post_init__(self) -> None:
        check_dims("hash_buckets, id_dim, surface_dim", (self.hash_buckets, self.id_dim, self.surface_dim))

    @property
    def out_dim(self) -> int:
        return (4 if self.user_id else 3) * self.id_dim + self.surface_dim + EMBED_DIM



class RowFeatures(nn.Module):
    """Embeddings of a row's ids and surface, concatenated with the candidate content embedding.

    Args:
        cfg: table sizes and widths; the output has ``cfg.out_dim`` columns.

    Example::

        >>> RowFeatures(RowFeatureConfig(id_dim=4, surface_dim=4, user_id=True)).out_dim  # 4 ids x 4 + 4 + 32
        52
    """

    def __init__(self, cfg: RowFeatureConfig):
        super().__init__()
        self.out_dim = cfg.out_dim
        self.user = HashedEmbedding(cfg.hash_buckets, cfg.id_dim) if cfg.user_id else None
        self.item = HashedEmbedding(cfg.hash_buckets, cfg.id_dim)
        self.author = HashedEmbedding(cfg.hash_buckets, cfg.id_dim)
        self.topic = HashedEmbedding(cfg.hash_buckets, cfg.id_dim)
        self.surface = HashedEmbedding(len(SURFACES), cfg.surface_dim)

    def forward(self, batch: RowInputs) -> torch.Tensor:
        parts = [self.item(batch.item_id), self.author(batch.author_id), self.topic(batch.topic_id),
                 self.surface(batch.surface), batch.cand_emb]
        if self.user is not None:
            parts.insert(0, self.user(batch.user_id))
        return torch.cat(parts, dim=-1)
