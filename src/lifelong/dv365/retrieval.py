"""A two-tower retrieval model that can consume the frozen DV365 user embedding (integration 3).

The user tower reads the user's own features (dense counts, hashed ids) and, when configured,
the de-quantized DV365 embedding through a plain linear projection or through a
:class:`~lifelong.dv365.projection.GateNet` then the projection (the paper's variant); the item
tower reads the item's content embedding and hashed ids. Both end L2-normalised, so a score is
a cosine. Training is an in-batch sampled softmax: each (user, engaged item) pair of a batch
must score its item above the other items of the batch, with accidental hits (the same item
elsewhere in the batch) masked and an optional logQ correction for the popularity with which
items enter batches (Yi et al., 2019). :func:`hit_rate_at_k` ranks a whole corpus per user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lifelong.core.errors import ConfigError
from lifelong.data.schema import EMBED_DIM
from lifelong.dv365.projection import EmbeddingProjection
from lifelong.modules.layers import MLP, HashedEmbedding

PROJECTIONS = ("linear", "gatenet")


@dataclass(frozen=True)
class TwoTowerConfig:
    """Sizes of the two towers.

    Args:
        n_user_dense: dense features of the user tower.
        user_buckets: rows of each hashed user id table (e.g. the user id), one per feature.
        item_buckets: rows of each hashed item id table (e.g. item, author, topic).
        id_dim: width of every id embedding.
        content_dim: width of the item content embedding.
        hidden: hidden widths of each tower's MLP.
        out_dim: width of the (normalised) tower outputs.
        user_embedding: ``(R, C)`` of the DV365 embedding the user tower reads; None: without.
        projection: how the user tower reads it: ``linear`` or ``gatenet``.
        embedding_dim: width the DV365 embedding is projected to inside the user tower.
        temperature: divides the cosine logits of the sampled softmax.
        sparse_grad: the id tables produce sparse gradients (for ``torch.optim.SparseAdam``).

    Example::

        >>> TwoTowerConfig(n_user_dense=2, user_buckets=(64,), item_buckets=(100, 10)).out_dim
        32
    """

    n_user_dense: int
    user_buckets: tuple[int, ...]
    item_buckets: tuple[int, ...]
    id_dim: int = 16
    content_dim: int = EMBED_DIM
    hidden: tuple[int, ...] = (128,)
    out_dim: int = 32
    user_embedding: tuple[int, int] | None = None
    projection: str = "linear"
    embedding_dim: int = 64
    temperature: float = 0.05
    sparse_grad: bool = False

    def __post_init__(self) -> None:
        sizes = (self.n_user_dense + 1, self.id_dim, self.content_dim, self.out_dim, self.embedding_dim,
                 *self.user_buckets, *self.item_buckets, *self.hidden)
        if min(sizes) <= 0:
            raise ConfigError(f"two-tower sizes must be positive: {self}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"unknown projection {self.projection!r}; choose one of {', '.join(PROJECTIONS)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")


class TwoTower(nn.Module):
    """User and item towers with L2-normalised outputs.

    Args:
        cfg: the configuration.

    Example::

        >>> cfg = TwoTowerConfig(n_user_dense=2, user_buckets=(64,), item_buckets=(100,), user_embedding=(4, 8),
        ...                      projection="gatenet")
        >>> model = TwoTower(cfg)
        >>> u = model.user_vectors(torch.randn(3, 2), torch.randint(0, 64, (3, 1)), torch.randn(3, 4, 8))
        >>> v = model.item_vectors(torch.randn(5, 32), torch.randint(0, 100, (5, 1)))
        >>> (u @ v.T).shape
        torch.Size([3, 5])
    """

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.user_ids = nn.ModuleList(HashedEmbedding(n, cfg.id_dim, sparse=cfg.sparse_grad) for n in cfg.user_buckets)
        self.item_ids = nn.ModuleList(HashedEmbedding(n, cfg.id_dim, sparse=cfg.sparse_grad) for n in cfg.item_buckets)
        for table in (*self.user_ids, *self.item_ids):
            # On the scale of the unit-norm content embedding, not N(0, 1) per entry.
            nn.init.normal_(table.weight, std=cfg.id_dim**-0.5)
        self.embedding = None
        user_in = cfg.n_user_dense + len(cfg.user_buckets) * cfg.id_dim
        if cfg.user_embedding is not None:
            self.embedding = EmbeddingProjection(*cfg.user_embedding, cfg.embedding_dim,
                                                 gate=cfg.projection == "gatenet")
            user_in += cfg.embedding_dim
        self.user_mlp = nn.Sequential(MLP(user_in, cfg.hidden), nn.Linear(cfg.hidden[-1], cfg.out_dim))
        item_in = cfg.content_dim + len(cfg.item_buckets) * cfg.id_dim
        self.item_mlp = nn.Sequential(MLP(item_in, cfg.hidden), nn.Linear(cfg.hidden[-1], cfg.out_dim))

    def user_vectors(self, dense: torch.Tensor, sparse: torch.Tensor,
                     user_emb: torch.Tensor | None = None) -> torch.Tensor:
        """(B, out_dim) unit vectors from (B, n_user_dense) floats, (B, n_user_sparse) ids and,
        when configured, the (B, R, C) frozen DV365 embedding."""
        if (user_emb is None) != (self.embedding is None):
            raise ValueError("pass user_emb exactly when the tower is configured with user_embedding")
        parts = [dense] + [table(sparse[:, i]) for i, table in enumerate(self.user_ids)]
        if self.embedding is not None:
            parts.append(self.embedding(user_emb))
        return F.normalize(self.user_mlp(torch.cat(parts, dim=1)), dim=-1)

    def item_vectors(self, content: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """(N, out_dim) unit vectors from (N, content_dim) content embeddings and (N, n_item_sparse) ids."""
        parts = [content] + [table(sparse[:, i]) for i, table in enumerate(self.item_ids)]
        return F.normalize(self.item_mlp(torch.cat(parts, dim=1)), dim=-1)


def in_batch_softmax_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_ids: torch.Tensor,
                          temperature: float, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy of B (user, item) pairs against the batch's other items.

    Args:
        user_vecs, item_vecs: (B, D) tower outputs of the pairs (row b is one pair).
        item_ids: (B,) item ids; a column holding the row's own item (an accidental hit) is
            masked, whatever its position.
        temperature: divides the logits.
        log_q: (B,) log-probability that each column's item is sampled into a batch; subtracted
            from its logits (logQ correction) so popular items are not over-penalised.

    Example::

        >>> u = torch.eye(3)
        >>> loss = in_batch_softmax_loss(u, u, torch.tensor([7, 8, 9]), temperature=0.1)
        >>> round(float(loss), 4)
        0.0001
    """
    logits = user_vecs @ item_vecs.T / temperature
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    hit = item_ids.unsqueeze(1) == item_ids.unsqueeze(0)
    hit.fill_diagonal_(False)
    logits = logits.masked_fill(hit, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)


