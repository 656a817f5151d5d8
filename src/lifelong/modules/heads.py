"""What a ranker returns, and the ranking loss over its heads.

Logits stay logits: the sigmoid belongs to the loss (``binary_cross_entropy_with_logits`` is
stable where ``sigmoid`` then ``log`` is not) and to evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ModelOutput:
    """Output of every ranker's ``forward``.

    Args:
        logits: (B, H) one logit per ranking head, in the order of the batch's label columns.
        rt_states: (B, r, 32) encoder outputs at the ``S_RT[:r]`` positions projected to the
            item-embedding space (zero at padding), the queries of the Next Action Loss; None
            for models without a causal real-time encoder.
    """

    logits: torch.Tensor
    rt_states: torch.Tensor | None = None


def ranking_loss(logits: torch.Tensor, labels: torch.Tensor,
                 head_weights: Sequence[float] | torch.Tensor | None = None,
                 row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE: ``sum_h w_h * mean_b BCE(logits[b, h], labels[b, h])``.

    Args:
        logits: (B, H) raw logits.
        labels: (B, H) 0/1 labels.
        head_weights: H non-negative weights; None weighs every head 1. These are training
            weights, not the (possibly negative) weights of the final ranking score.
        row_weights: (B,) importance weights of the rows (e.g. ``1 / rate`` for down-sampled
            negatives); the mean is then weighted by them. None weighs every row 1.

    Example::

        >>> round(float(ranking_loss(torch.zeros(2, 2), torch.ones(2, 2), [1.0, 0.5])), 4)
        1.0397
    """
    if logits.shape != labels.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must both be (B, H)")
    per_row = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if row_weights is None:
        per_head = per_row.mean(dim=0)
    else:
        w_row = row_weights.to(per_row.dtype).unsqueeze(1)
        per_head = (per_row * w_row).sum(dim=0) / w_row.sum()
    if head_weights is None:
        return per_head.sum()
    w = torch.as_tensor(head_weights, dtype=per_head.dtype, device=per_head.device)
    if w.shape != per_head.shape:
        raise ValueError(f"{w.numel()} head weights for {per_head.numel()} heads")
    if (w < 0).any():
        raise ValueError("head weights must be non-negative")
    return (w * per_head).sum()
