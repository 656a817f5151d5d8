"""Typed configurations of the rankers, validated on construction.

Every ranker takes one frozen dataclass. ``apply_overrides`` turns a plain mapping (a parsed
YAML section, CLI flags) into a new config, converting nested mappings and lists, so that a
typo in a key is a :class:`~lifelong.core.errors.ConfigError` instead of a silently ignored field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lifelong.core.config import apply_overrides, check, check_dims
from lifelong.data.schema import EMBED_DIM, HEADS
from lifelong.modules.row_features import RowFeatureConfig
from lifelong.transact.sequence_layout import SequenceLayout


@dataclass(frozen=True)
class TransActConfig:
    """TransAct V2 (all four blocks) or TransAct v1 (``blocks=("rt",)``).

    Args:
        layout: block sizes of ``S_all`` in the batch.
        blocks: the blocks of ``S_all`` the encoder reads, in layout order.
        n_heads: number of ranking heads (logits).
        row: hashed id features.
        early_fusion: concatenate the candidate embedding to every token (d_model = 64);
            without it tokens are the item embeddings alone (d_model = 32).
        token_similarity: add each token's dot product with the candidate, times a learned
            d_model vector, to the token (off: the paper's plain concatenation). Attention over
            ``concat(e_j, e_c)`` can learn how alike a token and the candidate are only through
            products of projections; this hands it the similarity NN selection ranks by. On
            by default: it won the ablation on three world seeds for both encoders
            (docs/results.md).
        n_layers, attn_heads, ffn_dim, dropout: the transformer encoder. Dropout defaults to
            0: the encoder is tiny, and on CPU sampling dropout masks over (B, S, d) tokens
            costs about half of a training step.
        pool_dim: width of the linear layer applied before max-pooling the encoder output.
        cross_layers: DCN-v2 cross layers (full-rank W).
        mlp_dims: hidden widths of the MLP after the cross network.
        user_tokens: ``(R, C)`` of a frozen DV365 user embedding (``RankBatch.user_emb``) whose
            R rows, projected to d_model, are prepended as tokens before the blocks read;
            None: no user tokens.

    Example::

        >>> TransActConfig.v1().blocks, TransActConfig().d_model
        (('rt',), 64)
    """

    layout: SequenceLayout = field(default_factory=SequenceLayout)
    blocks: tuple[str, ...] = SequenceLayout.BLOCKS
    n_heads: int = len(HEADS)
    row: RowFeatureConfig = field(default_factory=RowFeatureConfig)
    early_fusion: bool = True
    token_similarity: bool = True
    n_layers: int = 2
    attn_heads: int = 1
    ffn_dim: int = 32
    dropout: float = 0.0
    pool_dim: int = 64
    cross_layers: int = 3
    mlp_dims: tuple[int, ...] = (256, 128)
    user_tokens: tuple[int, int] | None = None

    @classmethod
    def v1(cls, **overrides: Any) -> TransActConfig:
        """TransAct v1: the real-time block only, early fusion, causal attention."""
        return dataclasses.replace(cls(blocks=("rt",)), **overrides)

    def __post_init__(self) -> None:
        known = SequenceLayout.BLOCKS
        check(len(self.blocks) > 0 and all(b in known for b in self.blocks),
               f"blocks must be a non-empty subset of {known}, got {self.blocks}")
        check(list(self.blocks) == [b for b in known if b in self.blocks],
               f"blocks must be distinct and in layout order {known}, got {self.blocks}")
        check(self.seq_len > 0, f"blocks {self.blocks} have no tokens in {self.layout}")
        check_dims("n_heads, n_layers, attn_heads, ffn_dim, pool_dim",
                    (self.n_heads, self.n_layers, self.attn_heads, self.ffn_dim, self.pool_dim))
        check_dims("mlp_dims", self.mlp_dims)
        check(self.cross_layers >= 0, f"cross_layers must be >= 0, got {self.cross_layers}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.d_model % self.attn_heads == 0,
               f"d_model {self.d_model} is not divisible by attn_heads {self.attn_heads}")
        check(self.user_tokens is None or (len(self.user_tokens) == 2 and min(self.user_tokens) > 0),
               f"user_tokens must be (rows, dim) > 0, got {self.user_tokens}")

    @property
    def d_model(self) -> int:
        return 2 * EMBED_DIM if self.early_fusion else EMBED_DIM

    @property
    def seq_len(self) -> int:
        return sum(getattr(self.layout, b) for b in self.blocks)


@dataclass(frozen=True)
class BSTConfig:
    """Behavior Sequence Transformer over the real-time block, candidate as an extra token.

    Args:
        layout: block sizes of ``S_all`` in the batch (only ``rt`` is read).
        n_heads: number of ranking heads (logits).
        row: hashed id features.
        d_model, n_layers, attn_heads, ffn_dim, dropout: the (bidirectional) encoder.
        mlp_dims: hidden widths of the MLP on pooled sequence + row features.

    Example::

        >>> BSTConfig().n_layers
        1
    """

    layout: SequenceLayout = field(default_factory=SequenceLayout)
    n_heads: int = len(HEADS)
    row: RowFeatureConfig = field(default_factory=RowFeatureConfig)
    d_model: int = 32
    n_layers: int = 1
    attn_heads: int = 2
    ffn_dim: int = 64
    dropout: float = 0.0
    mlp_dims: tuple[int, ...] = (256, 128)

    def __post_init__(self) -> None:
        check_dims("n_heads, d_model, n_layers, attn_heads, ffn_dim",
                    (self.n_heads, self.d_model, self.n_layers, self.attn_heads, self.ffn_dim))
        check_dims("mlp_dims", self.mlp_dims)
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.d_model % self.attn_heads == 0,
               f"d_model {self.d_model} is not divisible by attn_heads {self.attn_heads}")


@dataclass(frozen=True)
class WideDeepConfig:
    """Wide & deep without sequences.

    Args:
        layout: block sizes of ``S_all`` (unused; kept so every config carries the layout).
        n_heads: number of ranking heads (logits).
        row: hashed id features of the deep part.
        wide_buckets: rows of each wide table (single ids and hashed id crosses).
        mlp_dims: hidden widths of the deep MLP.

    Example::

        >>> WideDeepConfig(n_heads=2).mlp_dims
        (256, 128)
    """

    layout: SequenceLayout = field(default_factory=SequenceLayout)
    n_heads: int = len(HEADS)
    row: RowFeatureConfig = field(default_factory=RowFeatureConfig)
    wide_buckets: int = 2**18
    mlp_dims: tuple[int, ...] = (256, 128)

    def __post_init__(self) -> None:
        check_dims("n_heads, wide_buckets", (self.n_heads, self.wide_buckets))
        check_dims("mlp_dims", self.mlp_dims)


ModelConfig = TransActConfig | BSTConfig | WideDeepConfig

__all__ = ["BSTConfig", "ModelConfig", "RowFeatureConfig", "TransActConfig", "WideDeepConfig", "apply_overrides"]
