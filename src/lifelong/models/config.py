"""Typed configurations of the rankers, validated on construction.

Every ranker takes one frozen dataclass. ``apply_overrides`` turns a plain mapping (a parsed
YAML section, CLI flags) into a new config, converting nested mappings and lists, so that a
typo in a key is a :class:`~lifelong.errors.ConfigError` instead of a silently ignored field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lifelong.data.schema import EMBED_DIM, HEADS
from lifelong.errors import ConfigError
from lifelong.models.batch import SequenceLayout


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_dims(name: str, dims: tuple[int, ...]) -> None:
    _check(all(isinstance(d, int) and d > 0 for d in dims), f"{name} must be positive ints, got {dims}")


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
        _check_dims("hash_buckets, id_dim, surface_dim", (self.hash_buckets, self.id_dim, self.surface_dim))

    @property
    def out_dim(self) -> int:
        return (4 if self.user_id else 3) * self.id_dim + self.surface_dim + EMBED_DIM


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
    n_layers: int = 2
    attn_heads: int = 1
    ffn_dim: int = 32
    dropout: float = 0.0
    pool_dim: int = 64
    cross_layers: int = 3
    mlp_dims: tuple[int, ...] = (256, 128)
    user_tokens: tuple[int, int] | None = None

    @classmethod
    def v1(cls, **overrides: Any) -> "TransActConfig":
        """TransAct v1: the real-time block only, early fusion, causal attention."""
        return dataclasses.replace(cls(blocks=("rt",)), **overrides)

    def __post_init__(self) -> None:
        known = SequenceLayout.BLOCKS
        _check(len(self.blocks) > 0 and all(b in known for b in self.blocks),
               f"blocks must be a non-empty subset of {known}, got {self.blocks}")
        _check(list(self.blocks) == [b for b in known if b in self.blocks],
               f"blocks must be distinct and in layout order {known}, got {self.blocks}")
        _check(self.seq_len > 0, f"blocks {self.blocks} have no tokens in {self.layout}")
        _check_dims("n_heads, n_layers, attn_heads, ffn_dim, pool_dim",
                    (self.n_heads, self.n_layers, self.attn_heads, self.ffn_dim, self.pool_dim))
        _check_dims("mlp_dims", self.mlp_dims)
        _check(self.cross_layers >= 0, f"cross_layers must be >= 0, got {self.cross_layers}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.d_model % self.attn_heads == 0,
               f"d_model {self.d_model} is not divisible by attn_heads {self.attn_heads}")
        _check(self.user_tokens is None or (len(self.user_tokens) == 2 and min(self.user_tokens) > 0),
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
        _check_dims("n_heads, d_model, n_layers, attn_heads, ffn_dim",
                    (self.n_heads, self.d_model, self.n_layers, self.attn_heads, self.ffn_dim))
        _check_dims("mlp_dims", self.mlp_dims)
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.d_model % self.attn_heads == 0,
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
        _check_dims("n_heads, wide_buckets", (self.n_heads, self.wide_buckets))
        _check_dims("mlp_dims", self.mlp_dims)


ModelConfig = TransActConfig | BSTConfig | WideDeepConfig
C = TypeVar("C")


def _coerce(hint: Any, value: Any) -> Any:
    """YAML and JSON give lists where the config declares tuples (which keep it hashable)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if isinstance(value, list) and any(typing.get_origin(h) is tuple for h in options):
        return tuple(value)
    return value


def apply_overrides(cfg: C, overrides: Mapping[str, Any]) -> C:
    """A copy of ``cfg`` with ``overrides`` applied; nested mappings update nested configs.

    Raises:
        ConfigError: an override names no field of the config, or a value is invalid.

    Example::

        >>> apply_overrides(TransActConfig(), {"layout": {"rt": 16}, "mlp_dims": [64]}).layout.rt
        16
        >>> apply_overrides(BSTConfig(), {"d_modle": 8})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lifelong.errors.ConfigError: BSTConfig has no field 'd_modle'; fields are ...
    """
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"{type(cfg).__name__} has no field {key!r}; fields are {', '.join(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = apply_overrides(current, value)
        else:
            changes[key] = _coerce(hints[key], value)
    try:
        return dataclasses.replace(cfg, **changes)
    except TypeError as exc:
        raise ConfigError(f"invalid {type(cfg).__name__}: {exc}") from exc
