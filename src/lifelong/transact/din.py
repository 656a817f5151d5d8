"""DIN: Deep Interest Network target attention over ``S_all`` (Zhou et al., KDD 2018).

The recipe for a new ranker in one file: a frozen config (with ``layout`` and ``n_heads``), an
``nn.Module`` declaring its abilities (:mod:`lifelong.transact.abilities`) and one line in
:mod:`lifelong.transact.registry`. The trainer, evaluation and both serving paths then take it
through those abilities: it reads blocks of ``S_all`` (all four by default) but is not causal
(each candidate's pooled interest sees every token, so no ``rt_states`` and no Next Action
Loss), reads no user tokens and has no token-table path (the optimized service gathers its
rows and runs ``forward``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lifelong.core.config import check, check_dims
from lifelong.data.schema import EMBED_DIM, HEADS
from lifelong.modules.heads import ModelOutput
from lifelong.modules.layers import MLP, TokenContext
from lifelong.modules.row_features import RowFeatureConfig, RowFeatures
from lifelong.modules.target_attention import TargetAttention
from lifelong.transact.abilities import Abilities
from lifelong.transact.batch import RankBatch
from lifelong.transact.sequence_layout import SequenceLayout


@dataclass(frozen=True)
class DINConfig:
    """DIN over blocks of ``S_all``.

    Args:
        layout: block sizes of ``S_all`` in the batch.
        blocks: the blocks read, in layout order (default all four).
        n_heads: number of ranking heads (logits).
        row: hashed id features.
        d_model: width of the projected tokens and candidate.
        attention_dims: hidden widths of the activation unit.
        mlp_dims: hidden widths of the MLP over [interest, candidate, row features].
        dropout: dropout after each MLP layer.

    Example::

        >>> DINConfig().blocks == SequenceLayout.BLOCKS, DINConfig().seq_len
        (True, 192)
    """

    layout: SequenceLayout = field(default_factory=SequenceLayout)
    blocks: tuple[str, ...] = SequenceLayout.BLOCKS
    n_heads: int = len(HEADS)
    row: RowFeatureConfig = field(default_factory=RowFeatureConfig)
    d_model: int = 32
    attention_dims: tuple[int, ...] = (64, 32)
    mlp_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        known = SequenceLayout.BLOCKS
        check(len(self.blocks) > 0 and list(self.blocks) == [b for b in known if b in self.blocks],
              f"blocks must be a non-empty, distinct subset of {known} in layout order, got {self.blocks}")
        check(self.seq_len > 0, f"blocks {self.blocks} have no tokens in {self.layout}")
        check_dims("n_heads, d_model", (self.n_heads, self.d_model))
        check_dims("attention_dims", self.attention_dims)
        check_dims("mlp_dims", self.mlp_dims)
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def seq_len(self) -> int:
        return sum(getattr(self.layout, b) for b in self.blocks)


class DIN(nn.Module):
    """Target attention of the candidate over the tokens read, then an MLP with one logit per head.

    A token is its projected item embedding plus action, surface and position embeddings
    (:class:`~lifelong.modules.layers.TokenContext`); the query is the projected candidate.
    The interest ``Σ_j a(x_j, q) x_j`` (:class:`~lifelong.modules.target_attention.TargetAttention`)
    joins the query and the row features in an MLP.

    Example::

        model = DIN(DINConfig(layout=batch_layout, n_heads=4))
        model(batch).logits.shape  # (B, 4); rt_states is None
    """

    @classmethod
    def abilities_for(cls, cfg: DINConfig) -> Abilities:
        """Reads ``cfg.blocks``; not causal; no user tokens; no token-table path."""
        return Abilities(blocks=cfg.blocks, counters=cfg.row.counters)

    @property
    def abilities(self) -> Abilities:
        return self.abilities_for(self.cfg)

    @property
    def logit_layers(self) -> tuple[nn.Module, ...]:
        """The layers whose outputs sum to the logits (``fold_logit_calibration`` scales them)."""
        return (self.out,)

    def __init__(self, cfg: DINConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("token_index", cfg.layout.positions(cfg.blocks), persistent=False)
        self.item_proj = nn.Linear(EMBED_DIM, cfg.d_model)
        self.token_context = TokenContext(cfg.d_model, cfg.seq_len)
        self.attention = TargetAttention(cfg.d_model, cfg.attention_dims)
        self.row = RowFeatures(cfg.row)
        self.mlp = MLP(2 * cfg.d_model + self.row.out_dim, cfg.mlp_dims, cfg.dropout)
        self.out = nn.Linear(self.mlp.out_dim, cfg.n_heads)

    def interest(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pooled interest ``(B, d)``, the query ``(B, d)`` and the attention weights ``(B, S')``."""
        read = self.token_index
        valid = batch.seq_valid[:, read]
        x = self.item_proj(batch.seq_emb[:, read]) + self.token_context(batch.seq_action[:, read],
                                                                         batch.seq_surface[:, read])
        query = self.item_proj(batch.cand_emb)
        pooled, weights = self.attention(x, query, valid)
        return pooled, query, weights

    def forward(self, batch: RankBatch) -> ModelOutput:
        pooled, query, _ = self.interest(batch)
        return ModelOutput(logits=self.out(self.mlp(torch.cat([pooled, query, self.row(batch)], dim=-1))))
