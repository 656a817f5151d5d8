"""DV365's Funnel Summarization Arch (FSA) and the encoders of the paper's comparison (Table 2).

The user tower's input is the pooled slice tokens ``X ∈ [N, D]`` (N slices × id types, D
columns per token). Every encoder here maps a batch of matrices ``(B, R, C_in)`` to
``(B, R, C_out)``: its learned maps act on the last axis (C) and are **shared by the R rows**
(the transformer's attention also mixes rows). The *view* decides which axis is which:

- ``token`` (the paper's choice): the transposed ``X^T ∈ [D, N]``. Each of the D rows is a
  "token" of length N, so the encoders compress the N slices to ``C_out`` while every
  column of the embeddings is treated alike: ``[D, N] -> [D, C_out]``.
- ``dim``: ``X`` itself, ``[N, D] -> [N, C_out]``: each slice token is compressed on its own.

Encoders (``FSAConfig.encoders``; several run in parallel and their outputs are stacked along
the rows, so the output is ``(B, R · n_encoders, C_out)``, flattened by the consumer):

- ``lce``: the linear compression encoder, one ``C_in -> C_out`` linear map;
- ``mlp``: ``C_in -> hidden -> C_out`` with a ReLU;
- ``transformer``: post-norm encoder layers at width ``C_in``, then a linear map to ``C_out``;
- ``funnel``: the funnel transformer: blocks of encoder layers; between blocks a strided mean
  pooling over the C axis (the slice-token axis in the token view) shortens it by
  ``pool_stride``; a linear map to ``C_out`` after the last block;
- ``none``: no compression (the identity; ``C_out = C_in``), alone only.

The FSA proper is ``FSAConfig(view="token", encoders=("funnel", "lce"))``, the default.

Example::

    >>> fsa = FunnelSummarizationArch(n_tokens=12, dim=4, cfg=FSAConfig(out_cols=3, funnel_blocks=2))
    >>> fsa.out_shape, tuple(fsa(torch.randn(5, 12, 4)).shape)  # (2 encoders x 4 rows, 3)
    ((8, 3), (5, 8, 3))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lifelong.core.errors import ConfigError
from lifelong.modules.layers import EncoderLayer

VIEWS = ("token", "dim")
ENCODERS = ("lce", "mlp", "transformer", "funnel", "none")


@dataclass(frozen=True)
class FSAConfig:
    """The user tower's summarisation arch.

    Args:
        view: ``token`` (encoders act on the slice axis, shared by the embedding columns) or
            ``dim`` (act on the embedding columns, shared by the slices).
        encoders: encoders run in parallel, outputs stacked along the rows (see module doc).
        out_cols: C_out, the compressed length of the C axis.
        mlp_hidden: hidden width of the ``mlp`` encoder.
        transformer_layers: layers of the ``transformer`` encoder.
        funnel_blocks: blocks of the ``funnel`` encoder (pooling between consecutive blocks).
        layers_per_block: encoder layers per funnel block.
        pool_stride: stride (and window) of the funnel's mean pooling.
        n_heads: attention heads; must divide every width attention runs at (1 always does).
        ffn_dim: feed-forward width of the encoder layers.
        dropout: dropout of the encoder layers.

    Example::

        >>> FSAConfig(encoders=("none", "lce"))
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: FSA encoder 'none' (no compression) cannot be combined with others, got ('none', 'lce')
    """

    view: str = "token"
    encoders: tuple[str, ...] = ("funnel", "lce")
    out_cols: int = 32
    mlp_hidden: int = 64
    transformer_layers: int = 2
    funnel_blocks: int = 2
    layers_per_block: int = 1
    pool_stride: int = 2
    n_heads: int = 1
    ffn_dim: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoders", tuple(self.encoders))
        if self.view not in VIEWS:
            raise ConfigError(f"unknown FSA view {self.view!r}; choose one of {', '.join(VIEWS)}")
        if not self.encoders:
            raise ConfigError("the FSA needs at least one encoder")
        for name in self.encoders:
            if name not in ENCODERS:
                raise ConfigError(f"unknown FSA encoder {name!r}; choose from {', '.join(ENCODERS)}")
        if "none" in self.encoders and len(self.encoders) > 1:
            raise ConfigError(f"FSA encoder 'none' (no compression) cannot be combined with others, got {self.encoders}")
        for key in ("out_cols", "mlp_hidden", "transformer_layers", "funnel_blocks", "layers_per_block",
                    "n_heads", "ffn_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"FSA {key} must be >= 1, got {getattr(self, key)}")
        if self.pool_stride < 2:
            raise ConfigError(f"FSA pool_stride must be >= 2, got {self.pool_stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"FSA dropout must be in [0, 1), got {self.dropout}")


def _layers(width: int, n: int, cfg: FSAConfig) -> nn.ModuleList:
    if width % cfg.n_heads:
        raise ConfigError(f"FSA n_heads={cfg.n_heads} does not divide the attention width {width}")
    return nn.ModuleList(EncoderLayer(width, cfg.n_heads, cfg.ffn_dim, cfg.dropout) for _ in range(n))


class LinearCompression(nn.Linear):
    """The linear compression encoder (LCE): ``(B, R, C_in) -> (B, R, C_out)``, one map for all rows."""


class MLPCompression(nn.Sequential):
    """``C_in -> hidden -> C_out`` with a ReLU, one MLP for all rows."""

    def __init__(self, c_in: int, hidden: int, c_out: int):
        super().__init__(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))


class TransformerCompression(nn.Module):
    """Encoder layers over the R rows at width ``C_in`` (no mask), then a linear map to ``C_out``."""

    def __init__(self, c_in: int, c_out: int, cfg: FSAConfig):
        super().__init__()
        self.layers = _layers(c_in, cfg.transformer_layers, cfg)
        self.out = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, None)
        return self.out(x)


class FunnelCompression(nn.Module):
    """The funnel transformer: blocks of encoder layers, strided mean pooling of C between blocks.

    Block ``b`` runs at width ``w_b`` with ``w_0 = C_in`` and ``w_{b+1} = ceil(w_b / stride)``
    (a short last window averages what is left); a linear map takes ``w_last`` to ``C_out``.

    Example::

        >>> funnel = FunnelCompression(10, 3, FSAConfig(funnel_blocks=3, pool_stride=2))
        >>> funnel.widths, tuple(funnel(torch.randn(2, 4, 10)).shape)
        ((10, 5, 3), (2, 4, 3))
    """

    def __init__(self, c_in: int, c_out: int, cfg: FSAConfig):
        super().__init__()
        widths = [c_in]
        for _ in range(cfg.funnel_blocks - 1):
            widths.append(math.ceil(widths[-1] / cfg.pool_stride))
        self.widths = tuple(widths)
        self.stride = cfg.pool_stride
        self.blocks = nn.ModuleList(_layers(w, cfg.layers_per_block, cfg) for w in widths)
        self.out = nn.Linear(widths[-1], c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b, block in enumerate(self.blocks):
            if b:
                x = F.avg_pool1d(x, self.stride, self.stride, ceil_mode=True)
            for layer in block:
                x = layer(x, None)
        return self.out(x)


def build_encoder(name: str, c_in: int, cfg: FSAConfig) -> nn.Module:
    """One encoder of :data:`ENCODERS` mapping ``(B, R, c_in) -> (B, R, cfg.out_cols)`` (``none``: c_in)."""
    if name == "lce":
        return LinearCompression(c_in, cfg.out_cols)
    if name == "mlp":
        return MLPCompression(c_in, cfg.mlp_hidden, cfg.out_cols)
    if name == "transformer":
        return TransformerCompression(c_in, cfg.out_cols, cfg)
    if name == "funnel":
        return FunnelCompression(c_in, cfg.out_cols, cfg)
    if name == "none":
        return nn.Identity()
    raise ConfigError(f"unknown FSA encoder {name!r}; choose from {', '.join(ENCODERS)}")


class FunnelSummarizationArch(nn.Module):
    """Summarise pooled slice tokens ``(B, N, D)`` into ``(B, R, C)`` (see the module docstring).

    Args:
        n_tokens: N, tokens per user.
        dim: D, columns per token.
        cfg: view and encoders.

    Attributes:
        out_shape: ``(R, C)``: ``R = rows · n_encoders`` with ``rows = D`` (token view) or
            ``N`` (dim view); ``C = cfg.out_cols`` (``N`` or ``D`` without compression).
    """

    def __init__(self, n_tokens: int, dim: int, cfg: FSAConfig = FSAConfig()):
        super().__init__()
        self.cfg = cfg
        rows, cols = (dim, n_tokens) if cfg.view == "token" else (n_tokens, dim)
        self.encoders = nn.ModuleList(build_encoder(name, cols, cfg) for name in cfg.encoders)
        self.out_shape = (rows * len(cfg.encoders), cols if cfg.encoders == ("none",) else cfg.out_cols)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.transpose(1, 2) if self.cfg.view == "token" else tokens
        return torch.cat([encoder(x) for encoder in self.encoders], dim=1)