@torch.no_grad()
def hit_rate_at_k(user_vecs: torch.Tensor, item_vecs: torch.Tensor, query_user: np.ndarray, query_item: np.ndarray,
                  ks: Sequence[int] = (1, 10), chunk: int = 64) -> dict[int, float]:
    """HitRate@K: the share of (user, engaged item) queries whose item ranks in the user's top K.

    Each user's scores rank the whole corpus ``item_vecs``; a query's item is a hit at K when
    fewer than K corpus items score strictly higher than it, not counting the user's other
    queried items (each of them is a right answer too, and must not push this one out).

    Args:
        user_vecs: (U, D) user vectors; ``query_user`` indexes its rows.
        item_vecs: (N, D) corpus vectors; ``query_item`` indexes its rows.
        query_user, query_item: (Q,) one query per (user, engaged item) pair, unique pairs.
        ks: cut-offs.
        chunk: users scored at once (memory: ``chunk × N`` floats).

    Example::

        >>> users, items = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
        >>> hit_rate_at_k(users, items, np.array([0, 0, 1]), np.array([0, 2, 0]), ks=(1, 2))
        {1: 0.6666666666666666, 2: 0.6666666666666666}
    """
    query_user, query_item = np.asarray(query_user, dtype=np.int64), np.asarray(query_item, dtype=np.int64)
    if query_user.size == 0:
        return {k: float("nan") for k in ks}
    users, local, per_user = np.unique(query_user, return_inverse=True, return_counts=True)
    k_max = max(ks)
    hit_within = np.empty(query_user.size, dtype=np.int64)
    for a in range(0, users.size, chunk):
        mine = np.flatnonzero((local >= a) & (local < a + chunk))
        scores = user_vecs[torch.from_numpy(users[a:a + chunk])] @ item_vecs.T  # (c, N), once per user
        # Only the top k_max + (the user's queries) scores can decide a hit: an item below all
        # of them has at least that many items above it, at most queries - 1 of them excused.
        top = scores.topk(min(k_max + int(per_user[a:a + chunk].max()), scores.shape[1]), dim=1).values
        row = torch.from_numpy(local[mine] - a)
        own = scores[row, torch.from_numpy(query_item[mine])]
        higher = (top[row] > own.unsqueeze(1)).sum(1)
        # The user's other queried items that outscore this one leave the count: a (q, q)
        # comparison among the chunk's queries, restricted to pairs of the same user.
        same_user = row.unsqueeze(0) == row.unsqueeze(1)
        higher -= (same_user & (own.unsqueeze(0) > own.unsqueeze(1))).sum(1)
        higher[own < top[row, -1]] = k_max
        hit_within[mine] = higher.numpy()
    return {k: float((hit_within < k).mean()) for k in ks}
