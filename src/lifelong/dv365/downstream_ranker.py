"""A DLRM ranker that can consume the frozen DV365 user embedding (downstream integration 1).

DLRM (Naumov et al., 2019): a bottom MLP maps the dense features to a D-wide vector; each
sparse id has a D-wide embedding; the interaction is either the pairwise dot products of all
those vectors (plus the dense vector itself) or their plain concatenation; a top MLP ends in
one logit per binary task, trained with :func:`~lifelong.modules.heads.ranking_loss`.

With ``user_embedding=(R, C)`` the de-quantized DV365 embedding is flattened, linearly
projected to D (:class:`~lifelong.dv365.projection.EmbeddingProjection`) and concatenated to
the interaction's vectors as one more feature, so it is crossed with every id like they are
with each other. Without it the same ranker is the baseline of the downstream experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lifelong.core.errors import ConfigError
from lifelong.dv365.projection import EmbeddingProjection
from lifelong.modules.layers import MLP, HashedEmbedding

INTERACTIONS = ("dot", "cat")


@dataclass(frozen=True)
class DLRMRankerConfig:
    """A DLRM ranker, with or without the DV365 embedding.

    Args:
        n_dense: dense features per row.
        sparse_buckets: rows of each sparse feature's hashed table (ids are taken modulo it),
            one entry per sparse feature.
        n_tasks: binary tasks (one logit each).
        embed_dim: D, width of every embedding and of the bottom MLP's output.
        bottom_dims: hidden widths of the bottom MLP (a final layer to D is added).
        top_dims: hidden widths of the top MLP (a final layer to ``n_tasks`` is added).
        interaction: ``dot`` (pairwise dot products, DLRM's default) or ``cat``.
        user_embedding: ``(R, C)`` of the DV365 embedding the ranker reads; None: without it.
        sparse_grad: the id tables produce sparse gradients (train them with
            ``torch.optim.SparseAdam``), so a step's cost does not grow with the tables' sizes.

    Example::

        >>> DLRMRankerConfig(n_dense=3, sparse_buckets=(100, 10), user_embedding=(4, 8)).n_vectors
        4
    """

    n_dense: int
    sparse_buckets: tuple[int, ...]
    n_tasks: int = 4
    embed_dim: int = 16
    bottom_dims: tuple[int, ...] = (64,)
    top_dims: tuple[int, ...] = (128, 64)
    interaction: str = "dot"
    user_embedding: tuple[int, int] | None = None
    sparse_grad: bool = False

    def __post_init__(self) -> None:
        sizes = (self.n_dense, self.n_tasks, self.embed_dim, *self.sparse_buckets, *self.bottom_dims, *self.top_dims)
        if min(sizes) <= 0:
            raise ConfigError(f"DLRM ranker sizes must be positive: {self}")
        if self.interaction not in INTERACTIONS:
            raise ConfigError(f"unknown DLRM interaction {self.interaction!r}; choose one of {', '.join(INTERACTIONS)}")
        if self.user_embedding is not None and (len(self.user_embedding) != 2 or min(self.user_embedding) <= 0):
            raise ConfigError(f"user_embedding must be (rows, dim) > 0, got {self.user_embedding}")

    @property
    def n_vectors(self) -> int:
        """D-wide vectors entering the interaction: dense, one per sparse feature, the embedding."""
        return 1 + len(self.sparse_buckets) + (self.user_embedding is not None)


class DLRMRanker(nn.Module):
    """DLRM with optional DV365 embedding input; ``forward`` returns (B, n_tasks) logits.

    Args:
        cfg: the configuration.

    Example::

        >>> model = DLRMRanker(DLRMRankerConfig(n_dense=3, sparse_buckets=(100, 10), n_tasks=2,
        ...                                     user_embedding=(4, 8)))
        >>> model(torch.randn(5, 3), torch.randint(0, 1000, (5, 2)), torch.randn(5, 4, 8)).shape
        torch.Size([5, 2])
    """

    def __init__(self, cfg: DLRMRankerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.bottom = nn.Sequential(MLP(cfg.n_dense, cfg.bottom_dims), nn.Linear(cfg.bottom_dims[-1], d))
        self.sparse = nn.ModuleList(HashedEmbedding(n, d, sparse=cfg.sparse_grad) for n in cfg.sparse_buckets)
        for table in self.sparse:
            # Unit-variance rows would make the pairwise dot products start with variance D.
            nn.init.normal_(table.weight, std=d**-0.5)
        self.user = None if cfg.user_embedding is None else EmbeddingProjection(*cfg.user_embedding, d)
        f = cfg.n_vectors
        top_in = d + f * (f - 1) // 2 if cfg.interaction == "dot" else f * d
        self.register_buffer("pairs", torch.triu_indices(f, f, offset=1), persistent=False)
        self.top = nn.Sequential(MLP(top_in, cfg.top_dims), nn.Linear(cfg.top_dims[-1], cfg.n_tasks))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, user_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from (B, n_dense) floats, (B, n_sparse) int64 ids and, when configured, the
        (B, R, C) frozen user embedding."""
        if (user_emb is None) != (self.user is None):
            raise ValueError("pass user_emb exactly when the ranker is configured with user_embedding")
        x = self.bottom(dense)
        vectors = [x] + [table(sparse[:, i]) for i, table in enumerate(self.sparse)]
        if self.user is not None:
            vectors.append(self.user(user_emb))
        z = torch.stack(vectors, dim=1)  # (B, F, D)
        if self.cfg.interaction == "dot":
            dots = torch.bmm(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
            features = torch.cat([x, dots], dim=1)
        else:
            features = z.flatten(1)
        return self.top(features)
