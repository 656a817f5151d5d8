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


def fit_logit_calibration(logits: torch.Tensor, labels: torch.Tensor, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ``(scale, shift)`` minimising the log loss of ``scale * logit + shift`` (Platt scaling).

    L-BFGS with a strong-Wolfe line search on the two parameters of each head, all heads at once
    (the log loss is convex in them). A head whose labels are all one class keeps ``(1, 0)``:
    there is nothing to fit.

    Args:
        logits: (n, H) a model's logits on held-out rows.
        labels: (n, H) their 0/1 labels.
        iters: the most L-BFGS iterations.

    Example::

        >>> z = torch.linspace(-4, 4, 4000).unsqueeze(1)
        >>> y = (torch.rand(4000, 1, generator=torch.Generator().manual_seed(0)) < torch.sigmoid(0.5 * z - 1)).float()
        >>> scale, shift = fit_logit_calibration(3 * z, y)  # logits 6x too confident, and biased
        >>> round(float(scale), 2), round(float(shift), 1)
        (0.17, -1.0)
    """
    z, y = logits.detach().double(), labels.detach().double()
    both = (y.min(0).values < y.max(0).values).double()
    params = torch.zeros(2, z.shape[1], dtype=torch.float64, requires_grad=True)  # log-free: scale = 1 + params[0]
    opt = torch.optim.LBFGS([params], max_iter=iters, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        scaled = (1 + params[0] * both) * z + params[1] * both
        value = F.binary_cross_entropy_with_logits(scaled, y, reduction="sum") / max(z.shape[0], 1)
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        return (1 + params[0] * both).float(), (params[1] * both).float()


def fold_logit_calibration(layers: Sequence[torch.nn.Module], scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``Σ layer(x)`` (a model's logits, :attr:`logit_layers`) return ``scale * Σ layer(x) + shift``.

    The calibration becomes part of the weights, so every path that scores with them (training
    code, evaluation, both serving paths) scores calibrated logits with nothing new to run. A
    ``Linear`` holds one row per head (its bias takes the shift); an ``Embedding``/``EmbeddingBag``
    summed into the logits (wide&deep's wide part) holds one column per head.
    """
    with torch.no_grad():
        shifted = False
        for layer in layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(scale.unsqueeze(1))
                if layer.bias is not None:
                    layer.bias.mul_(scale)
                    if not shifted:
                        layer.bias.add_(shift)
                        shifted = True
            elif isinstance(layer, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                layer.weight.mul_(scale.unsqueeze(0))
            else:
                raise TypeError(f"cannot fold a calibration into a {type(layer).__name__}")
        if not shifted:
            raise ValueError("no logit layer has a bias to take the calibration's shift")
