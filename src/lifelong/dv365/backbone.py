"""DV365's backbone simulation network: a DLRM that trains the user tower end to end.

The tower's output for a user (``(R, C)``, flattened) is projected to ``user_vectors``
embedding-width vectors, the user's only representation here (no user-id embedding, so every
bit the model knows about the user comes through the tower). Per example:

- **dense**: the candidate's content embedding, whether it is a video and its log duration,
  through a bottom MLP to one embedding-width vector;
- **sparse**: hashed item, author and topic embeddings, and the surface;
- **interaction**: the dot products of every pair of those vectors and the user vectors
  (DLRM's), concatenated with the bottom MLP's output;
- **top MLP** to one logit per binary task and one watch-time prediction.

The loss is ``L = Σ_k BCE_k + α · MSE(watch)`` (:func:`backbone_loss`), the watch-time target
being ``log1p(dwell_s)``.

Example::

    >>> net = BackboneSimulation(user_shape=(6, 4), cfg=BackboneConfig(emb_dim=8, hash_buckets=64))
    >>> user = torch.randn(2, 6, 4)  # two users' tower outputs
    >>> batch = ExampleFeatures(group=torch.tensor([0, 0, 1]), dense=torch.randn(3, N_DENSE),
    ...                         sparse=torch.tensor([[1, 2, 3, 0], [4, 5, 6, 1], [7, 8, 9, 2]]))
    >>> out = net(user, batch)
    >>> tuple(out.logits.shape), tuple(out.watch.shape)
    ((3, 4), (3,))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lifelong.core.errors import ConfigError
from lifelong.data.schema import EMBED_DIM, SURFACES
from lifelong.modules.layers import MLP, HashedEmbedding

TASKS: tuple[str, ...] = ("click", "repin", "long_view", "hide")
"""The binary tasks, each an action bit of the example's impression event."""

N_DENSE = EMBED_DIM + 2
"""Dense features per example: content embedding, is-video, log1p(duration_s)."""

SPARSE = ("item", "author", "topic", "surface")
N_SPARSE = len(SPARSE)


@dataclass(frozen=True)
class BackboneConfig:
    """The DLRM around the user tower.

    Args:
        emb_dim: width of every embedding vector that enters the interaction.
        hash_buckets: rows of the item, author and topic tables (``id mod buckets``). Few by
            default: trained on ~200k examples over 200k items, 32k rows memorised item ids
            and the evaluation NE rose with every epoch; 1,024 rows keep the 256 topics apart.
        user_vectors: vectors the flattened tower output is projected to; 0 leaves the user
            tower out (the no-user-embedding baseline).
        bottom_dims: hidden widths of the dense features' bottom MLP (its output is emb_dim).
        top_dims: hidden widths of the top MLP.
        watch_weight: α, the watch-time MSE's weight in the loss.

    Example::

        >>> BackboneConfig(user_vectors=-1)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: backbone user_vectors must be >= 0, got -1
    """

    emb_dim: int = 16
    hash_buckets: int = 2**10
    user_vectors: int = 4
    bottom_dims: tuple[int, ...] = (64,)
    top_dims: tuple[int, ...] = (128, 64)
    watch_weight: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "bottom_dims", tuple(self.bottom_dims))
        object.__setattr__(self, "top_dims", tuple(self.top_dims))
        if self.user_vectors < 0:
            raise ConfigError(f"backbone user_vectors must be >= 0, got {self.user_vectors}")
        if self.emb_dim < 1 or self.hash_buckets < 1 or min((*self.bottom_dims, *self.top_dims), default=1) < 1:
            raise ConfigError("backbone emb_dim, hash_buckets and MLP widths must be >= 1")
        if self.watch_weight < 0:
            raise ConfigError(f"backbone watch_weight must be >= 0, got {self.watch_weight}")


@dataclass
class ExampleFeatures:
    """The per-example inputs of a batch.

    Args:
        group: (B,) the row of the batch's user tensor each example belongs to.
        dense: (B, N_DENSE) float32 dense features.
        sparse: (B, N_SPARSE) int64 ids, columns in :data:`SPARSE` order.
    """

    group: torch.Tensor
    dense: torch.Tensor
    sparse: torch.Tensor


@dataclass
class BackboneOutput:
    """``logits`` (B, len(TASKS)) per binary task and ``watch`` (B,) predicted log1p(dwell_s)."""

    logits: torch.Tensor
    watch: torch.Tensor


class BackboneSimulation(nn.Module):
    """The DLRM backbone (see the module docstring).

    Args:
        user_shape: ``(R, C)`` of the user tower's output.
        cfg: widths and the loss weight.
    """

    def __init__(self, user_shape: tuple[int, int], cfg: BackboneConfig = BackboneConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.emb_dim
        self.user_proj = nn.Linear(user_shape[0] * user_shape[1], cfg.user_vectors * d) if cfg.user_vectors else None
        bottom = MLP(N_DENSE, cfg.bottom_dims)
        self.bottom = nn.Sequential(bottom, nn.Linear(bottom.out_dim, d))
        self.item = HashedEmbedding(cfg.hash_buckets, d)
        self.author = HashedEmbedding(cfg.hash_buckets, d)
        self.topic = HashedEmbedding(cfg.hash_buckets, d)
        self.surface = nn.Embedding(len(SURFACES), d)
        for table in (self.item, self.author, self.topic, self.surface):
            nn.init.normal_(table.weight, std=d**-0.5)
        n_vectors = 1 + N_SPARSE + cfg.user_vectors
        self._pairs = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.top = MLP(d + self._pairs.shape[1], cfg.top_dims)
        self.out = nn.Linear(self.top.out_dim, len(TASKS) + 1)

    def forward(self, user: torch.Tensor, batch: ExampleFeatures) -> BackboneOutput:
        """Score a batch: ``user`` (G, R, C) tower outputs, ``batch.group`` indexes into G."""
        d = self.cfg.emb_dim
        bottom = self.bottom(batch.dense)
        sparse = batch.sparse
        vectors = [bottom, self.item(sparse[:, 0]), self.author(sparse[:, 1]), self.topic(sparse[:, 2]),
                   self.surface(sparse[:, 3])]
        if self.user_proj is not None:
            # Project once per user, then gather per example: a user has many examples.
            per_user = self.user_proj(user.flatten(1)).view(user.shape[0], -1, d)
            vectors += list(per_user[batch.group].unbind(1))
        stacked = torch.stack(vectors, dim=1)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))[:, self._pairs[0], self._pairs[1]]
        out = self.out(self.top(torch.cat([bottom, dots], dim=1)))
        return BackboneOutput(out[:, :-1], out[:, -1])


def backbone_loss(out: BackboneOutput, labels: torch.Tensor, watch: torch.Tensor,
                  watch_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, Σ_k BCE_k, MSE)`` with ``L = Σ_k BCE_k + α · MSE``.

    Args:
        out: the backbone's output.
        labels: (B, len(TASKS)) 0/1 labels.
        watch: (B,) watch-time targets (log1p of dwell seconds).
        watch_weight: α.

    Example::

        >>> out = BackboneOutput(torch.zeros(2, 4), torch.zeros(2))
        >>> [round(float(x), 4) for x in backbone_loss(out, torch.ones(2, 4), torch.ones(2), 0.5)]
        [3.2726, 2.7726, 1.0]
    """
    bce = F.binary_cross_entropy_with_logits(out.logits, labels.to(out.logits.dtype), reduction="none").mean(0).sum()
    mse = F.mse_loss(out.watch, watch.to(out.watch.dtype))
    return bce + watch_weight * mse, bce, mse
