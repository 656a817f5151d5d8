"""DIN's target attention: a candidate-conditioned weighted sum of sequence tokens (Zhou et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lifelong.modules.layers import MLP


class TargetAttention(nn.Module):
    """Activation unit + weighted sum: ``u = Σ_j a(x_j, q) · x_j`` over the real tokens.

    ``a`` is an MLP over ``[x_j, q, x_j − q, x_j ⊙ q]`` with one output per token; as in DIN the
    weights are not softmax-normalised, so the sum keeps the intensity of the user's interest.
    Padding tokens weigh 0; a row without a real token gives zeros. Each row's result depends
    only on its own tokens and candidate: there is no attention between tokens.

    Args:
        dim: width of the tokens and the query.
        hidden: hidden widths of the activation unit's MLP.

    Example::

        >>> att = TargetAttention(4, (8,))
        >>> u, w = att(torch.randn(2, 3, 4), torch.randn(2, 4), torch.tensor([[True, False, True], [False] * 3]))
        >>> u.shape, w[0, 1].item(), u[1].abs().sum().item()
        (torch.Size([2, 4]), 0.0, 0.0)
    """

    def __init__(self, dim: int, hidden: Sequence[int]):
        super().__init__()
        self.mlp = MLP(4 * dim, hidden)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: torch.Tensor, query: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``(B, d)`` and the weights ``(B, S)`` of tokens ``x`` ``(B, S, d)`` for ``query`` ``(B, d)``."""
        q = query.unsqueeze(1).expand_as(x)
        w = self.out(self.mlp(torch.cat([x, q, x - q, x * q], dim=-1))).squeeze(-1).masked_fill(~valid, 0.0)
        return torch.einsum("bs,bsd->bd", w, x), w
