"""Baselines of the TransAct V2 paper's Table 2: wide & deep (no sequence) and BST.

Neither exposes ``rt_states``: wide & deep has no sequence, and BST's bidirectional attention
lets every real-time position see the next action, which would make the Next Action Loss a
copy task.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong.data.schema import EMBED_DIM
from lifelong.modules.heads import ModelOutput
from lifelong.modules.layers import MLP, TokenContext, TransformerEncoder, masked_mean_pool, padding_attention_mask
from lifelong.modules.row_features import RowFeatures
from lifelong.transact.abilities import Abilities
from lifelong.transact.batch import RankBatch
from lifelong.transact.config import BSTConfig, WideDeepConfig

_HASH_PRIME = 2_147_483_647  # 2^31 - 1: every intermediate of hash_ids stays below 2^52
_HASH_MULT = 1_000_003


def hash_ids(*ids: torch.Tensor, salt: int, buckets: int) -> torch.Tensor:
    """Hash the tuple of int64 ids (element-wise) with a salt into ``[0, buckets)``.

    Example::

        >>> a = hash_ids(torch.tensor([5]), torch.tensor([7]), salt=1, buckets=1000)
        >>> b = hash_ids(torch.tensor([7]), torch.tensor([5]), salt=1, buckets=1000)
        >>> bool(a != b) and 0 <= int(a) < 1000
        True
    """
    h = torch.full_like(ids[0], salt + 1)
    for x in ids:
        h = torch.remainder(h * _HASH_MULT + torch.remainder(x, _HASH_PRIME), _HASH_PRIME)
    return torch.remainder(h, buckets)


class WideDeep(nn.Module):
    """Wide & deep: a linear model over hashed ids and id crosses, plus an MLP over row features.

    The wide part is one learned H-vector per hashed (field, value): single ids (item, author,
    topic, surface) and the crosses surface x item, surface x topic — with ``row.user_id`` also
    the user and the crosses user x topic, user x author — all sharing one table
    (``EmbeddingBag`` summing a row's fields).

    Args:
        cfg: the configuration.

    Example::

        model = WideDeep(WideDeepConfig(n_heads=4))
        model(batch).logits.shape  # (B, 4); rt_states is None
    """

    @classmethod
    def abilities_for(cls, cfg: WideDeepConfig) -> Abilities:
        """No sequence: no block read, no NAL, no user tokens, no token-table path."""
        return Abilities(counters=cfg.row.counters)

    @property
    def abilities(self) -> Abilities:
        return self.abilities_for(self.cfg)

    @property
    def logit_layers(self) -> tuple[nn.Module, ...]:
        """The layers whose outputs sum to the logits (``fold_logit_calibration`` scales them)."""
        return (self.deep_out, self.wide)

    def __init__(self, cfg: WideDeepConfig):
        super().__init__()
        self.cfg = cfg
        self.wide = nn.EmbeddingBag(cfg.wide_buckets, cfg.n_heads, mode="sum")
        nn.init.zeros_(self.wide.weight)
        self.row = RowFeatures(cfg.row)
        self.deep = MLP(self.row.out_dim, cfg.mlp_dims)
        self.deep_out = nn.Linear(self.deep.out_dim, cfg.n_heads)

    def _wide_index(self, b: RankBatch) -> torch.Tensor:
        fields = [(b.item_id,), (b.author_id,), (b.topic_id,), (b.surface,), (b.surface, b.item_id),
                  (b.surface, b.topic_id)]
        if self.cfg.row.user_id:
            fields += [(b.user_id,), (b.user_id, b.topic_id), (b.user_id, b.author_id)]
        return torch.stack([hash_ids(*f, salt=i, buckets=self.cfg.wide_buckets) for i, f in enumerate(fields)], 1)

    def forward(self, batch: RankBatch) -> ModelOutput:
        wide = self.wide(self._wide_index(batch))
        deep = self.deep_out(self.deep(self.row(batch)))
        return ModelOutput(logits=wide + deep)


class BST(nn.Module):
    """Behavior Sequence Transformer over ``S_RT[:r]`` with the candidate as a last token.

    No early fusion: a token is its projected item embedding plus action, surface and position
    embeddings; the candidate token is the projected candidate embedding plus the request
    surface and the last position. Attention is bidirectional (padding mask only). The
    candidate token's output and the mean over all real tokens' outputs join the row features
    in an MLP with one logit per head.

    Args:
        cfg: the configuration.

    Example::

        model = BST(BSTConfig(layout=batch_layout, n_heads=4))
        model(batch).logits.shape  # (B, 4); rt_states is None
    """

    @classmethod
    def abilities_for(cls, cfg: BSTConfig) -> Abilities:
        """Reads ``S_RT[:r]``; bidirectional, so not causal (no NAL)."""
        return Abilities(blocks=("rt",), counters=cfg.row.counters)

    @property
    def abilities(self) -> Abilities:
        return self.abilities_for(self.cfg)

    @property
    def logit_layers(self) -> tuple[nn.Module, ...]:
        """The layers whose outputs sum to the logits (``fold_logit_calibration`` scales them)."""
        return (self.out,)

    def __init__(self, cfg: BSTConfig):
        super().__init__()
        self.cfg = cfg
        self.rt = cfg.layout.block_slice("rt")
        r = cfg.layout.rt
        self.item_proj = nn.Linear(EMBED_DIM, cfg.d_model)
        self.token_context = TokenContext(cfg.d_model, r + 1)
        self.encoder = TransformerEncoder(cfg.d_model, cfg.n_layers, cfg.attn_heads, cfg.ffn_dim, cfg.dropout)
        self.row = RowFeatures(cfg.row)
        self.mlp = MLP(2 * cfg.d_model + self.row.out_dim, cfg.mlp_dims, cfg.dropout)
        self.out = nn.Linear(self.mlp.out_dim, cfg.n_heads)

    def forward(self, batch: RankBatch) -> ModelOutput:
        emb = torch.cat([batch.seq_emb[:, self.rt], batch.cand_emb.unsqueeze(1)], dim=1)
        action = torch.cat([batch.seq_action[:, self.rt], torch.zeros_like(batch.surface).unsqueeze(1)], dim=1)
        surface = torch.cat([batch.seq_surface[:, self.rt], batch.surface.unsqueeze(1)], dim=1)
        valid = torch.cat([batch.seq_valid[:, self.rt], torch.ones_like(batch.seq_valid[:, :1])], dim=1)
        x = self.item_proj(emb) + self.token_context(action, surface)
        h = self.encoder(x, padding_attention_mask(valid))
        pooled = torch.cat([h[:, -1], masked_mean_pool(h, valid)], dim=-1)
        logits = self.out(self.mlp(torch.cat([pooled, self.row(batch)], dim=-1)))
        return ModelOutput(logits=logits)
