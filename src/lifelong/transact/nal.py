"""Next Action Loss (TransAct V2 §3.3): each real-time state must point at the next positive item.

For every position t of the ``S_RT[:r]`` block with a next positive (``nal_pos_valid``), the
query is the L2-normalised ``rt_states[b, t]``; it must score the normalised next positive
``nal_pos_emb[b, t]`` above normalised negatives, with cosine logits divided by a temperature:

* ``negatives="impression"``: the row's own impression negatives ``nal_neg_emb[b]``, items the
  user was shown without engaging. A batch with no valid impression negative at all (MovieLens
  has no impressions) falls back to in-batch negatives for that batch.
* ``negatives="in_batch"``: the next positives of rows of *other* users of the batch, de-duplicated
  per (user, item) and capped at ``max_in_batch`` by a random subset (drawn from ``generator``,
  so a seeded generator or ``torch.manual_seed`` makes it deterministic).

Accidental hits, negatives with the positive's item id, are masked: logit -inf in the sampled
softmax, excluded from the BCE variant. Positions without a valid positive or without any
valid negative contribute nothing; the loss is the mean over the positions that do, and 0
(still attached to the graph) when none does. The trainer adds it as ``L_CE + w_NAL * L_NAL``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lifelong.core.errors import ConfigError
from lifelong.transact.batch import RankBatch

Negatives = Literal["impression", "in_batch"]
LossKind = Literal["softmax", "bce"]


def _impression_negatives(batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row negatives (B, M, D) and which of them may serve each position (B, r, M)."""
    ok = batch.nal_neg_valid.unsqueeze(1) & (batch.nal_neg_item.unsqueeze(1) != batch.nal_pos_item.unsqueeze(2))
    return F.normalize(batch.nal_neg_emb, dim=-1), ok


def _in_batch_negatives(batch: RankBatch, max_in_batch: int,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared negatives (K, D) from the batch's positives and which may serve each position (B, r, K)."""
    rows, cols = batch.nal_pos_valid.nonzero(as_tuple=True)
    users, items = batch.user_id[rows], batch.nal_pos_item[rows, cols]
    # Rows of one request repeat the user's sequence: keep each (user, item) pair once so the
    # sample is not dominated by the users with most candidates in the batch.
    pairs, inverse = torch.unique(torch.stack([users, items], dim=1), dim=0, return_inverse=True)
    first = torch.full((pairs.shape[0],), rows.numel(), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(rows.numel(), device=rows.device), reduce="amin")
    if first.numel() > max_in_batch:
        pick = torch.randperm(first.numel(), generator=generator, device="cpu")[:max_in_batch]
        first = first[pick.to(first.device)]
    emb = F.normalize(batch.nal_pos_emb[rows[first], cols[first]], dim=-1)
    other_user = users[first].unsqueeze(0) != batch.user_id.unsqueeze(1)  # (B, K)
    not_hit = items[first].view(1, 1, -1) != batch.nal_pos_item.unsqueeze(2)  # (B, r, K)
    return emb, other_user.unsqueeze(1) & not_hit


def next_action_loss(rt_states: torch.Tensor, batch: RankBatch, negatives: Negatives = "impression",
                     loss: LossKind = "softmax", temperature: float = 0.05, max_in_batch: int = 256,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The Next Action Loss of a batch (a scalar), see the module docstring.

    Args:
        rt_states: (B, r, D) the model's ``ModelOutput.rt_states``.
        batch: the batch the states were computed from (its ``nal_*`` fields).
        negatives: ``"impression"`` (with in-batch fallback) or ``"in_batch"``.
        loss: ``"softmax"`` (sampled softmax cross-entropy over [positive, negatives]) or
            ``"bce"`` (BCE of the positive towards 1 plus mean BCE of the negatives towards 0).
        temperature: divides the cosine logits.
        max_in_batch: cap on the number of in-batch negatives.
        generator: random source of the in-batch subset (a CPU generator).

    Example::

        out = model(batch)
        loss = ranking_loss(out.logits, batch.labels) + 0.01 * next_action_loss(out.rt_states, batch)
    """
    if negatives not in ("impression", "in_batch"):
        raise ConfigError(f"unknown NAL negatives {negatives!r}; choose 'impression' or 'in_batch'")
    if loss not in ("softmax", "bce"):
        raise ConfigError(f"unknown NAL loss {loss!r}; choose 'softmax' or 'bce'")
    if temperature <= 0:
        raise ConfigError(f"NAL temperature must be positive, got {temperature}")
    if rt_states.shape != batch.nal_pos_emb.shape:
        raise ValueError(f"rt_states {tuple(rt_states.shape)} do not match nal_pos_emb "
                         f"{tuple(batch.nal_pos_emb.shape)}")

    q = F.normalize(rt_states, dim=-1)
    pos_logit = (q * F.normalize(batch.nal_pos_emb, dim=-1)).sum(-1) / temperature  # (B, r)
    if negatives == "impression" and bool(batch.nal_neg_valid.any()):
        neg, ok = _impression_negatives(batch)
        neg_logit = torch.einsum("brd,bmd->brm", q, neg) / temperature
    else:
        neg, ok = _in_batch_negatives(batch, max_in_batch, generator)
        neg_logit = torch.einsum("brd,kd->brk", q, neg) / temperature

    active = batch.nal_pos_valid & ok.any(-1)
    if not bool(active.any()):
        return rt_states.sum() * 0.0
    if loss == "softmax":
        # The positive's logit is always finite, so each logsumexp row is finite.
        all_logits = torch.cat([pos_logit.unsqueeze(-1), neg_logit.masked_fill(~ok, float("-inf"))], dim=-1)
        per_position = torch.logsumexp(all_logits, dim=-1) - pos_logit
    else:
        okf = ok.to(neg_logit.dtype)
        neg_term = (F.softplus(neg_logit) * okf).sum(-1) / okf.sum(-1).clamp_min(1.0)
        per_position = F.softplus(-pos_logit) + neg_term
    return per_position[active].mean()
