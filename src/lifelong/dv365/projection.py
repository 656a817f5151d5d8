"""How a downstream model reads the frozen DV365 user embedding: a linear or a gated projection.

The exported embedding arrives de-quantized as a ``(U, R, C)`` float tensor (R summary rows
of width C). Downstream models never train it: it is an input, like a dense feature, so no
gradient reaches whatever produced it. :class:`EmbeddingProjection` flattens it to ``R·C``
features and projects them to the width the consuming model needs, either directly
(``gate=False``, the paper's plain linear projection) or after a :class:`GateNet`, which
re-weights each of the ``R·C`` features per user before the projection (the paper's choice
for retrieval).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lifelong.core.errors import ConfigError
from lifelong.modules.layers import MLP


class GateNet(nn.Module):
    """Feature-wise gating: ``GateNet(x) = 2·σ(MLP(x)) ⊙ x``.

    Each feature of ``x`` is scaled by a gate in (0, 2) computed from all of ``x``. The gate's
    output layer starts at zero, so an untrained GateNet is the identity (every gate is
    ``2·σ(0) = 1``) and training starts from the plain projection it refines.

    Args:
        dim: width of ``x`` (and of the output).
        hidden: hidden widths of the gate MLP.

    Example::

        >>> g = GateNet(6, hidden=(4,))
        >>> x = torch.randn(3, 6)
        >>> bool(torch.equal(g(x), x))
        True
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64,)):
        super().__init__()
        self.mlp = MLP(dim, hidden)
        self.gate = nn.Linear(self.mlp.out_dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.gate(self.mlp(x))) * x


class EmbeddingProjection(nn.Module):
    """Projects a frozen ``(B, R, C)`` user embedding to ``(B, out_dim)``.

    Args:
        rows: R, summary rows of the embedding.
        dim: C, width of each row.
        out_dim: width of the projection.
        gate: put a :class:`GateNet` over the ``R·C`` flattened features before the projection.
        gate_hidden: hidden widths of the GateNet's MLP.

    Raises:
        ConfigError: a non-positive size.

    Example::

        >>> proj = EmbeddingProjection(rows=4, dim=8, out_dim=16, gate=True)
        >>> proj(torch.randn(2, 4, 8)).shape
        torch.Size([2, 16])
    """

    def __init__(self, rows: int, dim: int, out_dim: int, gate: bool = False, gate_hidden: Sequence[int] = (64,)):
        super().__init__()
        if min(rows, dim, out_dim) <= 0:
            raise ConfigError(f"embedding projection sizes must be positive, got rows={rows} dim={dim} out_dim={out_dim}")
        self.rows, self.dim = rows, dim
        self.gate = GateNet(rows * dim, gate_hidden) if gate else None
        self.linear = nn.Linear(rows * dim, out_dim)

    def forward(self, user_emb: torch.Tensor) -> torch.Tensor:
        if user_emb.shape[1:] != (self.rows, self.dim):
            raise ValueError(f"user embedding {tuple(user_emb.shape)} is not (B, {self.rows}, {self.dim})")
        # detach: the embedding is a frozen export; nothing upstream may be trained through it.
        x = user_emb.detach().flatten(1)
        return self.linear(self.gate(x) if self.gate is not None else x)
